"""nanotune.plot: PNG curves of a run's metrics.jsonl (`nanotune plot <runDir>`).

The metrics files are written by hand in the shape sinks.jsonl writes (one
`{time, type, ...event}` a line, NaN/Infinity as strings); the figure's line data
is read back from the matplotlib Figure and compared with what the file says."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from nanotune.plot import PlotError, build_figure, plot_run, read_metrics

REPO = Path(__file__).resolve().parents[2]


def loss_at(s: int) -> float:
    return 3.0 * math.exp(-s / 8) + 0.5 + 0.01 * (s % 3)


def write_metrics(run_dir: Path, events: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps({"time": "2025-01-01T00:00:00.000Z", **e}) + "\n" for e in events))
    return path


def run_start(step: int = 0, total: int = 20) -> dict:
    return {
        "type": "run:start", "step": step, "totalSteps": total,
        "model": {"path": "/cache/tiny-llama", "parameters": 1_500_000, "modelType": "llama", "device": "cpu"},
        "data": {"trainExamples": 200, "evalExamples": 20},
        "optimizer": {"name": "nanoadam", "groups": [], "stateBytes": 10, "generation": 2},
        "policy": {"name": "smallWeights", "activatedAt": 0, "spec": {"type": "smallWeights", "density": 0.1}},
        "config": {"model": "tiny-llama", "optimizer": {"name": "nanoadam", "density": 0.1}, "steps": total},
    }


def train_step(s: int, loss: float, *, density: float = 0.1, grad_norm=None, refreshed: bool = False) -> dict:
    return {
        "type": "train:step", "step": s, "loss": loss, "gradNorm": 1.0 + s / 10 if grad_norm is None else grad_norm,
        "tokens": 64, "inputTokens": 256, "timeS": 0.1, "lr": 1e-3 * min(1.0, (s + 1) / 5), "density": density,
        "maskRefreshed": refreshed, "epoch": s / 50, "stateBytes": 10, "policy": "smallWeights", "mask": None,
        "tokensPerS": 2000.0 + 10 * s,
    }


def full_run() -> list[dict]:
    """20 steps: refreshes at 0 and 12, a swap to largeWeights at 12 (density 0.05 from
    there), evals after steps 5, 10, 15, 20, step 7 refused once as non-finite (its
    loss "NaN", grad norm "Infinity") then taken, step 3's grad norm "NaN"."""
    evs = [run_start()]
    for s in range(20):
        if s == 7:
            evs.append({"type": "step:skipped", "reason": "non-finite", "inARow": 1, "step": 7, "loss": "NaN",
                        "gradNorm": "Infinity", "lr": 1e-3})
        if s == 12:
            evs.append({"type": "policy:swapped", "step": 12, "from": "smallWeights", "to": "largeWeights",
                        "spec": {"type": "largeWeights", "density": 0.05}})
        evs.append(train_step(s, loss_at(s), density=0.1 if s < 12 else 0.05, grad_norm="NaN" if s == 3 else None,
                              refreshed=s in (0, 12)))
        if s in (0, 12):
            evs.append({"type": "mask:refreshed", "step": s, "policy": "smallWeights" if s == 0 else "largeWeights",
                        "decision": {"criterion": "small_weights", "density": 0.1}})
        if (s + 1) % 5 == 0:
            evs.append({"type": "eval", "step": s + 1, "loss": loss_at(s + 1) + 0.2, "perplexity": 3.0, "tokens": 100,
                        "timeS": 0.05})
            evs.append({"type": "checkpoint:saved", "step": s + 1, "path": "/x", "timeS": 0.1})
    evs.append({"type": "run:end", "step": 20, "reason": "completed", "timeS": 2.0, "lastLoss": loss_at(19)})
    return evs


def lines_by_label(fig) -> dict:
    out: dict = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            out.setdefault(line.get_label(), []).append(line)
    return out


