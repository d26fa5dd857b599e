"""The real-model reproductions (`python -m nanotune.reproduce --real`): the tie counter on hand-made
ties, and the --quick mode end to end on SmolLM2-135M (two of its blocks)."""
import json
import math

import pytest
import torch

from nanotune.optim import select_mask, selected_count
from nanotune.reproduce import __main__ as reproduce
from nanotune.reproduce import star, ties
from nanotune.reproduce.smollm2 import RealConfig


def _mask_from_ties(w: torch.Tensor, density: float, chunk_size: int) -> list[int]:
    """The mask the tie counts describe: per chunk the entries below the threshold, then the
    first from_tie entries of its tie group (lowest offsets)."""
    flat = w.reshape(-1).abs().float()
    c = ties.chunk_ties(w, density, chunk_size)
    out, start = [], 0
    for length, k, from_tie in zip(c["length"].tolist(), c["k"].tolist(), c["from_tie"].tolist()):
        chunk = flat[start:start + length]
        t = chunk.kthvalue(k).values
        below = (chunk < t).nonzero().flatten()
        tie = (chunk == t).nonzero().flatten()[:from_tie]
        out += sorted((torch.cat([below, tie]) + start).tolist())
        start += length
    return out


def test_chunk_ties_counts_hand_made_ties_and_match_select_mask():
    w = torch.tensor([5., 1., -1., 1., 1., 7., 8., 9., 2., 3.,  # chunk 0: |w| = 1 four times, k = 3
                      4., 3., 2., 1., .5, 6., 7., 8., 9., 10.,  # chunk 1: no ties
                      -2., 2., 2., 1., 3.])  # tail of 5: k = round(1.5) = 2, |w| = 2 three times
    c = ties.chunk_ties(w, 0.3, chunk_size=10)
    assert c["k"].tolist() == [3, 3, 2] and c["length"].tolist() == [10, 10, 5]
    assert c["below"].tolist() == [0, 2, 1]
    assert c["tie"].tolist() == [4, 1, 3]
    assert c["from_tie"].tolist() == [3, 1, 1]
    assert c["decided"].tolist() == [3, 0, 1]  # chunk 1's one tie entry is selected whatever the rule
    assert c["tie_offset_sum"].tolist() == [1 + 2 + 3, 2, 0]  # the lowest offsets of each tie group
    assert (c["below"] + c["from_tie"] == c["k"]).all()
    want = [1, 2, 3, 12, 13, 14, 20, 23]
    assert _mask_from_ties(w, 0.3, 10) == want
    for fused in (False, None):  # torch's path and the CPU kernel (where it builds) select the same
        assert select_mask(w, 0.3, chunk_size=10, fused=fused).tolist() == want
    t = ties.tensor_ties(w.view(5, 5), 0.3, chunk_size=10)
    assert t["distinct_abs"] == 11 and t["k"] == 8 == selected_count(25, 0.3, 10)
    assert (t["tie"], t["from_tie"], t["decided"], t["chunks_with_decided"], t["max_tie_group"]) == (8, 5, 4, 2, 4)
    assert t["tie_pick_mean_position"] == pytest.approx((1 / 10 + 2 / 10 + 3 / 10 + 0 / 5) / 4)


def test_overlap_counts_ties_as_random_tie_breaks():
    w = torch.tensor([1., 1., 1., 1.] + [float(i) for i in range(2, 18)])  # bottom-2 of 20: 2 of the 4 ones
    g = torch.zeros(20)
    g[0], g[1] = 3.0, 2.0  # the top-2 gradients sit on two of the four tied smallest weights
    assert star.overlap(w, g) == pytest.approx(0.5)
    g2 = torch.zeros(20)
    g2[0], g2[19] = 3.0, 3.0  # ties in the gradient at the top: both are in, exactly 2
    assert star.overlap(w, g2) == pytest.approx(0.25)
    assert star.membership(torch.tensor([1., 1., 2.]), 1, largest=False).tolist() == [0.5, 0.5, 0.0]


