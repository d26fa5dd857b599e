"""One finetuning run's state in the sidecar: model, data, optimizer, step.

Each method takes the params Struct of the wire method of the same name and
returns its result Struct (nanotune.wire, generated from protocol/schema.ts), so
the sidecar's handlers (python/nanotune/methods/train.py) are one-line wrappers
and a plain Python loop drives the same Session in process, which is how tests
show that a TS-driven run equals a Python-driven one (nanotune.plainloop) and how
bench/controller.ts measures the bridge's overhead. From Python, keyword
arguments with the Structs' (snake_case) field names work too; they are checked
against the schema like a decoded call:

    s = Session(device="cpu")
    s.load_model(path="tiny-llama")
    s.train_step(wire.TrainStepParams(lr=1e-3, micro_batch=2))   # or s.train_step(lr=1e-3, micro_batch=2)

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
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import torch

from .checkpoint import STATE_FILE, CheckpointError, load_checkpoint, save_checkpoint
from .data import BatchIterator, DatasetError, LoadedDataset, load_dataset
from .errors import InvalidParams, field_of
from .models import LoadedModel, load_model
from .training import create_optimizer, evaluate, generate, train_step
from .wire import (
    CheckpointExtra,
    CreateOptimizerParams,
    CreateOptimizerResult,
    EvaluateParams,
    EvaluateResult,
    GenerateParams,
    GenerateResult,
    GetMasksParams,
    GetMasksResult,
    LoadCheckpointParams,
    LoadCheckpointResult,
    LoadDatasetParams,
    LoadDatasetResult,
    LoadModelParams,
    LoadModelResult,
    MaskDecision,
    MaskResult,
    MaskTensor,
    OptimizerGroup,
    RefreshMaskParams,
    SaveCheckpointParams,
    SaveCheckpointResult,
    SetMaskPolicyParams,
    TrainStepParams,
    TrainStepResult,
)

__all__ = ["MaskDecision", "Session", "SessionError"]

S = TypeVar("S", bound=msgspec.Struct)


class SessionError(InvalidParams):
    """A call made in the wrong order or with settings that cannot work (code
    INVALID_PARAMS); `field` names the culprit."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message, field=field)


def as_struct(value: S | Mapping[str, Any], cls: type[S], what: str) -> S:
    """`value` as a wire Struct: a Struct as it is, or a mapping in its wire form (the
    camelCase keys a JSON config or the TS side holds), converted and checked against
    the schema; a mismatch is a SessionError naming the field ("mask.density")."""
    if isinstance(value, cls):
        return value
    try:
        return msgspec.convert(value, cls)
    except msgspec.ValidationError as e:
        where, why = field_of(e, what)
        raise SessionError(f"{where}: {why}", where) from None


def params(cls: type[S], p: S | None, fields: dict[str, Any]) -> S:
    """A method's params: the Struct given (decoded by the sidecar, or built by the
    caller), or one built from keyword arguments and checked against the schema."""
    if p is not None:
        if fields or not isinstance(p, cls):
            raise TypeError(f"pass a {cls.__name__} or keyword arguments, not {type(p).__name__}"
                            + (f" and {sorted(fields)}" if fields else ""))
        return p
    try:
        built = cls(**fields)
    except TypeError as e:  # an unknown or missing argument
        raise SessionError(f"{cls.__name__}: {e}") from None
    return as_struct(msgspec.to_builtins(built), cls, "params")


