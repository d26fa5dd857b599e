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

Note [session generation]: the Session counts `generation`: load_model and
create_optimizer each start a new one (+1) and return it. Every other call's
params may carry the generation the caller believes current; one that differs
fails with SESSION_CHANGED (message: the call and both numbers; data {expected,
got}) before anything changes, so a client cannot train, save or load on a run
that another client has replaced meanwhile. An absent generation means "the
current one" (older clients, Python callers). create_optimizer checks the one it
is given, then starts the next.

Note [refused steps]: train_step refuses a step whose loss or global gradient
norm is not finite (training.py, Note [non-finite steps]): NanotuneError code
NON_FINITE, data {step, loss, gradNorm} (floats; NaN and inf travel as such in
msgpack). Weights, optimizer state (moments, masks, per-tensor step counters,
group options, a pending mask refresh), the session's step counter and its mask
decision are bit-identical across a refused step: the step's own mask decision
is applied only once the step is known to be finite (before backward in
NanoAdam's sparse-gradient mode, and undone on refusal). The data position does
advance: the offending micro-batches were consumed, so a controller that skips
the step moves on to new data (resuming a checkpoint restores the position too).
What the guard cannot see: an update that is finite but ruinous (lr 1e10 makes
weights of ~1e10, still finite in fp32 and bf16) is applied; the next step's
loss is then non-finite and refused, and the run recovers by load_checkpoint
of an earlier checkpoint. A post-update guard (snapshot the masked entries and
their moments, check isfinite after the step, restore) was considered and left
out: it would not catch that finite blow-up, only an overflow to inf, which the
next step's check refuses anyway, and for the dense group (untied heads) its
snapshot is a full copy of weights and moments.

Note [checkpoint loads]: load_checkpoint validates the whole checkpoint against
this session first (checkpoint.read_checkpoint: trainer_state.json, weights,
optimizer state, RNG; here: `extra` and the data position against the loaded
dataset), then applies it; any error is INVALID_PARAMS naming the file and key,
and leaves weights, optimizer state, data position, step and mask as they were.
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, TypeVar

import msgspec
import torch

from .checkpoint import STATE_FILE, CheckpointError, read_checkpoint, save_checkpoint
from .data import BatchIterator, DatasetError, LoadedDataset, StreamingBatchIterator, load_dataset
from .errors import ErrorCode, InvalidParams, NanotuneError, field_of
from .models import LoadedModel, load_model
from .training import DataParallel, complete, create_optimizer, evaluate, optimizer_state_bytes, train_step
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
    LoraConfig,
    MaskDecision,
    MaskResult,
    MaskTensor,
    OptimizerConfig,
    OptimizerGroup,
    RefreshMaskParams,
    SampleableTensor,
    SampleWeightsParams,
    SampleWeightsResult,
    SaveCheckpointParams,
    SaveCheckpointResult,
    SetMaskPolicyParams,
    TrainStepParams,
    TrainStepResult,
)

__all__ = ["MaskDecision", "Session", "SessionChanged", "SessionError"]

S = TypeVar("S", bound=msgspec.Struct)


