"""The peers of create_optimizer (galore, adam-mini, adafactor, adamw8bit, microadam) and
`npm run bench:peers` (nanotune.reproduce.peers) in its --quick mode."""
import json
import sys

import pytest
import torch

from nanotune.data import collate
from nanotune.training import OptimizerError, create_optimizer, optimizer_state_bytes, train_step

TEXTS = ["The cat sees the dog near the river.", "What is 12 plus 30? 12 + 30 = 42.",
         "The old tree holds the bird in the garden."]
# torch.utils.mkldnn (imported by transformers.optimization) warns about its own torch.jit use
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def batches(tok):
    ids = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in TEXTS]
    return [collate(ids, [list(x) for x in ids], 2)]


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def adamw_state_bytes(model) -> int:
    """What torch's AdamW keeps: two fp32 moments per trainable entry (plus a step count per tensor)."""
    return 2 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name, opts", [
    ("galore", {"rank": 8, "update_proj_gap": 2}),
    ("adam-mini", {}),
    ("adafactor", {}),
    ("adamw8bit", {"min_8bit_size": 1024}),
])
def test_a_peer_step_changes_every_weight_and_reports_its_state(tiny, name, opts):
    opt = create_optimizer(tiny.model, name, lr=1e-3, **opts)
    assert optimizer_state_bytes(opt) == 0  # nothing before the first step
    before = weights(tiny.model)
    out = train_step(tiny.model, opt, batches(tiny.tokenizer), lr=1e-3)
    assert out["density"] == 1.0 and out["mask_refreshed"] is False
    after = dict(tiny.model.named_parameters())
    unchanged = [n for n in before if torch.equal(after[n], before[n])]
    assert unchanged == []
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)
    state = optimizer_state_bytes(opt)
    assert 0 < state < adamw_state_bytes(tiny.model)  # each keeps less than AdamW's two fp32 moments


def test_galore_projects_the_attention_and_mlp_weights_and_counts_its_projectors(tiny):
    opt = create_optimizer(tiny.model, "galore", rank=4, update_proj_gap=10, scale=0.5)
    low = [g for g in opt.param_groups if "rank" in g]
    assert len(low) == 1 and (low[0]["rank"], low[0]["update_proj_gap"], low[0]["scale"]) == (4, 10, 0.5)
    names = {id(p): n for n, p in tiny.model.named_parameters()}
    projected = sorted(names[id(p)] for p in low[0]["params"])
    assert projected and all((".self_attn." in n or ".mlp." in n) and n.endswith("weight") for n in projected)
    assert all(p.dim() == 2 for p in low[0]["params"])
    regular = [names[id(p)] for g in opt.param_groups if "rank" not in g for p in g["params"]]
    assert "model.embed_tokens.weight" in regular and any("norm" in n for n in regular)
    train_step(tiny.model, opt, batches(tiny.tokenizer), lr=1e-3)
    p = low[0]["params"][0]
    st = opt.state[p]
    assert min(st["exp_avg"].shape) == 4  # the moments live in the rank-4 projection
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for t in (s["exp_avg"], s["exp_avg_sq"]))
    # galore-torch 1.0 keeps a slice of the whole fp32 SVD factor (U[:, :rank] is a view):
    # the memory held is the factor's, so that is what counts
    projectors = [s["projector"].ortho_matrix for s in opt.state.values() if "projector" in s]
    assert projectors and all(m.untyped_storage().nbytes() > m.numel() * 4 for m in projectors)
    assert optimizer_state_bytes(opt) == moments + sum(m.untyped_storage().nbytes() for m in projectors)


def test_adamw8bit_keeps_8bit_moments_on_cpu(tiny):
    opt = create_optimizer(tiny.model, "adamw8bit", min_8bit_size=1024)
    train_step(tiny.model, opt, batches(tiny.tokenizer), lr=1e-3)
    big = max((p for g in opt.param_groups for p in g["params"]), key=lambda p: p.numel())
    assert opt.state[big]["state1"].dtype == torch.uint8 and opt.state[big]["state2"].dtype == torch.uint8
    assert opt.param_groups[0]["weight_decay"] == 0.0  # ours, not bitsandbytes' 0.01


