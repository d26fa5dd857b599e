from pathlib import Path

import pytest
import torch

from nanotune.models import PRESETS, ModelError, build_preset, cache_dir, load_model, model_info


def test_tiny_preset_is_built_once_then_loaded_from_cache(nanotune_cache, tiny_dir):
    assert tiny_dir == nanotune_cache / "tiny-llama-v1"
    weights = tiny_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    a = load_model("tiny-llama", device="cpu")
    b = load_model("tiny-llama", device="cpu")
    assert weights.stat().st_mtime_ns == before  # reused, not rebuilt
    assert [p.name for p in nanotune_cache.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n


def test_tiny_preset_info_and_defaults(tiny):
    m, info = tiny.model, tiny.info
    assert tiny.device == torch.device("cpu") and tiny.dtype == torch.float32  # fp32 on CPU by default
    assert m.config.tie_word_embeddings and m.lm_head.weight is m.model.embed_tokens.weight
    assert info["tied"] == [["model.embed_tokens.weight", "lm_head.weight"]]
    unique = {id(p): p for p in m.parameters()}.values()
    assert info["parameters"] == info["trainable_parameters"] == sum(p.numel() for p in unique)
    assert info["param_bytes"] == 4 * info["parameters"]
    assert 50_000 < info["parameters"] < 500_000
    assert (info["num_layers"], info["hidden_size"], info["vocab_size"]) == (2, 64, 512)
    assert m.config.num_key_value_heads == 2 and m.config.num_attention_heads == 4
    assert info["source"] == "tiny-llama" and info["dtype"] == "float32" and info["device"] == "cpu"


def test_tiny_tokenizer_has_special_tokens_and_chat_template(tiny_tokenizer):
    tok = tiny_tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    ids = tok("The cat sees the dog near the river.")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) < 20  # BPE merges learned, bos added like Llama
    assert tok.decode(ids, skip_special_tokens=True) == "The cat sees the dog near the river."
    assert tok.decode(tok("naïve café ✓", add_special_tokens=False)["input_ids"]) == "naïve café ✓"  # byte-level
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>\nhi</s>\n<|assistant|>\n"


def test_preset_build_is_deterministic(tmp_path):
    a, b = build_preset("tiny-llama", tmp_path / "a"), build_preset("tiny-llama", tmp_path / "b")
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = build_preset("tiny-llama", tmp_path / "c", seed=1)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()  # the corpus is fixed


def test_seed_selects_its_own_cached_build(nanotune_cache, tiny):
    other = load_model("tiny-llama", device="cpu", seed=3)
    assert Path(other.path) == nanotune_cache / "tiny-llama-v1-seed3"
    assert not torch.equal(other.model.model.embed_tokens.weight, tiny.model.model.embed_tokens.weight)


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOTUNE_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    monkeypatch.delenv("NANOTUNE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "nanotune"


def test_local_hf_directory_round_trip(tiny, tmp_path):
    with torch.no_grad():
        tiny.model.model.layers[0].mlp.up_proj.weight.add_(1.0)  # differs from the preset
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m", device="cpu")
    assert loaded.info["source"] == str(tmp_path / "m") and loaded.path == str(tmp_path / "m")
    assert loaded.info["tied"] == tiny.info["tied"]
    for (n, p), (_, q) in zip(tiny.model.named_parameters(), loaded.model.named_parameters()):
        assert torch.equal(p, q), n
    assert loaded.tokenizer("a b c")["input_ids"] == tiny.tokenizer("a b c")["input_ids"]
    assert loaded.tokenizer.chat_template == tiny.tokenizer.chat_template


def test_dtype_option(tiny_dir):
    lm = load_model("tiny-llama", device="cpu", dtype="bf16")
    assert lm.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    assert lm.info["param_bytes"] == 2 * lm.info["parameters"]
    with pytest.raises(ModelError, match="dtype: 'int3'"):
        load_model("tiny-llama", device="cpu", dtype="int3")


def test_gradient_checkpointing_trains(tiny_dir):
    lm = load_model("tiny-llama", device="cpu", gradient_checkpointing=True)
    assert lm.info["gradient_checkpointing"]
    assert any(getattr(m, "gradient_checkpointing", False) for m in lm.model.modules())
    ids = torch.tensor([[0, 5, 6, 7, 8]])
    lm.model(input_ids=ids, labels=ids).loss.backward()
    assert lm.model.model.layers[0].self_attn.q_proj.weight.grad is not None
    from nanotune.training import generate

    assert isinstance(generate(lm.model, lm.tokenizer, "The cat", max_new_tokens=3), str)


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "has no config.json"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}")), "has no weights"),
    (lambda d: d.write_text("x"), "is not a directory"),
])
def test_bad_model_paths_name_the_path(tmp_path, make, message):
    d = tmp_path / "model"
    make(d)
    with pytest.raises(ModelError, match=message) as e:
        load_model(d, device="cpu")
    assert e.value.path == str(d) and str(d) in str(e.value)


