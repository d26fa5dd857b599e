"""One finetuning run's state in the sidecar: model, data, optimizer, step.

The sidecar's methods (python/nanotune/methods/train.py) are thin wire wrappers
around a Session; a plain Python loop can drive the same Session in process,
which is how tests show that a TS-driven run equals a Python-driven one and how
bench/controller.py measures the bridge's overhead.

TS decides *when* and *how much* (lr per step, when the mask refreshes, which
criterion and densities); the Session does the work. NanoAdam is therefore
created with ``mask_interval=None`` unless the caller gives one: with no
interval it refreshes only when told (``mask=...`` on a step, or
:meth:`Session.set_mask_policy`), plus its first step.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .data import BatchIterator, LoadedDataset, load_dataset
from .models import LoadedModel, load_model
from .training import create_optimizer, evaluate, generate, train_step

__all__ = ["MaskDecision", "Session", "SessionError"]

CRITERIA = ("small_weights", "large_weights", "random", "large_grads")


class SessionError(ValueError):
    """A call made in the wrong order or with settings that cannot work; `field` names the culprit."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


MaskDecision = Mapping[str, Any]  # {criterion, density, perTensor?, include?, exclude?}


class Session:
    def __init__(self) -> None:
        self.loaded: LoadedModel | None = None
        self.data: LoadedDataset | None = None
        self.batches: BatchIterator | None = None  # training batches, micro-batch sized
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_config: dict[str, Any] = {}
        self.step = 0  # optimizer steps taken
        self.mask: dict[str, Any] | None = None  # the last mask decision applied

    # ------------------------------------------------------------------ setup

    def load_model(self, path: str, dtype: str | None = None, device: str = "auto",
                   gradient_checkpointing: bool = False, seed: int = 0) -> dict[str, Any]:
        self.loaded = load_model(path, dtype=dtype, device=device,
                                 gradient_checkpointing=gradient_checkpointing, seed=seed)
        self.optimizer, self.step, self.mask = None, 0, None  # a new model starts a new run
        return self.model_summary()

    def model_summary(self) -> dict[str, Any]:
        lm = self._need_model()
        info = lm.info
        return {"path": lm.path, "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch."),
                "parameters": info["parameters"], "trainable_parameters": info["trainable_parameters"],
                "tied": info["tied"], "param_bytes": info["param_bytes"],
                "model_type": getattr(lm.model.config, "model_type", "unknown")}

    def load_dataset(self, path: str, format: str = "auto", cutoff: int = 256, train_on_inputs: bool = False,
                     seed: int = 0, shuffle: bool = True, eval_fraction: float = 0.0,
                     eval_path: str | None = None) -> dict[str, Any]:
        lm = self._need_model()
        self.data = load_dataset(path, lm.tokenizer, format=format, cutoff=cutoff,
                                 train_on_inputs=train_on_inputs, seed=seed, shuffle=shuffle,
                                 eval_fraction=eval_fraction, eval_path=eval_path)
        self.batches = None  # made at the first step, with its micro-batch size
        info = self.data.info
        return {"path": str(path), "format": info.get("format", format),
                "train_examples": len(self.data.train),
                "eval_examples": len(self.data.eval) if self.data.eval is not None else 0,
                "tokens": int(info.get("train", {}).get("tokens", sum(len(x) for x in self.data.train.input_ids))),
                "truncated": int(info.get("train", {}).get("truncated", 0)),
                "dropped": int(info.get("train", {}).get("dropped", 0))}

    def create_optimizer(self, name: str = "nanoadam", **opts: Any) -> dict[str, Any]:
        lm = self._need_model()
        if name == "nanoadam":
            opts.setdefault("mask_interval", None)  # the controller decides when to refresh
        self.optimizer = create_optimizer(lm.model, name, **opts)
        self.optimizer_config = {"name": name, **opts}
        self.mask = None
        return self.optimizer_summary()

    def optimizer_summary(self) -> dict[str, Any]:
        opt = self._need_optimizer()
        groups = []
        for g in opt.param_groups:
            groups.append({"sparse": bool(g.get("sparse", False)), "tensors": len(g["params"]),
                           "entries": sum(p.numel() for p in g["params"])})
        state_bytes = opt.state_bytes() if hasattr(opt, "state_bytes") else _state_bytes(opt)
        return {"name": self.optimizer_config.get("name", "?"), "groups": groups, "state_bytes": state_bytes}

    # ------------------------------------------------------------------ masks

    def tensor_names(self) -> list[str]:
        """Canonical names of the sparse tensors (NanoAdam), in optimizer order."""
        opt = self._need_optimizer()
        return [n.split("=")[0] for g in opt.param_groups if g.get("sparse") for n in g["names"]]

    def per_tensor_densities(self, decision: MaskDecision) -> dict[str, float] | None:
        """Exact per-tensor densities for a decision with perTensor/include/exclude; None when uniform."""
        per = decision.get("perTensor") or decision.get("per_tensor") or {}
        include, exclude = decision.get("include"), decision.get("exclude")
        if not per and include is None and not exclude:
            return None
        compiled = [(re.compile(p), float(v)) for p, v in per.items()]
        inc = [re.compile(p) for p in include] if include is not None else None
        exc = [re.compile(p) for p in exclude or ()]
        out = {}
        opt = self._need_optimizer()
        for g in opt.param_groups:
            if not g.get("sparse"):
                continue
            for full in g["names"]:
                names = full.split("=")
                hit = lambda rs: any(r.search(n) for r in rs for n in names)  # noqa: E731
                if (inc is not None and not hit(inc)) or hit(exc):
                    k = 0.0
                else:
                    k = next((v for r, v in compiled if hit([r])), float(decision["density"]))
                out["^" + re.escape(names[0]) + "$"] = k
        return out

    def set_mask_policy(self, decision: MaskDecision, now: bool = False) -> dict[str, Any]:
        """Applies a mask decision: with now=False the masks refresh at the start of the
        next step (what the Trainer uses), with now=True at once from the current weights."""
        opt = self._need_optimizer()
        if not hasattr(opt, "refresh_mask"):
            raise SessionError(f"mask policies need the nanoadam optimizer, not {self.optimizer_config.get('name')!r}",
                               "optimizer")
        criterion = decision.get("criterion")
        if criterion not in CRITERIA:
            raise SessionError(f"mask.criterion {criterion!r} is not one of {', '.join(CRITERIA)}", "criterion")
        density = decision.get("density")
        if not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise SessionError(f"mask.density {density!r} must be in (0, 1]", "density")
        try:
            per = self.per_tensor_densities(decision)
        except re.error as e:
            raise SessionError(f"mask pattern {e.pattern!r} is not a valid regular expression: {e}", "perTensor") from e
        opt.refresh_mask(density=float(density), criterion=criterion, now=False)
        if per is not None:
            opt.refresh_mask(density=per, now=False)
        if now:
            opt.refresh_mask(now=True)
        self.mask = dict(decision)
        return {"tensors": len(self.tensor_names()), "frozen": sum(1 for v in (per or {}).values() if v == 0)}

    def masks(self, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        opt = self._need_optimizer()
        if not hasattr(opt, "masks"):
            raise SessionError("masks exist only with the nanoadam optimizer", "optimizer")
        masks = opt.masks()
        if names is None:
            return masks
        missing = [n for n in names if n not in masks]
        if missing:
            raise SessionError(f"no mask for tensor {missing[0]!r}; known: {', '.join(list(masks)[:5])}...", "names")
        return {n: masks[n] for n in names}

    # ------------------------------------------------------------------ training

    def train_step(self, lr: float, micro_batch: int = 1, grad_accum: int = 1, grad_clip: float | None = None,
                   mask: MaskDecision | None = None) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches of `micro_batch` examples.
        `mask`: a decision applied (refresh) before this step."""
        lm = self._need_model()
        opt = self._need_optimizer()
        data = self._need_data()
        if micro_batch < 1:
            raise SessionError(f"microBatch must be >= 1, got {micro_batch}", "microBatch")
        if grad_accum < 1:
            raise SessionError(f"gradAccum must be >= 1, got {grad_accum}", "gradAccum")
        if self.batches is None or self.batches.batch_size != micro_batch:
            position = self.batches.state_dict() if self.batches is not None else None
            self.batches = data.train.batches(micro_batch)
            if position is not None:  # keep the position when the micro-batch size changes
                self.batches.epoch, self.batches.index = position["epoch"], position["index"]
        if mask is not None:
            self.set_mask_policy(mask, now=False)
        batches = [next(self.batches) for _ in range(grad_accum)]
        out = train_step(lm.model, opt, batches, lr, grad_clip=grad_clip)
        out["step"] = self.step
        out["epoch"] = self.batches.epoch + self.batches.index / max(1, len(data.train))
        out["state_bytes"] = opt.state_bytes() if hasattr(opt, "state_bytes") else _state_bytes(opt)
        self.step += 1
        return out

    def evaluate(self, batch_size: int = 8, max_batches: int | None = None) -> dict[str, Any]:
        lm = self._need_model()
        data = self._need_data()
        if data.eval is None or len(data.eval) == 0:
            raise SessionError("evaluate needs a held-out set: load_dataset with evalFraction > 0 or evalPath",
                               "evalFraction")
        it = data.eval.batches(batch_size, epochs=1, shuffle=False)
        batches = (b for i, b in enumerate(it) if max_batches is None or i < max_batches)
        t0 = time.perf_counter()
        out = evaluate(lm.model, batches)
        out["time_s"] = time.perf_counter() - t0
        out["step"] = self.step
        return out

    def generate(self, prompt: Any, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> str:
        lm = self._need_model()
        return generate(lm.model, lm.tokenizer, prompt, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, seed=seed)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        lm = self._need_model()
        extra = {**(extra or {}), "optimizer_config": _jsonable(self.optimizer_config), "mask": self.mask}
        t0 = time.perf_counter()
        out = save_checkpoint(path, lm.model, lm.tokenizer, self.optimizer,
                              self.batches.state_dict() if self.batches is not None else None, self.step, extra)
        return {"path": str(out), "step": self.step, "time_s": time.perf_counter() - t0}

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Restores weights, optimizer state, data position, RNG and step into the
        current model/optimizer/data (build them the same way first)."""
        lm = self._need_model()
        state = load_checkpoint(path, model=lm.model, optimizer=self.optimizer)
        if state.data_state is not None and self.data is not None:
            self.batches = self.data.train.batches(state.data_state["batch_size"])
            self.batches.load_state_dict(state.data_state)
        self.step = state.step
        self.mask = state.extra.get("mask")
        return {"path": state.path, "step": state.step, "extra": state.extra}

    # ------------------------------------------------------------------ helpers

    def _need_model(self) -> LoadedModel:
        if self.loaded is None:
            raise SessionError("no model loaded: call load_model first", "model")
        return self.loaded

    def _need_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            raise SessionError("no optimizer: call create_optimizer first", "optimizer")
        return self.optimizer

    def _need_data(self) -> LoadedDataset:
        if self.data is None:
            raise SessionError("no dataset loaded: call load_dataset first", "data")
        return self.data


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
