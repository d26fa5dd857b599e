"""Replays a TS Trainer run as a plain in-process Python loop over the same Session.

The Trainer (TypeScript) decides every step's lr and when the mask refreshes with
which decision; its run directory records both (config.json, and metrics.jsonl's
train:step events with `lr` and `mask`). This loop reads them back and makes the
same calls on a Session, without the bridge: tests use it to show that TS-driven
training is exactly Python-driven training, and bench/controller.ts to measure the
bridge's overhead. Nothing of the TS schedules or policies is re-implemented here:
what the Trainer decided is replayed as it was recorded.

    python -m nanotune.plainloop RUN_DIR [--out steps.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from . import wire
from .errors import ErrorCode, NanotuneError
from .session import Session


class ReplayError(NanotuneError, ValueError):
    """The run directory cannot be replayed; the message names the file and what is missing."""

    def __init__(self, message: str):
        super().__init__(ErrorCode.INVALID_ARGUMENT, message)


def read_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the resolved config, the train:step events in order) of a Trainer run directory."""
    run_dir = Path(run_dir)
    config_path, metrics_path = run_dir / "config.json", run_dir / "metrics.jsonl"
    for p in (config_path, metrics_path):
        if not p.is_file():
            raise ReplayError(f"{p} does not exist: replay needs a Trainer run directory (runDir with config.json and metrics.jsonl)")
    config = json.loads(config_path.read_text())
    if config.get("resumeFrom"):
        raise ReplayError(f"{config_path}: the run resumed from {config['resumeFrom']}; replay runs from step 0 only")
    steps = []
    for n, line in enumerate(metrics_path.read_text().splitlines(), 1):
        event = json.loads(line)
        if event.get("type") == "step:skipped":
            raise ReplayError(f"{metrics_path}:{n}: the run skipped a non-finite step; its data position cannot be replayed")
        if event.get("type") == "train:step":
            if "mask" not in event:
                raise ReplayError(f"{metrics_path}:{n}: train:step has no `mask` (written by an older nanotune)")
            steps.append(event)
    return config, steps


def _params(value: Any, cls: type[wire.Model]) -> Any:
    """A config entry (a bare path string, or the method's params as camelCase JSON) as the wire Struct."""
    return msgspec.convert({"path": value} if isinstance(value, str) else value, cls)


def replay(run_dir: str | Path, session: Session | None = None) -> list[dict[str, Any]]:
    """Runs the recorded steps; returns each step's result (snake_case) plus `wall_s`,
    the whole iteration's time (as bench/controller.ts times the Trainer's)."""
    config, recorded = read_run(run_dir)
    s = session or Session()
    model = _params(config["model"], wire.LoadModelParams)
    data = _params(config["data"], wire.LoadDatasetParams)
    optimizer = msgspec.convert(config.get("optimizer") or {"name": "nanoadam"}, wire.CreateOptimizerParams)
    s.load_model(model)
    s.load_dataset(data)
    s.create_optimizer(optimizer)
    out = []
    for event in recorded:
        t0 = time.perf_counter()
        step = wire.TrainStepParams(
            lr=event["lr"],
            micro_batch=config.get("microBatch", 1),
            grad_accum=config.get("gradAccum", 1),
            grad_clip=config.get("gradClip"),
            mask=None if event["mask"] is None else msgspec.convert(event["mask"], wire.MaskDecision),
        )
        result = msgspec.structs.asdict(s.train_step(step))
        result["wall_s"] = time.perf_counter() - t0
        out.append(result)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a Trainer runDir (config.json, metrics.jsonl)")
    ap.add_argument("--out", help="write the per-step results here (default: stdout)")
    args = ap.parse_args()
    try:
        steps = replay(args.run_dir)
    except ReplayError as e:
        sys.exit(f"nanotune.plainloop: {e}")
    text = json.dumps(steps)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
