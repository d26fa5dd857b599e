"""Optimizer benchmark: NanoAdam vs torch AdamW side by side, and each against this
machine's memory-bandwidth floor, all measured in one run.

On a ~30M-parameter Llama (random init; the optimizer's cost does not depend on
the weights' values) this measures, for each density:
  - the optimizer step (median over --steps, every optimizer interleaved so drift
    on a shared machine hits all alike; gradients are fixed random tensors, so only
    the optimizer is timed, not backward), on NanoAdam's default path (the compiled
    CPU kernels when they build) and on its torch-op reference path,
  - the mask refresh (every sparse tensor at once), separately,
  - optimizer state bytes,
and prints ratios to AdamW and to the floor.

The floor is bytes moved / memory bandwidth. The bandwidth is measured here, in the
same run: the best of STREAM's copy (a = b) and add (a = b + c) over arrays larger
than the caches, counted as STREAM counts (8 and 12 bytes an entry). Bytes moved is
what the math has to read and write, counted in the cache lines it touches, since
memory moves nothing smaller (Note [bandwidth floor] below).

    npm run bench:optimizer            # or: python bench/optimizer.py --steps 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nanotune import kernels
from nanotune.optim import NanoAdam, _expand, nanoadam_param_groups

LINE = 64  # bytes in a cache line

# Note [bandwidth floor]: the bytes each variant must move, per tensor.
# - AdamW: read weights, gradient, both moments; write weights and moments (7 arrays).
# - NanoAdam step, sparse tensor: the cache lines of the weights that hold a masked
#   entry, read and written, the same lines of the gradient, read; the k moments of
#   each kind, read and written; the stored mask (and the ages), read. A dense-group
#   tensor counts as AdamW.
# - Refresh, sparse tensor: read every weight (the selection looks at all of them);
#   write the new mask; read the old mask, moments and ages and write the new ones
#   (the carry). What a kernel reads again from cache is not counted: this is the
#   least any implementation has to move.


def build(seed: int, small: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    if small:  # for the test that keeps this script running
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    else:  # ~30M parameters, Llama 3.2 shape in miniature (tied embeddings)
        cfg = LlamaConfig(vocab_size=16000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def fill_grads(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bandwidth(entries: int = 2**26, reps: int = 5) -> float:
    """Bytes per second: the best of STREAM copy and add medians over fp32 arrays of
    ``entries`` (3 x 256 MiB by default, beyond the caches)."""
    a, b, c = torch.empty(entries), torch.rand(entries), torch.rand(entries)
    rates = []
    for name, fn, nbytes in (("copy", lambda: a.copy_(b), 8), ("add", lambda: torch.add(b, c, out=a), 12)):
        fn()
        rates.append(nbytes * entries / statistics.median(timed(fn) for _ in range(reps)))
    return max(rates)


def lines(flat_idx: torch.Tensor, element_size: int) -> int:
    """Cache lines holding the entries at ``flat_idx`` of a line-aligned array."""
    return int(torch.unique_consecutive(flat_idx.to(torch.int64) * element_size // LINE).numel())


def adamw_bytes(model: torch.nn.Module) -> int:
    return sum(7 * p.numel() * p.element_size() for p in model.parameters())


def nano_bytes(opt: NanoAdam) -> tuple[int, int]:
    """(step bytes, refresh bytes) of ``opt``'s current masks (Note [bandwidth floor])."""
    step = refresh = 0
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if not group["sparse"]:
                step += 7 * p.numel() * p.element_size()
                continue
            idx = _expand(state["idx"], p.numel(), state["density"], group["chunk_size"])
            k = idx.numel()
            per_entry = 2 * state["exp_avg"].element_size() + 2 * state["exp_avg_sq"].element_size() \
                + state["idx"].element_size() + (state["age"].element_size() if "age" in state else 0)
            step += 3 * LINE * lines(idx, p.element_size()) + k * per_entry
            carried = state["exp_avg"].element_size() + state["exp_avg_sq"].element_size() + \
                (state["age"].element_size() if "age" in state else 0)
            refresh += p.numel() * p.element_size() + 2 * k * state["idx"].element_size() + 2 * k * carried
    return step, refresh


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per optimizer (median reported)")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.1])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--small", action="store_true", help="a tiny model (for the test that runs this script)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    status = kernels.status()  # builds the CPU kernels now, not inside a timed step
    # Two AdamW baselines: torch's default on CPU (per-tensor loop) and foreach;
    # ratios are against the faster one.
    baselines = {}
    for foreach in (False, True):
        m = build(0, args.small)
        fill_grads(m, 1)
        baselines[foreach] = torch.optim.AdamW(m.parameters(), lr=1e-5, weight_decay=0.0, foreach=foreach)
    n_params = sum(p.numel() for p in m.parameters())
    # NanoAdam per density on its default path (fused: the CPU kernels where they load)
    # and on the torch-op reference path (fused=False, foreach=False).
    nano = {}
    for k in args.densities:
        for path, fused in (("default", None), ("torch ops", False)):
            model = build(0, args.small)
            fill_grads(model, 1)
            # mask_interval=None: refresh only at the first step, so timed steps are pure updates.
            nano[k, path] = NanoAdam(nanoadam_param_groups(model), lr=6e-5, density=k, mask_interval=None,
                                     fused=fused, foreach=False if fused is False else None)

    for opt in list(baselines.values()) + list(nano.values()):  # warm-up; creates state, first masks
        opt.step()
        opt.step()

    times = {f"adamw{f}": [] for f in baselines} | {key: [] for key in nano}
    for _ in range(args.steps):
        for f, opt in baselines.items():
            times[f"adamw{f}"].append(timed(opt.step))
        for key, opt in nano.items():
            times[key].append(timed(opt.step))
    # The refresh, timed after a few more steps each time, so that the weights moved and
    # some masks change (a refresh of unchanged weights keeps every mask, which is cheaper).
    refresh = {}
    for key, opt in nano.items():
        runs = []
        for _ in range(5):
            for _ in range(5):
                opt.step()
            runs.append(timed(opt.refresh_mask))
        refresh[key] = statistics.median(runs)
    bw = bandwidth()

    adamw_state = sum(t.numel() * t.element_size() for s in baselines[False].state.values()
                      for t in s.values() if torch.is_tensor(t))
    adamw_steps = {f: statistics.median(times[f"adamw{f}"]) for f in baselines}
    adamw_step = min(adamw_steps.values())
    adamw_floor = adamw_bytes(m) / bw
    path = "compiled CPU kernels" if status["available"] else f"torch ops ({status['reason']})"
    print(f"# NanoAdam vs torch AdamW: Llama with {n_params / 1e6:.1f}M parameters, fp32, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.steps} steps")
    print(f"memory bandwidth (best of STREAM copy/add, measured now): {bw / 1e9:.1f} GB/s; "
          f"NanoAdam's default path: {path}")
    print(f"AdamW: step {adamw_steps[False] * 1e3:.1f} ms (foreach: {adamw_steps[True] * 1e3:.1f} ms; "
          f"ratios use the faster), state {adamw_state / 2**20:.1f} MiB, floor {adamw_floor * 1e3:.1f} ms "
          f"(x{adamw_step / adamw_floor:.2f})")
    print(f"{'density':>8} {'path':>10} {'step ms':>8} {'/AdamW':>7} {'floor ms':>9} {'/floor':>7} "
          f"{'refresh ms':>11} {'/AdamW':>7} {'floor ms':>9} {'/floor':>7} {'state MiB':>10} {'/AdamW':>7}")
    verdicts = []
    for (k, name), opt in nano.items():
        step = statistics.median(times[k, name])
        step_bytes, refresh_bytes = nano_bytes(opt)
        step_floor, refresh_floor = step_bytes / bw, refresh_bytes / bw
        total = opt.state_bytes()
        r = refresh[k, name]
        print(f"{k:>8.2%} {name:>10} {step * 1e3:>8.1f} {step / adamw_step:>7.3f} {step_floor * 1e3:>9.2f} "
              f"{step / step_floor:>7.2f} {r * 1e3:>11.1f} {r / adamw_step:>7.2f} {refresh_floor * 1e3:>9.2f} "
              f"{r / refresh_floor:>7.2f} {total / 2**20:>10.2f} {total / adamw_state:>7.4f}")
        if name == "default":
            step_target = {0.01: 0.12, 0.1: 0.45}.get(k)
            if step_target is not None:
                verdicts.append((f"step at k = {k:.0%} <= {step_target} x AdamW and <= 3 x floor",
                                 step / adamw_step <= step_target and step / step_floor <= 3))
            if k == 0.1:
                verdicts.append(("refresh at k = 10% <= 3 AdamW steps and <= 3 x floor",
                                 r / adamw_step <= 3 and r / refresh_floor <= 3))
    for what, ok in verdicts:
        print(f"target {what}: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
