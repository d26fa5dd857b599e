"""Teacher-student toy of the paper (experiment 4): does updating only the
smallest-|w| entries learn a new teacher neuron with less loss and a smaller
shift from the pretrained weights than updating only the largest-|grad| ones?

What the paper states: f(x) = sum_i a_i relu(w_i . x),
"MSE", full-batch GD, x ~ N(0, I_2); teacher 2 neurons (a Rademacher, w ~ N(0, 1)
normalised); student 20 neurons, a_i = -a_{i+10}, weights N(0, 1/n); pretrain
10,000 steps at lr 2; add 1 (or 2) teacher-like neurons to the target and
finetune 10,000 steps at lr 1 updating only the smallest-|w| entries per layer
vs only the largest-|grad| entries. 10 seeds, 1 extra neuron: test loss 0.0094
vs 0.017, l2 shift 0.027 vs 0.057.

Here:
- Teacher: a_j = +-1, w_j ~ N(0, I_d) normalised to unit norm. Student: w_i =
  w_{i+10} ~ N(0, I_d / n), a_i = -a_{i+10} ~ N(0, 1/n), n = 20: it starts as
  the zero function.
- Loss, as the paper writes it, "MSE": L = (1/N) sum_n (f(x_n) - y_n)^2, the
  mean of squared errors with no 1/2 (torch's MSELoss). ``loss="half_mse"``
  (1/(2N) sum r^2, this toy's earlier choice) is a switch. Test loss is the same
  quantity on 10,000 fresh inputs against the new target.
- Pretraining: full-batch GD, 10,000 steps. At the paper's lr 2 with this loss
  GD diverges from the initialisation (within 10 steps) in nearly every seed: the
  sharpness of the minima it heads for (top Hessian eigenvalue of the MSE,
  2.4-4.0 over the 10 seeds) allows lr < 2/2.4 at most. So the lr-2 run is
  made and reported (divergences per seed), and finetuning starts from a
  student pretrained at ``pretrain_lr`` = 0.5, the largest of 2, 1, 0.5 where
  every seed converges (the same trajectory as lr 1 on the 1/2-scaled loss).
- Finetuning, 10,000 steps from the same pretrained student per seed, along
  three axes:
    optimizer: "masked_gd" (full-batch GD on the selected entries, the paper's
        toy, at its lr 1) and "nanoadam" (``nanotune.optim.NanoAdam`` itself,
        Adam on the selected entries; lr ``adam_lr``, see below);
    rule (NanoAdam's criteria): small_weights (smallest |theta|, the paper's),
        large_weights, random, large_grads (largest |grad| at the refresh);
        dense = every entry (plain GD; for NanoAdam a dense group, i.e. plain
        Adam, torch.optim.Adam when bias-corrected);
    m: the mask is refreshed every m steps, m = 1 and m = 100 (NanoAdam's
        default); m = 0 chooses it once, at step 0 (static).
  The mask is chosen PER LAYER and per seed (W: 20x2, a: 20): seeds are a batch
  dimension, and NanoAdam's chunked selection with chunk_size = one seed's
  layer gives exactly that. Masked GD selects with the same function
  (``nanotune.optim.select_mask``: k = round(density * layer), ties to the
  lower index), so both optimizers pick the same entries from the same state.
  Entries outside the mask stay bit-identical.
- density: 10% of each layer (4 of 40 W entries, 2 of 20 a entries; the
  paper's Llama default; it states none for the toy).
- NanoAdam: the optimizer's defaults (betas (0.9, 0.999), eps 1e-8, moments
  carried on refresh, fp32 moments; masks stored as int32 flat indices, which
  selects and updates the same entries as the default int16 chunk offsets,
  with less work per step) except ``bias_correction``, a switch of the
  toy reported for both values (``bias_corrections``); the dense group takes the
  same value. lr: the paper's lr 1 is a GD step size, meaningless for Adam
  (every selected entry would move by ~1 per step). Dense Adam reaches test
  loss ~1e-7 at every lr from 1e-3 to 1e-1, so it cannot choose; ``adam_lr`` =
  0.01 has the lowest geometric-mean test loss over all four masked rules
  together (m = 100, bias correction off, 3 seeds) among 1e-3 (1.8e-4), 1e-2
  (1.2e-4) and 1e-1 (3.1e-3): no rule is favoured by the choice. (Largest
  gradients beat small weights at each of the three.)
- NaN: a (run, seed) whose training loss becomes non-finite at any step counts
  as NaN; it is counted per rule and left out of every mean, median and
  head-to-head count.
- l2 shift: raw ||theta_finetuned - theta_pretrained||_2 over all 60 student
  weights, and the mean squared shift per parameter ||.||_2^2 / 60 (the paper
  does not define its l2; both are reported).
- data: 1,000 training inputs per seed, reused for both phases; 10 seeds.
- dtype: float32, torch's default (what the paper presumably ran) and about
  1.6x faster here than float64; NanoAdam computes in float32 anyway.

Masked GD at the paper's lr 1 with this loss is lr 2 on the 1/2-scaled one:
past the stability limit of dense GD at the pretrained minima, so NaN counts
are part of the result. ``--gd-lr 0.5`` is this toy's earlier, stabler setting.

Runtime of the full toy: about 5 minutes on a 2-core CPU shared with other
jobs, 1 torch thread (288 s wall, 228 s CPU); ``--bias-correction off`` or
``on`` saves a third.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from nanotune import optim as nano_optim
from nanotune.reproduce.lab import write_report

RULES = ("small_weights", "large_weights", "random", "large_grads", "dense")
MASKED_RULES = RULES[:-1]
OPTIMIZERS = ("masked_gd", "nanoadam")
LOSSES = {"mse": 1.0, "half_mse": 0.5}  # L = c/N sum r^2
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class ToyConfig:
    seeds: int = 10  # independent runs, batched
    input_dim: int = 2  # d
    teacher_neurons: int = 2  # the old target's neurons
    student_neurons: int = 20  # n; must be even (antisymmetric halves)
    extra_neurons: tuple[int, ...] = (1,)  # new teacher neurons added for finetuning (the paper's numbers: 1)
    n_train: int = 1_000  # training inputs per seed
    n_test: int = 10_000  # fresh test inputs per seed
    loss: str = "mse"  # "mse": (1/N) sum r^2 (the paper's word); "half_mse": 1/(2N) sum r^2
    pretrain_steps: int = 10_000  # full-batch GD on the old target
    paper_pretrain_lr: float = 2.0  # run and reported (divergences); 0 skips it
    pretrain_lr: float = 0.5  # the pretraining finetuning starts from (see docstring)
    finetune_steps: int = 10_000  # on the old target + extra neurons
    gd_lr: float = 1.0  # masked GD (the paper's finetuning lr)
    adam_lr: float = 0.01  # NanoAdam (see docstring)
    density: float = 0.10  # fraction of each layer updated
    mask_intervals: tuple[int, ...] = (1, 100)  # refresh the mask every m steps; 0 = once, at step 0
    optimizers: tuple[str, ...] = OPTIMIZERS  # masked_gd and/or nanoadam
    bias_corrections: tuple[bool, ...] = (False, True)  # NanoAdam's bias_correction, each reported
    log_every: int = 500  # test-loss curve resolution
    dtype: str = "float32"  # of weights and data (see docstring)
    seed: int = 0  # base RNG seed

    @classmethod
    def quick(cls) -> "ToyConfig":
        """Seconds-long (tests): every row of the full table, numbers meaningless."""
        return cls(seeds=2, n_train=64, n_test=128, pretrain_steps=30, finetune_steps=20, log_every=10,
                   mask_intervals=(1, 100))


# ---------------------------------------------------------------------------- model


def forward(W: torch.Tensor, a: torch.Tensor, X: torch.Tensor):
    """W (S, n, d), a (S, n), X (S, N, d) -> out (S, N), pre (S, N, n), h (S, N, n)."""
    pre = torch.bmm(X, W.transpose(1, 2))
    h = pre.clamp_min(0)
    return torch.bmm(h, a.unsqueeze(-1)).squeeze(-1), pre, h


def loss_and_grads(W, a, X, y, loss: str = "mse"):
    """L = c/N sum r^2 per seed (S,) (c = 1 for "mse", 1/2 for "half_mse"),
    with its gradients dL/dW (S, n, d), dL/da (S, n)."""
    c = LOSSES[loss]
    out, pre, h = forward(W, a, X)
    r = out - y  # (S, N)
    N = X.shape[1]
    value = c * (r * r).mean(1)
    g = r * (2 * c / N)  # dL/dout
    grad_a = torch.bmm(g.unsqueeze(1), h).squeeze(1)
    # dL/dW_i = a_i sum_n g_n 1[pre_ni > 0] x_n; sign(h) is that indicator (h = relu(pre) >= 0),
    # and 10x cheaper here than (pre > 0).to(dtype).
    grad_W = torch.bmm(torch.sign(h).transpose(1, 2), g.unsqueeze(-1) * X).mul_(a.unsqueeze(-1))
    return value, grad_W, grad_a


def test_loss(W, a, X, y, loss: str = "mse"):
    out, _, _ = forward(W, a, X)
    return LOSSES[loss] * ((out - y) ** 2).mean(1)


def teacher_neurons(S: int, k: int, d: int, gen: torch.Generator, dtype=torch.float64):
    """k teacher-like neurons per seed: a Rademacher (S, k), w unit-norm Gaussian (S, k, d)."""
    a = torch.randint(0, 2, (S, k), generator=gen, dtype=torch.float64) * 2 - 1
    w = torch.randn(S, k, d, generator=gen, dtype=torch.float64)
    return (w / w.norm(dim=-1, keepdim=True)).to(dtype), a.to(dtype)


def student_init(S: int, n: int, d: int, gen: torch.Generator, dtype=torch.float64):
    half = n // 2
    w = torch.randn(S, half, d, generator=gen, dtype=torch.float64) / math.sqrt(n)
    a = torch.randn(S, half, generator=gen, dtype=torch.float64) / math.sqrt(n)
    return torch.cat([w, w], 1).to(dtype), torch.cat([a, -a], 1).to(dtype)


def target(Wt, at, X):
    return forward(Wt, at, X)[0]


# ---------------------------------------------------------------------------- masked GD


def select_mask(param: torch.Tensor, grad: torch.Tensor | None, criterion: str, density: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean mask (shape of ``param`` (S, ...)) of the entries to update, chosen per seed
    over its whole layer by NanoAdam's own selection (``nanotune.optim.select_mask``, one
    chunk per seed): k = round(density * layer size) entries, ties to the lower index."""
    if criterion == "dense":
        return torch.ones_like(param, dtype=torch.bool)
    if criterion not in MASKED_RULES:
        raise ValueError(f"criterion must be one of {RULES}, got {criterion!r}")
    per_seed = param[0].numel()
    idx = nano_optim.select_mask(param, density, criterion, grad=grad, generator=generator, chunk_size=per_seed)
    return torch.zeros(param.numel(), dtype=torch.bool, device=param.device).index_fill_(
        0, idx.long(), True).view(param.shape)


