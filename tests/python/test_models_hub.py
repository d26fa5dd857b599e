"""Hub ids resolved like from_pretrained, through a Hugging Face cache built by hand in
the layout huggingface_hub writes (there is no network here, so HF_HUB_OFFLINE=1, as the
issue's acceptance asks), then load_model's dtype names and amp (Note [amp] in models.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

from nanotune import wire
from nanotune.models import ModelError, hub_cache_dir, load_model, looks_like_hub_id
from nanotune.session import Session, SessionError
from nanotune.training import _loss_sum, evaluate

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"
ROWS = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(24)]


def make_hub_repo(hub: Path, repo_id: str, src: Path, commit: str = COMMIT, refs: dict[str, str] | None = None) -> Path:
    """Writes the files of directory `src` into hub cache `hub` as huggingface_hub does:
    models--org--name/blobs/<content hash> holds the bytes, snapshots/<commit>/<file> is a
    relative symlink to its blob, refs/<branch or tag> holds the commit (no newline).
    Returns the snapshot directory."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name in sorted(os.listdir(src)):
        data = (src / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref, target in (refs if refs is not None else {"main": commit}).items():
        (repo / "refs" / ref).write_text(target)
    return snapshot


@pytest.fixture
def hf_home(tmp_path, monkeypatch, tiny_dir, nanotune_cache):
    """HF_HOME with "org/name" (the tiny-llama preset) cached at COMMIT (main) and, as
    tag v1, the seed-7 build at OTHER; offline. Returns HF_HOME."""
    home = tmp_path / "hf-home"
    seven = Path(load_model("tiny-llama", device="cpu", seed=7).path)
    make_hub_repo(home / "hub", "org/name", tiny_dir, refs={"main": COMMIT, "v1": OTHER})
    make_hub_repo(home / "hub", "org/name", seven, commit=OTHER, refs={})
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def snapshot_of(home: Path, repo_id: str, commit: str) -> Path:
    return (home / "hub" / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit).resolve()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(t, sb[k]) for k, t in a.state_dict().items())


def session_on(model: str, write_jsonl, **load) -> tuple[Session, wire.LoadModelResult]:
    s = Session(device="cpu")
    result = s.load_model(path=model, **load)
    s.load_dataset(path=str(write_jsonl(ROWS)), eval_fraction=0.25, seed=3)
    s.create_optimizer(name="nanoadam", lr=1e-3, density=0.1)
    return s, result


def test_a_hub_id_resolves_through_the_cache_offline_and_trains(hf_home, tiny, write_jsonl, tmp_path):
    """The acceptance test: HF_HOME holds a hand-built cache, HF_HUB_OFFLINE=1, model "org/name"."""
    s, result = session_on("org/name", write_jsonl)
    assert Path(result.path) == snapshot_of(hf_home, "org/name", COMMIT) and result.revision == COMMIT
    assert result.dtype == "float32" and result.amp is None and result.model_type == "llama"
    assert s.loaded.info["source"] == "org/name" and s.loaded.info["revision"] == COMMIT
    assert same_weights(s.loaded.model, tiny.model)  # the preset's weights, through blobs and symlinks
    losses = [s.train_step(lr=1e-2, micro_batch=2).loss for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))) and s.step == 3
    assert not same_weights(s.loaded.model, tiny.model)

    # Checkpoint and resume: the checkpoint keeps the weights, and resuming loads the same id first.
    s.save_checkpoint(path=str(tmp_path / "ckpt"))
    tail = [s.train_step(lr=1e-2, micro_batch=2).loss for _ in range(2)]
    again, _ = session_on("org/name", write_jsonl)
    assert again.load_checkpoint(path=str(tmp_path / "ckpt")).step == 3
    assert [again.train_step(lr=1e-2, micro_batch=2).loss for _ in range(2)] == tail
    assert load_model(tmp_path / "ckpt" / "model", device="cpu").revision is None  # the checkpoint's HF dir, local