class SessionChanged(NanotuneError):
    """A call for a session generation that is no longer current (code SESSION_CHANGED;
    Note [session generation]); data {expected, got}."""

    code = ErrorCode.SESSION_CHANGED

    def __init__(self, method: str, expected: int, got: int):
        super().__init__(None, f"{method}: the call belongs to session generation {got}, but the session is at "
                               f"generation {expected} (load_model or create_optimizer ran since); nothing was done",
                         {"expected": expected, "got": got})


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
    def __init__(self, device: str | None = None, group: Any = None) -> None:
        """device: where load_model puts a model when it is not told ("auto" or no
        device): the sidecar passes the device it chose at start; None means cuda if
        torch sees one, else cpu (models.resolve_device decides both).
        group: this rank's nanotune.distributed.Group in a sidecar group, whose every
        rank runs the same calls (Note [lockstep calls]); None: one process."""
        self.device = device
        self.group = group
        self.dp: DataParallel | None = None  # the DDP wrapper and its hook's state, in a group
        self.loaded: LoadedModel | None = None
        self.data: LoadedDataset | None = None
        self.batches: BatchIterator | StreamingBatchIterator | None = None  # training batches, micro-batch sized
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_params: OptimizerConfig | None = None  # what built self.optimizer
        self.step = 0  # optimizer steps taken
        self.mask: MaskDecision | None = None  # the last mask decision applied
        self.generation = 0  # Note [session generation]
        self.watch: _Watch | None = None  # the tensor sample_weights samples (Note [weight samples])

    def _check_generation(self, p: Any, method: str) -> None:
        got = getattr(p, "generation", None)
        if got is not None and got != self.generation:
            raise SessionChanged(method, self.generation, got)

    # ------------------------------------------------------------------ setup

    def load_model(self, p: LoadModelParams | None = None, /, **fields: Any) -> LoadModelResult:
        p = params(LoadModelParams, p, fields)
        lora = None if p.lora is None else msgspec.structs.asdict(p.lora)
        loaded = load_model(p.path, dtype=p.dtype, device=p.device, default_device=self.device,
                            gradient_checkpointing=bool(p.gradient_checkpointing), seed=p.seed or 0, lora=lora,
                            revision=p.revision, amp=p.amp, gguf_file=p.gguf_file)
        parallel = None
        self.dp = None
        if self.group is not None:
            from .parallel import shard_fsdp, wrap_ddp

            parallel = p.parallel or "ddp"
            if parallel == "fsdp":
                if loaded.lora is not None:
                    raise SessionError("lora with parallel 'fsdp' is not supported: the adapter is small, use 'ddp'",
                                       "parallel")
                self.dp = DataParallel(shard_fsdp(loaded.model), self.group, sharded=True)
            else:
                module, comm = wrap_ddp(loaded.model, self.group.world_size)
                self.dp = DataParallel(module, self.group, comm)
        self.loaded = loaded
        self.optimizer, self.optimizer_params, self.step, self.mask = None, None, 0, None  # a new run
        self.watch = None
        self.generation += 1
        lm, info = self.loaded, self.loaded.info
        return LoadModelResult(path=lm.path, device=str(lm.device), dtype=str(lm.dtype).removeprefix("torch."),
                               parameters=info["parameters"], trainable_parameters=info["trainable_parameters"],
                               tied=info["tied"], param_bytes=info["param_bytes"],
                               model_type=getattr(lm.model.config, "model_type", "unknown"),
                               revision=lm.revision, amp=None if lm.amp is None else str(lm.amp).removeprefix("torch."),
                               lora=None if lm.lora is None else LoraConfig(**lm.lora),
                               generation=self.generation, parallel=parallel,
                               world_size=1 if self.group is None else self.group.world_size)

    def load_dataset(self, p: LoadDatasetParams | None = None, /, **fields: Any) -> LoadDatasetResult:
        """Reads and tokenizes the dataset (data.load_dataset). A streamed one (p.streaming,
        or a source over 64 MiB) reports what it read so far: the first window."""
        p = params(LoadDatasetParams, p, fields)
        self._check_generation(p, "load_dataset")
        lm = self._need_model()
        fmt = p.format or "auto"
        mapping = None if p.fields is None else \
            {k: v for k, v in msgspec.structs.asdict(p.fields).items() if v is not None}
        self.data = load_dataset(p.path, lm.tokenizer, format=fmt, cutoff=256 if p.cutoff is None else p.cutoff,
                                 train_on_inputs=bool(p.train_on_inputs), seed=p.seed or 0,
                                 shuffle=True if p.shuffle is None else p.shuffle,
                                 eval_fraction=p.eval_fraction or 0.0, eval_path=p.eval_path,
                                 split=p.split, config=p.config, revision=p.revision, fields=mapping,
                                 template=p.template, packing=bool(p.packing), streaming=p.streaming)
        self.batches = None  # made at the first step, with its micro-batch size
        info, train = self.data.info, self.data.info.get("train", {})
        return LoadDatasetResult(
            path=str(p.path), format=info.get("format", fmt), train_examples=int(train.get("examples", 0)),
            eval_examples=len(self.data.eval) if self.data.eval is not None else 0,
            tokens=int(train.get("tokens", 0)), truncated=int(train.get("truncated", 0)),
            dropped=int(train.get("dropped", 0)), template=info.get("template"), packed=bool(info.get("packed")),
            streaming=bool(info.get("streaming")))

    # NanoAdam's options that AdamW does not take (the schema has one params shape for both).
    _NANOADAM_ONLY = ("density", "mask_interval", "density_interval", "final_density", "total_steps", "criterion",
                      "moments_on_refresh", "bias_correction", "moments_dtype", "index_dtype", "sparse_gradients",
                      "chunk_size", "dense", "tied", "seed", "fused")

    def create_optimizer(self, p: CreateOptimizerParams | OptimizerConfig | None = None, /,
                         **fields: Any) -> CreateOptimizerResult:
        """Builds the optimizer (p: create_optimizer's params, or an OptimizerConfig such as
        a checkpoint's extra.optimizer) and starts a new session generation."""
        if type(p) is OptimizerConfig and not fields:
            p = CreateOptimizerParams(**{f: getattr(p, f) for f in OptimizerConfig.__struct_fields__})
        p = params(CreateOptimizerParams, p, fields)
        self._check_generation(p, "create_optimizer")
        lm = self._need_model()
        opts = {k: v for k, v in msgspec.structs.asdict(p).items()
                if v is not None and k not in ("name", "generation")}
        if p.name != "nanoadam":  # AdamW and the peers (galore, adam-mini, ...: training.create_optimizer)
            wrong = [k for k in opts if k in self._NANOADAM_ONLY]
            if wrong:
                takes = "lr, weight_decay" if p.name == "adafactor" else "lr, betas, eps, weight_decay"
                raise SessionError(f"{wrong[0]!r} is a NanoAdam option; {p.name} takes {takes}", wrong[0])
        else:
            opts.setdefault("mask_interval", None)  # the controller decides when to refresh
        sparse_comm = False
        if self.dp is not None and self.dp.sharded and opts.get("sparse_gradients"):
            raise SessionError("sparseGradients needs whole tensors and FSDP shards them (its gradients are already "
                               "sharded); leave it off with parallel 'fsdp', or use 'ddp'", "sparse_gradients")
        if self.dp is not None and p.name == "nanoadam" and opts.get("sparse_gradients"):
            # Under DDP, sparse gradients are what travels: the hook sums the k selected
            # entries (Note [sparse all-reduce]); DDP's buckets hold the dense gradient anyway.
            opts["sparse_gradients"], sparse_comm = False, True
        opt = create_optimizer(lm.model, p.name, **opts)
        if self.dp is not None and self.dp.comm is not None:
            self.dp.comm.optimizer = opt if sparse_comm else None
        for hook in getattr(self.optimizer, "_hooks", ()):  # the old NanoAdam's sparse-gradient hooks
            hook.remove()
        self.optimizer = opt
        # What a checkpoint keeps (CheckpointExtra.optimizer): the config without the generation.
        self.optimizer_params = OptimizerConfig(**{f: getattr(p, f) for f in OptimizerConfig.__struct_fields__})
        self.mask = None
        self.generation += 1
        groups = [OptimizerGroup(sparse=bool(g.get("sparse", False)), tensors=len(g["params"]),
                                 entries=sum(q.numel() for q in g["params"])) for g in opt.param_groups]
        return CreateOptimizerResult(name=p.name, groups=groups, state_bytes=_state_bytes(opt),
                                     generation=self.generation)

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
            self._check_generation(decision, "set_mask_policy")
            now = bool(decision.now) if now is None else now
            decision = MaskDecision(**{k: getattr(decision, k) for k in MaskDecision.__struct_fields__})
        elif isinstance(decision, Mapping) and "generation" in decision:
            self._check_generation(as_struct({"generation": decision["generation"]}, GetMasksParams, "params"),
                                   "set_mask_policy")
            decision = {k: v for k, v in decision.items() if k != "generation"}
        decision, per = self._check_mask(decision)
        self._apply_mask(decision, per, bool(now))
        return MaskResult(tensors=len(self.tensor_names()), frozen=sum(1 for v in (per or {}).values() if v == 0))

    def _check_mask(self, decision: MaskDecision | Mapping[str, Any]) -> tuple[MaskDecision, dict[str, float] | None]:
        """The decision as a MaskDecision and its per-tensor densities, checked against
        the optimizer; changes nothing."""
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
        return decision, per

    def _apply_mask(self, decision: MaskDecision, per: dict[str, float] | None, now: bool) -> None:
        opt = self._need_optimizer()
        try:
            opt.refresh_mask(density=float(decision.density), criterion=decision.criterion, now=False)
            if per is not None:
                opt.refresh_mask(density=per, now=False)
            if now:
                opt.refresh_mask(now=True)
        except ValueError as e:  # e.g. large_grads refreshed now, before any gradient exists
            raise SessionError(f"mask: {e}", "criterion") from e
        self.mask = decision

    def refresh_mask(self, p: RefreshMaskParams | None = None, /, **fields: Any) -> MaskResult:
        """Refreshes every mask now, with p.mask or else the last decision applied."""
        p = params(RefreshMaskParams, p, fields)
        self._check_generation(p, "refresh_mask")
        decision = p.mask if p.mask is not None else self.mask
        if decision is None:
            raise SessionError("no mask decision yet; pass mask", "mask")
        return self.set_mask_policy(decision, now=True)

    def masks(self, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Each sparse tensor's mask as flat int32 indices (all, or those named)."""
        opt = self._need_optimizer()
        if not hasattr(opt, "masks"):
            raise SessionError("masks exist only with the nanoadam optimizer", "optimizer")
        masks = opt.masks(None if names is None else set(names))
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
        self._check_generation(p, "get_masks")
        self._need_whole_tensors("get_masks")
        masks = self.masks(p.names)
        sizes = {n: q.numel() for n, q in self.loaded.model.named_parameters()} if self.loaded else {}
        return GetMasksResult(masks=[MaskTensor(name=n, numel=sizes.get(n, 0), indices=m.cpu())
                                     for n, m in masks.items()])

    # ------------------------------------------------------------------ weight samples

    def sample_weights(self, p: SampleWeightsParams | None = None, /, **fields: Any) -> SampleWeightsResult:
        """Weights, last-step gradients and mask membership of one tensor at a fixed
        random sample of its entries (Note [weight samples])."""
        p = params(SampleWeightsParams, p, fields)
        self._check_generation(p, "sample_weights")
        self._need_whole_tensors("sample_weights")
        lm = self._need_model()
        named = {n: q for n, q in lm.model.named_parameters() if q.requires_grad}
        masked = set(self.tensor_names()) if self.optimizer is not None and hasattr(self.optimizer, "masks") else set()
        choices = [SampleableTensor(name=n, shape=list(q.shape), masked=n in masked) for n, q in named.items()
                   if q.dim() >= 2]
        if not choices:
            raise SessionError("the model has no trainable tensor of 2 or more dimensions to sample", "tensor")
        name = p.tensor or next((c.name for c in choices if c.masked), choices[0].name)
        if name not in named:
            near = [c.name for c in choices if name.split(".")[-1] in c.name][:3] or [c.name for c in choices[:3]]
            raise SessionError(f"no trainable tensor named {name!r}; for example {', '.join(near)}", "tensor")
        param, count = named[name], p.count or 2000
        if self.watch is None or (self.watch.name, self.watch.count) != (name, count) or self.watch.param is not param:
            self.watch = _Watch(name, param, count)
        w = self.watch
        weights = w.weights if w.step is not None else w.at_sample(param)
        in_mask = None
        if name in masked:
            mask = self.optimizer.masks({name}).get(name)  # absent before the first refresh
            if mask is not None:
                in_mask = torch.isin(w.indices, mask.long().cpu()).to(torch.uint8)
        return SampleWeightsResult(tensor=name, shape=list(param.shape), step=w.step, indices=w.indices,
                                   weights=weights, grads=w.grads if w.step is not None else None,
                                   in_mask=in_mask, tensors=choices)

    # ------------------------------------------------------------------ training

    def train_step(self, p: TrainStepParams | None = None, /, **fields: Any) -> TrainStepResult:
        """One optimizer step over `grad_accum` micro-batches of `micro_batch` examples
        (1 and 1 when not given); `mask`: a decision applied (refresh) before it.
        A step whose loss or gradient norm is not finite is refused with NON_FINITE and
        changes nothing but the data position (Note [refused steps])."""
        p = params(TrainStepParams, p, fields)
        self._check_generation(p, "train_step")
        lm = self._need_model()
        opt = self._need_optimizer()
        data = self._need_data()
        mask = self._check_mask(p.mask) if p.mask is not None else None  # a bad decision fails before the step
        micro_batch, grad_accum = p.micro_batch or 1, p.grad_accum or 1
        # In a group every rank reads the same global micro-batches and trains on its rows.
        micro_batch *= 1 if self.group is None else self.group.world_size
        if self.batches is None:
            self.batches = data.train.batches(micro_batch)
        elif self.batches.batch_size != micro_batch:  # keep the position when the micro-batch size changes
            self.batches = self.batches.with_batch_size(micro_batch)
        batches = [next(self.batches) for _ in range(grad_accum)]
        before = self.mask
        try:
            out = train_step(lm.model, opt, batches, p.lr, grad_clip=p.grad_clip, step=self.step,
                             pending=None if mask is None else lambda: self._apply_mask(*mask, now=False),
                             observe=None if self.watch is None else (lambda w=self.watch: w.observe(self.step)),
                             data_parallel=self.dp)
        except BaseException:
            self.mask = before  # the optimizer's part came back in train_step
            raise
        result = TrainStepResult(**out, step=self.step,
                                 epoch=self.batches.progress,
                                 state_bytes=_state_bytes(opt),
                                 all_reduced_bytes=None if self.dp is None or self.dp.comm is None
                                 else self.dp.comm.bytes)
        self.step += 1
        return result

    def evaluate(self, p: EvaluateParams | None = None, /, **fields: Any) -> EvaluateResult:
        """Token-mean loss and perplexity on the held-out set, in batches of p.batch_size (8)."""
        p = params(EvaluateParams, p, fields)
        self._check_generation(p, "evaluate")
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

    def generate(self, p: GenerateParams | None = None, /, on_text: Callable[[str], None] | None = None,
                 check: Callable[[], None] | None = None, **fields: Any) -> GenerateResult:
        """The continuation of p.prompt, greedy unless p.temperature > 0; at most
        p.max_new_tokens (64) tokens (training.complete).

        A string prompt is the instruction of p.template (default "raw": the prompt as
        it is) with p.input as its {input}, tokenized exactly like a training prompt
        (Note [generation prompts] in training.py); chat messages go through the
        tokenizer's chat template. p.stop strings end generation, the text cut before
        the first. With p.stream, `on_text` gets each new piece of text as it is
        produced (the sidecar sends them as generate:token events; the pieces
        concatenate to the result's text). `check` runs after every token (the
        sidecar's cancellation)."""
        p = params(GenerateParams, p, fields)
        self._check_generation(p, "generate")
        lm = self._need_model()
        if isinstance(p.prompt, str):
            prompt: Any = p.prompt
        elif p.template not in (None, "chat"):
            raise SessionError(f"chat messages are rendered by the tokenizer's chat template, not {p.template!r}: "
                               "leave template out, or give the prompt as a string", "template")
        elif p.input:
            raise SessionError("input fills a template's {input}; chat messages have none (put it in a message)",
                               "input")
        elif not getattr(lm.tokenizer, "chat_template", None):
            raise SessionError("chat messages need a tokenizer with a chat template, and this model's has none; "
                               "give the prompt as a string", "prompt")
        else:
            prompt = [{"role": m.role, "content": m.content} for m in p.prompt]
        out = complete(lm.model, lm.tokenizer, prompt, template=p.template or "raw", input=p.input or "",
                       max_new_tokens=p.max_new_tokens or 64, temperature=p.temperature or 0.0,
                       top_p=1.0 if p.top_p is None else p.top_p, seed=p.seed or 0, stop=p.stop or (),
                       on_text=on_text if p.stream else None, check=check)
        return GenerateResult(text=out.text, tokens=len(out.ids), finish_reason=out.finish_reason, prompt=out.prompt)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, p: SaveCheckpointParams | None = None, /, **fields: Any) -> SaveCheckpointResult:
        """Writes a checkpoint. p.extra (the caller's policy, config, user data) is kept
        with the mask decision and optimizer params this session applies, as one
        CheckpointExtra (its wire form in trainer_state.json)."""
        p = params(SaveCheckpointParams, p, fields)
        self._check_generation(p, "save_checkpoint")
        lm = self._need_model()
        extra = msgspec.structs.replace(p.extra or CheckpointExtra(), mask=self.mask, optimizer=self.optimizer_params)
        t0 = time.perf_counter()
        sharded, weights = self.dp is not None and self.dp.sharded, None
        if sharded:  # FSDP2: the full weights, gathered to rank 0's CPU (a collective)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            weights = get_model_state_dict(lm.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        out = save_checkpoint(p.path, lm.model, lm.tokenizer, self.optimizer,
                              self.batches.state_dict() if self.batches is not None else None, self.step,
                              msgspec.to_builtins(extra), group=self.group, sharded=sharded, weights=weights)
        return SaveCheckpointResult(path=str(out), step=self.step, time_s=time.perf_counter() - t0)

    def load_checkpoint(self, p: LoadCheckpointParams | None = None, /, **fields: Any) -> LoadCheckpointResult:
        """Restores weights, optimizer state, data position, RNG and step into the
        current model/optimizer/data (build them the same way first). Everything is
        checked before anything changes (Note [checkpoint loads])."""
        p = params(LoadCheckpointParams, p, fields)
        self._check_generation(p, "load_checkpoint")
        lm = self._need_model()
        pending = read_checkpoint(p.path, model=lm.model, optimizer=self.optimizer, group=self.group,
                                  sharded=self.dp is not None and self.dp.sharded)
        state, state_file = pending.state, Path(p.path) / STATE_FILE
        try:
            extra = msgspec.convert(state.extra, CheckpointExtra)
        except msgspec.ValidationError as e:
            where, why = field_of(e, "extra")
            raise CheckpointError(f"checkpoint {p.path!r}: {STATE_FILE} {where} does not fit this nanotune: {why}",
                                  state_file, where) from None
        if extra.optimizer is not None and self.optimizer_params is not None \
                and extra.optimizer.name != self.optimizer_params.name:
            raise CheckpointError(f"checkpoint {p.path!r} was saved with the {extra.optimizer.name} optimizer; this "
                                  f"session's is {self.optimizer_params.name}", state_file, "extra.optimizer.name")
        batches = None
        if state.data_state is not None and self.data is not None:
            ds = state.data_state
            size = ds.get("batch_size", self.batches.batch_size if self.batches is not None else 1)
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise CheckpointError(f"checkpoint {p.path!r}: {STATE_FILE} data_state.batch_size is {size!r}, not a "
                                      "positive integer", state_file, "data_state.batch_size")
            try:
                batches = self.data.train.batches(size)
                batches.load_state_dict(ds)
            except DatasetError as e:
                raise CheckpointError(f"checkpoint {p.path!r} does not fit the loaded dataset: {e}", state_file,
                                      e.field or "data_state") from e
        pending.apply()  # validated: from here nothing fails on the checkpoint's contents
        if batches is not None:
            self.batches = batches
        self.step = state.step
        self.mask = extra.mask
        return LoadCheckpointResult(path=state.path, step=state.step, extra=extra)

    # ------------------------------------------------------------------ helpers

    def _need_whole_tensors(self, method: str) -> None:
        if self.dp is not None and self.dp.sharded:
            raise SessionError(f"{method}: it reads whole tensors and parallel 'fsdp' shards each one across the "
                               "ranks; use parallel 'ddp' to watch masks and weights", "parallel")

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


