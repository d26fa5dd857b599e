"""Bytes all-reduced per step and step time of a sidecar group under torchrun (issue 13):
AdamW-DDP against NanoAdam with dense-gradient DDP and with sparse DDP (only the
selected entries all-reduced; Note [sparse all-reduce] in python/nanotune/parallel.py),
side by side in one run.

For each row it starts a group (`python -m torch.distributed.run --nproc-per-node N
--standalone -m nanotune.sidecar --device cpu`, gloo), drives rank 0 over the wire
with a raw DEALER client (hello, load_model, load_dataset, create_optimizer,
train_step x (warm-up + timed), shutdown), and reads what each train_step reports:
allReducedBytes (bytes of gradients rank 0 all-reduced in the step) and timeS (the
slowest rank's step time). Medians are over the timed steps, after the warm-up.
Every rank runs with OMP_NUM_THREADS as torchrun sets it (1 thread per rank).

The target: NanoAdam sparse all-reduces <= 1.2 x k of AdamW's bytes (the dense
tensors, RMSNorm weights, travel whole; every sparse tensor sends its k entries).
Dense and sparse NanoAdam at the same k select the same masks and apply the same
update, so their losses agree step for step.

    python bench/distributed.py                  # small-llama (~29M), 2 ranks, ~3 min on 2 cores
    python bench/distributed.py --small --json /tmp/rows.json   # tiny-llama, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_wire import Client, write_data  # noqa: E402

# --model mid: a Llama in the shape family of the presets (GQA, SwiGLU, tied
# embeddings), ~4M params, between tiny-llama (~0.1M) and small-llama (~29M, the
# default): the same table in about a minute instead of three.
MID = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
           num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
           tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-5)

TARGET = 1.2  # sparse bytes <= TARGET x k x AdamW's bytes


def variants(densities: list[float]) -> list[tuple[str, dict]]:
    rows = [("adamw", {"name": "adamw"})]
    rows += [(f"nanoadam-dense k={k:g}", {"name": "nanoadam", "density": k}) for k in densities]
    rows += [(f"nanoadam-sparse k={k:g}", {"name": "nanoadam", "density": k, "sparseGradients": True})
             for k in densities]
    return rows


def build_model(name: str, work: pathlib.Path) -> pathlib.Path:
    """A local HF directory for `name`: a preset (built into work/), "mid" (MID, random
    init, saved with tiny-llama's tokenizer: its ids < 512 fit the vocab), or a path."""
    from nanotune.models import PRESETS, build_preset

    if name in PRESETS:
        return build_preset(name, work / name)
    if name != "mid":
        return pathlib.Path(name)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = work / "mid"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**MID)).save_pretrained(out)
    tok = build_preset("tiny-llama", work / "tiny-llama")
    for f in tok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def read_ready(proc: subprocess.Popen, timeout_s: float) -> str:
    """The endpoint from the group's ready line on stdout (rank 0 prints it once bound)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sel.select(timeout=max(0.0, deadline - time.monotonic())):
            line = proc.stdout.readline()
            if not line:
                break  # EOF: the group died before it was ready
            try:
                return json.loads(line)["ready"]
            except (ValueError, KeyError):
                continue  # not the ready line
    raise RuntimeError(f"the group sent no ready line (exit code {proc.poll()})")


def run(i: int, label: str, opt: dict, args, model_dir: pathlib.Path, data: pathlib.Path, work: pathlib.Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "python"), os.environ.get("PYTHONPATH")]))}
    env.pop("OMP_NUM_THREADS", None)  # torchrun sets 1 per rank when it is unset
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "--standalone",
           "--monitor-interval", "0.1", "-m", "nanotune.sidecar", "--endpoint", f"ipc://{work}/g{i}.sock",
           "--device", "cpu"]
    row: dict = {"variant": label, "optimizer": opt}  # g{i}: short names, as ipc paths are capped at 107 bytes
    err_path = work / f"g{i}.stderr"
    with err_path.open("w") as err:
        # Its own session: the finally below kills torchrun and every rank as one group.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True, start_new_session=True)
    c = None
    try:
        c = Client(read_ready(proc, args.start_timeout_s), timeout_ms=args.call_timeout_s * 1000)
        h = c.call("hello", {"protocol": 1})
        row["world_size"] = (h.get("distributed") or {}).get("worldSize")
        t0 = time.perf_counter()
        m = c.call("load_model", {"path": str(model_dir)})
        row["load_s"] = time.perf_counter() - t0
        row["params"] = m["parameters"]
        c.call("load_dataset", {"path": str(data), "cutoff": args.seq, "seed": 0})
        c.call("create_optimizer", {**opt, "lr": args.lr})
        steps = [c.call("train_step", {"lr": args.lr, "microBatch": args.micro_batch})
                 for _ in range(args.warmup + args.steps)]
        timed = steps[args.warmup:]
        row["losses"] = [s["loss"] for s in steps]
        row["bytes_per_step"] = [s.get("allReducedBytes") for s in steps]
        row["step_times_s"] = [s["timeS"] for s in steps]
        row["bytes"] = statistics.median(s["allReducedBytes"] for s in timed)
        row["step_s"] = statistics.median(s["timeS"] for s in timed)
        row["tokens_per_step"] = timed[-1]["tokens"]
        c.call("shutdown")
        row["exit_code"] = proc.wait(timeout=60)
    except Exception as e:  # noqa: BLE001 - the row reports it; the other rows still run
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything left of the group (nothing, after a clean exit)
        except ProcessLookupError:
            pass
        proc.wait()
        proc.stdout.close()
        if c is not None:
            c.sock.close()
    if ("error" in row or row.get("exit_code")) and (tail := stderr_tail(err_path.read_text())):
        row["stderr_tail"] = tail
    return row


def stderr_tail(text: str) -> list[str]:
    """A failed group's cause: each rank's last exception or sidecar exit line, rank 0
    first (torchrun's own summary, which ends stderr, names only exit codes), else the
    last lines but torchrun's OMP_NUM_THREADS banner."""
    last: dict[str, str] = {}
    for ln in text.strip().splitlines():
        m = re.match(r"(\[rank\d+\]:)?\s*([\w.]*(Error|Exception)\b|nanotune\.sidecar[ :(])", ln)
        if m and "ChildFailedError" not in ln and "FAILED" not in ln:
            last[m.group(1) or ""] = ln[:400]
    if last:
        return [last[r] for r in sorted(last)]
    return [ln for ln in text.strip().splitlines() if not ln.startswith(("*", "Setting OMP_NUM_THREADS"))][-5:]


def add_ratios(rows: list[dict]) -> None:
    base = next((r for r in rows if r["variant"] == "adamw" and "error" not in r), None)
    for r in rows:
        if base is None or "error" in r:
            continue
        r["bytes_vs_adamw"] = r["bytes"] / base["bytes"]
        r["time_vs_adamw"] = r["step_s"] / base["step_s"]
        k = r["optimizer"].get("density")
        if k is not None:
            r["bytes_vs_adamw_over_k"] = r["bytes_vs_adamw"] / k
        if r["optimizer"].get("sparseGradients"):
            r["meets_target"] = r["bytes_vs_adamw"] <= TARGET * k


def loss_agreement(rows: list[dict], densities: list[float], n: int) -> dict:
    """Largest relative difference between dense and sparse NanoAdam's first n losses, per k."""
    by = {r["variant"]: r for r in rows if "error" not in r}
    out = {}
    for k in densities:
        d, s = by.get(f"nanoadam-dense k={k:g}"), by.get(f"nanoadam-sparse k={k:g}")
        if d and s:
            out[f"{k:g}"] = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(d["losses"][:n], s["losses"][:n]))
    return out


