"""NanoAdam: Adam on the smallest-magnitude weights of each tensor.

From "Pay Attention to Small Weights" (Zhou, Jacobs, Gadhikar, Burkholz,
NeurIPS 2025, arXiv 2506.21374); docs/nanoadam.md sums up the algorithm and
our choices. No official code is public, so every point where the paper is
silent is a named choice below, switchable where users could want the other way.

The class does bookkeeping (schedules, masks, state); the functional
``nano_adam`` does the math, with a plain single-tensor reference path kept
beside the fast paths: ``foreach`` (torch's multi-tensor kernels, the default on
CUDA) and ``fused`` (compiled CPU kernels, the default on the CPU; Note [CPU
kernels]). Tests compare every fast path with the reference, bit for bit.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = [
    "CRITERIA",
    "MOMENTS_ON_REFRESH",
    "NanoAdam",
    "nano_adam",
    "nanoadam_param_groups",
    "select_mask",
]

CRITERIA = ("small_weights", "large_weights", "random", "large_grads")
MOMENTS_ON_REFRESH = ("carry", "reset")
# Chunk rule (as MicroAdam's kernels): each tensor is flattened and split into
# chunks of CHUNK_SIZE entries; the selection takes its share inside every chunk,
# so the mask is spread over the whole tensor and selection stays on the device
# in bounded memory. 2**15 keeps chunk-local offsets inside int16.
CHUNK_SIZE = 2**15
# How many chunks one selection pass handles at once (bounds the int64 key buffer).
_CHUNKS_PER_PASS = 256
# Entries per foreach bucket (bounds the fp32 working copies of one fast-path launch).
_FOREACH_BUCKET = 2**24

try:  # torch.distributed may be missing from a build
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()


def _local(t: Tensor | None) -> Tensor | None:
    """This rank's shard of a DTensor (FSDP2's sharded parameters and gradients), sharing
    its storage; any other tensor as it is (Note [shard-local masks])."""
    return t.to_local() if isinstance(t, DTensor) else t


# --------------------------------------------------------------------------- #
# Parameter groups
# --------------------------------------------------------------------------- #


def nanoadam_param_groups(
    model: nn.Module,
    dense: Sequence[str] = ("lm_head", "norm"),
    tied: str = "sparse",
    frozen: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a sparse and a dense group.

    ``dense`` are regular expressions searched in each parameter name; a match
    puts the tensor in the dense group, updated by plain Adam (the paper
    excludes the output head and all normalisation layers from selection;
    embeddings are not excluded). ``frozen`` patterns leave a tensor out of the
    optimizer altogether.

    Note [tied tensors]: a tied tensor (Llama 3.2 ties ``lm_head.weight`` to
    ``model.embed_tokens.weight``) is one tensor with several names and appears
    once. ``tied="sparse"`` (default) keeps it sparse unless *every* name matches
    a dense pattern: it is a pretrained embedding, not a freshly initialised
    classifier head, and dense Adam state for a 128k x 3072 matrix would cost
    more than all sparse state together. ``tied="dense"`` makes it dense as soon
    as *any* name matches (the head rule wins).

    Each group carries ``names`` (all names of each tensor joined by ``=``, the
    first being the canonical one) so masks and per-tensor densities can be
    addressed by name.
    """
    if tied not in ("sparse", "dense"):
        raise ValueError(f"Invalid tied: {tied!r}; expected 'sparse' or 'dense'")
    dense_res = [re.compile(p) for p in dense]
    frozen_res = [re.compile(p) for p in frozen]
    names_of: dict[int, list[str]] = {}
    tensors: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        names_of.setdefault(id(p), []).append(name)
        tensors[id(p)] = p
    sparse_group: dict[str, Any] = {"params": [], "names": [], "sparse": True}
    dense_group: dict[str, Any] = {"params": [], "names": [], "sparse": False}
    for key, names in names_of.items():
        if any(r.search(n) for r in frozen_res for n in names):
            continue
        hits = [any(r.search(n) for r in dense_res) for n in names]
        is_dense = all(hits) if tied == "sparse" else any(hits)
        group = dense_group if is_dense else sparse_group
        group["params"].append(tensors[key])
        group["names"].append("=".join(names))
    return [g for g in (sparse_group, dense_group) if g["params"]]


# --------------------------------------------------------------------------- #
# Mask selection
# --------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=4096)  # the same few shapes every step
def _chunk_count(numel: int, density: float, chunk_size: int) -> tuple[tuple[int, int, int], ...]:
    """(start, length, k) per run of chunks with the same k: full chunks, then the tail.

    k per chunk = round(density * length), at least 1, at most length (so a
    selected tensor always trains; round half up)."""

    def k_of(length: int) -> int:
        return min(length, max(1, int(math.floor(density * length + 0.5))))

    n_full, tail = divmod(numel, chunk_size)
    runs = []
    if n_full:
        runs.append((0, n_full * chunk_size, k_of(chunk_size)))
    if tail:
        runs.append((n_full * chunk_size, tail, k_of(tail)))
    return tuple(runs)


