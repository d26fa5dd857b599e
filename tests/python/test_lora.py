"""LoRA adapters (model.lora, PEFT): only the adapter trains, under NanoAdam or AdamW;
checkpoints hold the adapter in PEFT's format and resume bit for bit; `nanotune
export` copies it or merges it into a plain HF directory (models.py Notes [LoRA
defaults], [LoRA and NanoAdam], [LoRA B at zero]; checkpoint.py Note [adapter
checkpoints]; nanotune.export)."""

from __future__ import annotations

import copy
import json
import random
import re

import pytest
import torch

pytest.importorskip("peft")

from nanotune.checkpoint import CheckpointError  # noqa: E402
from nanotune.export import ExportError, export_checkpoint, main as export_main  # noqa: E402
from nanotune.models import LORA_DEFAULTS, ModelError, peft_quiet  # noqa: E402
from nanotune.session import Session, SessionError  # noqa: E402

LORA_NAME = re.compile(r"^base_model\.model\..+\.lora_[AB]\.default\.weight$")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture
def data_path(write_jsonl):
    rows = [{"text": f"Double {i}. The answer is {2 * i}."} for i in range(40)]
    return write_jsonl(rows)


def session(data_path, lora: dict | None = {}, optimizer="nanoadam", **opts) -> Session:  # noqa: B006
    """A tiny-llama session with data and an optimizer; lora None: no adapter, {}: the defaults."""
    s = Session(device="cpu")
    s.load_model(path="tiny-llama", lora=lora)
    s.load_dataset(path=str(data_path), cutoff=32, seed=1)
    if optimizer == "nanoadam":
        opts.setdefault("density", 0.25)
    s.create_optimizer(name=optimizer, **opts)
    return s


def steps(s: Session, n: int, mask_every: int = 2) -> list[float]:
    out = []
    for _ in range(n):
        mask = None
        if s.optimizer_params.name == "nanoadam" and s.step % mask_every == 0:
            mask = {"criterion": "small_weights", "density": 0.25}
        out.append(s.train_step(lr=1e-2, micro_batch=4, mask=mask).loss)
    return out


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        model.train(was)


# --------------------------------------------------------------------------- load_model


def test_only_the_adapter_trains_and_the_result_says_so(tiny_dir):
    s = Session(device="cpu")
    plain = s.load_model(path="tiny-llama")
    r = s.load_model(path="tiny-llama", lora={})
    model = s.loaded.model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(LORA_NAME.match(n) for n in trainable), list(trainable)[:3]
    # "all-linear": every linear layer but the head, each with A (r x in) and B (out x r)
    linears = [m for n, m in s.loaded.model.get_base_model().named_modules()
               if hasattr(m, "base_layer") and isinstance(m.base_layer, torch.nn.Linear)]
    assert len(linears) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    expected = sum(8 * (m.base_layer.in_features + m.base_layer.out_features) for m in linears)
    assert r.trainable_parameters == expected == sum(p.numel() for p in trainable.values())
    assert plain.trainable_parameters == plain.parameters
    assert r.parameters == plain.parameters + expected
    assert (r.lora.r, r.lora.alpha, r.lora.dropout, r.lora.target_modules) == (8, 16.0, 0.05, "all-linear")
    assert LORA_DEFAULTS == {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": "all-linear"}
    assert not any("lm_head" in n for n in trainable)
    # B starts at zero: the wrapped model computes what the base does
    assert all(not p.any() for n, p in trainable.items() if ".lora_B." in n)

    r = s.load_model(path="tiny-llama", lora={"r": 2, "alpha": 4, "targetModules": list(ATTN)})
    names = [n for n, p in s.loaded.model.named_parameters() if p.requires_grad]
    assert len(names) == 2 * 4 * 2 and all(any(f".{t}.lora_" in n for t in ATTN) for n in names)
    assert r.trainable_parameters == 2 * (2 * (64 + 64) + 2 * (64 + 32) * 2 + 2 * (64 + 64))  # q, k, v, o per layer
    assert r.lora.target_modules == list(ATTN)


def test_bad_lora_settings_name_the_field(tiny_dir):
    s = Session(device="cpu")
    with pytest.raises(ModelError, match=r"lora\.targetModules: .*fc1.* linear layers: down_proj, gate_proj") as e:
        s.load_model(path="tiny-llama", lora={"targetModules": ["fc1"]})
    assert e.value.data["field"] == "lora.targetModules"
    with pytest.raises(SessionError, match=r"lora\.rank.*unknown field"):
        s.load_model(path="tiny-llama", lora={"rank": 4})
    with pytest.raises(SessionError, match=r"lora\.r"):
        s.load_model(path="tiny-llama", lora={"r": 0})
    with pytest.raises(SessionError, match=r"lora\.targetModules"):
        s.load_model(path="tiny-llama", lora={"targetModules": "q_proj"})  # a list, or "all-linear"


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("optimizer", ["nanoadam", "adamw"])
def test_steps_change_the_adapter_and_leave_the_base_bit_identical(data_path, optimizer):
    s = session(data_path, optimizer=optimizer)
    model = s.loaded.model
    before = snapshot(model)
    losses = steps(s, 4)
    assert all(l == l for l in losses) and losses[-1] < losses[0]
    after = snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n in before:
        if n in trainable:
            continue
        assert torch.equal(before[n], after[n]), f"base tensor {n} changed"
    changed = [n for n in trainable if not torch.equal(before[n], after[n])]
    assert {n for n in changed if ".lora_B." in n} == {n for n in trainable if ".lora_B." in n}
    assert any(".lora_A." in n for n in changed)
    # the optimizer holds the adapter alone, under PEFT's names
    opt = s.optimizer
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for n, p in model.named_parameters() if n in trainable}
    if optimizer == "nanoadam":
        assert [g["sparse"] for g in opt.param_groups] == [True]  # lora_A/lora_B are 2-D: all masked
        assert sorted(opt.param_groups[0]["names"]) == sorted(trainable)
        assert set(s.masks()) == trainable


