"""`python -m nanotune.reproduce [--out reports] [--only NAME ...] [--quick]`: every reproduction, in order.

1 star, 2 ablation and 3 continual share one Lab (corpora, tokenizer, and a
model pretrained once on corpus A; finetuning runs shared between 2 and 3 are
computed once); 4 teacher_student is the synthetic toy. --quick shrinks all of
them to seconds (tests: checks every artefact is written, its numbers mean
nothing). Wall times go to <out>/runtime.json.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from nanotune.reproduce import ablation, continual, star, teacher_student
from nanotune.reproduce.corpora import CorpusError
from nanotune.reproduce.lab import Lab, LabConfig

NAMES = ("star", "ablation", "continual", "teacher_student")
TOY_QUICK = ["--quick"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("reports"), help="folder the plots and tables go to")
    p.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME",
                   help=f"run only these ({', '.join(NAMES)}); default: all")
    p.add_argument("--quick", action="store_true", help="tiny models and few steps (tests); numbers mean nothing")
    p.add_argument("--reuse-pretrained", action="store_true",
                   help="load <out>/cache/pretrained when it was built with the same settings (development)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # One thread: the CPU is shared (other jobs), and two intra-op threads on a busy
    # 2-core machine stalled each other (5x slower per step); the toy is tiny anyway.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # callers in the same process (tests) keep theirs


def _run(args) -> int:
    chosen = [n for n in NAMES if args.only is None or n in args.only]
    lab = Lab(LabConfig.quick() if args.quick else LabConfig(), cache=args.out / "cache",
              log=lambda s: print(s, flush=True), reuse=args.reuse_pretrained)
    experiments = {
        "star": lambda: star.write(star.run(lab), args.out),
        "ablation": lambda: ablation.write(ablation.run(lab), args.out),
        "continual": lambda: continual.write(continual.run(lab), args.out),
        "teacher_student": lambda: teacher_student.main(["--out", str(args.out)] + (TOY_QUICK if args.quick else [])),
    }
    times = {}
    start = time.perf_counter()
    for name in chosen:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            if name in ("star", "ablation", "continual") and not lab.prepared:
                lab.prepare()
                times["prepare (corpora, tokenizer, pretraining)"] = round(time.perf_counter() - t0, 1)
                t0 = time.perf_counter()
            status = experiments[name]()
        except CorpusError as e:
            print(f"{name} failed: {e}", file=sys.stderr)
            return 1
        if status not in (None, 0):
            print(f"{name} failed", file=sys.stderr)
            return 1
        times[name] = round(time.perf_counter() - t0, 1)
        print(f"== {name}: {times[name]:.0f}s", flush=True)
    elapsed = round(time.perf_counter() - start, 1)
    # --only updates its parts of runtime.json and keeps the others' last times (same mode);
    # the total is the sum of the parts, so it stays the time of a full run.
    path = args.out / "runtime.json"
    try:
        old = json.loads(path.read_text()) if args.only else {}
    except (OSError, ValueError):
        old = {}
    if old.get("quick") == args.quick:
        times = {**{k: v for k, v in old.get("seconds", {}).items() if k != "total"}, **times}
    times["total"] = round(sum(times.values()), 1)
    path.write_text(json.dumps({"seconds": times, "quick": args.quick, "torch_threads": torch.get_num_threads()},
                               indent=1) + "\n")
    print(f"== total: {elapsed:.0f}s this run ({times['total']:.0f}s for every part)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
