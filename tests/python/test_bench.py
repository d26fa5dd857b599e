"""The benchmark scripts run (briefly) so they never rot; their figures are read, not asserted."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_bench_small_runs_on_cpu_and_prints_the_table(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--small", "--device", "cpu", "--steps", "1",
         "--warmup", "1", "--seq", "32", "--variants", "adamw,nanoadam,nanoadam-sparse,adamw8bit",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "nanoadam-sparse / adamw: peak memory" in r.stdout
    rows = {row["variant"]: row for row in json.loads(out.read_text())}
    assert rows["adamw8bit"]["error"] == "RuntimeError: needs CUDA"
    for name in ("adamw", "nanoadam", "nanoadam-sparse"):
        assert rows[name]["step_s"] > 0 and rows[name]["peak_bytes"] > 0
    # NanoAdam keeps state for ~10% of the sparse entries only.
    assert rows["nanoadam"]["state_bytes"] < 0.25 * rows["adamw"]["state_bytes"]
    assert rows["nanoadam-sparse"]["state_bytes"] == rows["nanoadam"]["state_bytes"]


def test_gpu_wire_small_drives_a_real_sidecar_through_training_and_a_checkpoint(tmp_path):
    """bench/gpu_wire.py is the GPU check's run through the wire; small on a CPU here."""
    out = tmp_path / "wire.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_wire.py"), "--small", "--device", "cpu", "--steps", "2",
         "--seq", "64", "--variants", "nanoadam-sparse,adamw", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rows = {row["variant"]: row for row in json.loads(out.read_text())}
    for name in ("nanoadam-sparse", "adamw"):
        assert "error" not in rows[name], rows[name]
        assert len(rows[name]["losses"]) == 2 and rows[name]["save_s"] > 0 and rows[name]["step_s"] > 0
    assert rows["nanoadam-sparse"]["state_bytes"] < 0.5 * rows["adamw"]["state_bytes"]


def test_optimizer_bench_small_prints_ratios_to_adamw_and_to_the_bandwidth_floor():
    """bench/optimizer.py (npm run bench:optimizer) on a tiny model: every column is there."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "optimizer.py"), "--small", "--steps", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "memory bandwidth (best of STREAM copy/add, measured now):" in r.stdout
    assert "NanoAdam's default path: compiled CPU kernels" in r.stdout
    rows = [line.split() for line in r.stdout.splitlines() if line.strip().startswith(("1.00%", "10.00%"))]
    assert [(row[0], " ".join(row[1:-10])) for row in rows] == [
        ("1.00%", "default"), ("1.00%", "torch ops"), ("10.00%", "default"), ("10.00%", "torch ops")]
    for row in rows:
        step_ms, step_floor, refresh_ms, refresh_floor = map(float, (row[-10], row[-7], row[-6], row[-3]))
        assert step_ms > 0 and step_floor > 0 and refresh_ms > 0 and refresh_floor > 0
    assert sum(line.startswith("target ") for line in r.stdout.splitlines()) == 3