def _start(W, X_test, y_test, log_every):
    S = W.shape[0]
    return [], torch.full((S,), -1, dtype=torch.long), bool(log_every and X_test is not None)


def _track(t, loss_value, nan_step):
    bad = ~torch.isfinite(loss_value) & (nan_step < 0)
    if bad.any():
        nan_step[bad] = t


def train(
    W, a, X, y, steps: int, lr: float, criterion: str = "dense", density: float = 1.0,
    mask_interval: int = 1, loss: str = "mse", X_test=None, y_test=None, log_every: int = 0,
    generator: torch.Generator | None = None,
):
    """Full-batch GD; only the masked entries of each layer move.
    mask_interval m: refresh the mask every m steps; 0 = choose it once, at step 0.
    Returns (W, a, info): info["curve"] (steps // log_every + 1, S) test losses or None,
    info["nan_step"] (S,) the first step whose training loss was not finite, -1 if none."""
    curve, nan_step, logging = _start(W, X_test, y_test, log_every)
    mask_W = mask_a = None
    for t in range(steps):
        if logging and t % log_every == 0:
            curve.append(test_loss(W, a, X_test, y_test, loss))
        value, gW, ga = loss_and_grads(W, a, X, y, loss)
        _track(t, value, nan_step)
        if criterion == "dense":
            W, a = W - lr * gW, a - lr * ga
            continue
        if mask_W is None or (mask_interval and t % mask_interval == 0):
            mask_W = select_mask(W, gW, criterion, density, generator)
            mask_a = select_mask(a, ga, criterion, density, generator)
        W = torch.where(mask_W, W - lr * gW, W)
        a = torch.where(mask_a, a - lr * ga, a)
    _track(steps, loss_and_grads(W, a, X, y, loss)[0], nan_step)
    if logging:
        curve.append(test_loss(W, a, X_test, y_test, loss))
    return W, a, {"curve": torch.stack(curve) if curve else None, "nan_step": nan_step}


