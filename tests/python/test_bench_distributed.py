"""bench/distributed.py --small runs (briefly) so it never rots: five 2-rank CPU groups
under torchrun, and what they report holds together. Its timings are read, not asserted."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain `text` (the bench's work dir is in
    every group's --endpoint, so torchrun and every rank name it)."""
    out = []
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            out.append(f"{d.name}: {cmd}")
    return out


def test_distributed_bench_small_counts_sparse_bytes_and_keeps_the_losses(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "python"), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "distributed.py"), "--small", "--json", str(out)],
                       capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nanoadam-sparse k=0.01" in r.stdout and "OMP_NUM_THREADS=1" in r.stdout
    report = json.loads(out.read_text())
    assert processes_mentioning(report["work_dir"]) == []  # every group closed, nothing left behind
    rows = {row["variant"]: row for row in report["rows"]}
    assert set(rows) == {"adamw", "nanoadam-dense k=0.01", "nanoadam-dense k=0.1",
                         "nanoadam-sparse k=0.01", "nanoadam-sparse k=0.1"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["world_size"] == 2 and row["exit_code"] == 0
        assert row["bytes"] > 0 and all(b > 0 for b in row["bytes_per_step"]), row
        assert row["step_s"] > 0
    adamw = rows["adamw"]["bytes"]
    for k in ("0.01", "0.1"):
        dense, sparse = rows[f"nanoadam-dense k={k}"], rows[f"nanoadam-sparse k={k}"]
        # Dense-gradient NanoAdam all-reduces what AdamW does; sparse sends about k of it.
        assert dense["bytes"] == adamw
        assert sparse["bytes"] < dense["bytes"]
        assert sparse["bytes"] < 2 * float(k) * adamw
        # The same masks and the same update: the same losses, step for step.
        assert len(sparse["losses"]) == len(dense["losses"]) == 4
        for a, b in zip(dense["losses"], sparse["losses"]):
            assert abs(a - b) <= 1e-5 * abs(a), (dense["losses"], sparse["losses"])
    assert rows["nanoadam-sparse k=0.01"]["bytes"] < rows["nanoadam-sparse k=0.1"]["bytes"]
