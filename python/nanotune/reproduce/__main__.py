"""`python -m nanotune.reproduce [--out reports]`: every reproduction, in order.

Each experiment module has a `main(argv) -> int` taking `--out`; add new ones
to EXPERIMENTS. Experiments 1-3 of issue 5 are not written yet.
"""
import argparse
import sys
import time

import torch

from nanotune.reproduce import teacher_student

EXPERIMENTS = [("teacher_student (PAPER.md experiment 4)", teacher_student.main)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="reports", help="folder the plots and tables go to (default: reports)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the toys are tiny; threads cost more than they give
    for name, run in EXPERIMENTS:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        if run(["--out", args.out]) != 0:
            print(f"{name} failed", file=sys.stderr)
            return 1
        print(f"== {name}: {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
