"""Llama 3.2 3B through the wire: a Python DEALER client drives a real sidecar
(load_model, load_dataset, create_optimizer, train_step, save_checkpoint), as the
TypeScript Trainer does, for a machine that has a GPU but no Node (issue 15).

For each optimizer it builds the 3B architecture (random init, bf16) and saves it as
an HF directory with the tiny-llama preset's tokenizer (ids < 512 fit any vocab),
writes a small instruction set, starts a sidecar whose process is capped at
--memory-cap-gib of GPU memory (torch.cuda.set_per_process_memory_fraction, set
before the sidecar's loop starts), trains --steps steps and saves a checkpoint. It
prints per-step times and losses as the sidecar reports them, the checkpoint time,
and the sidecar's torch.cuda.max_memory_allocated at shutdown.

    python bench/gpu_wire.py --memory-cap-gib 24          # on a GPU: the 3B run
    python bench/gpu_wire.py --small --device cpu --steps 3  # the same path, small, on a CPU
    python bench/gpu_wire.py --nproc 1 --parallel ddp   # a sidecar group under torchrun (nccl on CUDA)

With --nproc the sidecar is a group launched by torchrun (nanotune.distributed), with
load_model's `parallel`; the memory cap and the peak are then not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "bench"))

from gpu import LLAMA_3_2_3B, SMALL  # noqa: E402

# The sidecar, started in a process whose GPU memory is capped first; it reports
# its peak allocation on stderr just before it exits.
SIDECAR = """
import json, sys, torch
from nanotune.sidecar.runtime import main
endpoint, device, cap = sys.argv[1], sys.argv[2], float(sys.argv[3])
if device.startswith("cuda") and cap > 0:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total), 0)
def report():
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    print("PEAK " + json.dumps({"peakAllocated": peak}), file=sys.stderr, flush=True)
main(endpoint, device, None, None, report)
"""

OPTIMIZERS = {
    "nanoadam-sparse": {"name": "nanoadam", "sparseGradients": True},
    "nanoadam": {"name": "nanoadam"},
    "adamw": {"name": "adamw"},
}


class Client:
    def __init__(self, endpoint: str, timeout_ms: int):
        import zmq

        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
        self.sock.connect(endpoint)
        self.next_id = 0

    def call(self, method: str, params: dict | None = None) -> dict:
        import msgspec

        self.next_id += 1
        self.sock.send_multipart([msgspec.msgpack.encode({"v": 1, "id": self.next_id, "method": method,
                                                          "params": params or {}})])
        while True:
            env, *_ = self.sock.recv_multipart()
            msg = msgspec.msgpack.decode(env)
            if "event" in msg:
                continue
            if msg.get("id") != self.next_id:
                continue
            if "error" in msg:
                raise RuntimeError(f"{method}: {msg['error']['code']}: {msg['error']['message']}")
            return msg["result"]


def build_model(dir: pathlib.Path, small: bool) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nanotune.models import build_preset

    torch.manual_seed(0)
    cfg = LlamaConfig(**(SMALL if small else LLAMA_3_2_3B))
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() and not small else "cpu"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(dir)
    del model
    tok = build_preset("tiny-llama", dir.parent / "tiny")
    for f in tok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, dir / f.name)


def write_data(path: pathlib.Path, rows: int = 256) -> None:
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"instruction": f"Add {i} and {i + 7}.", "input": "",
                                "output": f"{i} plus {i + 7} is {2 * i + 7}. " * 6}) + "\n")


def run(variant: str, args, model_dir: pathlib.Path, data: pathlib.Path, work: pathlib.Path) -> dict:
    sock = work / f"{variant}.sock"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "python"), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-c", SIDECAR, f"ipc://{sock}", args.device, str(args.memory_cap_gib or 0)]
    if args.nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "--standalone",
               "--monitor-interval", "0.1", "-m", "nanotune.sidecar", "--endpoint", f"ipc://{sock}",
               "--device", args.device]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                            start_new_session=True)
    ready = json.loads(proc.stdout.readline())["ready"]
    c = Client(ready, timeout_ms=args.call_timeout_s * 1000)
    row: dict = {"variant": variant}
    try:
        c.call("hello", {"protocol": 1})
        t0 = time.perf_counter()
        m = c.call("load_model", {"path": str(model_dir), "dtype": "bfloat16", "gradientCheckpointing": True,
                                  **({"parallel": args.parallel} if args.nproc else {})})
        row["world_size"] = m.get("worldSize", 1)
        row["load_s"] = time.perf_counter() - t0
        row["params"] = m["parameters"]
        c.call("load_dataset", {"path": str(data), "cutoff": args.seq, "seed": 0})
        opt = c.call("create_optimizer", {**OPTIMIZERS[variant], "lr": 1e-5 if variant == "adamw" else 6e-5,
                                          "density": args.density, "maskInterval": 600}
                     if variant != "adamw" else {**OPTIMIZERS[variant], "lr": 1e-5})
        row["state_bytes_created"] = opt["stateBytes"]
        steps = [c.call("train_step", {"lr": 1e-5 if variant == "adamw" else 6e-5, "microBatch": args.micro_batch})
                 for _ in range(args.steps)]
        row["losses"] = [round(s["loss"], 4) for s in steps]
        row["step_s"] = statistics.median(s["timeS"] for s in steps[1:] or steps)
        row["first_step_s"] = steps[0]["timeS"]
        row["tokens_per_step"] = steps[-1]["tokens"]
        row["state_bytes"] = steps[-1]["stateBytes"]
        row["all_reduced_bytes"] = steps[-1].get("allReducedBytes")
        t0 = time.perf_counter()
        c.call("save_checkpoint", {"path": str(work / f"ckpt-{variant}")})
        row["save_s"] = time.perf_counter() - t0
    except RuntimeError as e:
        row["error"] = str(e)[:200]
    finally:
        try:
            c.call("shutdown")
        except Exception:  # noqa: BLE001 - it may already be gone after an error
            proc.kill()
        _, err = proc.communicate(timeout=120)
        peak = [json.loads(line[5:]) for line in err.splitlines() if line.startswith("PEAK ")]
        row["peak_bytes"] = peak[-1]["peakAllocated"] if peak else None
        if "error" in row or proc.returncode:
            row["stderr_tail"] = err.strip().splitlines()[-3:]
        shutil.rmtree(work / f"ckpt-{variant}", ignore_errors=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny config (CPU-friendly); default: Llama 3.2 3B")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--variants", default="nanoadam-sparse")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--memory-cap-gib", type=float, default=None)
    ap.add_argument("--call-timeout-s", type=int, default=600)
    ap.add_argument("--nproc", type=int, default=0, help="launch a sidecar group of this many ranks with torchrun")
    ap.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"], help="with --nproc: load_model's parallel")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    work = pathlib.Path(tempfile.mkdtemp(prefix="nanotune-wire-"))
    os.environ.setdefault("NANOTUNE_CACHE", str(work / "cache"))
    try:
        model_dir, data = work / "model", work / "data.jsonl"
        t0 = time.perf_counter()
        build_model(model_dir, args.small)
        print(f"# built and saved the {'small' if args.small else 'Llama 3.2 3B'} architecture in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        write_data(data)
        rows = [run(v, args, model_dir, data, work) for v in args.variants.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cap = f", sidecar capped at {args.memory_cap_gib:g} GiB" if args.memory_cap_gib and not args.nproc else ""
    cap += f", a group of {args.nproc} rank(s), {args.parallel}" if args.nproc else ""
    print(f"# through the wire: device {args.device}, micro-batch {args.micro_batch}, cutoff {args.seq}, "
          f"k={args.density:g}, {args.steps} steps{cap}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']}: FAILED {r['error']} (peak {fmt_gib(r.get('peak_bytes'))}) {r.get('stderr_tail', '')}")
            continue
        print(f"{r['variant']}: {r['params'] / 1e9:.3f}B params, load {r['load_s']:.1f} s, step {r['step_s'] * 1e3:.0f} ms "
              f"(first {r['first_step_s'] * 1e3:.0f} ms), save {r['save_s']:.1f} s, peak allocated "
              f"{fmt_gib(r['peak_bytes'])}, state {r['state_bytes'] / 2**30:.3f} GiB, all-reduced "
              f"{r['all_reduced_bytes']} B, losses {r['losses']}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))


def fmt_gib(b) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


if __name__ == "__main__":
    main()
