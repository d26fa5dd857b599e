"""One optimizer step, evaluation and generation: the compute the sidecar's
train_step / evaluate / generate methods wrap. The loop itself lives in TS.

Note [loss over accumulated micro-batches]: a step's loss is the mean over all
target tokens of all its micro-batches, not the mean of per-micro-batch means.
Each micro-batch's backward uses sum(token losses) / (target tokens of the whole
step), so the accumulated gradient equals the gradient of one big batch with the
same tokens, whatever the padding and however the tokens split across
micro-batches (the unweighted mean of means would overweight short batches).
A target token is a label != -100 after the one-position shift.

Note [non-finite steps]: train_step checks the loss and the global gradient norm
after backward and before the optimizer step (one device sync). If either is not
finite the step is not applied: optimizer.step() is not called, the gradients are
zeroed, and the optimizer comes back exactly as it was before the call (its
per-tensor state dicts and group options are restored from a shallow snapshot,
which covers the lr set for the step, a mask refresh that sparse-gradient mode
ran during backward and the `pending` bookkeeping); the weights are untouched
since nothing wrote them. It then raises NonFiniteError (code NON_FINITE, data
{step, loss, gradNorm} as floats: msgpack carries NaN and +-inf, and the TS
client's msgpackr decodes them as NaN/Infinity). In sparse-gradient mode, where
no dense gradient exists, gradNorm is the norm of the gradient entries that were
kept (each mask's entries and the dense tensors'). Only non-finite values are
caught: an lr so large that the update itself is finite but ruinous (1e10) shows
up as a non-finite loss on a later step, which this refuses; the run recovers by
loading an earlier checkpoint.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX
from .errors import ErrorCode, InvalidParams, NanotuneError
from .models import amp_dtype
from .templates import render

__all__ = ["Completion", "NonFiniteError", "OPTIMIZERS", "OptimizerError", "complete", "create_optimizer", "evaluate",
           "generate", "optimizer_state_bytes", "prompt_ids", "train_step"]


class NonFiniteError(NanotuneError):
    """A step whose loss or gradient norm is not finite; it was not applied (Note
    [non-finite steps]). data: {step, loss, gradNorm} (floats; gradNorm None when
    there were no gradients)."""

    code = ErrorCode.NON_FINITE

    def __init__(self, step: int | None, loss: float, grad_norm: float | None):
        self.step, self.loss, self.grad_norm = step, loss, grad_norm
        at = "" if step is None else f"step {step}: "
        super().__init__(None, f"{at}the loss ({loss}) or the gradient norm ({grad_norm}) is not finite; the step "
                               "was not applied (weights, optimizer state and step are unchanged)",
                         {"step": step, "loss": loss, "gradNorm": grad_norm})


class OptimizerError(InvalidParams):
    """Bad create_optimizer arguments (code INVALID_PARAMS); `option` names the one that was wrong."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message, option=option)


# What create_optimizer builds (protocol/training.ts OptimizerConfig.name). The peers
# (galore, adam-mini, adafactor, adamw8bit, microadam) are for comparisons such as
# `npm run bench:peers`; their packages come with the `peers` extra of pyproject.toml,
# except MicroAdam's, which needs CUDA (see _microadam).
OPTIMIZERS = ("nanoadam", "adamw", "galore", "adam-mini", "adafactor", "adamw8bit", "microadam")
_PEERS_INSTALL = "pip install 'nanotune[peers]'"