def divergence(W, a, X, y, steps: int, lr: float, loss: str = "mse", check_every: int = 100):
    """Dense GD only to see which seeds diverge: (nan_step (S,), final train loss (S,)).
    Diverged seeds are dropped from the batch (every ``check_every`` steps), so a
    mostly diverging run costs little."""
    S = W.shape[0]
    nan_step = torch.full((S,), -1, dtype=torch.long)
    final = torch.full((S,), math.nan, dtype=W.dtype)
    alive = torch.arange(S)
    for t in range(steps + 1):
        value, gW, ga = loss_and_grads(W, a, X, y, loss)
        bad = ~torch.isfinite(value)
        nan_step[alive[bad]] = torch.where(nan_step[alive[bad]] < 0, t, nan_step[alive[bad]])
        if t == steps:
            final[alive] = value
            break
        if bad.any() and (t % check_every == 0 or bad.all()):
            keep = ~bad
            alive, W, a, gW, ga, X, y = alive[keep], W[keep], a[keep], gW[keep], ga[keep], X[keep], y[keep]
            if not alive.numel():
                break
        W, a = W - lr * gW, a - lr * ga
    return nan_step, final


# ---------------------------------------------------------------------------- NanoAdam


def nanoadam_train(
    W, a, X, y, steps: int, lr: float, criterion: str = "small_weights", density: float = 0.1,
    mask_interval: int = 100, bias_correction: bool = False, loss: str = "mse",
    X_test=None, y_test=None, log_every: int = 0, seed: int = 0,
):
    """Finetunes with ``nanotune.optim.NanoAdam`` itself: W and a are one tensor each
    (seeds stacked), selected per seed by chunk_size = one seed's layer. criterion
    "dense": one dense group (plain Adam). mask_interval 0: chosen once (None for
    NanoAdam). Everything else is the optimizer's default. Returns (W, a, info) as
    ``train``, with info["optimizer"] the NanoAdam instance."""
    Wp = W.detach().clone().requires_grad_(True)
    ap = a.detach().clone().requires_grad_(True)
    leaves = (Wp, ap)
    if criterion == "dense":
        # The dense group gets flat leaves: NanoAdam's dense path (at this commit) fails on
        # tensors of 2+ dims (it flattens the gradient but not the moments).
        leaves = (Wp.detach().reshape(-1).clone().requires_grad_(True),
                  ap.detach().reshape(-1).clone().requires_grad_(True))
        Wp, ap = leaves[0].view(W.shape), leaves[1].view(a.shape)
        groups = [{"params": list(leaves), "names": ["W", "a"], "sparse": False, "bias_correction": bias_correction}]
        opt = nano_optim.NanoAdam(groups, lr=lr, bias_correction=bias_correction, seed=seed)
    else:
        groups = [{"params": [Wp], "names": ["W"], "chunk_size": Wp[0].numel()},
                  {"params": [ap], "names": ["a"], "chunk_size": ap[0].numel()}]
        opt = nano_optim.NanoAdam(groups, lr=lr, density=density, mask_interval=mask_interval or None,
                                  criterion=criterion, bias_correction=bias_correction, seed=seed,
                                  index_dtype=torch.int32)  # flat indices: the same masks, less work per step
    curve, nan_step, logging = _start(W, X_test, y_test, log_every)
    for t in range(steps):
        if logging and t % log_every == 0:
            curve.append(test_loss(Wp.detach(), ap.detach(), X_test, y_test, loss))
        value, gW, ga = loss_and_grads(Wp.detach(), ap.detach(), X, y, loss)
        _track(t, value, nan_step)
        leaves[0].grad, leaves[1].grad = gW.reshape(leaves[0].shape), ga.reshape(leaves[1].shape)
        opt.step()
    W1, a1 = Wp.detach(), ap.detach()
    _track(steps, loss_and_grads(W1, a1, X, y, loss)[0], nan_step)
    if logging:
        curve.append(test_loss(W1, a1, X_test, y_test, loss))
    return W1, a1, {"curve": torch.stack(curve) if curve else None, "nan_step": nan_step, "optimizer": opt}