def test_adam_mini_takes_its_shape_from_the_model_config(tiny):
    opt = create_optimizer(tiny.model, "adam-mini")
    cfg = tiny.model.config
    assert (opt.dim, opt.n_heads, opt.n_kv_heads) == (cfg.hidden_size, cfg.num_attention_heads,
                                                      cfg.num_key_value_heads)
    train_step(tiny.model, opt, batches(tiny.tokenizer), lr=1e-3)
    q = next(p for n, p in tiny.model.named_parameters() if n.endswith("self_attn.q_proj.weight"))
    assert opt.state[q]["vmean"].numel() == cfg.num_attention_heads  # one second moment per head


def test_adafactor_runs_at_the_lr_it_is_given(tiny):
    opt = create_optimizer(tiny.model, "adafactor", lr=5e-3)
    g = opt.param_groups[0]
    assert (g["lr"], g["relative_step"], g["scale_parameter"], g["warmup_init"]) == (5e-3, False, False, False)
    before = weights(tiny.model)
    train_step(tiny.model, opt, batches(tiny.tokenizer), lr=0.0)  # the step's lr is the one used
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())


@pytest.mark.parametrize("name, option", [("galore", "rnak"), ("adam-mini", "density"), ("adafactor", "betas"),
                                          ("adamw8bit", "amsgrad"), ("galore", "density")])
def test_an_unknown_peer_option_is_named(tiny, name, option):
    with pytest.raises(OptimizerError, match=f"{name} has no option '{option}'") as e:
        create_optimizer(tiny.model, name, **{option: 1})
    assert e.value.option == option


def test_invalid_peer_values_are_named(tiny):
    for name, opts, option in [("galore", {"rank": 0}, "rank"), ("galore", {"proj_type": "diag"}, "proj_type"),
                               ("adafactor", {"eps": 1e-3}, "eps"), ("adafactor", {"relative_step": True},
                                                                     "relative_step"),
                               ("adam-mini", {"n_kv_heads": 3}, "n_kv_heads"), ("galore", {"lr": -1.0}, "lr"),
                               ("galore", {"targets": ["nothing"]}, "targets")]:
        with pytest.raises(OptimizerError) as e:
            create_optimizer(tiny.model, name, **opts)
        assert e.value.option == option, (name, opts, str(e.value))


def test_microadam_on_cpu_is_a_named_error_saying_what_is_missing(tiny):
    with pytest.raises(OptimizerError, match="microadam runs only on a CUDA GPU") as e:
        create_optimizer(tiny.model, "microadam")
    assert e.value.option == "name"
    assert "ista_daslab_cuda_micro_adam" in str(e.value) and "pip install ista-daslab-optimizers" in str(e.value)


def test_a_missing_peer_package_says_how_to_install_it(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "galore_torch", None)  # import galore_torch -> ImportError
    with pytest.raises(OptimizerError, match=r"galore needs the galore-torch package .*nanotune\[peers\]") as e:
        create_optimizer(tiny.model, "galore")
    assert e.value.option == "name"


def test_adamw8bit_without_a_kernel_for_the_device_is_a_named_error(tiny, monkeypatch):
    import bitsandbytes as bnb

    from nanotune import training

    def no_kernel(self, closure=None):
        raise NotImplementedError("Could not find a kernel for bitsandbytes::optimizer_update_8bit_blockwise")

    monkeypatch.setattr(training, "_BNB_WORKS", {})
    monkeypatch.setattr(bnb.optim.AdamW8bit, "step", no_kernel)
    with pytest.raises(OptimizerError, match="has no 8-bit AdamW kernel for torch.float32 tensors on cpu") as e:
        create_optimizer(tiny.model, "adamw8bit")
    assert e.value.option == "name"


def test_adam_mini_refuses_a_lora_adapter(tiny):
    from nanotune.models import add_lora

    model, _ = add_lora(tiny.model, r=2)
    with pytest.raises(OptimizerError, match="adam-mini partitions the parameters") as e:
        create_optimizer(model, "adam-mini")
    assert e.value.option == "name"