def test_plot_run_writes_a_png_and_summarizes_what_it_drew(tmp_path):
    run_dir = tmp_path / "run"
    write_metrics(run_dir, full_run())
    summary = plot_run(run_dir)
    out = run_dir / "curves.png"
    assert summary["out"] == str(out)
    assert summary["series"] == {"train loss": 20, "eval loss": 4, "lr": 20, "density": 20, "grad norm": 19,
                                 "tokens/s": 20}
    assert (summary["swaps"], summary["refreshes"], summary["skipped"], summary["resumes"]) == (1, 2, 1, 0)
    assert summary["steps"] == [0, 19]
    assert "tiny-llama" in summary["title"] and "nanoadam k=0.1" in summary["title"]
    assert "completed" in summary["title"]

    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (1200, 900) == tuple(summary["size"])
        rgb = im.convert("RGB")
    colors = rgb.getcolors(maxcolors=1 << 20)
    assert len(colors) > 50  # not a blank canvas
    white = sum(n for n, c in colors if c == (255, 255, 255))
    assert white < 0.97 * 1200 * 900

    def near(c, ref, tol=40):
        return all(abs(a - b) <= tol for a, b in zip(c, ref))

    # the curves' colors are really on the canvas: C0 (train loss) and C1 (eval loss)
    assert sum(n for n, c in colors if near(c, (0x1F, 0x77, 0xB4))) > 200
    assert sum(n for n, c in colors if near(c, (0xFF, 0x7F, 0x0E))) > 50


def test_the_figure_draws_the_file_values(tmp_path):
    run_dir = tmp_path / "run"
    write_metrics(run_dir, full_run())
    fig, summary = build_figure(read_metrics(run_dir))
    lines = lines_by_label(fig)

    (train,) = lines["train loss"]
    assert list(train.get_xdata()) == list(range(20))
    assert list(train.get_ydata()) == pytest.approx([loss_at(s) for s in range(20)])
    (ev,) = lines["eval loss"]
    assert list(ev.get_xdata()) == [5, 10, 15, 20]
    assert list(ev.get_ydata()) == pytest.approx([loss_at(s) + 0.2 for s in (5, 10, 15, 20)])
    (density,) = lines["density"]
    assert list(density.get_ydata()) == pytest.approx([0.1] * 12 + [0.05] * 8)
    (lr,) = lines["lr"]
    assert list(lr.get_ydata()) == pytest.approx([1e-3 * min(1.0, (s + 1) / 5) for s in range(20)])
    (grad,) = lines["grad norm"]
    ys = list(grad.get_ydata())
    assert math.isnan(ys[3])  # "NaN" in the file: a gap in the line
    assert [y for i, y in enumerate(ys) if i != 3] == pytest.approx([1.0 + s / 10 for s in range(20) if s != 3])
    (tps,) = lines["tokens/s"]
    assert list(tps.get_ydata()) == pytest.approx([2000.0 + 10 * s for s in range(20)])

    # the swap: one dashed line per panel at step 12, labelled with the new policy on the loss panel
    swaps = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(swaps) == 5 and {ln.get_xdata()[0] for ln in swaps} == {12}
    assert lines["policy swap"][0].get_xdata()[0] == 12
    assert "largeWeights" in [t.get_text().strip() for t in fig.axes[0].texts]
    (ticks,) = lines["mask refresh"]
    assert list(ticks.get_xdata()) == [0, 12]
    (skipped,) = lines["skipped step"]
    assert list(skipped.get_xdata()) == [7]
    assert "resumed" not in lines


def test_a_resumed_run_keeps_the_latest_timeline_and_marks_the_resume(tmp_path):
    """A second run:start at step 6 (resumed from the step-6 checkpoint): the first run's
    steps >= 6 and evals after 6 are dropped; the resumed run's points take their place."""
    first = [run_start(0, 12)] + [train_step(s, 5.0 + s) for s in range(10)]
    first += [{"type": "eval", "step": 6, "loss": 1.5, "perplexity": 4.5, "tokens": 10, "timeS": 0.1},
              {"type": "eval", "step": 10, "loss": 9.9, "perplexity": 9.9, "tokens": 10, "timeS": 0.1},
              {"type": "mask:refreshed", "step": 8, "policy": "smallWeights", "decision": {}}]
    first.append({"type": "run:end", "step": 10, "reason": "failed", "timeS": 1, "lastLoss": 14.0,
                  "error": {"code": "SIDECAR_CRASHED", "message": "x"}})
    second = [run_start(6, 12)] + [train_step(s, 0.5 + s / 100) for s in range(6, 12)]
    second += [{"type": "eval", "step": 12, "loss": 0.4, "perplexity": 1.5, "tokens": 10, "timeS": 0.1},
               {"type": "run:end", "step": 12, "reason": "completed", "timeS": 1, "lastLoss": 0.61}]
    run_dir = tmp_path / "resumed"
    write_metrics(run_dir, first + second)
    fig, summary = build_figure(read_metrics(run_dir))
    lines = lines_by_label(fig)
    (train,) = lines["train loss"]
    assert list(train.get_xdata()) == list(range(12))
    assert list(train.get_ydata()) == pytest.approx([5.0 + s for s in range(6)] + [0.5 + s / 100 for s in range(6, 12)])
    (ev,) = lines["eval loss"]
    assert list(ev.get_xdata()) == [6, 12] and list(ev.get_ydata()) == pytest.approx([1.5, 0.4])
    assert "mask refresh" not in lines  # the refresh at step 8 belonged to the dropped timeline
    assert [ln.get_xdata()[0] for ln in lines["resumed"]] == [6]
    assert summary["resumes"] == 1 and summary["refreshes"] == 0
    assert summary["series"]["train loss"] == 12 and summary["series"]["eval loss"] == 2
    assert "completed" in summary["title"] and "resumed 1x" in summary["title"]