# ---------------------------------------------------------------------------- experiment


@dataclass
class RunResult:
    extra: int
    optimizer: str  # masked_gd | nanoadam
    rule: str  # small_weights | large_weights | random | large_grads | dense
    mask_interval: int | None  # None for dense (no mask); 0 = static
    bias_correction: bool | None  # NanoAdam's switch; None for masked GD
    lr: float
    density: float
    nan: list[bool]  # per seed: training loss became non-finite
    test_loss: list[float | None]  # per seed, after finetuning (None: NaN)
    l2_raw: list[float | None]  # per seed, ||theta - theta_pretrained||_2
    l2_ms: list[float | None]  # per seed, ||theta - theta_pretrained||_2^2 / #params
    moved: list[int]  # per seed, entries that differ from the pretrained student (of #params)
    moved_max_abs: list[float | None]  # per seed, the largest final |theta| among moved entries
    curve_median: list[float | None] = field(default_factory=list)  # median over finite seeds

    @property
    def label(self) -> str:
        return optimizer_label(self.optimizer, self.bias_correction)


def optimizer_label(optimizer: str, bias_correction: bool | None) -> str:
    if optimizer == "masked_gd":
        return "masked GD"
    return f"NanoAdam, bias correction {'on' if bias_correction else 'off'}"


