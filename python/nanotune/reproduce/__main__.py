"""`python -m nanotune.reproduce [--out reports] [--only NAME ...] [--quick] [--real]`: every reproduction, in order.

1 star, 2 ablation and 3 continual share one Lab (corpora, tokenizer, and a
model pretrained once on corpus A; finetuning runs shared between 2 and 3 are
computed once); 4 teacher_student is the synthetic toy. --quick shrinks all of
them to seconds (tests: checks every artefact is written, its numbers mean
nothing). Wall times go to <out>/runtime.json.

--real runs the findings on a real model instead (SmolLM2-135M-Instruct, the
smollm2-135m preset; smollm2.py): real_ties (tie density of its quantized
weights under NanoAdam's selection), real_star (1) and real_continual (3),
sharing one SmolLab (the model loaded once; the star's finetuning run is the
continual sweep's AdamW run at its lr). Its wall times go to runtime.json's
"real" entry (the toy parts' times are kept). --real --quick: two blocks of
the real model and a few steps (tests).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from nanotune.reproduce import ablation, continual, real_continual, real_star, star, teacher_student, ties
from nanotune.reproduce.corpora import CorpusError
from nanotune.reproduce.lab import Lab, LabConfig

NAMES = ("star", "ablation", "continual", "teacher_student")
REAL_NAMES = ("real_ties", "real_star", "real_continual")
TOY_QUICK = ["--quick"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("reports"), help="folder the plots and tables go to")
    p.add_argument("--only", nargs="+", choices=NAMES + REAL_NAMES, metavar="NAME",
                   help=f"run only these ({', '.join(NAMES)}; with --real: {', '.join(REAL_NAMES)}); default: all")
    p.add_argument("--real", action="store_true",
                   help="the findings on SmolLM2-135M (real_ties, real_star, real_continual) instead of the tiny model")
    p.add_argument("--quick", action="store_true", help="tiny models and few steps (tests); numbers mean nothing")
    p.add_argument("--reuse-pretrained", action="store_true",
                   help="load <out>/cache/pretrained when it was built with the same settings (development)")
    args = p.parse_args(argv)
    wrong = [n for n in args.only or [] if (n in REAL_NAMES) != args.real]
    if wrong:
        p.error(f"--only {' '.join(wrong)}: " + ("not a --real part" if args.real else "needs --real"))
    args.out.mkdir(parents=True, exist_ok=True)
    # One thread: the CPU is shared (other jobs), and two intra-op threads on a busy
    # 2-core machine stalled each other (5x slower per step); the toy is tiny anyway.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_real(args) if args.real else _run(args)
    finally:
        torch.set_num_threads(threads)  # callers in the same process (tests) keep theirs


def _run(args) -> int:
    lab = Lab(LabConfig.quick() if args.quick else LabConfig(), cache=args.out / "cache",
              log=lambda s: print(s, flush=True), reuse=args.reuse_pretrained)
    experiments = {
        "star": lambda: star.write(star.run(lab), args.out),
        "ablation": lambda: ablation.write(ablation.run(lab), args.out),
        "continual": lambda: continual.write(continual.run(lab), args.out),
        "teacher_student": lambda: teacher_student.main(["--out", str(args.out)] + (TOY_QUICK if args.quick else [])),
    }
    return _run_parts(args, NAMES, experiments, lab, ("star", "ablation", "continual"),
                      "prepare (corpora, tokenizer, pretraining)", None)


def _run_parts(args, names, experiments: dict, lab, needs_lab, prepare_label: str, entry: str | None) -> int:
    """Runs the chosen parts in order, preparing `lab` before the first part in `needs_lab`;
    prints and records their wall times (_write_runtime, under `entry`)."""
    chosen = [n for n in names if args.only is None or n in args.only]
    times = {}
    start = time.perf_counter()
    for name in chosen:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            if name in needs_lab and not lab.prepared:
                lab.prepare()
                times[prepare_label] = round(time.perf_counter() - t0, 1)
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
    total = _write_runtime(args, times, entry)
    print(f"== total: {elapsed:.0f}s this run ({total:.0f}s for every part)", flush=True)
    return 0


def _write_runtime(args, times: dict, entry: str | None) -> float:
    """Writes the parts' times into <out>/runtime.json (at its top, or under `entry` for --real), keeping
    the other mode's entry. --only updates its parts and keeps the others' last times (same quick mode);
    the total is the sum of the parts, so it stays the time of a full run. Returns that total."""
    path = args.out / "runtime.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    old = data.get(entry, {}) if entry else data
    times = dict(times)
    if args.only and old.get("quick") == args.quick:
        times = {**{k: v for k, v in old.get("seconds", {}).items() if k != "total"}, **times}
    times["total"] = round(sum(times.values()), 1)
    new = {"seconds": times, "quick": args.quick, "torch_threads": torch.get_num_threads()}
    if entry:
        data[entry] = new
    else:
        data = {**new, **({"real": data["real"]} if "real" in data else {})}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return times["total"]


def _run_real(args) -> int:
    from nanotune.reproduce.smollm2 import RealConfig, SmolLab

    lab = SmolLab(RealConfig.quick() if args.quick else RealConfig(), log=lambda s: print(s, flush=True))
    experiments = {
        "real_ties": lambda: ties.write(ties.run(lab.model, lab.cfg.density, lab.log, lab.quant_types()), args.out),
        "real_star": lambda: real_star.write(real_star.run(lab), args.out),
        "real_continual": lambda: real_continual.write(real_continual.run(lab), args.out),
    }
    return _run_parts(args, REAL_NAMES, experiments, lab, REAL_NAMES,
                      "prepare (load SmolLM2, data, scores before finetuning)", "real")


if __name__ == "__main__":
    raise SystemExit(main())