@functools.lru_cache(maxsize=4096)
def _runs(numel: int, density: float, chunk_size: int) -> tuple[int, ...]:
    """The chunks as the CPU kernels take them: (start, width, rows, k) per run, flat."""
    out = []
    for start, length, k in _chunk_count(numel, density, chunk_size):
        width = min(length, chunk_size)
        out += [start, width, length // width, k]
    return tuple(out)


def selected_count(numel: int, density: float, chunk_size: int = CHUNK_SIZE) -> int:
    """How many entries a tensor of ``numel`` entries selects at ``density``."""
    return sum(
        (length // min(length, chunk_size)) * k
        for _, length, k in _chunk_count(numel, density, chunk_size)
    )


def _magnitude_bits(x: Tensor) -> Tensor:
    # |x| as float32 bit patterns: for non-negative floats the int32 view is
    # monotone in the value, and exact for bf16/fp16/fp32 inputs.
    return x.detach().abs().to(torch.float32).view(torch.int32).to(torch.int64)


@torch.no_grad()
def select_mask(
    param: Tensor,
    density: float,
    criterion: str = "small_weights",
    grad: Tensor | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = CHUNK_SIZE,
    fused: bool | None = None,
) -> Tensor:
    """Indices (int32, flat, ascending) of the entries of ``param`` to update.

    Per chunk of ``chunk_size`` entries, takes k = round(density * chunk length):
    ``small_weights`` the k smallest |w| (the paper's rule), ``large_weights``
    the k largest |w|, ``large_grads`` the k largest |grad|, ``random`` k
    uniformly at random (from ``generator``).

    Ties are broken by position: the lower flat index wins. Selection runs on
    exact int64 keys (|value| bits << 32 | offset), so the result is the same on
    every device and for every run, also for bf16 weights where equal
    magnitudes are common.

    ``fused``: None selects with the compiled CPU kernel (one pass per chunk, Note
    [CPU kernels]) where it applies, else with torch's topk over those keys; True
    requires the kernel, False never uses it. Both give the same indices.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"Invalid criterion: {criterion!r}; expected one of {CRITERIA}")
    if criterion == "large_grads" and grad is None:
        raise ValueError("criterion 'large_grads' needs the gradient: call after backward()")
    numel = param.numel()
    if numel >= 2**31:
        raise ValueError(f"tensor of {numel} entries is too large for int32 mask indices")
    if density == 0:  # a frozen tensor (per-tensor density 0): empty mask
        return torch.empty(0, dtype=torch.int32, device=param.device)
    source = grad if criterion == "large_grads" else param
    flat = source.detach().reshape(-1)
    kernel = _cpu_kernels(fused, [flat]) if criterion != "random" and flat.dtype in _KERNEL_DTYPES else None
    if fused and criterion != "random" and kernel is None:
        raise ValueError(f"Invalid fused=True: {_kernels_reason(flat)}")
    if kernel is not None:
        return kernel.refresh([flat], [_runs(numel, density, chunk_size)], criterion != "small_weights",
                              [None], [[]], [[]], -1, [0], 0, False)[0][0]
    out = []
    for start, length, k in _chunk_count(numel, density, chunk_size):
        width = min(length, chunk_size)
        rows = length // width
        for r0 in range(0, rows, _CHUNKS_PER_PASS):
            r1 = min(rows, r0 + _CHUNKS_PER_PASS)
            block = flat[start + r0 * width : start + r1 * width].view(r1 - r0, width)
            offsets = torch.arange(width, device=flat.device, dtype=torch.int64)
            if criterion == "random":
                keys = torch.rand(block.shape, generator=generator, device="cpu").to(block.device)
                local = keys.topk(k, dim=1, sorted=False).indices
            elif criterion == "small_weights":
                keys = (_magnitude_bits(block) << 32) | offsets
                local = keys.topk(k, dim=1, largest=False, sorted=False).indices
            else:  # large_weights, large_grads: larger value wins, then lower offset
                keys = (_magnitude_bits(block) << 32) | (width - 1 - offsets)
                local = keys.topk(k, dim=1, largest=True, sorted=False).indices
            local = local.sort(dim=1).values
            base = start + torch.arange(r0, r1, device=flat.device, dtype=torch.int64) * width
            out.append((local + base[:, None]).reshape(-1).to(torch.int32))
    return torch.cat(out)


def _remap(old_idx: Tensor, new_idx: Tensor, values: list[Tensor]) -> list[Tensor]:
    """Each of ``values`` at ``new_idx``: carried from ``old_idx`` where an index stays,
    zero where new (both ascending); one searchsorted serves all arrays."""
    outs = [torch.zeros(new_idx.numel(), dtype=v.dtype, device=v.device) for v in values]
    if old_idx.numel() == 0:
        return outs
    pos = torch.searchsorted(old_idx, new_idx).clamp_(max=old_idx.numel() - 1)
    stays = old_idx[pos] == new_idx
    src = pos[stays]
    for out, v in zip(outs, values):
        out[stays] = v[src]
    return outs


def _compact(idx: Tensor, chunk_size: int, index_dtype: torch.dtype) -> Tensor:
    """Stored form of a mask: int32 flat indices, or int16 offsets inside each chunk."""
    if index_dtype == torch.int32:
        return idx
    return (idx % chunk_size).to(torch.int16)  # chunks start at multiples of chunk_size


def _expand(stored: Tensor, numel: int, density: float, chunk_size: int) -> Tensor:
    """Flat int32 indices of a stored mask (inverse of _compact)."""
    if stored.dtype == torch.int32 or stored.numel() == 0:
        return stored.to(torch.int32)
    parts, pos = [], 0
    for start, length, k in _chunk_count(numel, density, chunk_size):
        width = min(length, chunk_size)
        rows = length // width
        base = start + torch.arange(rows, dtype=torch.int32, device=stored.device) * width
        local = stored[pos : pos + rows * k].to(torch.int32).view(rows, k)
        parts.append((local + base[:, None]).reshape(-1))
        pos += rows * k
    return torch.cat(parts)


# --------------------------------------------------------------------------- #
# The math
# --------------------------------------------------------------------------- #


def nano_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    idxs: list[Tensor | tuple[Tensor, float, int] | None],
    steps: list[Tensor | int | tuple[Tensor, int]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    foreach: bool = False,
    fused: bool = False,
) -> None:
    """One NanoAdam step over tensors.

    ``idxs[i]`` is the mask: int32 flat indices, ascending; or the stored form
    ``(int16 offsets inside chunks, density, chunk_size)`` (as NanoAdam keeps it);
    or None for a dense tensor (every entry). ``grads[i]`` is the gradient at the
    mask (gathered: one entry per mask entry, in the parameter's dtype or fp32) or
    the dense gradient, which the step gathers. Moments are kept in their own dtype
    and computed in fp32. ``steps[i]`` is the step count bias correction uses,
    already incremented: a number or 0-d tensor (the same for every entry of the
    tensor), a 1-d int tensor aligned with the mask (each entry's own count; Note
    [bias correction]) or a pair ``(ages, since)`` meaning ``ages + since``. Only
    ``params[i].view(-1)[mask]`` is written: every other entry stays bit-identical.

    ``fused=True`` runs the compiled CPU kernels (Note [CPU kernels]) for every
    tensor they take (contiguous CPU tensors, gradient in the parameter's dtype),
    the others on the reference path; else ``foreach`` picks torch's multi-tensor
    kernels or the single-tensor reference path. All give the same bits.
    """
    kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
              bias_correction=bias_correction)
    if fused:
        rest = _fused_nano_adam(params, grads, exp_avgs, exp_avg_sqs, idxs, steps, **kw)
        if rest:
            _single_tensor_nano_adam(*(list(x) for x in zip(*rest)), **kw)
        return
    if not foreach:
        _single_tensor_nano_adam(params, grads, exp_avgs, exp_avg_sqs, idxs, steps, **kw)
        return
    # Buckets of at most _FOREACH_BUCKET entries: the fp32 working copies of all
    # tensors at once would cost several GB on a 3B model.
    start, size = 0, 0
    for i, g in enumerate(grads):
        size += g.numel()
        if size >= _FOREACH_BUCKET or i == len(grads) - 1:
            sl = slice(start, i + 1)
            _foreach_nano_adam(params[sl], grads[sl], exp_avgs[sl], exp_avg_sqs[sl], idxs[sl], steps[sl], **kw)
            start, size = i + 1, 0


def _flat_mask(idx: Tensor | tuple[Tensor, float, int] | None, numel: int) -> Tensor | None:
    """int32 flat indices of a mask given as nano_adam takes it (None stays None)."""
    if isinstance(idx, tuple):
        stored, density, chunk_size = idx
        return _expand(stored, numel, density, chunk_size)
    return idx


def _gathered(g: Tensor, idx: Tensor | None) -> Tensor:
    """The fp32 gradient at the mask: ``g`` if already gathered, else gathered from it."""
    g = g.reshape(-1)
    if idx is not None and g.numel() != idx.numel():
        g = g.index_select(0, idx)
    return g.to(torch.float32)


def _counts(step: Tensor | int | tuple[Tensor, int]) -> Tensor | int:
    """The step count(s) bias correction uses; a pair (ages, since) is ages + since."""
    if isinstance(step, tuple):
        ages, since = step
        return ages.to(torch.int32) + since
    return step


def _gather_param(p: Tensor, idx: Tensor | None) -> Tensor:
    # fp32 working copy of the entries to update.
    flat = p.detach().view(-1)
    if idx is None:
        return flat.to(torch.float32, copy=True)
    return flat.index_select(0, idx).to(torch.float32)  # a new tensor already: no second copy


def _scatter_param(p: Tensor, idx: Tensor | None, value: Tensor) -> None:
    flat = p.detach().view(-1)
    if idx is None:
        flat.copy_(value)
    else:
        flat[idx] = value.to(p.dtype)


def _age_cap(beta1: float, beta2: float) -> int:
    """The count A from which Adam's bias correction no longer changes an fp32 bit
    (Note [bias correction]): beta1**A <= 2**-55 makes 1 - beta1**A exactly 1 in
    fp64, beta2**A <= 2**-26 makes sqrt(1 - beta2**A) round to 1 in fp32."""

    def cap(beta: float, bits: int) -> int:
        return 1 if beta == 0 else math.ceil(bits * math.log(2) / -math.log(beta))

    return max(1, cap(beta1, 55), cap(beta2, 26))


@functools.lru_cache(maxsize=16)
def _power_table(beta1: float, beta2: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """beta1**a and beta2**a for a = 0.._age_cap, fp64 on ``device``. Python floats, the
    same powers torch.optim.Adam takes, so per-entry factors equal its per-step ones."""
    n = _age_cap(beta1, beta2) + 1
    return (torch.tensor([beta1**a for a in range(n)], dtype=torch.float64, device=device),
            torch.tensor([beta2**a for a in range(n)], dtype=torch.float64, device=device))


def _step_scalars(step: Tensor | int, lr: float, beta1: float, beta2: float, bias_correction: bool):
    """(step size, sqrt(1 - beta2**step)) for ``step``: numbers for a number, fp32
    vectors for a 1-d tensor of per-entry counts (looked up in _factor_table)."""
    if not bias_correction:
        return lr, 1.0
    if torch.is_tensor(step) and step.dim() == 1:
        step_size, bc2_sqrt = _factor_table(lr, beta1, beta2, step.device)
        a = step.clamp(max=step_size.numel() - 1)  # counts >= the cap: identical fp32 factors
        return step_size[a], bc2_sqrt[a]
    t = float(step)
    return lr / (1 - beta1**t), math.sqrt(1 - beta2**t)


@functools.lru_cache(maxsize=4)  # lr changes every step: one entry serves all tensors of a step
def _factor_table(lr: float, beta1: float, beta2: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """fp32 lr / (1 - beta1**a) and sqrt(1 - beta2**a) for a = 0.._age_cap (entry 0 unused)."""
    p1, p2 = _power_table(beta1, beta2, device)
    return (lr / (1 - p1)).to(torch.float32), (1 - p2).sqrt_().to(torch.float32)


def _apply_update(theta: Tensor, m: Tensor, denom: Tensor, step_size: float | Tensor) -> None:
    # theta - step_size * m / denom, rounded as torch.optim.Adam's addcdiv_ does
    # ((value * m) / denom on the CPU); a per-entry step size multiplies m first.
    if torch.is_tensor(step_size):
        theta.addcdiv_(m * step_size, denom, value=-1)
    else:
        theta.addcdiv_(m, denom, value=-step_size)


def _single_tensor_nano_adam(params, grads, exp_avgs, exp_avg_sqs, idxs, steps, *, lr, beta1,
                             beta2, eps, weight_decay, bias_correction):
    # Reference path: plain per-tensor Adam on the selected entries, in the
    # operation order of torch.optim.Adam (so density=1 matches it bit for bit).
    for p, g, m, v, idx, step in zip(params, grads, exp_avgs, exp_avg_sqs, idxs, steps):
        m, v = m.view(-1), v.view(-1)  # a dense tensor's moments have its shape; the update runs flat
        idx = _flat_mask(idx, p.numel())
        g, step = _gathered(g, idx), _counts(step)
        m32 = m if m.dtype == torch.float32 else m.to(torch.float32)
        v32 = v if v.dtype == torch.float32 else v.to(torch.float32)
        m32.lerp_(g, 1 - beta1)
        v32.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size, bc2_sqrt = _step_scalars(step, lr, beta1, beta2, bias_correction)
        denom = (v32.sqrt() / bc2_sqrt).add_(eps)
        theta = _gather_param(p, idx)
        if weight_decay:
            theta.mul_(1 - lr * weight_decay)  # decoupled (AdamW-style), selected entries only
        _apply_update(theta, m32, denom, step_size)
        _scatter_param(p, idx, theta)
        if m32 is not m:
            m.copy_(m32)
            v.copy_(v32)


def _foreach_nano_adam(params, grads, exp_avgs, exp_avg_sqs, idxs, steps, *, lr, beta1, beta2,
                       eps, weight_decay, bias_correction):
    # Fast path: the same math with torch._foreach_* kernels over all tensors at
    # once (one launch per op on CUDA instead of one per tensor).
    if not params:
        return
    exp_avgs = [m.view(-1) for m in exp_avgs]  # a dense tensor's moments have its shape; the update runs flat
    exp_avg_sqs = [v.view(-1) for v in exp_avg_sqs]
    idxs = [_flat_mask(idx, p.numel()) for p, idx in zip(params, idxs)]
    gs = [_gathered(g, idx) for g, idx in zip(grads, idxs)]
    steps = [_counts(s) for s in steps]
    ms = [m if m.dtype == torch.float32 else m.to(torch.float32) for m in exp_avgs]
    vs = [v if v.dtype == torch.float32 else v.to(torch.float32) for v in exp_avg_sqs]
    torch._foreach_lerp_(ms, gs, 1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
    scalars = [_step_scalars(s, lr, beta1, beta2, bias_correction) for s in steps]
    # Tensors with one count for all entries take scalar lists; those with per-entry
    # counts (Note [bias correction]) take lists of fp32 vectors.
    one = [i for i, (s, _) in enumerate(scalars) if not torch.is_tensor(s)]
    each = [i for i, (s, _) in enumerate(scalars) if torch.is_tensor(s)]
    denoms = torch._foreach_sqrt(vs)
    for sel in (one, each):
        if sel:
            torch._foreach_div_([denoms[i] for i in sel], [scalars[i][1] for i in sel])
    torch._foreach_add_(denoms, eps)
    thetas = [_gather_param(p, idx) for p, idx in zip(params, idxs)]
    if weight_decay:
        torch._foreach_mul_(thetas, 1 - lr * weight_decay)
    if one:
        torch._foreach_addcdiv_([thetas[i] for i in one], [ms[i] for i in one], [denoms[i] for i in one],
                                [-scalars[i][0] for i in one])
    if each:
        steps_m = torch._foreach_mul([ms[i] for i in each], [scalars[i][0] for i in each])
        torch._foreach_addcdiv_([thetas[i] for i in each], steps_m, [denoms[i] for i in each], value=-1)
    for p, idx, theta in zip(params, idxs, thetas):
        _scatter_param(p, idx, theta)
    for m, v, m32, v32 in zip(exp_avgs, exp_avg_sqs, ms, vs):
        if m32 is not m:
            m.copy_(m32)
            v.copy_(v32)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cpu_kernels(fused: bool | None, tensors: Sequence[Tensor]):
    """The compiled CPU kernels (nanotune.kernels) when ``fused`` allows them (None or
    True; False never) and every tensor is a contiguous CPU tensor; else None."""
    if fused is False or not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    from . import kernels  # lazy: built on first use

    return kernels.cpu()


def _kernels_reason(t: Tensor) -> str:
    """Why the CPU kernels do not take ``t``, for error messages."""
    if t.device.type != "cpu":
        return f"nanotune's CPU kernels run on CPU tensors, not {t.device} (there the foreach path runs)"
    if not t.is_contiguous():
        return "nanotune's CPU kernels need contiguous tensors"
    if t.dtype not in _KERNEL_DTYPES:
        return f"nanotune's CPU kernels take float32, bfloat16 and float16, not {t.dtype}"
    from . import kernels

    return f"nanotune's CPU kernels did not load ({kernels.status()['reason']})"


def _fused_nano_adam(params, grads, exp_avgs, exp_avg_sqs, idxs, steps, *, lr, beta1, beta2, eps,
                     weight_decay, bias_correction) -> list[tuple]:
    # Note [CPU kernels]: one compiled call for every tensor the kernels take (they write
    # through data pointers, outside autograd); returns the (param, grad, m, v, idx, step)
    # tuples they do not take, for the reference path.
    from . import kernels

    kernel = kernels.cpu()
    rest: list[tuple] = []
    args: dict[str, list] = {k: [] for k in ("p", "g", "m", "v", "idx", "layout", "ss", "bc2", "age", "since")}
    for p, g, m, v, idx, step in zip(params, grads, exp_avgs, exp_avg_sqs, idxs, steps):
        if (kernel is None or p.device.type != "cpu" or g.dtype != p.dtype or p.dtype not in _KERNEL_DTYPES
                or m.dtype not in _KERNEL_DTYPES
                or not (p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous())):
            rest.append((p, g, m, v, idx, step))
            continue
        stored, layout = idx, (0, 0, 0)  # layout: (k per full chunk, full chunks, chunk size)
        if isinstance(idx, tuple):
            stored, density, chunk_size = idx
            if stored.dtype != torch.int16:
                stored = stored.to(torch.int32)
            else:
                first = _chunk_count(p.numel(), density, chunk_size)[0]
                full = first[1] >= chunk_size  # full chunks come first; else the tail is all
                layout = (first[2], first[1] // chunk_size, chunk_size) if full else (1, 0, chunk_size)
        ages, since, ss, bc2 = None, 0, 0.0, 1.0
        if isinstance(step, tuple) and bias_correction:
            ages, since = step
        elif torch.is_tensor(step) and step.dim() == 1 and bias_correction:
            ages = step.to(torch.int32).contiguous()
        else:
            ss, bc2 = _step_scalars(0 if isinstance(step, tuple) else step, lr, beta1, beta2, bias_correction)
        for key, x in zip(args, (p, g, m, v, stored, layout, ss, bc2, ages, since)):
            if key == "layout":
                args[key] += x
            else:
                args[key].append(x)
    if args["p"]:
        table = _factor_table(lr, beta1, beta2, torch.device("cpu")) if bias_correction else (None, None)
        cap = table[0].numel() - 1 if bias_correction else 0
        decay = 1 - lr * weight_decay if weight_decay else 1.0
        kernel.step(args["p"], args["g"], args["m"], args["v"], args["idx"], args["layout"], args["ss"],
                    args["bc2"], args["age"], args["since"], table[0], table[1], cap, beta1, beta2, eps, decay)
    return rest


# --------------------------------------------------------------------------- #
# The optimizer
# --------------------------------------------------------------------------- #


class NanoAdam(Optimizer):
    r"""Adam restricted to a refreshed mask of small-magnitude weights.

    Algorithm 1 of the paper, for each optimizer step t = 0, 1, ... and each
    tensor :math:`\theta` of a sparse group (S entries):

    .. math::
        &\textbf{if } d \text{ set and } t \bmod d = 0:\;
            k \leftarrow k_0 + (k_f - k_0)\min(1, \lfloor t/d \rfloor d / T) \\
        &\textbf{if } t \bmod m = 0 \text{ or } k \text{ changed}:\;
            I \leftarrow \text{bottom-}k \text{ of } |\theta_t| \text{ per chunk} \\
        &g \leftarrow \nabla_\theta \mathcal{L}(\theta_t)[I] \\
        &m \leftarrow \beta_1 m + (1-\beta_1) g,\quad
         v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        &\theta[I] \leftarrow \theta[I] - \eta_t\, m / (\sqrt{v} + \epsilon)
    and every other entry of :math:`\theta` stays bit-identical. Tensors of a
    dense group (``sparse=False``, from :func:`nanoadam_param_groups`: the head
    and the norms) get plain Adam with the same settings, bias-corrected unless
    ``dense_bias_correction=False`` (so exactly ``torch.optim.Adam``).

    Args:
        params: tensors or param groups; a group with ``sparse=False`` is dense,
            a group's ``names`` (list of str) names its tensors in :meth:`masks`.
        lr (float, default 1e-3): learning rate :math:`\eta`; set it per step.
        betas (tuple, default (0.9, 0.999)): :math:`\beta_1, \beta_2`.
        eps (float, default 1e-8): added to :math:`\sqrt{v}`.
        weight_decay (float, default 0): decoupled (AdamW-style) decay, applied to
            the selected entries only. 0 as in every experiment of the paper.
        density (float, default 0.01): :math:`k_0`, fraction of each tensor updated.
        mask_interval (int or None, default 100): m, refresh the mask every m
            steps. None: refresh only at the first step, on a density change and
            when :meth:`refresh_mask` asks (a controller decides when).
        density_interval (int or None, default None): d, change the density every
            d steps along the linear decay; None turns the schedule off.
        final_density (float or None): :math:`k_f`, target of the linear decay.
        total_steps (int or None): T, the step at which the decay reaches k_f.
        criterion (str, default "small_weights"): which entries a refresh picks;
            "large_weights", "random" and "large_grads" serve as ablations.
        moments_on_refresh (str, default "carry"): see Note [moments on mask refresh].
        bias_correction (bool, default True): Adam's bias correction in the sparse
            groups, counted per entry from when it entered the mask; False is
            Algorithm 1 literally. See Note [bias correction] (why True).
        dense_bias_correction (bool, default True): the ``bias_correction`` of
            dense groups that do not set their own: True is ``torch.optim.Adam``
            (the paper's plain Adam); False the uncorrected update of earlier versions.
        moments_dtype (torch.dtype or None, default None): dtype of the moments;
            None is float32, torch.bfloat16 halves them (the paper's).
        index_dtype (torch.dtype, default torch.int16): how a mask is stored:
            int16 offsets inside each chunk (2 bytes an entry, as MicroAdam; the
            flat indices are rebuilt for each step, a transient of 4 bytes an
            entry for one tensor at a time) or int32 flat indices (4 bytes).
        chunk_size (int, default 2**15): see CHUNK_SIZE.
        foreach (bool or None, default None): use the foreach fast path; None
            picks it on CUDA.
        fused (bool or None, default None): the compiled CPU kernels (Note [CPU
            kernels]) for the step, the selection and the moment remap; None uses
            them for CPU tensors when they build and ``foreach`` is not True, True
            requires them (an error where they cannot run), False never.
        sparse_gradients (bool, default False): see Note [sparse gradients].
        seed (int, default 0): seeds the "random" criterion (per tensor and step,
            so a resumed run draws the same masks).

    Note [moments on mask refresh]: the paper does not say what happens to the
    Adam moments when the mask changes. Default ``"carry"``: an index that stays
    selected keeps its m and v, a newly selected index starts at zero, a dropped
    one is forgotten (its state is not stored). ``"reset"`` zeroes all moments at
    every refresh.

    Note [bias correction]: Adam divides m by 1 - beta1**a and v by 1 - beta2**a,
    a being how many gradients the moments have averaged since they were zero.
    An entry's moments start at zero when it enters the mask, so a is the entry's
    age, the steps it has taken since it entered, not the tensor's step count.
    ``bias_correction=True`` uses the age, so an entry's first update is
    lr * g / (|g| + eps) <= lr at whatever step it enters, and at density 1 the
    optimizer is ``torch.optim.Adam``. Off (Algorithm 1 literally), a newly
    selected entry moves 3.16x lr on its first step and about 6.5x lr ten steps
    later (betas (0.9, 0.999), steady gradient), again after every refresh.

    The default is on, chosen from the reproductions (reports/README.md, "bias
    correction"; a 1.26M Llama finetuned from corpus A to B, lr grid to 10x AdamW's):
    on and off tie on the average of A retained and B learned at each one's best lr
    (5.597 vs 5.587 nats), but on keeps more of A (5.041 vs 5.154), moves less for
    the same B learned (l2 about 27 vs 39), holds its average within 0.3 nats over a
    100x lr range where off loses up to 0.8, never diverged, and prefers 3.3x AdamW's
    lr (the paper reports 5-10x; off prefers 1x). Off learns more of B at its best lr
    (6.019 vs 6.153) and is the only setting where largest-gradient selection
    diverges at a high lr as the paper reports. Correction on at lr x behaves
    roughly like off at x/3: an lr tuned for off should be raised about 3x. One
    seed on one small model: ``bias_correction=False`` stays one switch away.
    What the age costs:

    - ``"reset"``: a refresh zeroes every moment, so every selected entry of a
      tensor has the same age, step - refreshed_at. Nothing is stored per entry.
    - ``"carry"``: an entry that stays keeps its moments and its age, a new one
      starts at 0, so ages differ. State ``age`` (k,) holds each selected entry's
      age at the last refresh (0 for the entries it brought in), remapped with the
      moments; the age at a step is ``age + step - refreshed_at``, so ``age`` is
      written only at refreshes. It saturates at A = _age_cap(beta1, beta2)
      (18013 for betas (0.9, 0.999)): from A on, beta1**a <= 2**-55 makes
      1 - beta1**a exactly 1 in fp64 and beta2**a <= 2**-26 makes
      sqrt(1 - beta2**a) round to 1 in fp32, so the fp32 factors, which are all
      Adam uses, are those of A and saturation changes no bit. ``age`` is int16
      (2 bytes per selected entry) when A < 2**15, which holds for
      beta1 <= 0.9988 and beta2 <= 0.99945, else int32 (4 bytes). It exists only
      with ``bias_correction=True`` and ``"carry"``; off, no state is added.
    - Per-entry factors come from a table of beta**a per (beta1, beta2), taken
      with Python floats like ``torch.optim.Adam`` does per step, so equal ages
      give the same bits as one count per tensor (density 1 matches torch's
      single-tensor Adam bit for bit on the CPU).
    - Entries whose age is unknown, under ``"carry"`` with state saved before
      ages existed or with ``bias_correction`` turned on mid-run, count the
      tensor's steps (the previous behavior) until they leave the mask.
    - ``state_dict`` saves ``age``, ``refreshed_at`` and ``step``;
      ``load_state_dict`` keeps ``age``'s dtype. The sparse-gradient mode, the
      foreach and the single-tensor paths share the ages.
    - Dense groups count the tensor's steps, which is exact: their moments never
      restart. Their ``bias_correction`` comes from ``dense_bias_correction``.

    Note [shard-local masks]: under FSDP2 (``fully_shard``) each parameter is a
    DTensor sharded on dim 0 and each rank's optimizer sees only its shard, so
    NanoAdam selects, keeps moments for and updates this rank's shard alone (its
    ``to_local()``, which shares the storage): the state is sharded with the weights
    and no selection ever crosses ranks. The chunk rule then applies to the shard:
    the shard is flattened and cut into chunks of ``chunk_size`` from the shard's
    own first entry. A single device cuts the whole tensor from its first entry, so
    the two agree exactly when every shard starts at a multiple of ``chunk_size``
    in the flat tensor and every shard's size is a multiple of it (then each
    shard-local chunk is a single-device chunk). That holds for Llama 3.2 3B's
    matrices on 2, 4 or 8 ranks with the default 2**15 (a 3072 x 3072 shard of
    1536 rows is 144 chunks); it does not for tensors smaller than a chunk (tiny
    models) or uneven shards. Where it does not, a chunk that straddles two shards
    becomes two chunks, each taking round(k x length) of its own entries: the same
    density, but per chunk the smallest weights of each part rather than of the
    whole, and up to one entry more or less per extra chunk. The masks differ a
    little and so do the runs (on tiny-llama, 0.2% in loss after 5 steps at lr
    1e-2, tests/python/test_distributed.py); ``chunk_size`` set to divide every
    shard (64 on tiny-llama) makes them equal to the single-device run. The paper
    is silent (it runs one device). ``sparse_gradients`` is refused under FSDP2:
    its gradients already arrive sharded, reduce-scattered to 1/world of the
    tensor.

    Note [CPU kernels]: on the CPU the step, the selection and the moment carry
    run compiled kernels (csrc/nano_adam_cpu.cpp, built and cached by
    nanotune.kernels; ``fused``): one parallel pass per block of mask entries for
    the step (gather, moments, scatter); per chunk, bottom-k by selection (a
    sample or the previous chunk's window bounds the k-th key, one pass collects
    the few keys between the bounds, a histogram of them finds it), and the
    moments and ages carried by rank in a bitmap of the old mask, in place when
    the density is unchanged; every due tensor of a group in one call. They compute the torch-op
    path's fp32 operations in its order (fusing the multiply-adds torch's own
    kernels fuse, taking the square root from torch), so every result is bit for
    bit the reference's (tests/python/test_optim_kernels.py). Tensors they do not
    take (CUDA, non-contiguous, other dtypes, the "random" criterion) run the
    torch-op paths; so does everything when no compiler is found.

    Note [sparse gradients]: with ``sparse_gradients=True`` each sparse tensor's
    gradient is gathered at its mask as soon as backward has accumulated it
    (``register_post_accumulate_grad_hook``) and the dense gradient is freed, so
    full gradients never all exist at once; gradient accumulation adds up only
    the k gathered entries. The update is the same as in the dense path. On a
    step that refreshes with ``large_grads`` the dense gradient is kept until
    :meth:`step` (it is what the criterion reads). Call :meth:`refresh_mask`
    with ``now=False`` in this mode so the refresh happens before backward.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        density: float = 0.01,
        mask_interval: int | None = 100,
        density_interval: int | None = None,
        final_density: float | None = None,
        total_steps: int | None = None,
        criterion: str = "small_weights",
        moments_on_refresh: str = "carry",
        bias_correction: bool = True,
        dense_bias_correction: bool = True,
        moments_dtype: torch.dtype | None = None,
        index_dtype: torch.dtype = torch.int16,
        chunk_size: int = CHUNK_SIZE,
        foreach: bool | None = None,
        fused: bool | None = None,
        sparse_gradients: bool = False,
        seed: int = 0,
    ):
        if not lr >= 0.0:
            raise ValueError(f"Invalid lr: {lr}; must be >= 0")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid betas[0]: {betas[0]}; must be in [0, 1)")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid betas[1]: {betas[1]}; must be in [0, 1)")
        if not eps >= 0.0:
            raise ValueError(f"Invalid eps: {eps}; must be >= 0")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay}; must be >= 0")
        _check_density("density", density)
        if mask_interval is not None and not (isinstance(mask_interval, int) and mask_interval >= 1):
            raise ValueError(f"Invalid mask_interval: {mask_interval}; must be an int >= 1 or None")
        if density_interval is not None:
            if not (isinstance(density_interval, int) and density_interval >= 1):
                raise ValueError(f"Invalid density_interval: {density_interval}; must be an int >= 1 or None")
            if final_density is None:
                raise ValueError("Invalid final_density: None; density_interval needs final_density")
            if total_steps is None:
                raise ValueError("Invalid total_steps: None; density_interval needs total_steps")
        if final_density is not None:
            _check_density("final_density", final_density)
        if total_steps is not None and not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(f"Invalid total_steps: {total_steps}; must be an int >= 1")
        if criterion not in CRITERIA:
            raise ValueError(f"Invalid criterion: {criterion!r}; expected one of {CRITERIA}")
        if moments_on_refresh not in MOMENTS_ON_REFRESH:
            raise ValueError(
                f"Invalid moments_on_refresh: {moments_on_refresh!r}; expected one of {MOMENTS_ON_REFRESH}"
            )
        if moments_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"Invalid moments_dtype: {moments_dtype}; expected None, float32, bfloat16 or float16")
        if index_dtype not in (torch.int16, torch.int32):
            raise ValueError(f"Invalid index_dtype: {index_dtype}; expected torch.int16 or torch.int32")
        if fused not in (None, True, False):
            raise ValueError(f"Invalid fused: {fused!r}; expected None, True or False")
        if fused and foreach:
            raise ValueError("Invalid fused=True with foreach=True: pick one fast path")
        if not (isinstance(chunk_size, int) and 1 <= chunk_size <= (2**15 if index_dtype == torch.int16 else 2**31)):
            raise ValueError(f"Invalid chunk_size: {chunk_size}; must be an int in [1, 2**15] "
                             "(int16 indices) or [1, 2**31] (int32)")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, density=density,
            mask_interval=mask_interval, density_interval=density_interval,
            final_density=final_density, total_steps=total_steps, criterion=criterion,
            moments_on_refresh=moments_on_refresh, bias_correction=bias_correction,
            moments_dtype=moments_dtype, index_dtype=index_dtype, chunk_size=chunk_size,
            foreach=foreach, fused=fused, sparse=True,
            seed=seed,
        )
        # Read by add_param_group, which super().__init__ calls: not a group default.
        self._dense_bias_correction = bool(dense_bias_correction)
        super().__init__(params, defaults)
        if fused:  # fail at construction, not at the first step
            first = next((_local(p) for g in self.param_groups for p in g["params"]), None)
            if first is not None and _cpu_kernels(True, [first.detach()]) is None:
                raise ValueError(f"Invalid fused=True: {_kernels_reason(first)}; fused=None falls back to "
                                 "the torch-op paths")
        self.sparse_gradients = sparse_gradients
        # Gradients gathered at the mask in sparse-gradient mode, per tensor ((k,), grad dtype).
        # Not optimizer state: consumed by step(), never saved.
        self._sparse_grads: dict[Tensor, Tensor] = {}
        self._hooks = []
        # Whether the last step() refreshed any mask (read by the trainer for its events).
        self.last_step_refreshed = False
        if sparse_gradients:
            if any(isinstance(p, DTensor) for g in self.param_groups for p in g["params"]):
                raise ValueError("sparse_gradients needs whole tensors; FSDP shards them (its gradients are "
                                 "already sharded: leave sparse_gradients off)")
            for group in self.param_groups:
                if group["sparse"]:
                    for p in group["params"]:
                        self._hooks.append(p.register_post_accumulate_grad_hook(self._gather_hook))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # A dense group's bias_correction defaults to dense_bias_correction (Note [bias correction]).
        if not param_group.get("sparse", True) and "bias_correction" not in param_group:
            param_group = {**param_group, "bias_correction": self._dense_bias_correction}
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_dense_bias_correction", True)
        for group in self.param_groups:  # checkpoints from before an option existed
            group.setdefault("sparse", True)
            group.setdefault("seed", 0)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("moments_dtype", None)
            group.setdefault("index_dtype", torch.int32)

    # ------------------------------------------------------------------ schedule

    @staticmethod
    def scheduled_density(group: Mapping[str, Any], t: int) -> float:
        """The density Algorithm 1 uses at step ``t``: k0, or the linear decay
        toward ``final_density``, changed every ``density_interval`` steps."""
        d = group["density_interval"]
        if d is None:
            return group["density"]
        k0, kf, T = group["density"], group["final_density"], group["total_steps"]
        return k0 + (kf - k0) * min(1.0, (t // d) * d / T)

    def _density_for(self, group: Mapping[str, Any], state: Mapping[str, Any], t: int) -> float:
        override = state.get("density_override")
        return override if override is not None else self.scheduled_density(group, t)

    def _refresh_due(self, group, state, t: int) -> bool:
        if "idx" not in state or state.get("refresh_requested", False):
            return True
        m = group["mask_interval"]
        if m is not None and t % m == 0:
            return True
        return self._density_for(group, state, t) != state["density"]

    # ------------------------------------------------------------------ masks

    def _names(self, group) -> list[str]:
        names = group.get("names")
        if names is None:
            start = self._param_offset(group)
            names = [f"param{start + i}" for i in range(len(group["params"]))]
        return names

    def _generator(self, group, p_index: int, t: int) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed((group["seed"] * 1_000_003 + p_index) * 1_000_033 + t)
        return g

    def _refresh(self, group, p: Tensor, p_index: int, t: int, grad: Tensor | None) -> None:
        self._refresh_all(group, [(p, p_index, t, grad)])

    @torch.no_grad()
    def _refresh_all(self, group, items: list[tuple[Tensor, int, int, Tensor | None]]) -> None:
        """Refreshes the masks of ``items`` (tensor, its index, its step, its gradient): those
        the CPU kernels take in one call (Note [CPU kernels]), the others one by one."""
        criterion, fused = group["criterion"], group["fused"]
        batch, kernel = [], None
        for p, p_index, t, grad in items:
            state = self.state[p]
            density = self._density_for(group, state, t)
            source = _local(grad) if criterion == "large_grads" else _local(p)
            if criterion != "random" and density != 0 and source is not None and source.dtype in _KERNEL_DTYPES:
                kernel = _cpu_kernels(fused, [source])
                if kernel is not None:
                    batch.append((state, source.detach().reshape(-1), density, t))
                    continue
            self._refresh_one(group, p, p_index, t, grad)
        if batch:
            self._refresh_fused(kernel, group, batch)

    @torch.no_grad()
    def _refresh_one(self, group, p: Tensor, p_index: int, t: int, grad: Tensor | None) -> None:
        # The torch-op path: select_mask, then _remap carries the moments and ages.
        state = self.state[p]
        density = self._density_for(group, state, t)
        criterion = group["criterion"]
        gen = self._generator(group, p_index, t) if criterion == "random" else None
        fused = group["fused"]
        new_idx = select_mask(_local(p), density, criterion, grad=_local(grad), generator=gen,
                              chunk_size=group["chunk_size"], fused=fused)
        carry = group["moments_on_refresh"] == "carry"
        ages = carry and group["bias_correction"]  # Note [bias correction]
        if "idx" in state and carry:
            old_idx = self._mask(group, p)
            carried = [state["exp_avg"], state["exp_avg_sq"]]
            if ages:
                cap = _age_cap(*group["betas"])
                old_age = state.get("age")
                if old_age is None:  # unknown ages: the tensor's steps, as before ages existed
                    old_age = torch.full((old_idx.numel(),), t, dtype=torch.int32, device=p.device)
                else:
                    old_age = old_age.to(torch.int32) + (t - state["refreshed_at"])
                carried.append(old_age.clamp_(max=cap))
            carried = _remap(old_idx, new_idx, carried)
        else:
            carried = None
        self._store_refresh(group, state, _compact(new_idx, group["chunk_size"], group["index_dtype"]),
                            new_idx.numel(), carried, density, t, p.device)

    @staticmethod
    def _store_refresh(group, state, idx: Tensor, k: int, carried: list[Tensor] | None, density: float, t: int,
                       device: torch.device) -> None:
        """A refresh's result into ``state``: the stored mask ``idx`` of ``k`` entries, the
        carried moments (and ages, Note [bias correction]) or zeros when ``carried`` is None,
        and the density and step it was chosen at."""
        ages = group["moments_on_refresh"] == "carry" and group["bias_correction"]
        if carried is None:
            mdtype = group["moments_dtype"] or torch.float32
            carried = [torch.zeros(k, dtype=mdtype, device=device), torch.zeros(k, dtype=mdtype, device=device),
                       torch.zeros(k, dtype=torch.int32, device=device)]
        state["exp_avg"], state["exp_avg_sq"] = carried[0], carried[1]
        if ages:
            state["age"] = carried[2].to(torch.int16 if _age_cap(*group["betas"]) < 2**15 else torch.int32)
        else:
            state.pop("age", None)
        state["idx"] = idx
        state["density"] = density
        state["refreshed_at"] = t
        state["refresh_requested"] = False

    def _refresh_fused(self, kernel, group, batch: list[tuple[dict, Tensor, float, int]]) -> None:
        # _refresh_one for a batch of (state, flat source, density, step) in one compiled call
        # (Note [CPU kernels]): the selection, the new masks in their stored form, and the
        # carried moments and ages, chunk by chunk. The same result.
        chunk_size = group["chunk_size"]
        carry = group["moments_on_refresh"] == "carry"
        ages = carry and group["bias_correction"]  # Note [bias correction]
        cap = _age_cap(*group["betas"])
        args: dict[str, list] = {k: [] for k in ("source", "runs", "old", "old_runs", "values", "age_add")}
        for state, source, density, t in batch:
            old = state["idx"] if carry and state.get("density") else None  # a frozen tensor's empty mask carries nothing
            values, age_add = [], 0
            if old is not None:
                values = [state["exp_avg"], state["exp_avg_sq"]]
                if ages:
                    if "age" in state:
                        values.append(state["age"])
                        age_add = t - state["refreshed_at"]
                    else:  # unknown ages: the tensor's steps, as before ages existed
                        values.append(torch.full((old.numel(),), t, dtype=torch.int32))
            numel = source.numel()
            for k, v in zip(args, (source, _runs(numel, density, chunk_size), old,
                                   _runs(numel, state["density"], chunk_size) if old is not None else [],
                                   values, age_add)):
                args[k].append(v)
        outs = kernel.refresh(args["source"], args["runs"], group["criterion"] != "small_weights", args["old"],
                              args["old_runs"], args["values"], 2 if ages else -1, args["age_add"], cap,
                              group["index_dtype"] == torch.int16)
        for (state, source, density, t), (idx, *carried) in zip(batch, outs):
            self._store_refresh(group, state, idx, idx.numel(), carried or None, density, t, source.device)

    def _init_state(self, group, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            # step: optimizer steps this tensor took (drives the schedule and bias correction).
            state["step"] = torch.tensor(0.0)
            if not group["sparse"]:
                mdtype = group["moments_dtype"] or torch.float32
                # exp_avg, exp_avg_sq: dense Adam moments, same shape as p (moments_dtype).
                local = _local(p)  # FSDP2: the moments of this rank's shard
                state["exp_avg"] = torch.zeros_like(local, dtype=mdtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(local, dtype=mdtype, memory_format=torch.preserve_format)
            # Sparse tensors get, at their first refresh:
            #   idx: (k,) the mask, ascending: int16 chunk offsets or int32 flat indices;
            #   exp_avg, exp_avg_sq: (k,) moments of the selected entries (moments_dtype);
            #   density: the density the mask was chosen at; refreshed_at: its step;
            #   age: (k,) int16/int32, with bias_correction under "carry" only: each
            #   entry's steps in the mask at the refresh (Note [bias correction]).
        return state

    @torch.no_grad()
    def refresh_mask(
        self,
        density: float | Mapping[str, float] | None = None,
        criterion: str | None = None,
        *,
        now: bool = True,
    ) -> None:
        """Refresh every sparse tensor's mask, for an external controller.

        ``density``: a float sets every sparse group's density (the schedule,
        if on, takes over again at its next density step); a mapping of regular
        expressions to densities sets per-tensor densities (first matching
        pattern wins, searched in the tensor's names; unmatched tensors follow
        the group; 0 freezes a tensor: empty mask, no state, never updated).
        ``criterion`` sets every sparse group's criterion. Both persist for
        later refreshes.

        ``now=True`` selects at once from the current weights (and ``.grad`` for
        ``large_grads``); ``now=False`` marks the masks to be refreshed at the
        start of the next step, which is what sparse-gradient mode needs.
        """
        if criterion is not None and criterion not in CRITERIA:
            raise ValueError(f"Invalid criterion: {criterion!r}; expected one of {CRITERIA}")
        per_tensor: list[tuple[re.Pattern, float]] = []
        if isinstance(density, Mapping):
            for pattern, value in density.items():
                if value != 0:  # 0 freezes the matching tensors
                    _check_density(f"density[{pattern!r}]", value)
                per_tensor.append((re.compile(pattern), value))
        elif density is not None:
            _check_density("density", density)
        if now and self.sparse_gradients and self._sparse_grads:
            raise ValueError("refresh_mask(now=True) after backward in sparse-gradient mode would drop "
                             "gathered gradients; call it before backward or with now=False")
        for group in self.param_groups:
            if not group["sparse"]:
                continue
            if criterion is not None:
                group["criterion"] = criterion
            if density is not None and not per_tensor:
                group["density"] = density
            offset = self._param_offset(group)
            due = []
            for i, (p, name) in enumerate(zip(group["params"], self._names(group))):
                state = self._init_state(group, p)
                if per_tensor:
                    state["density_override"] = next(
                        (v for r, v in per_tensor if any(r.search(n) for n in name.split("="))), None)
                elif density is not None:
                    state["density_override"] = None
                if now:
                    if group["criterion"] == "large_grads" and p.grad is None:
                        raise ValueError(f"criterion 'large_grads' needs gradients: {name} has none "
                                         "(call after backward())")
                    due.append((p, offset + i, int(state["step"]), p.grad))
                else:
                    state["refresh_requested"] = True
            self._refresh_all(group, due)

    def _mask(self, group, p: Tensor) -> Tensor:
        state = self.state[p]
        return _expand(state["idx"], _local(p).numel(), state["density"], group["chunk_size"])

    def masks(self, names: Collection[str] | None = None) -> dict[str, Tensor]:
        """Current mask of each sparse tensor by its canonical name: int32 flat indices
        (only the tensors in `names` when given: the others are not expanded)."""
        out = {}
        for group in self.param_groups:
            if group["sparse"]:
                for p, name in zip(group["params"], self._names(group)):
                    canonical = name.split("=")[0]
                    if "idx" in self.state[p] and (names is None or canonical in names):
                        mask = self._mask(group, p)
                        # A copy of int32 masks: a refresh rewrites the stored one in place (Note [CPU kernels]).
                        out[canonical] = mask.clone() if mask is self.state[p]["idx"] else mask
        return out

    @property
    def current_density(self) -> float | None:
        """Density of the first sparse tensor's current mask (None before the first step)."""
        for group in self.param_groups:
            if group["sparse"]:
                for p in group["params"]:
                    if "density" in self.state[p]:
                        return self.state[p]["density"]
        return None

    def state_bytes(self, which: str = "all") -> int:
        """Bytes of optimizer state: ``"sparse"`` groups, ``"dense"`` groups or ``"all"``."""
        if which not in ("all", "sparse", "dense"):
            raise ValueError(f"Invalid which: {which!r}; expected 'all', 'sparse' or 'dense'")
        total = 0
        for group in self.param_groups:
            if which != "all" and group["sparse"] != (which == "sparse"):
                continue
            for p in group["params"]:
                for v in self.state[p].values():
                    if torch.is_tensor(v):
                        total += v.numel() * v.element_size()
        return total

    def _param_offset(self, group) -> int:
        offset = 0
        for g in self.param_groups:
            if g is group:
                return offset
            offset += len(g["params"])
        raise AssertionError("group not in param_groups")

    # ------------------------------------------------------------------ sparse gradients

    @torch.no_grad()
    def _gather_hook(self, p: Tensor) -> None:
        # Groups are looked up each time: load_state_dict replaces the group dicts.
        offset = 0
        for group in self.param_groups:
            i = next((j for j, q in enumerate(group["params"]) if q is p), None)
            if i is not None:
                break
            offset += len(group["params"])
        state = self._init_state(group, p)
        t = int(state["step"])
        if p not in self._sparse_grads and self._refresh_due(group, state, t) \
                and state.get("refreshed_at") != t:
            if group["criterion"] == "large_grads":
                return  # keep the dense gradient: step() selects from it
            self._refresh(group, p, offset + i, t, None)
        if p.grad is None:
            return
        # Accumulated in the gradient's own dtype: the same sums as dense accumulation in .grad.
        g = p.grad.view(-1)[self._mask(group, p)]
        acc = self._sparse_grads.get(p)
        self._sparse_grads[p] = g if acc is None else acc.add_(g)
        p.grad = None

    @torch.no_grad()
    def prepare_step(self) -> None:
        """Before backward: refreshes the masks due at the coming step (except
        "large_grads", which selects from that step's gradient) and sets
        ``comm_masks``: each tensor's flat indices whose gradient the step reads
        (absent: the whole gradient; a dense tensor, or one refreshing from its
        gradient). DDP's sparse all-reduce sends only those entries (Note [sparse
        all-reduce] in parallel.py); the step itself selects exactly as without it."""
        masks: dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            if not group["sparse"]:
                continue
            offset = self._param_offset(group)
            due, from_grad = [], set()
            for i, p in enumerate(group["params"]):
                state = self._init_state(group, p)
                t = int(state["step"])
                if self._refresh_due(group, state, t) and state.get("refreshed_at") != t:
                    if group["criterion"] == "large_grads":
                        from_grad.add(p)
                        continue
                    due.append((p, offset + i, t, None))
            self._refresh_all(group, due)
            for p in group["params"]:
                if p not in from_grad:
                    masks[p] = self._mask(group, p)
        self.comm_masks = masks

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._sparse_grads.clear()
        super().zero_grad(set_to_none)

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        refreshed = False
        for group in self.param_groups:
            params, grads, ms, vs, idxs, steps = [], [], [], [], [], []
            offset = self._param_offset(group)
            fused = self._fused(group)
            steps_of: dict[Tensor, int] = {}  # each sparse tensor's step count, read once
            if group["sparse"]:  # the masks due, refreshed together (one kernel call)
                due = []
                for i, p in enumerate(group["params"]):
                    if p.grad is None and p not in self._sparse_grads:
                        continue
                    state = self._init_state(group, p)
                    t = steps_of[p] = int(state["step"])
                    frozen = state.get("density_override") == 0 and state.get("density") == 0
                    if not frozen and self._refresh_due(group, state, t) and state.get("refreshed_at") != t:
                        due.append((p, offset + i, t, p.grad))
                self._refresh_all(group, due)
            for i, p in enumerate(group["params"]):
                # In sparse-gradient mode the hook left the gathered gradient here and
                # p.grad is None, except on a large_grads refresh step (dense kept).
                sparse_grad = self._sparse_grads.pop(p, None)
                if p.grad is None and sparse_grad is None:
                    continue
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("NanoAdam does not support torch sparse gradients")
                state = self._init_state(group, p)
                if group["sparse"]:
                    t = steps_of[p]
                    if state.get("density_override") == 0 and state.get("density") == 0:
                        p.grad = None  # frozen: nothing to update
                        continue
                    refreshed = refreshed or state["refreshed_at"] == t
                    if fused:  # the kernel reads the stored mask, and gathers a dense gradient itself
                        idx = state["idx"]
                        if idx.dtype == torch.int16:
                            idx = (idx, state["density"], group["chunk_size"])
                        g = sparse_grad
                        if g is None:
                            g = _local(p.grad)
                            if self.sparse_gradients:  # a large_grads refresh step: free the dense one now
                                g = g.reshape(-1).index_select(0, self._mask(group, p))
                    else:
                        idx = self._mask(group, p)
                        g = sparse_grad if sparse_grad is not None else _local(p.grad).view(-1).index_select(0, idx)
                    idxs.append(idx)
                else:
                    g = _local(p.grad)
                    idxs.append(None)
                if sparse_grad is not None or (self.sparse_gradients and group["sparse"]):
                    p.grad = None  # sparse-gradient mode never keeps a dense gradient
                state["step"] += 1
                params.append(_local(p))
                grads.append(g)
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
                steps.append(self._correction_steps(group, state, t + 1) if group["sparse"] else state["step"])
            if not params:
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = params[0].is_cuda
            beta1, beta2 = group["betas"]
            nano_adam(params, grads, ms, vs, idxs, steps, lr=group["lr"], beta1=beta1, beta2=beta2,
                      eps=group["eps"], weight_decay=group["weight_decay"],
                      bias_correction=group["bias_correction"], foreach=foreach, fused=fused)
        self.last_step_refreshed = refreshed
        return loss

    @staticmethod
    def _fused(group) -> bool:
        """Whether this group's step runs the compiled CPU kernels (the ``fused`` option)."""
        fused = group["fused"]
        if fused is False or (fused is None and group["foreach"]):
            return False
        first = _local(group["params"][0])
        if _cpu_kernels(fused, [first]) is not None:
            return True
        if fused:
            raise ValueError(f"Invalid fused=True: {_kernels_reason(first)}; fused=None falls back to "
                             "the torch-op paths")
        return False

    @staticmethod
    def _correction_steps(group, state, step: int) -> Tensor | int | tuple[Tensor, int]:
        """The count a sparse tensor's bias correction uses this step (Note [bias correction]):
        each entry's age under "carry", the steps since the refresh under "reset"."""
        if not group["bias_correction"]:
            return state["step"]  # unused
        since = step - state.get("refreshed_at", 0)  # step: the tensor's step count, already incremented
        if "age" in state:
            return state["age"], since  # nano_adam adds them up (the kernel, entry by entry)
        if group["moments_on_refresh"] == "reset":
            return since
        return state["step"]  # "carry" with unknown ages: the tensor's steps

    # ------------------------------------------------------------------ checkpoints

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts every floating state tensor, and int ones too, to the
        # parameter's dtype on load (an int32 index beyond 2**24 would not
        # survive float32). Ours keep their saved dtypes: they are set aside,
        # the rest loads as usual, then they come back on the parameter's device.
        kept: dict[Any, dict[str, Tensor]] = {}
        stripped = {}
        for key, st in state_dict["state"].items():
            kept[key] = {k: v for k, v in st.items() if torch.is_tensor(v) and k != "step"}
            stripped[key] = {k: v for k, v in st.items() if k not in kept[key]}
        super().load_state_dict({**state_dict, "state": stripped})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for k, v in kept.get(saved_id, {}).items():
                self.state[p][k] = v.to(device=p.device, copy=True)


def _check_density(name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise ValueError(f"Invalid {name}: {value}; must be in (0, 1]")
