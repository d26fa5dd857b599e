"""The training methods of the sidecar (protocol/training.ts): thin wire wrappers
around nanotune.session.Session, one per sidecar process (ctx.state.session).

Errors from bad input (a missing file, a bad row, an unknown option, a call out
of order) are INVALID_PARAMS replies whose message names the field, file or line,
with the same in `data`; the session keeps what it had before the failed call.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch

from ..sidecar import SidecarError, method
from ..sidecar.protocol import ErrorCode, Model, TensorRef
from ..session import Session

Criterion = Literal["small_weights", "large_weights", "random", "large_grads"]


def session(ctx) -> Session:
    if ctx.state.session is None:
        ctx.state.session = Session()
    return ctx.state.session


def bad_input_is_invalid_params(fn):
    """ValueErrors of our modules (DatasetError, ModelError, SessionError, ...) name
    what was wrong: they become INVALID_PARAMS with their path/line/field as data."""

    @functools.wraps(fn)
    def wrapper(ctx, p):
        try:
            return fn(ctx, p)
        except (ValueError, FileNotFoundError) as e:
            data = {k: getattr(e, k) for k in ("path", "line", "field", "option") if getattr(e, k, None) is not None}
            raise SidecarError(ErrorCode.INVALID_PARAMS, f"{ctx.method}: {e}", data or None) from e

    return wrapper


# ---- structs (mirror protocol/training.ts) ------------------------------------


class MaskDecision(Model):
    criterion: Criterion
    density: float
    per_tensor: dict[str, float] | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None


def _decision(m: MaskDecision) -> dict[str, Any]:
    d: dict[str, Any] = {"criterion": m.criterion, "density": m.density}
    if m.per_tensor is not None:
        d["perTensor"] = m.per_tensor
    if m.include is not None:
        d["include"] = m.include
    if m.exclude is not None:
        d["exclude"] = m.exclude
    return d


class LoadModelParams(Model):
    path: str
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    device: str | None = None
    gradient_checkpointing: bool | None = None
    seed: int | None = None


class LoadModelResult(Model):
    path: str
    device: str
    dtype: str
    parameters: int
    trainable_parameters: int
    tied: list[list[str]]
    param_bytes: int
    model_type: str


@method("load_model", params=LoadModelParams, result=LoadModelResult)
@bad_input_is_invalid_params
def load_model(ctx, p: LoadModelParams):
    out = session(ctx).load_model(p.path, dtype=p.dtype, device=p.device or "auto",
                                  gradient_checkpointing=bool(p.gradient_checkpointing), seed=p.seed or 0)
    return LoadModelResult(**out)


class LoadDatasetParams(Model):
    path: str
    format: Literal["auto", "text", "instruction", "alpaca", "commonsense", "chat"] | None = None
    cutoff: int | None = None
    train_on_inputs: bool | None = None
    seed: int | None = None
    shuffle: bool | None = None
    eval_fraction: float | None = None
    eval_path: str | None = None


class LoadDatasetResult(Model):
    path: str
    format: str
    train_examples: int
    eval_examples: int
    tokens: int
    truncated: int
    dropped: int


@method("load_dataset", params=LoadDatasetParams, result=LoadDatasetResult)
@bad_input_is_invalid_params
def load_dataset(ctx, p: LoadDatasetParams):
    out = session(ctx).load_dataset(
        p.path, format=p.format or "auto", cutoff=256 if p.cutoff is None else p.cutoff,
        train_on_inputs=bool(p.train_on_inputs), seed=p.seed or 0,
        shuffle=True if p.shuffle is None else p.shuffle, eval_fraction=p.eval_fraction or 0.0,
        eval_path=p.eval_path)
    return LoadDatasetResult(**out)


class CreateOptimizerParams(Model):
    name: Literal["nanoadam", "adamw"]
    lr: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    weight_decay: float | None = None
    density: float | None = None
    mask_interval: int | None = None
    density_interval: int | None = None
    final_density: float | None = None
    total_steps: int | None = None
    criterion: Criterion | None = None
    moments_on_refresh: Literal["carry", "reset"] | None = None
    bias_correction: bool | None = None
    moments_dtype: Literal["float32", "bfloat16"] | None = None
    index_dtype: Literal["int16", "int32"] | None = None
    sparse_gradients: bool | None = None
    dense: list[str] | None = None
    tied: Literal["sparse", "dense"] | None = None
    seed: int | None = None


class GroupInfo(Model):
    sparse: bool
    tensors: int
    entries: int


class CreateOptimizerResult(Model):
    name: str
    groups: list[GroupInfo]
    state_bytes: int


_NANOADAM_ONLY = ("density", "mask_interval", "density_interval", "final_density", "total_steps", "criterion",
                  "moments_on_refresh", "bias_correction", "moments_dtype", "index_dtype", "sparse_gradients",
                  "dense", "tied", "seed")


@method("create_optimizer", params=CreateOptimizerParams, result=CreateOptimizerResult)
@bad_input_is_invalid_params
def create_optimizer(ctx, p: CreateOptimizerParams):
    import msgspec

    opts = {k: v for k, v in msgspec.structs.asdict(p).items() if v is not None and k != "name"}
    if p.name == "adamw":
        wrong = [k for k in opts if k in _NANOADAM_ONLY]
        if wrong:
            raise SidecarError(ErrorCode.INVALID_PARAMS,
                               f"create_optimizer: {wrong[0]!r} is a NanoAdam option; adamw takes lr, betas, eps, "
                               "weightDecay", {"field": wrong[0]})
    if "moments_dtype" in opts:
        opts["moments_dtype"] = getattr(torch, opts["moments_dtype"])
    if "index_dtype" in opts:
        opts["index_dtype"] = getattr(torch, opts["index_dtype"])
    if "mask_interval" not in opts and p.name == "nanoadam":
        opts["mask_interval"] = None  # the controller decides (a null on the wire reads the same)
    out = session(ctx).create_optimizer(p.name, **opts)
    return CreateOptimizerResult(name=out["name"], groups=[GroupInfo(**g) for g in out["groups"]],
                                 state_bytes=out["state_bytes"])


class TrainStepParams(Model):
    lr: float
    micro_batch: int | None = None
    grad_accum: int | None = None
    grad_clip: float | None = None
    mask: MaskDecision | None = None


class TrainStepResult(Model):
    step: int
    loss: float
    grad_norm: float | None
    tokens: int
    input_tokens: int
    time_s: float
    lr: float
    density: float | None
    mask_refreshed: bool
    epoch: float
    state_bytes: int


@method("train_step", params=TrainStepParams, result=TrainStepResult)
@bad_input_is_invalid_params
def train_step(ctx, p: TrainStepParams):
    ctx.check_cancelled()
    out = session(ctx).train_step(p.lr, micro_batch=p.micro_batch or 1, grad_accum=p.grad_accum or 1,
                                  grad_clip=p.grad_clip, mask=_decision(p.mask) if p.mask else None)
    return TrainStepResult(**out)


class SetMaskPolicyParams(MaskDecision):
    now: bool | None = None


class MaskResult(Model):
    tensors: int
    frozen: int


@method("set_mask_policy", params=SetMaskPolicyParams, result=MaskResult)
@bad_input_is_invalid_params
def set_mask_policy(ctx, p: SetMaskPolicyParams):
    return MaskResult(**session(ctx).set_mask_policy(_decision(p), now=bool(p.now)))


class RefreshMaskParams(Model):
    mask: MaskDecision | None = None


@method("refresh_mask", params=RefreshMaskParams, result=MaskResult)
@bad_input_is_invalid_params
def refresh_mask(ctx, p: RefreshMaskParams):
    s = session(ctx)
    decision = _decision(p.mask) if p.mask is not None else s.mask
    if decision is None:
        raise SidecarError(ErrorCode.INVALID_PARAMS, "refresh_mask: no mask decision yet; pass mask",
                           {"field": "mask"})
    return MaskResult(**s.set_mask_policy(decision, now=True))


class GetMasksParams(Model):
    names: list[str] | None = None


class MaskTensor(Model):
    name: str
    numel: int  # entries of the whole tensor
    indices: TensorRef  # int32 flat indices of the mask (a torch.Tensor when returned)


class GetMasksResult(Model):
    masks: list[MaskTensor]


@method("get_masks", params=GetMasksParams, result=GetMasksResult)
@bad_input_is_invalid_params
def get_masks(ctx, p: GetMasksParams):
    s = session(ctx)
    sizes = {n: q.numel() for n, q in s.loaded.model.named_parameters()} if s.loaded else {}
    masks = s.masks(p.names)
    return GetMasksResult(masks=[MaskTensor(name=n, numel=sizes.get(n, 0), indices=m.cpu()) for n, m in masks.items()])


class EvaluateParams(Model):
    batch_size: int | None = None
    max_batches: int | None = None


class EvaluateResult(Model):
    loss: float
    perplexity: float
    tokens: int
    time_s: float
    step: int


@method("evaluate", params=EvaluateParams, result=EvaluateResult)
@bad_input_is_invalid_params
def evaluate(ctx, p: EvaluateParams):
    out = session(ctx).evaluate(batch_size=p.batch_size or 8, max_batches=p.max_batches)
    return EvaluateResult(loss=out["loss"], perplexity=out["perplexity"], tokens=out["tokens"],
                          time_s=out["time_s"], step=out["step"])


class ChatMessage(Model):
    role: str
    content: str


class GenerateParams(Model):
    prompt: str | list[ChatMessage]
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None


class GenerateResult(Model):
    text: str


@method("generate", params=GenerateParams, result=GenerateResult)
@bad_input_is_invalid_params
def generate(ctx, p: GenerateParams):
    prompt = p.prompt if isinstance(p.prompt, str) else [{"role": m.role, "content": m.content} for m in p.prompt]
    text = session(ctx).generate(prompt, max_new_tokens=p.max_new_tokens or 64, temperature=p.temperature or 0.0,
                                 top_p=1.0 if p.top_p is None else p.top_p, seed=p.seed or 0)
    return GenerateResult(text=text)


class SaveCheckpointParams(Model):
    path: str
    extra: dict[str, Any] | None = None


class SaveCheckpointResult(Model):
    path: str
    step: int
    time_s: float


@method("save_checkpoint", params=SaveCheckpointParams, result=SaveCheckpointResult)
@bad_input_is_invalid_params
def save_checkpoint(ctx, p: SaveCheckpointParams):
    return SaveCheckpointResult(**session(ctx).save_checkpoint(p.path, p.extra))


class LoadCheckpointParams(Model):
    path: str


class LoadCheckpointResult(Model):
    path: str
    step: int
    extra: dict[str, Any]


@method("load_checkpoint", params=LoadCheckpointParams, result=LoadCheckpointResult)
@bad_input_is_invalid_params
def load_checkpoint(ctx, p: LoadCheckpointParams):
    return LoadCheckpointResult(**session(ctx).load_checkpoint(p.path))