def _clean(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _measure(W, a, W0, a0, nan_step, curve) -> dict:
    dW, da = W - W0, a - a0
    sq = (dW.double() ** 2).sum((1, 2)) + (da.double() ** 2).sum(1)
    n_params = W[0].numel() + a[0].numel()
    moved_W, moved_a = W != W0, a != a0
    moved = moved_W.sum((1, 2)) + moved_a.sum(1)
    abs_moved = torch.cat([torch.where(moved_W, W.abs(), 0).flatten(1), torch.where(moved_a, a.abs(), 0)], 1)
    nan = nan_step >= 0
    med = []
    if curve is not None:
        for row in curve:
            finite = row[~nan & torch.isfinite(row)]
            med.append(_clean(finite.median().item()) if finite.numel() else None)
    return {
        "nan": nan.tolist(),
        "l2_raw": [None if bad else _clean(v) for bad, v in zip(nan.tolist(), sq.sqrt().tolist())],
        "l2_ms": [None if bad else _clean(v) for bad, v in zip(nan.tolist(), (sq / n_params).tolist())],
        "moved": moved.tolist(),
        "moved_max_abs": [None if bad or not mv else _clean(v)
                          for bad, mv, v in zip(nan.tolist(), moved.tolist(), abs_moved.max(1).values.tolist())],
        "curve_median": med,
    }


def variants(cfg: ToyConfig) -> list[tuple[str, str, int | None, bool | None]]:
    """(optimizer, rule, mask_interval, bias_correction) in table order."""
    out = []
    for opt in cfg.optimizers:
        for bc in ((None,) if opt == "masked_gd" else cfg.bias_corrections):
            out.append((opt, "dense", None, bc))
            out += [(opt, rule, m, bc) for m in cfg.mask_intervals for rule in MASKED_RULES]
    return out


def run(cfg: ToyConfig, progress=print) -> dict:
    """Pretrain once per seed, then finetune every (extra, optimizer, rule, m, bias correction)."""
    if cfg.student_neurons % 2:
        raise ValueError(f"student_neurons must be even for the a_i = -a_(i+n/2) init, got {cfg.student_neurons}")
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {cfg.loss!r}")
    unknown = set(cfg.optimizers) - set(OPTIMIZERS)
    if unknown:
        raise ValueError(f"optimizers must be among {OPTIMIZERS}, got {sorted(unknown)}")
    dtype = DTYPES[cfg.dtype]
    gen = torch.Generator().manual_seed(cfg.seed)
    S, d = cfg.seeds, cfg.input_dim
    Wt, at = teacher_neurons(S, cfg.teacher_neurons, d, gen, dtype)
    W0, a0 = student_init(S, cfg.student_neurons, d, gen, dtype)
    X = torch.randn(S, cfg.n_train, d, generator=gen, dtype=torch.float64).to(dtype)
    X_test = torch.randn(S, cfg.n_test, d, generator=gen, dtype=torch.float64).to(dtype)
    extras = {k: teacher_neurons(S, k, d, gen, dtype) for k in cfg.extra_neurons}
    y_pre, y_pre_test = target(Wt, at, X), target(Wt, at, X_test)

    paper_pre = None
    if cfg.paper_pretrain_lr:
        t0 = time.perf_counter()
        nan_step, final = divergence(W0, a0, X, y_pre, cfg.pretrain_steps, cfg.paper_pretrain_lr, cfg.loss)
        paper_pre = {"lr": cfg.paper_pretrain_lr, "nan_step": nan_step.tolist(),
                     "final_train_loss": [_clean(v) for v in final.tolist()]}
        progress(f"pretraining at the paper's lr {cfg.paper_pretrain_lr}: {int((nan_step >= 0).sum())}/{S} seeds "
                 f"diverged ({time.perf_counter() - t0:.1f}s)")
    t0 = time.perf_counter()
    W_pre, a_pre, info = train(W0, a0, X, y_pre, cfg.pretrain_steps, cfg.pretrain_lr, loss=cfg.loss)
    pre_loss = test_loss(W_pre, a_pre, X_test, y_pre_test, cfg.loss)
    pre_nan = int((info["nan_step"] >= 0).sum())
    progress(f"pretrained {S} seeds at lr {cfg.pretrain_lr} in {time.perf_counter() - t0:.1f}s; "
             f"{pre_nan} diverged; test loss median {pre_loss.median():.2e}")

    results: list[RunResult] = []
    start_losses, seconds = {}, {}
    for k, (We, ae) in extras.items():
        Wn, an = torch.cat([Wt, We], 1), torch.cat([at, ae], 1)
        y, y_test = target(Wn, an, X), target(Wn, an, X_test)
        start_losses[k] = [_clean(v) for v in test_loss(W_pre, a_pre, X_test, y_test, cfg.loss).tolist()]
        for i, (opt, rule, m, bc) in enumerate(variants(cfg)):
            t0 = time.perf_counter()
            kw = dict(loss=cfg.loss, X_test=X_test, y_test=y_test, log_every=cfg.log_every)
            if opt == "masked_gd":
                lr = cfg.gd_lr
                W, a, info = train(W_pre, a_pre, X, y, cfg.finetune_steps, lr, rule, cfg.density, m or 0,
                                   generator=torch.Generator().manual_seed(cfg.seed * 1_000 + i), **kw)
            else:
                lr = cfg.adam_lr
                W, a, info = nanoadam_train(W_pre, a_pre, X, y, cfg.finetune_steps, lr, rule, cfg.density,
                                            m or 0, bool(bc), seed=cfg.seed, **kw)
            measured = _measure(W, a, W_pre, a_pre, info["nan_step"], info["curve"])
            tl = test_loss(W, a, X_test, y_test, cfg.loss).tolist()
            measured["test_loss"] = [None if bad else _clean(v) for bad, v in zip(measured["nan"], tl)]
            r = RunResult(k, opt, rule, m, bc, lr, 1.0 if rule == "dense" else cfg.density, **measured)
            results.append(r)
            key = f"+{k} {r.label} {rule} m={m}"
            seconds[key] = round(time.perf_counter() - t0, 1)
            progress(f"{key}: test loss {_loss(_mean(r.test_loss))}, NaN {sum(r.nan)}/{S}, "
                     f"l2 {_fmt(_mean(r.l2_raw))} ({seconds[key]:.1f}s)")
    return {
        "config": asdict(cfg),
        "paper_pretrain": paper_pre,
        "pretrain_test_loss": [_clean(v) for v in pre_loss.tolist()],
        "pretrain_nan": pre_nan,
        "finetune_start_test_loss": start_losses,
        "n_params": W0[0].numel() + a0[0].numel(),
        "runs": [asdict(r) for r in results],
        "seconds": seconds,
    }


# ---------------------------------------------------------------------------- report


def _finite(xs):
    return [x for x in xs if x is not None and math.isfinite(x)]


def _mean(xs):
    xs = _finite(xs)
    return sum(xs) / len(xs) if xs else math.nan


def _std(xs):
    xs = _finite(xs)
    if len(xs) < 2:
        return math.nan
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _median(xs):
    ys = sorted(_finite(xs))
    if not ys:
        return math.nan
    mid = len(ys) // 2
    return ys[mid] if len(ys) % 2 else (ys[mid - 1] + ys[mid]) / 2


def _fmt(x: float, spec: str = ".4f") -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, spec)


def _loss(x: float) -> str:
    """A loss: 4 decimals, or 2 significant digits below 1e-3 (0.0000 would hide them)."""
    return _fmt(x, ".4f" if x is None or not math.isfinite(x) or x == 0 or abs(x) >= 1e-3 else ".1e")


# The paper's numbers for 1 extra neuron: (test loss, l2) as it reports them; and its GD learning rates.
PAPER = {1: {"small_weights": (0.0094, 0.027), "large_grads": (0.017, 0.057)}}
PAPER_LR = {"pretrain": 2.0, "finetune": 1.0}


def _refresh(m: int | None) -> str:
    return "—" if m is None else ("static" if m == 0 else str(m))


def _pick(runs, **key):
    return next((r for r in runs if all(r[k] == v for k, v in key.items())), None)


def _settings(result: dict):
    """(extra, optimizer, bias_correction, m) for every masked setting, in table order."""
    seen = []
    for r in result["runs"]:
        if r["rule"] != "dense":
            key = (r["extra"], r["optimizer"], r["bias_correction"], r["mask_interval"])
            if key not in seen:
                seen.append(key)
    return seen