def print_table(rows: list[dict], args, n_losses: int) -> None:
    p = next((r["params"] for r in rows if "params" in r), None)
    print(f"# {args.nproc}-rank CPU group (torchrun --standalone, gloo), OMP_NUM_THREADS=1 per rank as torchrun "
          f"sets it; model {args.model} ({p / 1e6:.2f}M params)" if p else f"# model {args.model}")
    print(f"# micro-batch {args.micro_batch} (global, split across ranks), cutoff {args.seq}, lr {args.lr:g}; "
          f"medians over {args.steps} timed steps after {args.warmup} warm-up")
    head = (f"{'variant':<22} {'bytes/step':>12} {'/ adamw':>8} {'/ k':>6} {'step ms':>9} {'/ adamw':>8}  "
            f"target (sparse <= {TARGET:g} x k)")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<22} FAILED {r['error']} {r.get('stderr_tail', '')}")
            continue
        over_k = f"{r['bytes_vs_adamw_over_k']:.3f}" if "bytes_vs_adamw_over_k" in r else "-"
        target = ("met" if r["meets_target"] else "NOT met") if "meets_target" in r else ""
        print(f"{r['variant']:<22} {r['bytes'] / 1e6:>9.3f} MB {r.get('bytes_vs_adamw', float('nan')):>8.4f} "
              f"{over_k:>6} {r['step_s'] * 1e3:>9.1f} {r.get('time_vs_adamw', float('nan')):>8.3f}  {target}")
    print(f"\n# losses of the first {n_losses} steps")
    for r in rows:
        if "error" not in r:
            print(f"{r['variant']:<22} " + " ".join(f"{x:.6f}" for x in r["losses"][:n_losses]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="ranks (processes) in the group")
    ap.add_argument("--model", default=None,
                    help="a preset (small-llama: default; tiny-llama), 'mid' (~4M) or an HF directory")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 8; --small 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; --small 1)")
    ap.add_argument("--micro-batch", type=int, default=None, help="global rows per step (default 8; --small 4)")
    ap.add_argument("--seq", type=int, default=None, help="cutoff: most tokens per example (default 128; --small 64)")
    ap.add_argument("--densities", default="0.01,0.1", help="NanoAdam's k values")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--small", action="store_true", help="fast mode for the test: tiny-llama, 3 short steps")
    ap.add_argument("--start-timeout-s", type=int, default=120)
    ap.add_argument("--call-timeout-s", type=int, default=300)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    small = dict(model="tiny-llama", steps=3, warmup=1, micro_batch=4, seq=64)
    full = dict(model="small-llama", steps=8, warmup=2, micro_batch=8, seq=128)
    for key, value in (small if args.small else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    densities = [float(k) for k in args.densities.split(",")]

    work = pathlib.Path(tempfile.mkdtemp(prefix="nanotune-dist-"))
    os.environ.setdefault("NANOTUNE_CACHE", str(work / "cache"))
    t_all = time.perf_counter()
    try:
        model_dir, data = build_model(args.model, work), work / "data.jsonl"
        write_data(data)
        rows = []
        for i, (label, opt) in enumerate(variants(densities)):
            t0 = time.perf_counter()
            rows.append(run(i, label, opt, args, model_dir, data, work))
            print(f"# {label}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    add_ratios(rows)
    n_losses = min(args.warmup + args.steps, 5)
    agree = loss_agreement(rows, densities, args.warmup + args.steps)
    print_table(rows, args, n_losses)
    for k, d in agree.items():
        print(f"# k={k}: dense vs sparse losses, largest relative difference over all steps: {d:.2e}")
    print(f"# whole bench: {time.perf_counter() - t_all:.1f} s")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"args": vars(args), "work_dir": str(work), "rows": rows,
                                                       "loss_agreement": agree}, indent=2))
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