def test_adamw_has_no_density_series(tmp_path):
    run_dir = tmp_path / "adamw"
    write_metrics(run_dir, [run_start()] + [train_step(s, 2.0 - s / 10, density=None) for s in range(4)])
    fig, summary = build_figure(read_metrics(run_dir))
    assert summary["series"]["density"] == 0 and summary["series"]["train loss"] == 4
    assert "density" not in lines_by_label(fig)
    assert any("no data" in t.get_text() for ax in fig.axes for t in ax.texts)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, r"run directory .*nope does not exist"),
        (lambda d: d.mkdir(), r"has no metrics\.jsonl"),
        (lambda d: write_metrics(d, [run_start(), {"type": "run:end", "step": 0, "reason": "completed"}]),
         r"metrics\.jsonl has no train:step events"),
    ],
)
def test_errors_name_what_is_wrong(tmp_path, setup, message):
    d = tmp_path / "nope"
    setup(d)
    with pytest.raises(PlotError, match=message):
        plot_run(d)
    assert not (d / "curves.png").exists()


@pytest.mark.parametrize(
    "bad, why",
    [
        ('{"type": "train:step", "step": 2, "loss": 1.0', "malformed line: Expecting"),
        ('[1, 2]', "not a JSON object with a 'type'"),
        ('{"type": "train:step", "step": 2, "loss": "abc", "lr": 0.1}', 'expected a number, got "abc"'),
        ('{"type": "train:step", "step": "two", "loss": 1.0, "lr": 0.1}', "'step' is not a step number"),
        ('{"type": "eval", "step": 3}', "missing field 'loss'"),
    ],
)
def test_a_malformed_line_is_named_by_file_and_line(tmp_path, bad, why):
    path = write_metrics(tmp_path / "run", [run_start(), train_step(0, 1.0)])
    path.write_text(path.read_text() + bad + "\n" + json.dumps(train_step(1, 1.0)) + "\n")
    with pytest.raises(PlotError) as e:
        read_metrics(tmp_path / "run")
    assert str(e.value).startswith(f"{path}:3: ")
    assert why in str(e.value)
    assert (e.value.path, e.value.line) == (str(path), 3)


def test_out_must_be_a_png_and_its_directory_is_created(tmp_path):
    write_metrics(tmp_path / "run", full_run())
    with pytest.raises(PlotError, match=r"must be a \.png"):
        plot_run(tmp_path / "run", tmp_path / "x.svg")
    out = tmp_path / "figs" / "a" / "run.png"
    assert plot_run(tmp_path / "run", out)["out"] == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_prints_json_or_one_error_line_with_exit_2(tmp_path):
    write_metrics(tmp_path / "run", full_run())
    env = {**os.environ, "PYTHONPATH": str(REPO / "python")}
    out = tmp_path / "c.png"
    ok = subprocess.run([sys.executable, "-m", "nanotune.plot", str(tmp_path / "run"), "--out", str(out)],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["out"] == str(out) and summary["series"]["train loss"] == 20 and out.is_file()
    bad = subprocess.run([sys.executable, "-m", "nanotune.plot", str(tmp_path / "missing")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [f"nanotune.plot: error: run directory {tmp_path / 'missing'} does not exist"]