class Session:
    def __init__(self, device: str | None = None) -> None:
        """device: where load_model puts a model when it is not told ("auto" or no
        device): the sidecar passes the device it chose at start; None means cuda if
        torch sees one, else cpu (models.resolve_device decides both)."""
        self.device = device
        self.loaded: LoadedModel | None = None
        self.data: LoadedDataset | None = None
        self.batches: BatchIterator | None = None  # training batches, micro-batch sized
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_params: CreateOptimizerParams | None = None  # what built self.optimizer
        self.step = 0  # optimizer steps taken
        self.mask: MaskDecision | None = None  # the last mask decision applied

    # ------------------------------------------------------------------ setup

    def load_model(self, p: LoadModelParams | None = None, /, **fields: Any) -> LoadModelResult:
        p = params(LoadModelParams, p, fields)
        self.loaded = load_model(p.path, dtype=p.dtype, device=p.device, default_device=self.device,
                                 gradient_checkpointing=bool(p.gradient_checkpointing), seed=p.seed or 0)
        self.optimizer, self.optimizer_params, self.step, self.mask = None, None, 0, None  # a new run
        lm, info = self.loaded, self.loaded.info
        return LoadModelResult(path=lm.path, device=str(lm.device), dtype=str(lm.dtype).removeprefix("torch."),
                               parameters=info["parameters"], trainable_parameters=info["trainable_parameters"],
                               tied=info["tied"], param_bytes=info["param_bytes"],
                               model_type=getattr(lm.model.config, "model_type", "unknown"))

    def load_dataset(self, p: LoadDatasetParams | None = None, /, **fields: Any) -> LoadDatasetResult:
        p = params(LoadDatasetParams, p, fields)
        lm = self._need_model()
        fmt = p.format or "auto"
        self.data = load_dataset(p.path, lm.tokenizer, format=fmt, cutoff=256 if p.cutoff is None else p.cutoff,
                                 train_on_inputs=bool(p.train_on_inputs), seed=p.seed or 0,
                                 shuffle=True if p.shuffle is None else p.shuffle,
                                 eval_fraction=p.eval_fraction or 0.0, eval_path=p.eval_path)
        self.batches = None  # made at the first step, with its micro-batch size
        info, train = self.data.info, self.data.info.get("train", {})
        return LoadDatasetResult(
            path=str(p.path), format=info.get("format", fmt), train_examples=len(self.data.train),
            eval_examples=len(self.data.eval) if self.data.eval is not None else 0,
            tokens=int(train.get("tokens", sum(len(x) for x in self.data.train.input_ids))),
            truncated=int(train.get("truncated", 0)), dropped=int(train.get("dropped", 0)))

    # NanoAdam's options that AdamW does not take (the schema has one params shape for both).
    _NANOADAM_ONLY = ("density", "mask_interval", "density_interval", "final_density", "total_steps", "criterion",
                      "moments_on_refresh", "bias_correction", "moments_dtype", "index_dtype", "sparse_gradients",
                      "dense", "tied", "seed")

    def create_optimizer(self, p: CreateOptimizerParams | None = None, /, **fields: Any) -> CreateOptimizerResult:
        p = params(CreateOptimizerParams, p, fields)
        lm = self._need_model()
        opts = {k: v for k, v in msgspec.structs.asdict(p).items() if v is not None and k != "name"}
        if p.name == "adamw":
            wrong = [k for k in opts if k in self._NANOADAM_ONLY]
            if wrong:
                raise SessionError(f"{wrong[0]!r} is a NanoAdam option; adamw takes lr, betas, eps, weight_decay",
                                   wrong[0])
        else:
            opts.setdefault("mask_interval", None)  # the controller decides when to refresh
        self.optimizer = create_optimizer(lm.model, p.name, **opts)
        self.optimizer_params = p
        self.mask = None
        opt = self.optimizer
        groups = [OptimizerGroup(sparse=bool(g.get("sparse", False)), tensors=len(g["params"]),
                                 entries=sum(q.numel() for q in g["params"])) for g in opt.param_groups]
        return CreateOptimizerResult(name=p.name, groups=groups, state_bytes=_state_bytes(opt))

    # ------------------------------------------------------------------ masks

    def tensor_names(self) -> list[str]:
        """Canonical names of the sparse tensors (NanoAdam), in optimizer order."""
        opt = self._need_optimizer()
        return [n.split("=")[0] for g in opt.param_groups if g.get("sparse") for n in g["names"]]

    def per_tensor_densities(self, decision: MaskDecision) -> dict[str, float] | None:
        """Exact per-tensor densities for a decision with per_tensor/include/exclude; None when uniform."""
        per = decision.per_tensor or {}
        include, exclude = decision.include, decision.exclude
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
                    k = next((v for r, v in compiled if hit([r])), float(decision.density))
                out["^" + re.escape(names[0]) + "$"] = k
        return out

    def set_mask_policy(self, decision: MaskDecision | SetMaskPolicyParams | Mapping[str, Any],
                        now: bool | None = None) -> MaskResult:
        """Applies a mask decision (a MaskDecision, set_mask_policy's params, or the wire
        form of a MaskDecision as a mapping): with now=False (default) the masks refresh
        at the start of the next step (what the Trainer uses), with now=True at once
        from the current weights."""
        if isinstance(decision, SetMaskPolicyParams):
            now = bool(decision.now) if now is None else now
            decision = MaskDecision(**{k: getattr(decision, k) for k in MaskDecision.__struct_fields__})
        decision = as_struct(decision, MaskDecision, "mask")
        opt = self._need_optimizer()
        if not hasattr(opt, "refresh_mask"):
            raise SessionError(f"mask policies need the nanoadam optimizer, not {self.optimizer_params.name!r}",
                               "optimizer")
        try:
            per = self.per_tensor_densities(decision)
        except re.error as e:
            raise SessionError(f"mask pattern {e.pattern!r} is not a valid regular expression: {e}",
                               "per_tensor") from e
        try:
            opt.refresh_mask(density=float(decision.density), criterion=decision.criterion, now=False)
            if per is not None:
                opt.refresh_mask(density=per, now=False)
            if now:
                opt.refresh_mask(now=True)
        except ValueError as e:  # e.g. large_grads refreshed now, before any gradient exists
            raise SessionError(f"mask: {e}", "criterion") from e
        self.mask = decision
        return MaskResult(tensors=len(self.tensor_names()), frozen=sum(1 for v in (per or {}).values() if v == 0))

    def refresh_mask(self, p: RefreshMaskParams | None = None, /, **fields: Any) -> MaskResult:
        """Refreshes every mask now, with p.mask or else the last decision applied."""
        p = params(RefreshMaskParams, p, fields)
        decision = p.mask if p.mask is not None else self.mask
        if decision is None:
            raise SessionError("no mask decision yet; pass mask", "mask")
        return self.set_mask_policy(decision, now=True)

    def masks(self, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Each sparse tensor's mask as flat int32 indices (all, or those named)."""
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

    def get_masks(self, p: GetMasksParams | None = None, /, **fields: Any) -> GetMasksResult:
        """masks() as get_masks' result; each `indices` holds the tensor itself (the
        sidecar's codec sends it as a frame and writes its TensorRef)."""
        p = params(GetMasksParams, p, fields)
        masks = self.masks(p.names)
        sizes = {n: q.numel() for n, q in self.loaded.model.named_parameters()} if self.loaded else {}
        return GetMasksResult(masks=[MaskTensor(name=n, numel=sizes.get(n, 0), indices=m.cpu())
                                     for n, m in masks.items()])

    # ------------------------------------------------------------------ training

    def train_step(self, p: TrainStepParams | None = None, /, **fields: Any) -> TrainStepResult:
        """One optimizer step over `grad_accum` micro-batches of `micro_batch` examples
        (1 and 1 when not given); `mask`: a decision applied (refresh) before it."""
        p = params(TrainStepParams, p, fields)
        lm = self._need_model()
        opt = self._need_optimizer()
        data = self._need_data()
        micro_batch, grad_accum = p.micro_batch or 1, p.grad_accum or 1
        if self.batches is None or self.batches.batch_size != micro_batch:
            position = self.batches.state_dict() if self.batches is not None else None
            self.batches = data.train.batches(micro_batch)
            if position is not None:  # keep the position when the micro-batch size changes
                self.batches.epoch, self.batches.index = position["epoch"], position["index"]
        if p.mask is not None:
            self.set_mask_policy(p.mask, now=False)
        batches = [next(self.batches) for _ in range(grad_accum)]
        out = train_step(lm.model, opt, batches, p.lr, grad_clip=p.grad_clip)
        result = TrainStepResult(**out, step=self.step,
                                 epoch=self.batches.epoch + self.batches.index / max(1, len(data.train)),
                                 state_bytes=_state_bytes(opt))
        self.step += 1
        return result

    def evaluate(self, p: EvaluateParams | None = None, /, **fields: Any) -> EvaluateResult:
        """Token-mean loss and perplexity on the held-out set, in batches of p.batch_size (8)."""
        p = params(EvaluateParams, p, fields)
        lm = self._need_model()
        data = self._need_data()
        if data.eval is None or len(data.eval) == 0:
            raise SessionError("evaluate needs a held-out set: load_dataset with eval_fraction > 0 or eval_path",
                               "eval_fraction")
        it = data.eval.batches(p.batch_size or 8, epochs=1, shuffle=False)
        batches = (b for i, b in enumerate(it) if p.max_batches is None or i < p.max_batches)
        t0 = time.perf_counter()
        out = evaluate(lm.model, batches)
        return EvaluateResult(loss=out["loss"], perplexity=out["perplexity"], tokens=out["tokens"],
                              time_s=time.perf_counter() - t0, step=self.step)

    def generate(self, p: GenerateParams | None = None, /, **fields: Any) -> GenerateResult:
        """The continuation of p.prompt (a string, or chat messages), greedy unless
        p.temperature > 0; at most p.max_new_tokens (64) tokens."""
        p = params(GenerateParams, p, fields)
        lm = self._need_model()
        if isinstance(p.prompt, str):
            prompt: Any = p.prompt
        elif not getattr(lm.tokenizer, "chat_template", None):
            raise SessionError("chat messages need a tokenizer with a chat template, and this model's has none; "
                               "give the prompt as a string", "prompt")
        else:
            prompt = [{"role": m.role, "content": m.content} for m in p.prompt]
        text = generate(lm.model, lm.tokenizer, prompt, max_new_tokens=p.max_new_tokens or 64,
                        temperature=p.temperature or 0.0, top_p=1.0 if p.top_p is None else p.top_p,
                        seed=p.seed or 0)
        return GenerateResult(text=text)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, p: SaveCheckpointParams | None = None, /, **fields: Any) -> SaveCheckpointResult:
        """Writes a checkpoint. p.extra (the caller's policy, config, user data) is kept
        with the mask decision and optimizer params this session applies, as one
        CheckpointExtra (its wire form in trainer_state.json)."""
        p = params(SaveCheckpointParams, p, fields)
        lm = self._need_model()
        extra = msgspec.structs.replace(p.extra or CheckpointExtra(), mask=self.mask, optimizer=self.optimizer_params)
        t0 = time.perf_counter()
        out = save_checkpoint(p.path, lm.model, lm.tokenizer, self.optimizer,
                              self.batches.state_dict() if self.batches is not None else None, self.step,
                              msgspec.to_builtins(extra))
        return SaveCheckpointResult(path=str(out), step=self.step, time_s=time.perf_counter() - t0)

    def load_checkpoint(self, p: LoadCheckpointParams | None = None, /, **fields: Any) -> LoadCheckpointResult:
        """Restores weights, optimizer state, data position, RNG and step into the
        current model/optimizer/data (build them the same way first)."""
        p = params(LoadCheckpointParams, p, fields)
        lm = self._need_model()
        state = load_checkpoint(p.path, model=lm.model, optimizer=self.optimizer)
        try:
            extra = msgspec.convert(state.extra, CheckpointExtra)
        except msgspec.ValidationError as e:
            where, why = field_of(e, "extra")
            raise CheckpointError(f"checkpoint {p.path!r}: {STATE_FILE} {where} does not fit this nanotune: {why}",
                                  Path(p.path) / STATE_FILE) from None
        if state.data_state is not None and self.data is not None:
            try:
                batches = self.data.train.batches(state.data_state["batch_size"])
                batches.load_state_dict(state.data_state)
            except (DatasetError, KeyError) as e:
                raise CheckpointError(f"checkpoint {p.path!r} does not fit the loaded dataset: {e}", p.path) from e
            self.batches = batches
        self.step = state.step
        self.mask = extra.mask
        return LoadCheckpointResult(path=state.path, step=state.step, extra=extra)

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
    if hasattr(opt, "state_bytes"):
        return opt.state_bytes()
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