class _Watch:
    """The tensor sample_weights looks at, and what the last step showed of it.

    Note [weight samples]: sample_weights answers "|w| vs |grad| of this tensor at the
    last step" (the paper's star figure, watched live) without a cost for runs that never
    ask: only the tensor asked for last is watched. Its sample is a fixed set of flat
    indices (uniform without replacement, seeded by the name and count, so the same
    entries come back on every call and the points of a live scatter move rather than
    jump). Each train_step that is applied calls observe() after the loss and gradient
    norm were found finite and before clipping and the update: it copies the weights and
    the accumulated gradients at those indices to the CPU (2 x count floats). The first
    call for a tensor therefore has no gradients (step null); the next step fills them.
    With NanoAdam's sparse gradients a masked tensor's dense gradient never exists, so
    its grads are null. A refused step (NON_FINITE) leaves the last sample as it was."""

    def __init__(self, name: str, param: torch.nn.Parameter, count: int):
        self.name, self.param, self.count = name, param, count
        self.indices = _sample_indices(param.numel(), count, zlib.crc32(name.encode()) ^ count)
        self.step: int | None = None  # the session's step counter after the observed step
        self.weights: torch.Tensor | None = None
        self.grads: torch.Tensor | None = None

    def at_sample(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (the parameter or its gradient) at the sampled entries, as float32 on the CPU."""
        return t.detach().reshape(-1)[self.indices.to(t.device)].float().cpu()

    def observe(self, step: int) -> None:
        self.weights = self.at_sample(self.param)
        self.grads = None if self.param.grad is None else self.at_sample(self.param.grad)
        self.step = step + 1


def _sample_indices(numel: int, count: int, seed: int) -> torch.Tensor:
    """`count` distinct flat indices in [0, numel), sorted, int64 (all of them when count >= numel),
    without materializing a permutation of a large tensor."""
    if count >= numel:
        return torch.arange(numel, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    if numel <= 4 * count:
        picked = torch.randperm(numel, generator=gen)[:count]
    else:
        picked = torch.empty(0, dtype=torch.int64)
        while picked.numel() < count:  # draws with replacement: duplicates are rare when numel > 4 count
            picked = torch.unique(torch.cat([picked, torch.randint(numel, (2 * count,), generator=gen)]))
        picked = picked[torch.randperm(picked.numel(), generator=gen)[:count]]
    return picked.sort().values


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return optimizer_state_bytes(opt)  # NanoAdam's own count; the peers' tensors however they keep them