def test_the_session_builds_a_peer_and_rejects_nanoadam_options(tiny_dir):
    from nanotune.session import Session, SessionError

    s = Session(device="cpu")
    s.load_model(path="tiny-llama")
    out = s.create_optimizer(name="galore", lr=1e-3, weight_decay=0.01)
    assert out.name == "galore" and out.state_bytes == 0 and sum(g.entries for g in out.groups) > 0
    with pytest.raises(SessionError, match="'density' is a NanoAdam option; adafactor takes lr, weight_decay"):
        s.create_optimizer(name="adafactor", density=0.1)
    with pytest.raises(SessionError, match="'mask_interval' is a NanoAdam option"):
        s.create_optimizer(name="adam-mini", mask_interval=5)


def test_peak_memory_sees_a_tensor_allocated_and_freed_in_the_window():
    from nanotune.reproduce.peers import _PeakMemory

    m = _PeakMemory(torch.device("cpu"))
    m.start()
    x = torch.ones(1 << 20)  # 4 MiB
    y = x * 2  # 4 MiB more, both live
    del x, y
    z = torch.ones(1 << 18)  # 1 MiB, after both were freed
    m.stop()
    assert 8 << 20 <= m.peak < 9 << 20
    del z


@pytest.fixture(scope="module")
def quick_lab(tmp_path_factory):
    from nanotune.reproduce.lab import Lab, LabConfig

    return Lab(LabConfig.quick(), cache=tmp_path_factory.mktemp("peers") / "cache", log=lambda s: None).prepare()


def test_a_step_that_is_not_finite_ends_the_run_as_diverged(quick_lab, monkeypatch):
    from nanotune.reproduce import peers
    from nanotune.training import NonFiniteError

    real = peers.train_step
    calls = []

    def fails_at_3(model, opt, batches, lr):
        calls.append(lr)
        if len(calls) == 4:
            raise NonFiniteError(3, float("nan"), None)
        return real(model, opt, batches, lr)

    monkeypatch.setattr(peers, "train_step", fails_at_3)
    run = peers.finetune(quick_lab, peers.ROWS[0], 1e-3)
    assert run["diverged_at"] == 3 and len(run["train_loss"]) == 3
    assert all(v != v for v in (run["final"]["a_loss"], run["final"]["b_loss"]))  # NaN: no final scores


def test_bench_peers_quick_writes_the_table_and_lora_nanoadam_keeps_less_than_lora_adamw(quick_lab, tmp_path,
                                                                                         capsys):
    from nanotune.reproduce import peers

    assert peers.main(["--quick", "--out", str(tmp_path)], lab=quick_lab) == 0
    printed = capsys.readouterr().out
    md = (tmp_path / "peers.md").read_text()
    data = json.loads((tmp_path / "peers.json").read_text())
    assert (tmp_path / "peers.png").stat().st_size > 0
    labels = ["AdamW", "NanoAdam", "AdamW8bit", "GaLore", "Adam-mini", "Adafactor", "LoRA+AdamW", "LoRA+NanoAdam"]
    assert [r["label"] for r in data["rows"]] == labels  # everything that runs on CPU
    for label in labels:
        assert f"| {label} | " in md and f"| {label} | " in printed
    if not torch.cuda.is_available():
        assert [s["key"] for s in data["skipped"]] == ["microadam"]
        assert "| MicroAdam | skipped |" in md and "runs only on a CUDA GPU" in md
    rows = {r["key"]: r for r in data["rows"]}
    for r in data["rows"]:
        assert len(r["runs"]) == len(r["lrs"]) >= 2
        best = r["best"]
        assert best["final"]["b_loss"] == min(x["final"]["b_loss"] for x in r["runs"])
        assert best["state_bytes"] > 0 and best["step_time_s"] > 0 and best["step_cpu_s"] > 0
        # step 1 holds the weights, the optimizer state and the gradients at once
        assert best["peak_bytes"] >= best["model_bytes"] + best["state_bytes"]
    lora_adamw, lora_nano = rows["lora-adamw"]["best"], rows["lora-nanoadam"]["best"]
    assert lora_nano["trainable_parameters"] == lora_adamw["trainable_parameters"] < \
        rows["adamw"]["best"]["trainable_parameters"]
    assert lora_nano["state_bytes"] < lora_adamw["state_bytes"]
    assert lora_nano["peak_bytes"] < lora_adamw["peak_bytes"]
    assert rows["nanoadam"]["best"]["state_bytes"] < rows["adamw"]["best"]["state_bytes"]