def _head_to_head(x, y, field_: str) -> tuple[int, int]:
    """Seeds where x's value < y's, of the seeds where both are finite."""
    pairs = [(u, v) for u, v in zip(x[field_], y[field_]) if u is not None and v is not None]
    return sum(u < v for u, v in pairs), len(pairs)


def verdicts(result: dict) -> list[dict]:
    """Per masked setting: which rule wins on mean test loss, and small weights vs largest
    gradients (the paper's comparison) and vs random on loss and both l2 measures."""
    runs = result["runs"]
    out = []
    for extra, opt, bc, m in _settings(result):
        mine = {r["rule"]: r for r in runs if (r["extra"], r["optimizer"], r["bias_correction"]) == (extra, opt, bc)
                and r["mask_interval"] in (m, None)}
        ranked = sorted((r for r in mine.values() if r["rule"] != "dense" and _finite(r["test_loss"])),
                        key=lambda r: _mean(r["test_loss"]))
        sw, lg, rnd = mine.get("small_weights"), mine.get("large_grads"), mine.get("random")
        v = {"extra": extra, "optimizer": opt, "bias_correction": bc, "mask_interval": m,
             "label": optimizer_label(opt, bc), "ranking": [r["rule"] for r in ranked],
             "nan": {rule: sum(r["nan"]) for rule, r in mine.items()},
             "small_moved_max_abs": sw["moved_max_abs"] if sw else []}
        for name, other in (("large_grads", lg), ("random", rnd)):
            if sw is None or other is None:
                continue
            cmp = {}
            for f in ("test_loss", "l2_raw", "l2_ms"):
                a, b = _mean(sw[f]), _mean(other[f])
                wins, n = _head_to_head(sw, other, f)
                cmp[f] = {"small": a, "other": b, "small_lower": bool(a < b) if math.isfinite(a) and math.isfinite(b)
                          else None, "seeds_small_lower": wins, "seeds": n}
            v[f"vs_{name}"] = cmp
        out.append(v)
    return out


def _versus(c: dict, spec: str) -> str:
    """'a vs b (small lower, w/n seeds)' for one measure of a verdict's comparison."""
    if c["small_lower"] is None:
        verdict = "no comparison"
    else:
        verdict = "small lower" if c["small_lower"] else "small NOT lower"
    fmt = _loss if spec == "loss" else (lambda x: _fmt(x, spec))
    return f"{fmt(c['small'])} vs {fmt(c['other'])} ({verdict}, {c['seeds_small_lower']}/{c['seeds']} seeds)"


def _disagreement(result: dict, vs: list[dict]) -> list[str]:
    """The closing section, every sentence computed from the numbers."""
    cfg = result["config"]
    S = cfg["seeds"]
    lines = ["## Where we still disagree with the paper", ""]
    pp = result.get("paper_pretrain")
    if pp:
        steps = sorted(s for s in pp["nan_step"] if s >= 0)
        text = (f"- **Pretraining at the paper's lr {pp['lr']}** with the loss as written ({cfg['loss']}) "
                f"diverged in {len(steps)}/{S} seeds")
        if steps:
            text += (f" (first non-finite loss at steps {steps[0]}-{steps[-1]}); the finetuning below starts from "
                     f"students pretrained at lr {cfg['pretrain_lr']}, where {S - result['pretrain_nan']}/{S} "
                     "converged")
        lines.append(text + ".")
    agree, total = [], 0
    for v in vs:
        c = v.get("vs_large_grads")
        if not c:
            continue
        total += 1
        if all(c[f]["small_lower"] for f in ("test_loss", "l2_raw", "l2_ms")):
            agree.append(v)
        where = f"{v['label']}, m = {_refresh(v['mask_interval'])}"
        if len(cfg["extra_neurons"]) > 1:
            where += f", +{v['extra']}"
        winner = v["ranking"][0] if v["ranking"] else "none (every seed NaN)"
        n_ok = S - v["nan"].get(winner, 0)
        finite = f" (mean of its {n_ok}/{S} finite seeds)" if v["ranking"] and n_ok < S else ""
        text = (f"- {where}: lowest mean test loss **{winner}**{finite}; small weights vs largest gradients: "
                f"loss {_versus(c['test_loss'], 'loss')}, l2 {_versus(c['l2_raw'], '.3f')}")
        rnd = v.get("vs_random")
        if rnd:
            text += f"; vs random: loss {_versus(rnd['test_loss'], 'loss')}"
        ceiling = _median(v.get("small_moved_max_abs", []))
        if math.isfinite(ceiling):
            text += f"; small weights' largest moved |θ| {ceiling:.2f} (median)"
        nan_txt = ", ".join(f"{rule} {n}" for rule, n in v["nan"].items() if n)
        lines.append(text + (f"; NaN: {nan_txt}" if nan_txt else "") + ".")
    nan_runs: dict[str, tuple[int, int]] = {}
    for r in result["runs"]:
        label = optimizer_label(r["optimizer"], r["bias_correction"])
        bad, tot = nan_runs.get(label, (0, 0))
        nan_runs[label] = (bad + sum(r["nan"]), tot + len(r["nan"]))
    lines.append("- NaN at the finetuning lr (runs x seeds whose training loss became non-finite): "
                 + "; ".join(f"{label} {bad}/{tot}" for label, (bad, tot) in nan_runs.items()) + ".")
    lines.append("")
    if agree:
        names = "; ".join(f"{v['label']}, m = {_refresh(v['mask_interval'])}" for v in agree)
        lines.append(f"The paper's direction (small weights beat largest gradients on loss and on l2, both measures) "
                     f"holds in {len(agree)} of {total} settings: {names}. It does not hold in the others.")
    else:
        lines.append(f"The paper's direction (small weights beat largest gradients on loss and on l2) holds in none "
                     f"of our {total} settings.")
    # Magnitudes: our small-weights numbers beside the paper's.
    paper = PAPER.get(1)
    ones = [v for v in vs if v["extra"] == 1 and v.get("vs_large_grads")]
    raw = _finite([v["vs_large_grads"]["l2_raw"]["small"] for v in ones])
    ms = _finite([v["vs_large_grads"]["l2_ms"]["small"] for v in ones])
    losses = _finite([v["vs_large_grads"]["test_loss"]["small"] for v in ones])
    if paper and raw and ms and losses:
        lines += ["", f"Magnitudes (small weights, 1 extra neuron, over our settings): test loss "
                      f"{_loss(min(losses))}-{_loss(max(losses))} against the paper's {paper['small_weights'][0]}; "
                      f"l2 raw {_fmt(min(raw), '.3f')}-{_fmt(max(raw), '.3f')} and l2²/#params "
                      f"{_fmt(min(ms))}-{_fmt(max(ms))} against its {paper['small_weights'][1]}. "
                      "The paper does not define its l2; neither of our measures is known to be it."]
    return lines


