"""Llama 3.2 3B on one GPU: peak memory and step time of AdamW vs NanoAdam (issue 6).

Builds the Llama 3.2 3B architecture from its config (random init, since no
weights can be fetched here; or --model-dir with local weights), bf16 on CUDA
with gradient checkpointing, micro-batch 2, cutoff 256 (the paper's setting),
and measures, each optimizer in a fresh process so peaks do not mix:
  - peak memory: torch.cuda.max_memory_allocated on CUDA; on the CPU the peak
    resident set above the process's baseline after imports (coarser),
  - median step time over --steps steps after --warmup steps,
  - mask refresh time (NanoAdam),
and prints each as a ratio to AdamW from the same run.

Variants: adamw (torch, states in the weights' dtype), nanoadam (as the paper
runs it: dense gradients), nanoadam-sparse (Note [sparse gradients]: gradients
gathered at the mask in backward), and, where installed and on CUDA, adamw8bit
(bitsandbytes) and microadam (ista-daslab-optimizers); otherwise the table
says why not.

    python bench/gpu.py              # the 3B architecture (needs a big GPU)
    python bench/gpu.py --small      # a tiny config, runs on a CPU in a minute
    python bench/gpu.py --memory-cap-gib 24   # each variant capped at 24 GiB of GPU memory

With --memory-cap-gib the worker calls torch.cuda.set_per_process_memory_fraction
before building the model, so a variant that needs more fails with an out-of-memory
row (the peak it had reached is reported) instead of borrowing the rest of the card.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("adamw", "nanoadam", "nanoadam-sparse", "adamw8bit", "microadam")

# Llama 3.2 3B (meta-llama/Llama-3.2-3B config.json).
LLAMA_3_2_3B = dict(
    vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
    num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=131072,
    rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5, head_dim=128,
    rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
)
# --small: same shape family (tied embeddings, GQA), small enough for CI on a CPU.
SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
             rope_theta=500000.0)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_optimizer(variant: str, model, args):
    import torch

    cuda = next(model.parameters()).is_cuda
    if variant == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=cuda or None)
    if variant in ("nanoadam", "nanoadam-sparse"):
        from nanotune.optim import NanoAdam, nanoadam_param_groups

        return NanoAdam(nanoadam_param_groups(model), lr=6e-5, density=args.density,
                        mask_interval=args.mask_interval,
                        moments_dtype=torch.bfloat16 if cuda else None,
                        sparse_gradients=variant == "nanoadam-sparse")
    if not cuda:
        raise RuntimeError("needs CUDA")
    if variant == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(model.parameters(), lr=1e-5, weight_decay=0.0)
    if variant == "microadam":
        from ista_daslab_optimizers import MicroAdam

        return MicroAdam(model.parameters(), m=10, lr=1e-5, quant_block_size=100_000, k_init=0.01)
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def worker(variant: str, args) -> dict:
    """Runs one optimizer in this process and returns its measurements."""
    import torch

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    baseline = current_rss_bytes()
    if cuda and args.memory_cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total), device.index or 0)
    try:
        return measure(variant, args, device, baseline)
    except torch.OutOfMemoryError:
        peak = torch.cuda.max_memory_allocated(device) if cuda else 0
        return {"variant": variant, "error": f"out of memory under the {args.memory_cap_gib:g} GiB cap "
                f"(peak allocated {peak / 2**30:.2f} GiB when it failed)"}


def measure(variant: str, args, device, baseline: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    if args.model_dir:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, torch_dtype=dtype,
                                                     local_files_only=True).to(device)
    else:
        cfg = LlamaConfig(**(SMALL if args.small else LLAMA_3_2_3B))
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in bf16 directly: no fp32 copy in the peak
        try:
            with torch.device(device):
                model = LlamaForCausalLM(cfg).to(dtype)
        finally:
            torch.set_default_dtype(default)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)  # the peak of training, not of building the model
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.train()
    opt = make_optimizer(variant, model, args)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, vocab, (args.micro_batch, args.seq), generator=gen).to(device)
            for _ in range(args.grad_accum)]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step():
        for x in data:
            loss = model(input_ids=x, labels=x).loss / len(data)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    refresh = None
    if hasattr(opt, "refresh_mask"):
        samples = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            opt.refresh_mask(now=True)
            sync()
            samples.append(time.perf_counter() - t0)
        refresh = statistics.median(samples)
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes() - baseline
    state = opt.state_bytes() if hasattr(opt, "state_bytes") else sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {
        "variant": variant, "peak_bytes": peak, "step_s": statistics.median(times), "refresh_s": refresh,
        "state_bytes": state, "loss": float(loss) * len(data),
        "params": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny config (CPU-friendly); default: Llama 3.2 3B")
    ap.add_argument("--model-dir", help="a local HF model directory instead of random init")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256, help="cutoff length (tokens per row)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--mask-interval", type=int, default=600)
    ap.add_argument("--memory-cap-gib", type=float, default=None,
                    help="CUDA: cap each variant's process at this much GPU memory (set_per_process_memory_fraction)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            sys.exit(f"unknown variant {variant!r}; expected some of {', '.join(VARIANTS)}")
        cmd = [sys.executable, __file__, "--worker", variant] + [a for a in sys.argv[1:]]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        else:
            reason = (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1]
            rows.append({"variant": variant, "error": reason[:120]})
    print_table(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def print_table(rows: list[dict], args) -> None:
    ok = [r for r in rows if "error" not in r]
    base = next((r for r in ok if r["variant"] == "adamw"), None)
    first = ok[0] if ok else {}
    what = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS above baseline"
    print(f"# {'small config' if args.small else 'Llama 3.2 3B architecture'}: "
          f"{first.get('params', 0) / 1e9:.3f}B params, device {first.get('device', args.device)}, "
          f"torch {first.get('torch', '?')}, micro-batch {args.micro_batch}, seq {args.seq}, "
          f"grad accum {args.grad_accum}, k={args.density:g}, m={args.mask_interval}, "
          f"median of {args.steps} steps; memory = {what}"
          + (f"; capped at {args.memory_cap_gib:g} GiB" if args.memory_cap_gib else ""))
    print(f"| {'variant':<16}| {'peak GiB':>9} | {'/ AdamW':>8} | {'step ms':>9} | {'/ AdamW':>8} "
          f"| {'refresh ms':>10} | {'state GiB':>9} |")
    print("|" + "-" * 17 + ("|" + "-" * 11) + ("|" + "-" * 10) + ("|" + "-" * 11) + ("|" + "-" * 10)
          + ("|" + "-" * 12) + ("|" + "-" * 11) + "|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']:<16}| not run: {r['error']}")
            continue
        mem_ratio = r["peak_bytes"] / base["peak_bytes"] if base else float("nan")
        time_ratio = r["step_s"] / base["step_s"] if base else float("nan")
        refresh = f"{r['refresh_s'] * 1e3:10.1f}" if r["refresh_s"] is not None else f"{'-':>10}"
        print(f"| {r['variant']:<16}| {r['peak_bytes'] / 2**30:9.3f} | {mem_ratio:8.3f} | "
              f"{r['step_s'] * 1e3:9.1f} | {time_ratio:8.3f} | {refresh} | {r['state_bytes'] / 2**30:9.4f} |")
    sparse = next((r for r in ok if r["variant"] == "nanoadam-sparse"), None)
    if base and sparse:
        print(f"nanoadam-sparse / adamw: peak memory {sparse['peak_bytes'] / base['peak_bytes']:.3f} "
              f"(target <= 0.40), step time {sparse['step_s'] / base['step_s']:.3f} (target <= 1.0)")


if __name__ == "__main__":
    main()
