"""Optimizer benchmark (issue 2, acceptance 7): NanoAdam vs torch AdamW, side by side.

On a ~30M-parameter Llama (random init; the optimizer's cost does not depend on
the weights' values) this measures, in one run, for each density:
  - optimizer step time (median over --steps, NanoAdam and AdamW interleaved so
    drift on a shared machine hits both alike; gradients are fixed random
    tensors, so only the optimizer is timed, not backward),
  - optimizer state bytes,
  - the mask refresh time (NanoAdam only), separately,
and prints ratios NanoAdam / AdamW. Target: step-time ratio <= 1.

    npm run bench:optimizer            # or: python bench/optimizer.py --steps 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nanotune.optim import NanoAdam, nanoadam_param_groups


def build(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(  # ~30M parameters, Llama 3.2 shape in miniature (tied embeddings)
        vocab_size=16000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per optimizer (median reported)")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.1])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    # Two AdamW baselines: torch's default on CPU (per-tensor loop) and foreach;
    # ratios are against the faster one.
    baselines = {}
    for foreach in (False, True):
        m = build(0)
        fill_grads(m, 1)
        baselines[foreach] = torch.optim.AdamW(m.parameters(), lr=1e-5, weight_decay=0.0, foreach=foreach)
    n_params = sum(p.numel() for p in m.parameters())
    nano = {}
    for k in args.densities:
        model = build(0)
        fill_grads(model, 1)
        # mask_interval=None: refresh only at the first step, so timed steps are pure updates.
        nano[k] = (model, NanoAdam(nanoadam_param_groups(model), lr=6e-5, density=k, mask_interval=None))

    for opt in list(baselines.values()) + [o for _, o in nano.values()]:  # warm-up; creates state, first masks
        opt.step()
        opt.step()

    times = {f"adamw{f}": [] for f in baselines} | {k: [] for k in nano}
    for _ in range(args.steps):
        for f, opt in baselines.items():
            times[f"adamw{f}"].append(timed(opt.step))
        for k, (_, opt) in nano.items():
            times[k].append(timed(opt.step))
    refresh = {k: statistics.median(timed(opt.refresh_mask) for _ in range(3)) for k, (_, opt) in nano.items()}

    adamw_bytes = sum(t.numel() * t.element_size() for s in baselines[False].state.values()
                      for t in s.values() if torch.is_tensor(t))
    adamw_steps = {f: statistics.median(times[f"adamw{f}"]) for f in baselines}
    adamw_step = min(adamw_steps.values())
    print(f"# NanoAdam vs torch AdamW: Llama with {n_params / 1e6:.1f}M parameters, fp32, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.steps} steps")
    print(f"AdamW: step {adamw_steps[False] * 1e3:.1f} ms (foreach: {adamw_steps[True] * 1e3:.1f} ms; "
          f"ratios use the faster), state {adamw_bytes / 2**20:.1f} MiB")
    header = f"{'density':>8} {'step ms':>9} {'step ratio':>11} {'state MiB':>10} {'state ratio':>12} " \
             f"{'sparse MiB':>11} {'dense MiB':>10} {'refresh ms':>11}"
    print(header)
    for k, (_, opt) in nano.items():
        step = statistics.median(times[k])
        total = opt.state_bytes()
        print(f"{k:>8.2%} {step * 1e3:>9.1f} {step / adamw_step:>11.3f} {total / 2**20:>10.2f} "
              f"{total / adamw_bytes:>12.4f} {opt.state_bytes('sparse') / 2**20:>11.2f} "
              f"{opt.state_bytes('dense') / 2**20:>10.3f} {refresh[k] * 1e3:>11.1f}")
    worst = max(statistics.median(times[k]) / adamw_step for k in nano)
    print(f"target step ratio <= 1.0: {'met' if worst <= 1.0 else 'NOT met'} (worst {worst:.3f})")


if __name__ == "__main__":
    main()