def create_optimizer(model: torch.nn.Module, name: str = "nanoadam", **opts: Any) -> torch.optim.Optimizer:
    """name="nanoadam": NanoAdam over nanoadam_param_groups(model, dense=...);
    opts are NanoAdam's keyword arguments plus `dense` (default ("lm_head", "norm"))
    and `tied` ("sparse" or "dense", see Note [tied tensors] in optim.py).
    name="adamw": torch.optim.AdamW over the trainable parameters (the dense
    baseline); opts are AdamW's, with weight_decay defaulting to 0.0 like NanoAdam
    (torch's own default is 0.01). moments_dtype and index_dtype may be torch dtypes or
    their names ("bfloat16", "int32").

    The peers (packages from the `peers` extra; lr is a placeholder that train_step
    overwrites every step; weight_decay defaults to 0.0 for all of them):
    name="galore": galore_torch.GaLoreAdamW as GaLore's README sets it up: the 2-D
        weights of the nn.Linear modules whose name contains one of `targets`
        (default ("attn", "mlp")) get low-rank projected Adam (`rank` 128,
        `update_proj_gap` 200, `scale` 0.25, `proj_type` "std"), every other
        parameter plain AdamW; plus lr, betas, eps (GaLore's default 1e-6),
        weight_decay, correct_bias.
    name="adam-mini": adam_mini.Adam_mini over model.named_parameters(); `dim`,
        `n_heads`, `n_kv_heads` default to the model config's hidden_size,
        num_attention_heads, num_key_value_heads; plus lr, betas, eps, weight_decay.
        Not for LoRA adapters (it partitions by the base model's module names).
    name="adafactor": transformers.optimization.Adafactor with an explicit lr
        (relative_step=False, scale_parameter=False, warmup_init=False by default);
        opts are Adafactor's (eps is its pair (eps1, eps2); beta1 None = no momentum).
    name="adamw8bit": bitsandbytes.optim.AdamW8bit (block-wise 8-bit moments); opts
        lr, betas, eps, weight_decay, min_8bit_size (tensors smaller than it keep
        32-bit state; bitsandbytes' default 4096). Runs where this bitsandbytes has an
        8-bit Adam kernel for the model's device (CUDA; CPU in recent releases):
        checked by one tiny step at creation, else OptimizerError.
    name="microadam": ista_daslab_optimizers.MicroAdam, CUDA only (OptimizerError on
        another device or without its CUDA kernels); opts m (10), quant_block_size
        (100000), k_init (0.01), alpha, lr, betas, eps, weight_decay.

    An unknown or invalid option raises OptimizerError naming it; so does a peer whose
    package is missing (option "name", with the pip command)."""
    opts = {k: getattr(torch, v) if k in ("moments_dtype", "index_dtype") and isinstance(v, str) else v
            for k, v in opts.items()}
    try:
        if name == "adamw":
            opts.setdefault("weight_decay", 0.0)
            _check_options(torch.optim.AdamW, opts, name)
            return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **opts)
        if name == "nanoadam":
            from .optim import NanoAdam, nanoadam_param_groups  # lazy: the sidecar loads without it

            dense = opts.pop("dense", ("lm_head", "norm"))
            tied = opts.pop("tied", "sparse")
            _check_options(NanoAdam, opts, name)
            return NanoAdam(nanoadam_param_groups(model, dense=tuple(dense), tied=tied), **opts)
        if name in _PEER_BUILDERS:
            return _PEER_BUILDERS[name](model, dict(opts))
    except OptimizerError:
        raise
    except (ValueError, AssertionError) as e:  # the optimizers' own checks: "Invalid betas[0]: 1.5; must be in [0, 1)"
        m = re.match(r"Invalid (\w+)", str(e))
        option = {"learning": "lr", "beta": "betas", "epsilon": "eps"}.get(m.group(1), m.group(1)) if m else None
        raise OptimizerError(f"{name}: {e}", option) from e
    raise OptimizerError(f"optimizer name {name!r} is not one of {', '.join(map(repr, OPTIMIZERS))}", "name")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state: NanoAdam's own count (state_bytes()); for any other
    optimizer every tensor reachable from optimizer.state (values, lists, and the
    attributes of objects kept there, such as GaLore's projector matrices), each
    storage once (bitsandbytes shares one quantization map across tensors)."""
    if hasattr(optimizer, "state_bytes"):
        return int(optimizer.state_bytes())
    seen: set[tuple[str, int]] = set()
    total = 0

    def visit(v: Any, depth: int) -> None:
        nonlocal total
        if torch.is_tensor(v):
            if hasattr(v, "to_local"):  # a DTensor (FSDP2): this rank's shard
                v = v.to_local()
            storage = v.untyped_storage()
            key = (str(v.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(v, dict):
            for x in v.values():
                visit(x, depth + 1)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x, depth + 1)
        elif depth < 3 and hasattr(v, "__dict__") and not isinstance(v, (type, torch.nn.Module)):
            for x in vars(v).values():
                visit(x, depth + 1)

    for s in optimizer.state.values():
        visit(s, 0)
    return total


def _allow(name: str, opts: dict[str, Any], allowed: Sequence[str]) -> None:
    for key in opts:
        if key not in allowed:
            raise OptimizerError(f"{name} has no option {key!r}; options are {list(allowed)}", key)


def _need(name: str, module: str, package: str, install: str = _PEERS_INSTALL):
    import importlib
    import logging

    # bitsandbytes (imported by galore_torch too) logs a warning at import on CPUs with
    # AVX512-BF16 about an optional 4-bit matmul kernel (the `kernels` package) that none
    # of these optimizers uses.
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise OptimizerError(f"{name} needs the {package} package ({e}); install it: {install} "
                             f"(or pip install {package})", "name") from e
    finally:
        log.setLevel(level)


def _device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    raise OptimizerError("the model has no parameters to optimize", "name")


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _galore(model: torch.nn.Module, opts: dict[str, Any]) -> torch.optim.Optimizer:
    galore = _need("galore", "galore_torch", "galore-torch")
    rank, gap = opts.pop("rank", 128), opts.pop("update_proj_gap", 200)
    scale, proj_type = opts.pop("scale", 0.25), opts.pop("proj_type", "std")
    targets = opts.pop("targets", ("attn", "mlp"))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise OptimizerError(f"galore: rank must be an integer >= 1, got {rank!r}", "rank")
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise OptimizerError(f"galore: update_proj_gap must be an integer >= 1, got {gap!r}", "update_proj_gap")
    if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
        raise OptimizerError(f"galore: scale must be a number > 0, got {scale!r}", "scale")
    if proj_type not in ("std", "reverse_std", "right", "left", "full"):
        raise OptimizerError(f"galore: proj_type {proj_type!r} is not std, reverse_std, right, left or full",
                             "proj_type")
    if isinstance(targets, str):
        targets = (targets,)
    opts.setdefault("weight_decay", 0.0)
    _allow("galore", opts, ("lr", "betas", "eps", "weight_decay", "correct_bias"))
    low_rank = [m.weight for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and any(t in n for t in targets) and m.weight.requires_grad]
    if not low_rank:
        raise OptimizerError(f"galore: no trainable nn.Linear weight in a module whose name contains one of "
                             f"{list(targets)}", "targets")
    ids = {id(p) for p in low_rank}
    regular = [p for p in _trainable(model) if id(p) not in ids]
    groups = ([{"params": regular}] if regular else []) + [
        {"params": low_rank, "rank": rank, "update_proj_gap": gap, "scale": float(scale), "proj_type": proj_type}]
    return galore.GaLoreAdamW(groups, no_deprecation_warning=True, **opts)


def _adam_mini(model: torch.nn.Module, opts: dict[str, Any]) -> torch.optim.Optimizer:
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        raise OptimizerError("adam-mini partitions the parameters by the base model's module names (one lr per "
                             "attention head, neuron or token); a LoRA adapter's lora_A/lora_B are no such blocks: "
                             "use adamw or nanoadam with model.lora", "name")
    adam_mini = _need("adam-mini", "adam_mini", "adam-mini")
    cfg = getattr(model, "config", None)
    dim = opts.pop("dim", getattr(cfg, "hidden_size", None))
    n_heads = opts.pop("n_heads", getattr(cfg, "num_attention_heads", None))
    n_kv_heads = opts.pop("n_kv_heads", getattr(cfg, "num_key_value_heads", None) or n_heads)
    for key, v in (("dim", dim), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise OptimizerError(f"adam-mini: {key} must be an integer >= 1 (default: the model config's), "
                                 f"got {v!r}", key)
    if n_heads % n_kv_heads:
        raise OptimizerError(f"adam-mini: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}",
                             "n_kv_heads")
    opts.setdefault("weight_decay", 0.0)
    _allow("adam-mini", opts, ("lr", "betas", "eps", "weight_decay"))
    return adam_mini.Adam_mini(named_parameters=model.named_parameters(), dim=dim, n_heads=n_heads,
                               n_kv_heads=n_kv_heads, verbose=False, **opts)


def _adafactor(model: torch.nn.Module, opts: dict[str, Any]) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    for key, default in (("lr", 1e-3), ("relative_step", False), ("scale_parameter", False),
                         ("warmup_init", False)):
        opts.setdefault(key, default)
    _check_options(Adafactor, opts, "adafactor")
    eps = opts.get("eps")
    if eps is not None and not (isinstance(eps, (list, tuple)) and len(eps) == 2):
        raise OptimizerError(f"adafactor: eps is a pair (eps1, eps2) (default (1e-30, 1e-3)), got {eps!r}", "eps")
    if opts["relative_step"]:
        raise OptimizerError("adafactor: relative_step=True makes Adafactor choose its own lr; nanotune sets the lr "
                             "of every step, so it runs with relative_step=False", "relative_step")
    if "eps" in opts:
        opts["eps"] = tuple(opts["eps"])
    return Adafactor(_trainable(model), **opts)


_BNB_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def _adamw8bit(model: torch.nn.Module, opts: dict[str, Any]) -> torch.optim.Optimizer:
    bnb = _need("adamw8bit", "bitsandbytes", "bitsandbytes")
    opts.setdefault("weight_decay", 0.0)
    _allow("adamw8bit", opts, ("lr", "betas", "eps", "weight_decay", "min_8bit_size"))
    params = _trainable(model)
    dev, dt = _device(model), params[0].dtype if params else torch.float32
    key = (str(dev), dt)
    if key not in _BNB_WORKS:  # one 8-bit step on a 4096-entry tensor: does this device have the kernel?
        try:
            probe = torch.zeros(4096, device=dev, dtype=dt, requires_grad=True)
            probe.grad = torch.ones_like(probe)
            p_opt = bnb.optim.AdamW8bit([probe], lr=1e-3, min_8bit_size=0)
            p_opt.step()
            if p_opt.state[probe]["state1"].dtype != torch.uint8 or not torch.isfinite(probe).all():
                raise RuntimeError("the probe step did not keep 8-bit state")
            _BNB_WORKS[key] = True
        except Exception as e:  # NotImplementedError, RuntimeError from the dispatcher or the native library
            raise OptimizerError(
                f"adamw8bit: bitsandbytes {getattr(bnb, '__version__', '?')} has no 8-bit AdamW kernel for {dt} "
                f"tensors on {dev} ({type(e).__name__}: {e}); bitsandbytes has CUDA kernels, and CPU ones in "
                f"recent releases (pip install -U bitsandbytes)", "name") from e
    return bnb.optim.AdamW8bit(params, **opts)


def _microadam(model: torch.nn.Module, opts: dict[str, Any]) -> torch.optim.Optimizer:
    dev = _device(model)
    install = "pip install ista-daslab-optimizers ista-daslab-optimizers-cuda"
    if dev.type != "cuda":
        raise OptimizerError(
            f"microadam runs only on a CUDA GPU: MicroAdam (ista-daslab-optimizers) is written as CUDA kernels "
            f"(the ista_daslab_cuda_micro_adam and ista_daslab_cuda_tools extensions of ista-daslab-optimizers-cuda) "
            f"and has no CPU code; this model is on {dev}. On a machine with a CUDA GPU and a CUDA build of torch: "
            f"{install}", "name")
    try:
        from ista_daslab_optimizers import MicroAdam
    except ImportError as e:
        raise OptimizerError(
            f"microadam needs ista-daslab-optimizers and its CUDA kernels ({e}): {install} (not in nanotune[peers]: "
            f"it pulls torchvision, torchaudio, triton and wandb, and its kernels are built for a CUDA torch)",
            "name") from e
    for key, default in (("lr", 1e-3), ("m", 10), ("quant_block_size", 100_000), ("k_init", 0.01),
                         ("weight_decay", 0.0)):
        opts.setdefault(key, default)
    _allow("microadam", opts, ("lr", "m", "quant_block_size", "k_init", "alpha", "betas", "eps", "weight_decay"))
    return MicroAdam(_trainable(model), **opts)


_PEER_BUILDERS: dict[str, Callable[[torch.nn.Module, dict[str, Any]], torch.optim.Optimizer]] = {
    "galore": _galore, "adam-mini": _adam_mini, "adafactor": _adafactor, "adamw8bit": _adamw8bit,
    "microadam": _microadam,
}


def _check_options(cls: type, opts: dict[str, Any], name: str) -> None:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    allowed = [k for k in params if k not in ("self", "params")]
    for key in opts:
        if key not in allowed:
            raise OptimizerError(f"{name} has no option {key!r}; options are {allowed}", key)


def _targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], amp: torch.dtype | None = None) -> torch.Tensor:
    """Sum of the token cross-entropies of one micro-batch, in fp32. amp: the forward and
    the loss run under torch.autocast to it (models.py, Note [amp]); backward, called
    outside, follows the dtypes autocast chose, as torch's AMP recipe has it."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device, non_blocking=True)  # (B, T)
    attention_mask = batch["attention_mask"].to(device, non_blocking=True)  # (B, T)
    labels = batch["labels"].to(device, non_blocking=True)  # (B, T)
    packed = {}
    if "position_ids" in batch:  # packed blocks (data.py, Note [packing]): positions restart at each document;
        # without an attention_mask transformers attends within each document only (block-diagonal causal)
        packed, attention_mask = {"position_ids": batch["position_ids"].to(device, non_blocking=True)}, None
    with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       **packed).logits  # (B, T, V)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")