def test_missing_tokenizer_and_corrupt_config_name_the_path(tiny_dir, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_bytes((tiny_dir / "config.json").read_bytes())
    (d / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(ModelError, match="has no tokenizer"):
        load_model(d, device="cpu")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).write_bytes((tiny_dir / name).read_bytes())
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="could not load model directory") as e:
        load_model(d, device="cpu")
    assert str(d) in str(e.value)


def test_device_option():
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            load_model("tiny-llama", device="cuda")
    with pytest.raises(ModelError, match="device: 'gpu7'"):
        load_model("tiny-llama", device="gpu7")


def test_small_llama_preset_is_about_30m_parameters():
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = {k: v for k, v in PRESETS["small-llama"].items() if k != "version"}
    with torch.device("meta"):  # counts shapes without building the 120 MB preset
        model = LlamaForCausalLM(LlamaConfig(**spec, tie_word_embeddings=True))
    assert 25e6 < model_info(model)["parameters"] < 35e6


def test_one_device_resolver_honours_the_sidecars_device_when_torch_sees_cuda(monkeypatch):
    """The sidecar started with --device cpu passes "cpu" as the default: load_model's
    "auto"/absent device is then cpu even where torch sees a GPU (faked here: this
    checks the pure resolver, which never touches the device)."""
    from nanotune.models import default_dtype, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cpu, cuda0, cuda1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)
    assert resolve_device("auto", default="cpu") == cpu
    assert resolve_device(None, default="cpu") == cpu
    assert resolve_device("auto") == cuda0  # the warm-up's --device auto: cuda when torch sees it
    assert resolve_device("cuda") == cuda0  # always with its index, as hello reports it
    assert resolve_device("cuda", default="cuda:1") == cuda1  # plain "cuda": the sidecar's CUDA device
    assert resolve_device("cuda", default="cpu") == cuda0  # asked for explicitly: honoured
    assert resolve_device("cuda:1", default="cpu") == cuda1
    assert resolve_device("cpu", default="cuda:1") == cpu
    assert resolve_device("auto", default="cuda:1") == cuda1
    with pytest.raises(ModelError, match="'cuda:2' does not exist") as e:
        resolve_device("cuda:2", default="cpu")
    assert e.value.code == "INVALID_PARAMS" and e.value.data == {"field": "device"}
    assert default_dtype(cpu) == torch.float32 and default_dtype(cuda0) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == cpu
    with pytest.raises(ModelError, match="CUDA is not available"):
        resolve_device("auto", default="cuda:0")  # a default is checked like an explicit device


def test_model_errors_are_nanotune_errors_with_the_path_in_data(tmp_path):
    from nanotune.errors import NanotuneError, SidecarError

    with pytest.raises(NanotuneError) as e:
        load_model(tmp_path / "nope", device="cpu")
    assert isinstance(e.value, ModelError) and isinstance(e.value, ValueError) and SidecarError is NanotuneError
    assert e.value.code == "INVALID_PARAMS" and e.value.data == {"path": str(tmp_path / "nope")}
