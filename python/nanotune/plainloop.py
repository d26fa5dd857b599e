"""The Trainer's loop written as a plain in-process Python loop over the same Session.

For a JSON config of `nanotune train` (constant/linear/cosine schedules, a built-in
mask policy), this runs the same steps with the same lr and mask decisions as the
TS Trainer, without the bridge. Tests use it to show that TS-driven training is
exactly Python-driven training; bench/controller.ts uses it to measure the bridge.

    python -m nanotune.plainloop config.json [--out steps.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from .session import Session

POLICY_CRITERIA = {"smallWeights": "small_weights", "largeWeights": "large_weights", "random": "random",
                   "largeGrads": "large_grads"}


def schedule(spec: Any, step: int, total: int) -> float:
    """ts/train/schedules.ts for the JSON forms of ts/train/config.ts ScheduleJSON."""
    if isinstance(spec, (int, float)):
        return float(spec)
    kind = spec["type"]
    if kind == "constant":
        return float(spec["value"])
    if kind == "linear":
        span = spec.get("steps") or total
        every = spec.get("every", 1)
        held = (step // every) * every
        return spec["from"] + (spec["to"] - spec["from"]) * min(1.0, held / span)
    if kind == "cosine":
        peak, low, warm = spec["peak"], spec.get("min", 0.0), spec.get("warmupSteps", 0)
        if step < warm:
            return peak * (step + 1) / warm
        span = max(1, (spec.get("steps") or total) - warm)
        progress = min(1.0, (step - warm) / span)
        return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * progress))
    raise ValueError(f"schedule type {kind!r} is not constant, linear or cosine")


def decision(policy: dict[str, Any], step: int, total: int) -> dict[str, Any]:
    d: dict[str, Any] = {"criterion": POLICY_CRITERIA[policy["type"]], "density": schedule(policy["density"], step, total)}
    if policy.get("perTensor"):
        d["perTensor"] = {k: schedule(v, step, total) for k, v in policy["perTensor"].items()}
    for key in ("include", "exclude"):
        if key in policy:
            d[key] = list(policy[key])
    return d


def run(config: dict[str, Any], session: Session | None = None) -> list[dict[str, Any]]:
    s = session or Session()
    model = config["model"] if isinstance(config["model"], dict) else {"path": config["model"]}
    data = config["data"] if isinstance(config["data"], dict) else {"path": config["data"]}
    s.load_model(model["path"], dtype=model.get("dtype"), device=model.get("device", "auto"),
                 gradient_checkpointing=model.get("gradientCheckpointing", False), seed=model.get("seed", 0))
    s.load_dataset(data["path"], format=data.get("format", "auto"), cutoff=data.get("cutoff", 256),
                   train_on_inputs=data.get("trainOnInputs", False), seed=data.get("seed", 0),
                   shuffle=data.get("shuffle", True), eval_fraction=data.get("evalFraction", 0.0),
                   eval_path=data.get("evalPath"))
    opt = dict(config.get("optimizer", {"name": "nanoadam"}))
    name = opt.pop("name")
    camel = {"weightDecay": "weight_decay", "momentsOnRefresh": "moments_on_refresh",
             "biasCorrection": "bias_correction", "sparseGradients": "sparse_gradients"}
    s.create_optimizer(name, **{camel.get(k, k): (tuple(v) if k == "betas" else v) for k, v in opt.items()})
    total = config["steps"]
    policy = config.get("maskPolicy") or {"type": "smallWeights", "density": opt.get("density", 0.01)}
    interval = policy.get("maskInterval", 100)
    last = None
    out = []
    for step in range(total):
        t0 = time.perf_counter()  # the whole iteration, as bench/controller.ts times the Trainer's
        mask = None
        if name == "nanoadam":
            d = decision(policy, step, total)
            if last is None or step % interval == 0 or d != last:
                mask = last = d
        r = s.train_step(schedule(config["lr"], step, total), micro_batch=config.get("microBatch", 1),
                         grad_accum=config.get("gradAccum", 1), grad_clip=config.get("gradClip"), mask=mask)
        r["wall_s"] = time.perf_counter() - t0
        out.append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--out", help="write the per-step results here (default: stdout)")
    args = ap.parse_args()
    with open(args.config) as f:
        steps = run(json.load(f))
    text = json.dumps(steps)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