def _sync(model: torch.nn.Module) -> None:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _OptimizerSnapshot:
    """What a refused step must put back: each tensor's state dict (shallow: the step
    replaces the tensors it changes before step(), it never writes them in place) and
    each group's options. Costs a few dict copies, no tensor memory."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.state = {p: dict(s) for p, s in optimizer.state.items()}
        self.groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    def restore(self) -> None:
        opt = self.optimizer
        for p in list(opt.state):
            if p not in self.state:
                del opt.state[p]
        for p, saved in self.state.items():
            st = opt.state[p]
            st.clear()
            st.update(saved)
        for g, saved in zip(opt.param_groups, self.groups):
            for k in [k for k in g if k != "params" and k not in saved]:
                del g[k]
            g.update(saved)


def _kept_grad_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """Sparse-gradient mode: the norm of the gradient entries that exist (gathered at
    the masks, and the dense tensors' .grad)."""
    parts = list(getattr(optimizer, "_sparse_grads", {}).values())
    parts += [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not parts:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32) for t in parts]))


class DataParallel:
    """A sidecar group's data parallelism for train_step: the module to run (DDP's
    wrapper, or the FSDP2-sharded model itself), the group (for the loss sum and the
    slowest rank's time) and, under DDP, the communication hook's state."""

    def __init__(self, module: torch.nn.Module, group: Any, comm: Any = None, sharded: bool = False):
        self.module, self.group, self.comm, self.sharded = module, group, comm, sharded

    def gradient_sync(self, on: bool) -> contextlib.AbstractContextManager:
        """Gradient accumulation: only the last micro-batch's backward communicates."""
        if on:
            return contextlib.nullcontext()
        return _without_gradient_sync(self.module) if self.sharded else self.module.no_sync()

    def slice(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from .parallel import rank_slice

        return rank_slice(batch, self.group.rank, self.group.world_size)


@contextlib.contextmanager
def _without_gradient_sync(module: torch.nn.Module) -> Iterator[None]:
    """FSDP2's no_sync: no reduce-scatter in the backward passes inside."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               batches: Sequence[dict[str, torch.Tensor]], lr: float, grad_clip: float | None = None,
               pending: Callable[[], Any] | None = None, step: int | None = None,
               observe: Callable[[], Any] | None = None, *, data_parallel: DataParallel | None = None
               ) -> dict[str, Any]:
    """One optimizer step over gradient-accumulated micro-batches at learning rate `lr`
    (set on every param group). grad_clip: max global grad norm (None = no clipping).
    pending: optimizer bookkeeping that belongs to this step only (the session's mask
    decision), run just before optimizer.step() once the step is known to be finite;
    in sparse-gradient mode before backward instead (the hooks gather at the new
    masks), and undone with the rest if the step is refused.
    step: the step's number, for NonFiniteError's data.
    observe: called once the step is known to be finite, before clipping and the update,
    while the accumulated gradients are in .grad (Session.sample_weights' watch).
    data_parallel: in a sidecar group, `batches` are the global micro-batches and this
    rank trains on its rows (parallel.rank_slice) through the DDP wrapper; loss, tokens
    and time come back for the whole group, the same on every rank (DataParallel).

    Raises NonFiniteError, leaving weights and optimizer state as they were, when the
    loss or the gradient norm is not finite (Note [non-finite steps]).

    Returns {loss, grad_norm, tokens, input_tokens, time_s, lr, density, mask_refreshed}:
    loss is the token mean of Note [loss over accumulated micro-batches]; grad_norm the
    global norm before clipping (None when NanoAdam(sparse_gradients=True) drops the dense
    gradients in backward);
    tokens the target tokens, input_tokens the non-padding ones; density and
    mask_refreshed come from NanoAdam (`current_density`, `last_step_refreshed`), and
    are 1.0 / False for optimizers without them, such as AdamW.
    The forward runs under autocast when load_model gave `model` an amp dtype (models.py,
    Note [amp]); weights, gradients and optimizer state keep their dtype.
    """
    if not batches:
        raise InvalidParams("train_step needs at least one micro-batch", field="grad_accum")
    if not (lr >= 0 and math.isfinite(lr)):
        raise InvalidParams(f"lr must be a finite number >= 0, got {lr!r}", field="lr")
    sparse_grads = bool(getattr(optimizer, "sparse_gradients", False))  # NanoAdam frees dense grads in backward
    if grad_clip is not None and sparse_grads:
        raise InvalidParams("grad_clip needs the full gradients, which NanoAdam(sparse_gradients=True) frees "
                            "during backward; turn one of them off", field="grad_clip")
    tokens = sum(_targets(b) for b in batches)
    if tokens == 0:
        raise InvalidParams("train_step: the micro-batches have no target tokens (all labels are -100)")
    input_tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    amp = amp_dtype(model)  # read off the bare model: a DDP wrapper does not forward attributes
    forward, dp = model, data_parallel
    if dp is not None:  # this rank's rows of each global micro-batch; the sums run over the group
        batches = [dp.slice(b) for b in batches]
        forward = dp.module
        if dp.comm is not None:
            dp.comm.bytes = 0
    sparse_comm = dp is not None and dp.comm is not None and dp.comm.sparse
    if grad_clip is not None and sparse_comm:
        raise InvalidParams("grad_clip needs the full gradients, and NanoAdam's sparse all-reduce sums only the "
                            "selected entries; turn one of them off", field="grad_clip")
    _sync(model)
    start = time.perf_counter()
    model.train()
    snapshot = _OptimizerSnapshot(optimizer)
    try:
        for group in optimizer.param_groups:
            group["lr"] = lr
        if pending is not None and (sparse_grads or sparse_comm):
            pending()
        if sparse_comm:
            optimizer.prepare_step()  # the masks the all-reduce sends (Note [sparse all-reduce])
        optimizer.zero_grad(set_to_none=True)
        loss_sum: Any = 0.0
        for n, batch in enumerate(batches):
            # DDP and FSDP communicate in the last micro-batch's backward only
            with dp.gradient_sync(n == len(batches) - 1) if dp is not None else contextlib.nullcontext():
                loss = _loss_sum(forward, batch, amp) / tokens
                loss.backward()
            loss_sum += loss.detach()  # an fp32 tensor on the device from the first micro-batch on
        grad_norm = None
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if dp is not None and dp.sharded:  # FSDP: this rank's shards; the norm is summed over the ranks below
            grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        if grads and not sparse_grads:
            # In fp32 even for bf16 gradients; clipping scales like clip_grad_norm_ does.
            grad_norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))
        checked = grad_norm if not sparse_grads else _kept_grad_norm(optimizer)
        # One device sync: the step is applied only when both are finite (Note [non-finite steps]).
        values = torch.stack([loss_sum.float(), checked.to(loss_sum.device)]) if checked is not None \
            else loss_sum.float()[None]
        loss_value, *rest = values.tolist()
        norm_value = rest[0] if rest else None
        if dp is not None:  # each rank summed its rows: the step's loss is the sum over ranks
            if dp.sharded and norm_value is not None:  # and each rank's shard holds part of the norm
                loss_value, square = dp.group.all_reduce_sum([loss_value, norm_value ** 2])
                norm_value = math.sqrt(square)
                grad_norm = torch.tensor(norm_value, device=grads[0].device)
            else:
                loss_value = dp.group.all_reduce_sum([loss_value])[0]
        if not math.isfinite(loss_value) or (norm_value is not None and not math.isfinite(norm_value)):
            raise NonFiniteError(step, loss_value, norm_value)
        if observe is not None:  # the gradients as accumulated, before clipping (Session.sample_weights)
            observe()
        if grad_norm is not None and grad_clip is not None:
            scale = torch.clamp(grad_clip / (grad_norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, scale.to(grads[0].device))
        if pending is not None and not sparse_grads:
            pending()
    except BaseException:
        optimizer.zero_grad(set_to_none=True)
        snapshot.restore()
        raise
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    density = getattr(optimizer, "current_density", 1.0)  # NanoAdam: None while no tensor is sparse
    _sync(model)
    elapsed = time.perf_counter() - start
    if dp is not None:
        elapsed = dp.group.all_reduce_max(elapsed)  # the group's step is its slowest rank's
    return {
        "loss": loss_value,
        "grad_norm": None if grad_norm is None else norm_value,
        "tokens": tokens,
        "input_tokens": input_tokens,
        "time_s": elapsed,
        "lr": lr,
        "density": None if density is None else float(density),
        "mask_refreshed": bool(getattr(optimizer, "last_step_refreshed", False)),
    }


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Token-mean loss and perplexity (exp of it) over all target tokens of `batches`;
    under autocast like train_step when the model has an amp dtype (models.py, Note [amp])."""
    amp = amp_dtype(model)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    tokens = 0
    try:
        for batch in batches:
            total += _loss_sum(model, batch, amp).double().cpu()
            tokens += _targets(batch)
    finally:
        model.train(was_training)
    if tokens == 0:
        raise InvalidParams("evaluate: no target tokens in the batches")
    loss = float(total) / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}


# ---------------------------------------------------------------------------
# Generation
#
# Note [generation prompts]: a string prompt is the instruction of a template
# (templates.render, the function data.load_dataset renders instruction rows with;
# "raw", the default, is the text as it is) and is tokenized the way data.py
# tokenizes an example's prompt: bos, then the prompt text tokenized on its own
# without special tokens (Note [prompt and response tokenized apart] in data.py).
# A finetuned model is therefore asked with the ids of its training prompts, token
# for token (tests/python/test_generate.py checks that against load_dataset). The
# "chat" template and chat messages get no extra bos: the tokenizer's chat template
# writes its own, and data.py's chat rows get none either. Generation itself is
# transformers' model.generate with the model's generation_config (eos, pad, greedy
# unless temperature > 0), so its tokens are transformers' own for the same ids.
#
# Note [streamed text]: with `stop` or `on_text`, a stopping criterion decodes the
# new ids after every token (skip_special_tokens, and clean_up_tokenization_spaces
# off: that clean-up rewrites text already produced, " ." becoming ".", so a piece
# once sent could stop being a prefix of the text; the result's text is decoded
# the same way). What it sends on is final: it holds back a trailing U+FFFD (a
# character whose bytes are not all generated yet) and any tail that could be the
# start of a stop string, so a stop string is never streamed, and the pieces
# concatenate to the result's text. The first stop string to appear ends
# generation, and the text is cut before it.

GENERATION_FINISH = ("length", "eos", "stop")


@dataclass
class Completion:
    """What complete() produced."""

    text: str  # the new text: special tokens removed, cut before the first stop string
    ids: list[int]  # the new token ids as generated (a final eos, or the token that completed a stop string, included)
    finish_reason: str  # "eos", "stop" (a stop string) or "length" (max_new_tokens reached)
    prompt: str  # the prompt text as rendered by the template (chat messages: by the chat template)
    prompt_ids: list[int]  # the ids the model was given


def prompt_ids(tokenizer, prompt: str | Sequence[dict[str, str]], template: str = "raw",
               input: str = "") -> tuple[str, list[int]]:
    """The rendered prompt and its token ids (Note [generation prompts]).

    prompt: a string, the instruction of `template` (with `input` as its {input}),
        or chat messages, rendered by the tokenizer's chat template with the
        assistant's turn opened (`template` and `input` do not apply).
    """
    if isinstance(prompt, str):
        text = render(template, prompt, input, tokenizer=tokenizer)
        add_bos = template != "chat"
    else:
        text = tokenizer.apply_chat_template([dict(m) for m in prompt], tokenize=False, add_generation_prompt=True)
        add_bos = False
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if add_bos and tokenizer.bos_token_id is not None:
        ids.insert(0, tokenizer.bos_token_id)
    return text, ids


def _decode(tokenizer, ids: list[int]) -> str:
    # Note [streamed text]: no clean-up, so a longer decode extends a shorter one.
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the earliest stop string in `text` starts (None: none there)."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _settled(text: str, stop: Sequence[str]) -> int:
    """How much of `text` (no stop string in it) later tokens cannot change: all but a
    trailing U+FFFD and the longest tail that begins some stop string."""
    n = len(text)
    while n and text[n - 1] == "\ufffd":
        n -= 1
    hold = max((k for s in stop for k in range(min(len(s) - 1, n), 0, -1) if text.endswith(s[:k], 0, n)),
               default=0)
    return n - hold


class _Watch:
    """A stopping criterion for model.generate that runs after every new token: calls
    `check` (cancellation), streams the settled new text to `on_text` and ends
    generation at a stop string (Note [streamed text])."""

    def __init__(self, tokenizer, start: int, stop: Sequence[str], on_text: Callable[[str], None] | None,
                 check: Callable[[], None] | None):
        self.tokenizer, self.start, self.stop, self.on_text, self.check = tokenizer, start, list(stop), on_text, check
        self.sent = ""  # the text streamed so far
        self.stopped = False
        self.decodes = bool(stop) or on_text is not None

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        if self.check is not None:
            self.check()
        if self.decodes and not self.stopped:
            text = _decode(self.tokenizer, input_ids[0, self.start:].tolist())  # batch of one
            cut = _first_stop(text, self.stop)
            self.stopped = cut is not None
            self._send(text[:cut] if cut is not None else text[:_settled(text, self.stop)])
        return torch.full((input_ids.shape[0],), self.stopped, dtype=torch.bool, device=input_ids.device)

    def _send(self, settled: str) -> None:
        if self.on_text is not None and len(settled) > len(self.sent) and settled.startswith(self.sent):
            piece, self.sent = settled[len(self.sent):], settled
            self.on_text(piece)

    def finish(self, text: str) -> None:
        """Sends what is left of the final `text` (the pieces then concatenate to it)."""
        if self.on_text is not None and not text.startswith(self.sent):  # Note [streamed text] rules this out
            raise NanotuneError(ErrorCode.INTERNAL, f"generate: the streamed text {self.sent!r} is not a prefix of "
                                                    f"the final text {text!r}")
        self._send(text)


def _token_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, torch.Tensor):
        return set(value.flatten().tolist())
    return {int(v) for v in value} if isinstance(value, (list, tuple, set)) else {int(value)}


