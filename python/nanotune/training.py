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

import inspect
import math
import re
import time
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX
from .errors import ErrorCode, InvalidParams, NanotuneError

__all__ = ["NonFiniteError", "OptimizerError", "create_optimizer", "evaluate", "generate", "train_step"]


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


def create_optimizer(model: torch.nn.Module, name: str = "nanoadam", **opts: Any) -> torch.optim.Optimizer:
    """name="nanoadam": NanoAdam over nanoadam_param_groups(model, dense=...);
    opts are NanoAdam's keyword arguments plus `dense` (default ("lm_head", "norm"))
    and `tied` ("sparse" or "dense", see Note [tied tensors] in optim.py).
    name="adamw": torch.optim.AdamW over the trainable parameters (the dense
    baseline); opts are AdamW's, with weight_decay defaulting to 0.0 like NanoAdam
    (torch's own default is 0.01). moments_dtype and index_dtype may be torch dtypes or
    their names ("bfloat16", "int32"). An unknown or invalid option raises OptimizerError
    naming it."""
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
    except OptimizerError:
        raise
    except ValueError as e:  # the optimizers' own checks: "Invalid betas[0]: 1.5; must be in [0, 1)"
        m = re.match(r"Invalid (\w+)", str(e))
        raise OptimizerError(f"{name}: {e}", m.group(1) if m else None) from e
    raise OptimizerError(f"optimizer name {name!r} is not 'nanoadam' or 'adamw'", "name")


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


def _loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the token cross-entropies of one micro-batch, in fp32."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device, non_blocking=True)  # (B, T)
    attention_mask = batch["attention_mask"].to(device, non_blocking=True)  # (B, T)
    labels = batch["labels"].to(device, non_blocking=True)  # (B, T)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
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


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               batches: Sequence[dict[str, torch.Tensor]], lr: float, grad_clip: float | None = None,
               pending: Callable[[], Any] | None = None, step: int | None = None,
               observe: Callable[[], Any] | None = None) -> dict[str, Any]:
    """One optimizer step over gradient-accumulated micro-batches at learning rate `lr`
    (set on every param group). grad_clip: max global grad norm (None = no clipping).
    pending: optimizer bookkeeping that belongs to this step only (the session's mask
    decision), run just before optimizer.step() once the step is known to be finite;
    in sparse-gradient mode before backward instead (the hooks gather at the new
    masks), and undone with the rest if the step is refused.
    step: the step's number, for NonFiniteError's data.
    observe: called once the step is known to be finite, before clipping and the update,
    while the accumulated gradients are in .grad (Session.sample_weights' watch).

    Raises NonFiniteError, leaving weights and optimizer state as they were, when the
    loss or the gradient norm is not finite (Note [non-finite steps]).

    Returns {loss, grad_norm, tokens, input_tokens, time_s, lr, density, mask_refreshed}:
    loss is the token mean of Note [loss over accumulated micro-batches]; grad_norm the
    global norm before clipping (None when NanoAdam(sparse_gradients=True) drops the dense
    gradients in backward);
    tokens the target tokens, input_tokens the non-padding ones; density and
    mask_refreshed come from NanoAdam (`current_density`, `last_step_refreshed`), and
    are 1.0 / False for optimizers without them, such as AdamW.
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
    _sync(model)
    start = time.perf_counter()
    model.train()
    snapshot = _OptimizerSnapshot(optimizer)
    try:
        for group in optimizer.param_groups:
            group["lr"] = lr
        if pending is not None and sparse_grads:
            pending()
        optimizer.zero_grad(set_to_none=True)
        loss_sum: Any = 0.0
        for batch in batches:
            loss = _loss_sum(model, batch) / tokens
            loss.backward()
            loss_sum += loss.detach()  # an fp32 tensor on the device from the first micro-batch on
        grad_norm = None
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
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
    return {
        "loss": loss_value,
        "grad_norm": None if grad_norm is None else norm_value,
        "tokens": tokens,
        "input_tokens": int(sum(int(b["attention_mask"].sum()) for b in batches)),
        "time_s": time.perf_counter() - start,
        "lr": lr,
        "density": None if density is None else float(density),
        "mask_refreshed": bool(getattr(optimizer, "last_step_refreshed", False)),
    }


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Token-mean loss and perplexity (exp of it) over all target tokens of `batches`."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    tokens = 0
    try:
        for batch in batches:
            total += _loss_sum(model, batch).double().cpu()
            tokens += _targets(batch)
    finally:
        model.train(was_training)
    if tokens == 0:
        raise InvalidParams("evaluate: no target tokens in the batches")
    loss = float(total) / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, prompt: str | list[dict[str, str]], max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> str:
    """The continuation of `prompt` (the new text only, special tokens removed).

    prompt: a string (bos is added like in training) or chat messages, rendered by
        the tokenizer's chat template with the assistant header appended.
    temperature: 0 (default) = greedy; > 0 samples, with `top_p` nucleus filtering.
    seed: the sampling seed; the global torch RNG is left untouched either way.
    """
    if isinstance(prompt, str):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
    else:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    ids = ids.to(device)  # (1, T)
    was_training = model.training
    model.eval()
    sample = temperature > 0
    kwargs: dict[str, Any] = dict(do_sample=sample, max_new_tokens=max_new_tokens,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:  # greedy: clear sampling settings a generation_config.json may carry
        kwargs.update(temperature=None, top_p=None, top_k=None)
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)  # (1, T + new)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