def test_a_lora_adapter_on_a_hub_id_keeps_the_snapshot_as_its_base(hf_home, write_jsonl, tmp_path):
    s, result = session_on("org/name", write_jsonl, lora={"r": 4})
    assert result.revision == COMMIT and result.lora is not None
    s.train_step(lr=1e-2, micro_batch=2)
    s.save_checkpoint(path=str(tmp_path / "ckpt"))
    base = json.loads((tmp_path / "ckpt" / "model" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base) == snapshot_of(hf_home, "org/name", COMMIT)
    adapter = load_model(tmp_path / "ckpt" / "model", device="cpu")
    assert adapter.revision == COMMIT and Path(adapter.info["base"]) == Path(base)
    assert same_weights(adapter.model, s.loaded.model)


def test_revision_a_commit_hash_or_a_named_ref(hf_home, tiny):
    by_commit = load_model("org/name", device="cpu", revision=COMMIT)
    assert by_commit.revision == COMMIT and same_weights(by_commit.model, tiny.model)
    by_tag = load_model("org/name", device="cpu", revision="v1")
    seven = load_model("tiny-llama", device="cpu", seed=7)
    assert by_tag.revision == OTHER and Path(by_tag.path) == snapshot_of(hf_home, "org/name", OTHER)
    assert same_weights(by_tag.model, seven.model) and not same_weights(by_tag.model, tiny.model)
    with pytest.raises(ModelError) as e:
        load_model("org/name", device="cpu", revision="v2")
    msg = str(e.value)
    assert "'org/name'" in msg and "'v2'" in msg and str(hub_cache_dir()) in msg and "--revision v2" in msg
    assert "the cache has 'org/name' at main, v1" in msg
    assert e.value.data == {"path": "org/name", "field": "revision"}
    with pytest.raises(ModelError, match="revision: 'v1' is a Hub id's revision, and model is the preset"):
        load_model("tiny-llama", device="cpu", revision="v1")


def test_an_id_missing_from_the_cache_names_the_id_and_the_cache(hf_home, monkeypatch):
    with pytest.raises(ModelError) as e:
        load_model("org/missing", device="cpu")
    msg = str(e.value)
    assert "'org/missing'" in msg and "revision 'main'" in msg and str(hf_home / "hub") in msg
    assert "HF_HUB_OFFLINE" in msg and "hf download org/missing" in msg and "HF_HOME" in msg
    assert e.value.code == "INVALID_PARAMS" and e.value.data == {"path": "org/missing"}
    with pytest.raises(ModelError, match="tiny-lama.*not a preset"):  # a typo of a preset reads as a Hub id
        load_model("tiny-lama", device="cpu")
    # HF_HUB_CACHE wins over HF_HOME, as in huggingface_hub
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "elsewhere"))
    with pytest.raises(ModelError, match="elsewhere"):
        load_model("org/name", device="cpu")


def test_online_without_a_network_uses_the_cache_or_says_the_hub_was_unreachable(hf_home, monkeypatch, tiny):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    cached = load_model("org/name", device="cpu")  # like from_pretrained: the cached snapshot of main
    assert cached.revision == COMMIT and same_weights(cached.model, tiny.model)
    with pytest.raises(ModelError) as e:
        load_model("org/missing", device="cpu")
    msg = str(e.value)
    assert "'org/missing'" in msg and "could not be reached" in msg and "http://127.0.0.1:9" in msg
    assert str(hf_home / "hub") in msg and "HF_HUB_OFFLINE=1" in msg


