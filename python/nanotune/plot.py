"""`nanotune plot <runDir>`: PNG curves of a run from its metrics.jsonl, no browser.

    python -m nanotune.plot RUNDIR [--out FILE.png]    # prints what was drawn as JSON

Reads <runDir>/metrics.jsonl (one TrainerEvent a line, `{time, type, ...}`, as
sinks.jsonl writes it; NaN and +-Infinity arrive as the strings "NaN",
"Infinity", "-Infinity") and draws, on one figure of a fixed size (1200x900 px):

- loss: train:step loss (a line) and eval loss (dots) on the same axes, both
  token-mean cross-entropy;
- lr, density (NanoAdam's k, its axis from 0; "no data" with AdamW), gradient
  norm, tokens/s;
- on every panel: policy swaps (policy:swapped) as dashed vertical lines, labelled
  with the new policy on the loss panel; resumes as dotted vertical lines;
- mask refreshes (mask:refreshed) as small ticks along the bottom of the loss and
  density panels; skipped steps (step:skipped) as red crosses at the top of the
  loss panel;
- the title: the runDir's name, model, optimizer (its density), the mask policy
  at the (latest) run:start, the steps drawn, and how the run ended.

The x axis is the events' `step` field: the sidecar's step counter. A train:step
at step s is the (s+1)-th update, its loss measured on the weights after s
updates; an eval at step s ran on the weights after s updates, so both curves
share one axis.

A run resumed into the same runDir appends to the same metrics.jsonl, so the file
can hold several run:start events. A run:start at step S continues from the
checkpoint of step S: whatever the file holds from before it at steps the resumed
run takes again (train:step, step:skipped, swaps, refreshes at step >= S; evals
at step > S) is dropped, so the plot shows the timeline that led to the latest
weights, and the resume is marked with a dotted line "resumed @S".

Matplotlib renders it (the Agg backend, through matplotlib.figure.Figure, without
pyplot): it is already in the sidecar's environment, needs no native Node build
and no browser, bundles its fonts and works offline; the reproductions' figures
(nanotune.reproduce) use it too.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidParams

__all__ = ["PlotError", "RunMetrics", "build_figure", "main", "plot_run", "read_metrics"]

WIDTH_IN, HEIGHT_IN, DPI = 12.0, 9.0, 100  # 1200 x 900 pixels
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
SERIES = ("train loss", "eval loss", "lr", "density", "grad norm", "tokens/s")


class PlotError(InvalidParams):
    """A run directory that cannot be plotted: missing, no metrics.jsonl, a malformed
    line (`path` and `line` say where), no train:step events. Code INVALID_PARAMS."""


def _number(v: Any) -> float:
    """A metric value as a float: a JSON number, "NaN"/"Infinity"/"-Infinity", or None (NaN)."""
    if v is None:
        return math.nan
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got {json.dumps(v)}")
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v in NON_FINITE:
        return NON_FINITE[v]
    raise ValueError(f"expected a number, got {json.dumps(v)[:40]}")


@dataclass
class RunMetrics:
    """What metrics.jsonl says, resumes resolved (see the module's docstring)."""

    path: Path
    # step -> {loss, lr, density, gradNorm, tokensPerS}
    steps: dict[int, dict[str, float]] = field(default_factory=dict)
    evals: dict[int, float] = field(default_factory=dict)
    swaps: dict[int, str] = field(default_factory=dict)  # step -> the new policy
    refreshes: set[int] = field(default_factory=set)
    skipped: list[int] = field(default_factory=list)  # one entry per step:skipped (a step can be refused again)
    starts: list[dict] = field(default_factory=list)  # every run:start, in order
    resumes: list[int] = field(default_factory=list)  # the step of each run:start that continued from a checkpoint
    end: dict | None = None  # the last run:end

    def cut(self, at: int) -> None:
        """Drops what a run resumed at step `at` takes again."""
        self.steps = {s: v for s, v in self.steps.items() if s < at}
        self.evals = {s: v for s, v in self.evals.items() if s <= at}
        self.swaps = {s: v for s, v in self.swaps.items() if s < at}
        self.refreshes = {s for s in self.refreshes if s < at}
        self.skipped = [s for s in self.skipped if s < at]


def read_metrics(run_dir: str | Path) -> RunMetrics:
    """Reads <run_dir>/metrics.jsonl; PlotError for a missing directory or file, a malformed line, no steps."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise PlotError(f"run directory {run_dir} does not exist", path=str(run_dir))
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir} is not a directory (expected a runDir)", path=str(run_dir))
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir} has no metrics.jsonl (a Trainer with runDir writes one there)", path=str(path))
    m = RunMetrics(path=path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                _read_event(m, json.loads(line))
            except (ValueError, TypeError, KeyError) as e:
                why = e.msg if isinstance(e, json.JSONDecodeError) else f"missing field {e}" if isinstance(e, KeyError) else str(e)
                raise PlotError(f"{path}:{lineno}: malformed line: {why}", path=str(path), line=lineno) from None
    if not m.steps:
        raise PlotError(f"{path} has no train:step events (the run took no step)", path=str(path))
    return m


def _read_event(m: RunMetrics, ev: Any) -> None:
    if not isinstance(ev, dict) or not isinstance(ev.get("type"), str):
        raise ValueError("not a JSON object with a 'type'")
    kind = ev["type"]
    if kind == "run:start":
        step = _step(ev)
        if m.starts or step > 0:
            m.resumes.append(step)
        m.cut(step)
        m.starts.append(ev)
    elif kind == "train:step":
        m.steps[_step(ev)] = {
            "loss": _number(ev["loss"]),
            "lr": _number(ev["lr"]),
            "density": _number(ev.get("density")),
            "gradNorm": _number(ev.get("gradNorm")),
            "tokensPerS": _number(ev.get("tokensPerS")),
        }
    elif kind == "eval":
        m.evals[_step(ev)] = _number(ev["loss"])
    elif kind == "policy:swapped":
        m.swaps[_step(ev)] = str(ev["to"])
    elif kind == "mask:refreshed":
        m.refreshes.add(_step(ev))
    elif kind == "step:skipped":
        m.skipped.append(_step(ev))
    elif kind == "run:end":
        m.end = ev
    # other events (checkpoint:saved, sink:error, newer ones) draw nothing


def _step(ev: dict) -> int:
    s = ev["step"]
    if isinstance(s, bool) or not isinstance(s, int) or s < 0:
        raise ValueError(f"{ev['type']}: 'step' is not a step number: {json.dumps(s)[:40]}")
    return s


def _title(m: RunMetrics, run_dir: Path) -> str:
    start = m.starts[-1] if m.starts else {}
    config = start.get("config") if isinstance(start.get("config"), dict) else {}
    model = config.get("model")
    if isinstance(model, dict):
        model = model.get("path")
    if not isinstance(model, str):
        model = (start.get("model") or {}).get("path", "?")
    model_info = start.get("model") or {}
    if isinstance(model_info.get("parameters"), int):
        model = f"{model} ({model_info['parameters'] / 1e6:.3g}M params)"
    opt = config.get("optimizer") if isinstance(config.get("optimizer"), dict) else {}
    name = (start.get("optimizer") or {}).get("name") or opt.get("name") or "?"
    optimizer = f"{name} k={opt['density']:g}" if isinstance(opt.get("density"), (int, float)) else str(name)
    policy = (start.get("policy") or {}).get("name") if isinstance(start.get("policy"), dict) else None
    first, last = min(m.steps), max(m.steps)
    total = start.get("totalSteps")
    line2 = f"steps {first}-{last}" + (f" of {total}" if isinstance(total, int) else "")
    if m.end:
        line2 += f" · {m.end.get('reason', '?')}"
    if m.resumes:
        line2 += f" · resumed {len(m.resumes)}x"
    return f"{run_dir.name or run_dir}: {model} · {optimizer}" + (f" · policy {policy}" if policy else "") + f"\n{line2}"


def build_figure(m: RunMetrics, run_dir: str | Path | None = None):
    """The figure of a run and the summary of what it holds (without `out`).

    Every data line carries its series name as its label (`train loss`, `eval loss`,
    `lr`, `density`, `grad norm`, `tokens/s`); the markers are labelled `policy
    swap`, `mask refresh`, `skipped step`, `resumed`."""
    from matplotlib.figure import Figure
    from matplotlib.transforms import blended_transform_factory

    run_dir = Path(run_dir) if run_dir is not None else m.path.parent
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(3, 2, height_ratios=(1.6, 1, 1))
    ax_loss = fig.add_subplot(grid[0, :])
    ax_lr = fig.add_subplot(grid[1, 0], sharex=ax_loss)
    ax_density = fig.add_subplot(grid[1, 1], sharex=ax_loss)
    ax_grad = fig.add_subplot(grid[2, 0], sharex=ax_loss)
    ax_tps = fig.add_subplot(grid[2, 1], sharex=ax_loss)
    title = _title(m, run_dir)
    fig.suptitle(title, fontsize=12)

    xs = sorted(m.steps)
    counts: dict[str, int] = {}

    def series(ax, name: str, x: list[int], y: list[float], **style) -> None:
        # non-finite values are gaps in the line
        y = [v if math.isfinite(v) else math.nan for v in y]
        counts[name] = sum(1 for v in y if not math.isnan(v))
        if counts[name]:
            ax.plot(x, y, label=name, **style)

    series(ax_loss, "train loss", xs, [m.steps[s]["loss"] for s in xs], color="C0", lw=1.2)
    ex = sorted(m.evals)
    series(ax_loss, "eval loss", ex, [m.evals[s] for s in ex], color="C1", lw=1.2, marker="o", ms=4)
    series(ax_lr, "lr", xs, [m.steps[s]["lr"] for s in xs], color="C2", lw=1.2)
    series(ax_density, "density", xs, [m.steps[s]["density"] for s in xs], color="C3", lw=1.2, drawstyle="steps-post")
    series(ax_grad, "grad norm", xs, [m.steps[s]["gradNorm"] for s in xs], color="C4", lw=1)
    series(ax_tps, "tokens/s", xs, [m.steps[s]["tokensPerS"] for s in xs], color="C5", lw=1)

    for ax, label, name in ((ax_loss, "loss", "train loss"), (ax_lr, "lr", "lr"), (ax_density, "density (k)", "density"),
                            (ax_grad, "gradient norm", "grad norm"), (ax_tps, "tokens/s", "tokens/s")):
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if not counts[name]:
            why = "no data (AdamW has no density)" if name == "density" else "no data"
            ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", color="0.5")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if counts["density"]:
        ax_density.set_ylim(bottom=0)  # k is a fraction: halving it looks like half
    grad = [v for v in (m.steps[s]["gradNorm"] for s in xs) if math.isfinite(v) and v > 0]
    if grad and max(grad) / min(grad) > 100:
        ax_grad.set_yscale("log")
    for ax in (ax_grad, ax_tps):
        ax.set_xlabel("step")
    ax_loss.set_xlim(min(xs + ex) - 0.5, max(xs + ex) + 0.5)

    panels = (ax_loss, ax_lr, ax_density, ax_grad, ax_tps)
    for i, (s, to) in enumerate(sorted(m.swaps.items())):
        for ax in panels:
            ax.axvline(s, color="C6", ls="--", lw=1, label="policy swap" if ax is ax_loss and i == 0 else None)
        ax_loss.text(s, 0.98, f"{to} ", transform=blended_transform_factory(ax_loss.transData, ax_loss.transAxes),
                     rotation=90, ha="right", va="top", fontsize=8, color="C6")
    for i, s in enumerate(m.resumes):
        for ax in panels:
            ax.axvline(s, color="0.35", ls=":", lw=1.2, label="resumed" if ax is ax_loss and i == 0 else None)
        ax_loss.text(s, 0.02, f" resumed @{s}", transform=blended_transform_factory(ax_loss.transData, ax_loss.transAxes),
                     rotation=90, ha="left", va="bottom", fontsize=8, color="0.35")
    refreshes = sorted(m.refreshes)
    if refreshes:
        for ax in (ax_loss, ax_density):
            ax.plot(refreshes, [0.035] * len(refreshes), ls="none", marker="|", ms=10, mew=1.2, color="0.3",
                    transform=blended_transform_factory(ax.transData, ax.transAxes),
                    label="mask refresh" if ax is ax_loss else None)
    if m.skipped:
        ax_loss.plot(m.skipped, [0.95] * len(m.skipped), ls="none", marker="x", ms=7, mew=1.5, color="red",
                     transform=blended_transform_factory(ax_loss.transData, ax_loss.transAxes), label="skipped step")
    ax_loss.legend(loc="upper right", fontsize=8)

    summary = {
        "runDir": str(run_dir),
        "title": title,
        "series": {name: counts[name] for name in SERIES},
        "steps": [min(xs), max(xs)],
        "swaps": len(m.swaps),
        "refreshes": len(m.refreshes),
        "skipped": len(m.skipped),
        "resumes": len(m.resumes),
        "size": [round(WIDTH_IN * DPI), round(HEIGHT_IN * DPI)],
    }
    return fig, summary


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """Writes the run's curves as a PNG (default <run_dir>/curves.png); returns the
    summary of what was drawn: series names with their point counts, swaps,
    refreshes, skipped steps and resumes marked, the size and the output path."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "curves.png"
    if out.suffix.lower() != ".png":
        raise PlotError(f"--out {out}: the output must be a .png file", path=str(out))
    m = read_metrics(run_dir)
    fig, summary = build_figure(m, run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=DPI)
    summary["out"] = str(out)
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m nanotune.plot RUNDIR [--out FILE]`: print the summary as JSON; a PlotError
    is one line `nanotune.plot: error: ...` on stderr and exit code 2 (as argparse's errors)."""
    import argparse

    p = argparse.ArgumentParser(prog="nanotune.plot", description="PNG curves of a run from <runDir>/metrics.jsonl.")
    p.add_argument("run_dir", metavar="RUNDIR")
    p.add_argument("--out", default=None, help="the PNG to write (default RUNDIR/curves.png)")
    args = p.parse_args(argv)
    try:
        summary = plot_run(args.run_dir, args.out)
    except PlotError as e:
        print(f"nanotune.plot: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