def test_state_bytes_count_the_adapter_alone_and_nanoadam_keeps_less(data_path):
    """What the later LoRA+NanoAdam vs LoRA+AdamW memory comparison reads: train_step's
    stateBytes (create_optimizer's is 0 for both: state is made at the first step)."""
    got = {}
    for name in ("adamw", "nanoadam"):
        s = session(data_path, optimizer=name)
        trainable = [p for p in s.loaded.model.parameters() if p.requires_grad]
        created = s.create_optimizer(name=name, **({"density": 0.25} if name == "nanoadam" else {}))
        assert created.state_bytes == 0
        assert sum(g.entries for g in created.groups) == sum(p.numel() for p in trainable)
        got[name] = s.train_step(lr=1e-2, micro_batch=4,
                                 mask={"criterion": "small_weights", "density": 0.25} if name == "nanoadam" else None
                                 ).state_bytes
        if name == "adamw":  # exp_avg + exp_avg_sq in fp32 and a 4-byte step, per adapter tensor
            assert got[name] == sum(8 * p.numel() + 4 for p in trainable)
        else:
            assert got[name] == s.optimizer.state_bytes("sparse") and s.optimizer.state_bytes("dense") == 0
    assert got["nanoadam"] < 0.4 * got["adamw"]


def test_zero_b_first_mask_is_the_first_rows_and_then_sweeps_on(data_path):
    """Note [LoRA B at zero]: every |B| ties at 0, ties go to the lower index."""
    s = session(data_path)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    params = dict(s.loaded.model.named_parameters())
    b, a = params[name], params[name.replace("lora_B", "lora_A")]
    a0 = a.detach().clone()
    s.train_step(lr=1e-2, micro_batch=4, mask={"criterion": "small_weights", "density": 0.25})
    k = b.numel() // 4
    first = s.masks([name])[name].long()
    assert torch.equal(first, torch.arange(k))  # rows 0 .. out/4 - 1, all r columns
    assert torch.equal(a, a0)  # dL/dA = 0 while B = 0
    assert (b.detach().reshape(-1)[:k] != 0).all() and not b.detach().reshape(-1)[k:].any()
    s.train_step(lr=1e-2, micro_batch=4)
    assert not torch.equal(a, a0)  # through the rows of B that moved
    s.refresh_mask()
    assert torch.equal(s.masks([name])[name].long(), torch.arange(k, 2 * k))  # the next untouched rows


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_holds_the_adapter_and_resumes_bit_for_bit(data_path, tmp_path, tiny_dir):
    s = session(data_path)
    steps(s, 3)
    s.save_checkpoint(path=str(tmp_path / "ck"))
    model_dir = tmp_path / "ck" / "model"
    files = set(p.name for p in model_dir.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files)  # no copy of the base
    cfg = json.loads((model_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_dir.resolve())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 8, 16)
    from safetensors.torch import load_file
    saved = load_file(model_dir / "adapter_model.safetensors")
    assert len(saved) == sum(1 for p in s.loaded.model.parameters() if p.requires_grad)
    marker = (torch.rand(2), random.random())
    expected = steps(s, 3)
    weights, opt_state = snapshot(s.loaded.model), copy.deepcopy(s.optimizer.state_dict())

    for how in ("in place", "base + lora", "adapter dir"):
        torch.manual_seed(99)  # the checkpoint brings the RNG back (dropout draws from it)
        if how == "in place":
            t = s
        else:
            t = Session(device="cpu")
            if how == "base + lora":
                t.load_model(path="tiny-llama", lora={})
            else:  # a LoRA checkpoint's model/ loads as a model: its base with the adapter on it
                r = t.load_model(path=str(model_dir))
                assert (r.path, r.lora.r, r.trainable_parameters) == (str(model_dir), 8,
                                                                       sum(v.numel() for v in saved.values()))
            t.load_dataset(path=str(data_path), cutoff=32, seed=1)
            t.create_optimizer(name="nanoadam", density=0.25)
        assert t.load_checkpoint(path=str(tmp_path / "ck")).step == 3, how
        assert torch.equal(torch.rand(2), marker[0]) and random.random() == marker[1]
        assert steps(t, 3) == expected, how  # exact float equality
        for n, p in t.loaded.model.named_parameters():
            assert torch.equal(p, weights[n]), (how, n)
        got = t.optimizer.state_dict()
        for i, st in opt_state["state"].items():
            for key, v in st.items():
                assert torch.equal(got["state"][i][key], v) if torch.is_tensor(v) else got["state"][i][key] == v, \
                    (how, i, key)