def test_hub_errors_gated_no_repo_no_revision(hf_home, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    request = sys.modules[errors.Response.__module__].Request("GET", "https://huggingface.co/api/models/org/x")
    raised = {}

    def fake(repo_id, **kwargs):
        raise raised["error"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    raised["error"] = errors.GatedRepoError("403 Client Error. Cannot access gated repo.",
                                            response=errors.Response(403, request=request))
    with pytest.raises(ModelError) as e:
        load_model("org/gated", device="cpu")
    msg = str(e.value)
    assert "'org/gated'" in msg and "gated" in msg and "accept its license" in msg and "HF_TOKEN" in msg
    assert "/org/gated" in msg and str(hf_home / "hub") in msg
    raised["error"] = errors.RepositoryNotFoundError("404 Client Error.",
                                                     response=errors.Response(404, request=request))
    with pytest.raises(ModelError, match="no model repository 'org/gone'.*HF_TOKEN"):
        load_model("org/gone", device="cpu")
    raised["error"] = errors.RevisionNotFoundError("404 Client Error.", response=errors.Response(404, request=request))
    with pytest.raises(ModelError, match="has no revision 'nope'") as e:
        load_model("org/name", device="cpu", revision="nope")
    assert e.value.data["field"] == "revision"


def test_a_config_that_is_not_a_causal_lm_is_refused_naming_its_architecture(hf_home, tiny_dir, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    src = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, src / name)
    make_hub_repo(hf_home / "hub", "org/bert", src)
    with pytest.raises(ModelError) as e:
        load_model("org/bert", device="cpu")
    msg = str(e.value)
    assert "'org/bert'" in msg and "not a causal LM" in msg and "BertForMaskedLM" in msg and "'bert'" in msg
    with pytest.raises(ModelError, match="not a causal LM"):  # the same check for a local directory
        load_model(src, device="cpu")


def test_what_reads_as_a_hub_id():
    for name in ("org/name", "gpt2", "HuggingFaceTB/SmolLM2-135M"):
        assert looks_like_hub_id(name)
    for path in ("./org/name", "/models/x", "~/models/x", "a/b/c", "a\\b", "a..b", ""):
        assert not looks_like_hub_id(path)


def test_a_hub_id_through_the_sidecar_process(hf_home, tmp_path):
    """The sidecar reads HF_HOME and HF_HUB_OFFLINE from the environment it starts with."""
    from test_sidecar import Client, start

    proc, endpoint = start(tmp_path)
    client = Client(endpoint)
    try:
        r = client.call("load_model", {"path": "org/name", "revision": "v1", "dtype": "fp32"})[0]
        assert r["result"]["revision"] == OTHER and Path(r["result"]["path"]) == snapshot_of(hf_home, "org/name", OTHER)
        assert r["result"]["dtype"] == "float32" and r["result"].get("amp") is None  # None fields are left out
        err = client.call("load_model", {"path": "org/missing"})[0]["error"]
        assert err["code"] == "INVALID_PARAMS" and "'org/missing'" in err["message"]
        assert str(hf_home / "hub") in err["message"]
        assert client.call("shutdown")[0]["result"] == {}
        assert proc.wait(10) == 0
    finally:
        client.sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# ---------------------------------------------------------------------------
# dtype names and amp


@pytest.mark.parametrize("short, long", [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")])
def test_short_and_long_dtype_names_load_the_same_model(tiny_dir, short, long):
    results = [Session(device="cpu").load_model(path="tiny-llama", dtype=name) for name in (short, long)]
    assert results[0].dtype == results[1].dtype == long
    a, b = (load_model("tiny-llama", device="cpu", dtype=name) for name in (short, long))
    assert a.dtype == b.dtype == getattr(torch, long) and same_weights(a.model, b.model)


def test_amp_bf16_on_cpu_autocasts_the_forward_over_fp32_weights(tiny_dir, write_jsonl):
    s, result = session_on("tiny-llama", write_jsonl, amp="bf16")
    plain, _ = session_on("tiny-llama", write_jsonl)
    assert result.amp == "bfloat16" and result.dtype == "float32" and s.loaded.info["amp"] == "bfloat16"
    model = s.loaded.model
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    batch = next(s.data.train.batches(4, epochs=1, shuffle=False))
    with torch.no_grad():
        mixed, full = float(_loss_sum(model, batch, torch.bfloat16)), float(_loss_sum(model, batch))
    assert seen == [torch.bfloat16, torch.float32]
    assert mixed != full and abs(mixed - full) / full < 2e-2  # bf16 matmuls: close, not equal

    seen.clear()
    losses = [s.train_step(lr=1e-2, micro_batch=2).loss for _ in range(3)]
    plain_losses = [plain.train_step(lr=1e-2, micro_batch=2).loss for _ in range(3)]
    hook.remove()
    assert seen == [torch.bfloat16] * 3  # every step's forward under autocast
    assert losses != plain_losses and losses == pytest.approx(plain_losses, rel=2e-2)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    state = [t for st in s.optimizer.state.values() for t in st.values()
             if torch.is_tensor(t) and t.is_floating_point()]
    assert state and all(t.dtype == torch.float32 for t in state)

    ev = s.evaluate(batch_size=4)
    assert ev.loss > 0 and ev.tokens > 0
    batches = list(s.data.eval.batches(4, epochs=1, shuffle=False))
    setattr(model, "nanotune_amp", None)
    unmixed = evaluate(model, batches)["loss"]
    assert unmixed != ev.loss and unmixed == pytest.approx(ev.loss, rel=2e-2)


def test_amp_choices_and_errors(tiny_dir, monkeypatch):
    fp16 = load_model("tiny-llama", device="cpu", amp="float16")  # torch 2.13's CPU autocast has fp16 too
    assert fp16.amp == torch.float16 and fp16.dtype == torch.float32
    with pytest.raises(ModelError, match="amp: bfloat16 autocast is for fp32 weights.*bfloat16 weights") as e:
        load_model("tiny-llama", device="cpu", dtype="bf16", amp="bf16")
    assert e.value.data == {"field": "amp"}
    assert load_model("tiny-llama", device="cpu", dtype="fp32", amp="bf16").amp == torch.bfloat16
    with pytest.raises(ModelError, match="amp: 'fp32' is not"):
        load_model("tiny-llama", device="cpu", amp="fp32")
    with pytest.raises(SessionError, match="amp"):  # the schema allows bf16 and fp16 only
        Session(device="cpu").load_model(path="tiny-llama", amp="fp32")

    class Unsupported:  # what torch does for a (device, dtype) autocast lacks: warn and disable
        def __init__(self, device_type, dtype):
            warnings.warn("In CPU autocast, but the target dtype is not supported. Disabling autocast.")
            self._enabled = False

    monkeypatch.setattr(torch, "autocast", Unsupported)
    with pytest.raises(ModelError, match="cannot autocast to float16 on cpu.*not supported.*use amp 'bf16'"):
        load_model("tiny-llama", device="cpu", amp="fp16")