def test_only_names_must_match_the_mode(tmp_path):
    with pytest.raises(SystemExit):
        reproduce.main(["--out", str(tmp_path), "--only", "real_star"])
    with pytest.raises(SystemExit):
        reproduce.main(["--out", str(tmp_path), "--real", "--only", "star"])


def test_real_quick_run_writes_every_artefact(tmp_path):
    (tmp_path / "runtime.json").write_text(json.dumps({"seconds": {"star": 1.0, "total": 1.0}, "quick": False}))
    assert reproduce.main(["--out", str(tmp_path), "--real", "--quick"]) == 0
    for name in ("real_ties", "real_star", "real_continual"):
        md = (tmp_path / f"{name}.md").read_text()
        assert md.startswith("# ") and f"({name}.png)" in md, name
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    runtime = json.loads((tmp_path / "runtime.json").read_text())
    assert runtime["seconds"] == {"star": 1.0, "total": 1.0}  # the tiny model's times are kept
    assert runtime["real"]["quick"] is True
    assert set(runtime["real"]["seconds"]) >= {"real_ties", "real_star", "real_continual", "total"}

    cfg = RealConfig.quick()
    tie = json.loads((tmp_path / "real_ties.json").read_text())
    assert set(tie["per_kind"]) == set(ties.KINDS)
    assert len(tie["per_tensor"]) == 7 * cfg.layers + 1  # the norms are dense: not counted
    for name, t in tie["per_tensor"].items():
        assert t["k"] == selected_count(t["numel"], cfg.density), name
        assert t["below"] + t["from_tie"] == t["k"] and t["from_tie"] <= t["tie"], name
        assert 0 <= t["decided"] <= t["from_tie"] and 1 < t["distinct_abs"] < t["numel"], name
        if ties.kind(name) != "embed_tokens":  # Q4_1: 16 levels per 32-entry block
            assert t["max_distinct_per_block"] <= 16, name
    for col in ("k", "tie", "from_tie", "decided"):
        assert tie["total"][col] == sum(a[col] for a in tie["per_kind"].values())
    assert "lowest offset in the chunk wins" in (tmp_path / "real_ties.md").read_text()

    st = json.loads((tmp_path / "real_star.json").read_text())
    assert set(st["overlap"]) == {"finetune", "scratch"} and st["blocks"] == 7 * cfg.layers
    assert st["steps"] == sorted({0, cfg.steps // 4, cfg.steps - 1})
    for kind in ("finetune", "scratch"):
        for v in st["overlap"][kind].values():
            assert 0 <= v["mean_blocks"] <= 1 and math.isfinite(v["model.embed_tokens.weight"])
    assert "| mean of the" in (tmp_path / "real_star.md").read_text()

    cont = json.loads((tmp_path / "real_continual.json").read_text())
    assert [r["lr"] for r in cont["sweep"]["adamw"]] == list(cfg.adamw_lrs)
    assert [r["lr"] for r in cont["sweep"]["nanoadam"]] == list(cfg.nanoadam_lrs)
    for key, runs in cont["sweep"].items():
        for r in runs:
            assert set(r["final"]) >= {"a_loss", "b_loss", "avg_loss", "knowledge_acc", "knowledge_loss",
                                       "l2_all", "l2_blocks"}
            assert len(r["train_loss"]) == cfg.steps and r["steps"][0] == 0 and r["steps"][-1] == cfg.steps
            assert r["final"]["l2_all"] >= r["final"]["l2_blocks"] > 0
        best = cont["best"][key]
        assert best["final"]["avg_loss"] == min(r["final"]["avg_loss"] for r in runs)
    assert cont["sweep"]["nanoadam"][0]["bias_correction"] is not None  # the optimizer's default, recorded
    assert len(cont["knowledge"]) == cfg.knowledge_questions
    md = (tmp_path / "real_continual.md").read_text()
    assert "| **NanoAdam** |" in md and "| AdamW | 1e-05 |" in md and "| pretrained (before B) |" in md