def test_loads_refuse_a_mismatched_adapter_and_say_which_side_has_one(data_path, tmp_path):
    s = session(data_path, lora={"r": 4, "alpha": 8})
    steps(s, 1)
    s.save_checkpoint(path=str(tmp_path / "lora"))
    plain = session(data_path, lora=None)
    with pytest.raises(CheckpointError, match="holds a LoRA adapter .* the loaded model has none"):
        plain.load_checkpoint(path=str(tmp_path / "lora"))
    steps(plain, 1)
    plain.save_checkpoint(path=str(tmp_path / "full"))

    other = session(data_path, lora={"r": 4, "alpha": 16})
    before = snapshot(other.loaded.model)
    with pytest.raises(CheckpointError, match=r"lora_alpha is 8\.0, the loaded model's adapter has 16\.0") as e:
        other.load_checkpoint(path=str(tmp_path / "lora"))
    assert e.value.data["key"] == "lora_alpha"
    with pytest.raises(CheckpointError, match="r is 4, the loaded model's adapter has 8"):
        session(data_path).load_checkpoint(path=str(tmp_path / "lora"))
    with pytest.raises(CheckpointError, match="target_modules"):
        session(data_path, lora={"r": 4, "alpha": 8, "targetModules": ["q_proj"]}).load_checkpoint(
            path=str(tmp_path / "lora"))
    with pytest.raises(CheckpointError, match="holds a full model .* the loaded model has a LoRA adapter"):
        other.load_checkpoint(path=str(tmp_path / "full"))
    assert all(torch.equal(p, before[n]) for n, p in other.loaded.model.named_parameters())  # nothing changed


# --------------------------------------------------------------------------- export


def test_export_merge_equals_the_peft_model_and_the_copy_loads_with_peft(data_path, tmp_path, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    s = session(data_path)
    steps(s, 6)
    s.save_checkpoint(path=str(tmp_path / "ck"))
    ids = s.loaded.tokenizer("Double 7.", return_tensors="pt").input_ids
    want = logits(s.loaded.model, ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert not torch.allclose(logits(base, ids), want, atol=1e-3)  # the adapter matters

    r = export_checkpoint(tmp_path / "ck", tmp_path / "merged", merge=True)
    assert (r["kind"], r["base"]) == ("merged", str(tiny_dir.resolve()))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "merged").iterdir()}
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), want, atol=1e-5, rtol=1e-5)

    assert export_checkpoint(tmp_path / "ck", tmp_path / "adapter")["kind"] == "adapter"
    with peft_quiet():
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "adapter")
    assert torch.equal(logits(peft_model, ids), want)


def test_export_errors_name_what_is_wrong(data_path, tmp_path, capsys):
    s = session(data_path, lora=None, optimizer="adamw")
    steps(s, 1)
    s.save_checkpoint(path=str(tmp_path / "full"))
    with pytest.raises(ExportError, match="has no adapter to merge: its model/ is a full model"):
        export_checkpoint(tmp_path / "full", tmp_path / "out", merge=True)
    assert not (tmp_path / "out").exists()
    assert export_checkpoint(tmp_path / "full", tmp_path / "out")["kind"] == "model"  # without --merge: a copy
    assert (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(ExportError, match="exists and is not an empty directory"):
        export_checkpoint(tmp_path / "full", tmp_path / "out")
    with pytest.raises(ExportError, match="is not a nanotune checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "out2")
    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(tmp_path / "nope", tmp_path / "out2")

    t = session(data_path)
    steps(t, 1)
    t.save_checkpoint(path=str(tmp_path / "lora"))
    with pytest.raises(ExportError, match="is an adapter directory, not a nanotune checkpoint"):
        export_checkpoint(tmp_path / "lora" / "model", tmp_path / "out2")
    with pytest.raises(ExportError, match=r"base model .*nowhere.* \(--base\) is not a Hugging Face model directory"):
        export_checkpoint(tmp_path / "lora", tmp_path / "out2", merge=True, base=tmp_path / "nowhere")
    assert not (tmp_path / "out2").exists()

    assert export_main([str(tmp_path / "full"), "--out", str(tmp_path / "out3"), "--merge"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanotune: export: checkpoint ") and "has no adapter to merge" in err


def test_a_lora_run_repeats_exactly_from_load_models_seed(data_path):
    # lora_A's random init and the adapter's dropout come from the seed (add_lora), so two runs in
    # one process, whatever the RNG did in between, give the same losses and adapter weights.
    first = session(data_path)
    a = steps(first, 6)
    torch.rand(1000)  # the RNG moves on between the runs
    second = session(data_path)
    assert steps(second, 6) == a
    for (n, p), (_, q) in zip(first.loaded.model.named_parameters(), second.loaded.model.named_parameters()):
        assert torch.equal(p, q), n