@torch.no_grad()
def complete(model: torch.nn.Module, tokenizer, prompt: str | Sequence[dict[str, str]], template: str = "raw",
             input: str = "", max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, stop: Sequence[str] = (), on_text: Callable[[str], None] | None = None,
             check: Callable[[], None] | None = None) -> Completion:
    """The continuation of `prompt`, with what generation did (see generate for the
    arguments; Notes [generation prompts] and [streamed text]).

    stop: strings that end generation; the text is cut before the first one to appear.
    on_text: called with each new piece of text as it is produced; the pieces
        concatenate to the result's text.
    check: called after every token; raising there (the sidecar's cancellation) ends
        generation with that exception.
    """
    from transformers import StoppingCriteriaList

    rendered, ids_list = prompt_ids(tokenizer, prompt, template, input)
    device = next(model.parameters()).device
    ids = torch.tensor([ids_list], dtype=torch.long, device=device)  # (1, T)
    sample = temperature > 0
    kwargs: dict[str, Any] = dict(do_sample=sample, max_new_tokens=max_new_tokens)
    # The model's generation_config decides like in transformers (a list of eos ids for
    # instruct models); the tokenizer's fill in what it leaves out.
    config = getattr(model, "generation_config", None)
    if getattr(config, "pad_token_id", None) is None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    if getattr(config, "eos_token_id", None) is None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    eos = _token_ids(kwargs.get("eos_token_id", getattr(config, "eos_token_id", None)))
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:  # greedy: clear sampling settings a generation_config.json may carry
        kwargs.update(temperature=None, top_p=None, top_k=None)
    watch = None
    if stop or on_text is not None or check is not None:
        watch = _Watch(tokenizer, ids.shape[1], stop, on_text, check)
        kwargs["stopping_criteria"] = StoppingCriteriaList([watch])
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)  # (1, T + new)
    finally:
        model.train(was_training)
    new = out[0, ids.shape[1]:].tolist()
    text = _decode(tokenizer, new)
    cut = _first_stop(text, stop)
    reason = "stop" if cut is not None else "eos" if new and new[-1] in eos else "length"
    text = text if cut is None else text[:cut]
    if watch is not None:
        watch.finish(text)
    return Completion(text=text, ids=new, finish_reason=reason, prompt=rendered, prompt_ids=ids_list)


def generate(model: torch.nn.Module, tokenizer, prompt: str | Sequence[dict[str, str]], max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, template: str = "raw",
             input: str = "", stop: Sequence[str] = (), on_text: Callable[[str], None] | None = None) -> str:
    """The continuation of `prompt` (the new text only, special tokens removed).

    prompt: a string, the instruction of `template` ("raw" by default: the text as
        it is; "alpaca", "chat", or a format string, see nanotune.templates) with
        `input` as its {input}, tokenized like a training prompt (bos first); or chat
        messages, rendered by the tokenizer's chat template with the assistant
        header appended (Note [generation prompts]).
    temperature: 0 (default) = greedy; > 0 samples, with `top_p` nucleus filtering.
    seed: the sampling seed; the global torch RNG is left untouched either way.
    stop, on_text: see complete(), which also tells the ids and why generation ended.
    """
    return complete(model, tokenizer, prompt, template=template, input=input, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_p=top_p, seed=seed, stop=stop, on_text=on_text).text