def markdown(result: dict) -> str:
    cfg = result["config"]
    runs = result["runs"]
    S = cfg["seeds"]
    bcs = " and ".join("on" if b else "off" for b in cfg["bias_corrections"])
    pre_note = (f" (the paper's {PAPER_LR['pretrain']}: {'see below' if cfg['paper_pretrain_lr'] else 'not run'})"
                if cfg["pretrain_lr"] != PAPER_LR["pretrain"] else " (the paper's)")
    gd_note = " (the paper's)" if cfg["gd_lr"] == PAPER_LR["finetune"] else f" (the paper's: {PAPER_LR['finetune']})"
    lines = [
        "# Teacher-student toy (the paper's experiment 4)",
        "",
        f"Generated by `python -m nanotune.reproduce.teacher_student` (set-up and every choice: the module "
        f"docstring). {S} seeds; student {cfg['student_neurons']} neurons, teacher {cfg['teacher_neurons']}, "
        f"d = {cfg['input_dim']}; {cfg['n_train']} train / {cfg['n_test']} test inputs per seed; loss "
        f"{'(1/N)' if cfg['loss'] == 'mse' else '(1/2N)'} Σ r² ({cfg['loss']}); {cfg['dtype']}. Pretraining "
        f"{cfg['pretrain_steps']} GD steps at lr {cfg['pretrain_lr']}{pre_note}; finetuning "
        f"{cfg['finetune_steps']} steps: " + " and ".join(
            [f"masked GD at lr {cfg['gd_lr']}{gd_note}"] * ("masked_gd" in cfg["optimizers"])
            + [f"NanoAdam (`nanotune.optim.NanoAdam`, its defaults; bias correction {bcs}) at lr {cfg['adam_lr']}"]
            * ("nanoadam" in cfg["optimizers"])) + ". "
        f"Density {cfg['density']:.0%} of each layer, mask refreshed every m steps; dense = every entry (plain GD / "
        "plain Adam), no mask, so one row per optimizer.",
        "",
        f"Columns: test loss mean ± sd and median over the seeds that did not diverge; NaN = seeds whose "
        f"training loss became non-finite (left out of every other column); l2 raw = ||θ − θ₀||₂ over all "
        f"{result['n_params']} weights (mean ± sd); l2²/#params = the mean squared shift per parameter (mean); "
        "moved = entries that differ from the pretrained student (mean over seeds), max |θ| moved = the largest "
        "final magnitude among them (median over seeds). The paper's numbers (1 extra neuron) sit beside the two "
        "rules it compares; it states no density, refresh interval or l2 definition.",
        "",
        f"Pretrained test loss (old teacher): median {_fmt(_median(result['pretrain_test_loss']), '.2e')}, "
        f"{result['pretrain_nan']}/{S} diverged.",
        "",
        "| extra | optimizer | m | rule | test loss mean ± sd | median | NaN | l2 raw | l2²/#params | moved "
        "| max \\|θ\\| moved | paper loss | paper l2 |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, start in result["finetune_start_test_loss"].items():
        lines.append(f"| {k} | (before finetuning) | | | {_loss(_mean(start))} ± {_loss(_std(start))} | "
                     f"{_fmt(_median(start), '.2e')} | | 0 | 0 | 0 | | | |")
        for r in (r for r in runs if r["extra"] == int(k)):
            paper = PAPER.get(int(k), {}).get(r["rule"])
            p_loss, p_l2 = (f"{paper[0]}", f"{paper[1]}") if paper else ("", "")
            lines.append(
                f"| {k} | {optimizer_label(r['optimizer'], r['bias_correction'])} | {_refresh(r['mask_interval'])} | "
                f"{r['rule']} | {_loss(_mean(r['test_loss']))} ± {_loss(_std(r['test_loss']))} | "
                f"{_fmt(_median(r['test_loss']), '.2e')} | {sum(r['nan'])}/{S} | "
                f"{_fmt(_mean(r['l2_raw']), '.3f')} ± {_fmt(_std(r['l2_raw']), '.3f')} | {_fmt(_mean(r['l2_ms']))} | "
                f"{_fmt(_mean(r['moved']), '.1f')} | {_fmt(_median(r['moved_max_abs']), '.2f')} | {p_loss} | {p_l2} |"
            )
    vs = verdicts(result)
    lines += [
        "",
        "Head to head, per seed (same pretrained student, same new target; seeds where both are finite): in how "
        "many seeds small weights end lower than largest gradients / than random.",
        "",
        "| extra | optimizer | m | lower loss vs large_grads | lower l2 vs large_grads | lower loss vs random "
        "| lower l2 vs random | lowest mean loss (masked rules, best first) |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for v in vs:
        cells = []
        for name in ("large_grads", "random"):
            c = v.get(f"vs_{name}")
            for f in ("test_loss", "l2_raw"):
                cells.append(f"{c[f]['seeds_small_lower']}/{c[f]['seeds']}" if c else "")
        lines.append(f"| {v['extra']} | {v['label']} | {_refresh(v['mask_interval'])} | " + " | ".join(cells)
                     + f" | {', '.join(v['ranking'])} |")
    lines += [""] + _disagreement(result, vs)
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    """Median test-loss curves: one panel per optimizer (x bias correction) and m, the
    first extra-neuron count. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cfg, runs = result["config"], result["runs"]
    k = int(next(iter(result["finetune_start_test_loss"])))
    rows = []
    for r in runs:
        key = (r["optimizer"], r["bias_correction"])
        if r["extra"] == k and key not in rows:
            rows.append(key)
    cols = list(cfg["mask_intervals"])
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(5.2 * len(cols), 3.4 * len(rows)), squeeze=False)
    colours = {"small_weights": "tab:blue", "large_weights": "tab:orange", "random": "tab:green",
               "large_grads": "tab:red", "dense": "tab:gray"}
    for i, (opt, bc) in enumerate(rows):
        for j, m in enumerate(cols):
            ax = axes[i][j]
            for r in runs:
                if r["extra"] != k or (r["optimizer"], r["bias_correction"]) != (opt, bc) or \
                        r["mask_interval"] not in (m, None):
                    continue
                steps = [s * cfg["log_every"] for s, v in enumerate(r["curve_median"]) if v is not None]
                vals = [v for v in r["curve_median"] if v is not None]
                if vals:
                    ax.plot(steps, vals, color=colours[r["rule"]], lw=1.2,
                            ls="--" if r["rule"] == "dense" else "-",
                            label=f"{r['rule']} (NaN {sum(r['nan'])})")
            ax.set(yscale="log", xlabel="finetuning step", ylabel="test loss (median of seeds)",
                   title=f"{optimizer_label(opt, bc)}, m = {_refresh(m)}")
            ax.title.set_fontsize(9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write(result: dict, out: Path) -> None:
    write_report(out, "teacher_student", result, markdown(result), lambda p: plot(result, p),
                 "median test loss curves per optimizer and refresh interval")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("reports"), help="folder for teacher_student.{md,json,png}")
    p.add_argument("--quick", action="store_true", help="seconds (tests): 2 seeds, few steps; numbers mean nothing")
    d = ToyConfig()
    p.add_argument("--seeds", type=int)
    p.add_argument("--pretrain-steps", type=int)
    p.add_argument("--finetune-steps", type=int)
    p.add_argument("--pretrain-lr", type=float,
                   help=f"the pretraining that finetuning starts from (default {d.pretrain_lr})")
    p.add_argument("--paper-pretrain-lr", type=float,
                   help=f"also pretrain at this lr and report divergences; 0 skips (default {d.paper_pretrain_lr})")
    p.add_argument("--gd-lr", type=float, help=f"masked GD finetuning lr (default {d.gd_lr})")
    p.add_argument("--adam-lr", type=float, help=f"NanoAdam finetuning lr (default {d.adam_lr})")
    p.add_argument("--loss", choices=tuple(LOSSES), help=f"default {d.loss}")
    p.add_argument("--density", type=float, help=f"default {d.density}")
    p.add_argument("--extra-neurons", type=int, nargs="+", help=f"default {' '.join(map(str, d.extra_neurons))}")
    p.add_argument("--mask-intervals", type=int, nargs="+",
                   help="refresh intervals to compare; 0 = mask chosen once (default: 1 100)")
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, help="default: both")
    p.add_argument("--bias-correction", choices=("off", "on", "both"),
                   help="NanoAdam's bias_correction (default: both, each reported)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help=f"default {d.dtype}")
    args = p.parse_args(argv)
    cfg = ToyConfig.quick() if args.quick else ToyConfig()
    overrides = {
        "seeds": args.seeds, "pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
        "pretrain_lr": args.pretrain_lr, "paper_pretrain_lr": args.paper_pretrain_lr, "gd_lr": args.gd_lr,
        "adam_lr": args.adam_lr, "loss": args.loss, "density": args.density, "dtype": args.dtype,
        "extra_neurons": tuple(args.extra_neurons) if args.extra_neurons else None,
        "mask_intervals": tuple(args.mask_intervals) if args.mask_intervals else None,
        "optimizers": tuple(args.optimizers) if args.optimizers else None,
        "bias_corrections": {"off": (False,), "on": (True,), "both": (False, True)}.get(args.bias_correction),
    }
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    t0 = time.perf_counter()
    result = run(cfg, progress=lambda s: print(s, flush=True))
    result["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    write(result, args.out)
    print(f"wrote {args.out / 'teacher_student.md'} ({result['seconds']['total']:.0f}s)")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they give
    raise SystemExit(main())
