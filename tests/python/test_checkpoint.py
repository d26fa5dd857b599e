import json
import random

import pytest
import torch

from nanotune.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nanotune.data import load_dataset
from nanotune.models import load_model
from nanotune.training import create_optimizer, generate, train_step

WORDS = ("red", "blue", "green", "cold", "warm", "tall", "dark")


@pytest.fixture
def data(tiny_tokenizer, write_jsonl):
    rows = [{"instruction": f"Say {w} {i}.", "output": f"{w} {i}"} for i, w in enumerate(WORDS * 2)]
    return load_dataset(write_jsonl(rows), tiny_tokenizer, seed=1).train


def run(lm, opt, it, steps):
    return [train_step(lm.model, opt, [next(it), next(it)], lr=1e-2 / (1 + i), grad_clip=1.0)["loss"]
            for i in range(steps)]


def assert_same_params(a, b):
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("optimizer, opts", [("adamw", {}), ("nanoadam", {"density": 0.1, "mask_interval": 2})])
@pytest.mark.parametrize("in_place", [False, True])
def test_resume_is_bit_for_bit(tiny_dir, data, tmp_path, optimizer, opts, in_place):
    if optimizer == "nanoadam":
        pytest.importorskip("nanotune.optim")
    lm = load_model("tiny-llama", device="cpu")
    opt = create_optimizer(lm.model, optimizer, **opts)
    it = data.batches(3)  # 14 examples: the run crosses epoch boundaries
    run(lm, opt, it, 3)
    save_checkpoint(tmp_path / "ckpt", lm.model, lm.tokenizer, opt, it.state_dict(), step=3, extra={"run": "a"})
    marker = torch.rand(3), random.random()
    expected = run(lm, opt, it, 3)

    torch.manual_seed(1234)  # the RNG must come back from the checkpoint
    random.seed(1234)
    if in_place:  # the sidecar reusing its loaded model
        lm2 = load_model("tiny-llama", device="cpu")
        opt2 = create_optimizer(lm2.model, optimizer, **opts)
        state = load_checkpoint(tmp_path / "ckpt", model=lm2.model, optimizer=opt2)
    else:  # a fresh process: the model from the checkpoint's HF directory
        lm2 = load_model(tmp_path / "ckpt" / "model", device="cpu")
        opt2 = create_optimizer(lm2.model, optimizer, **opts)
        state = load_checkpoint(tmp_path / "ckpt", optimizer=opt2)
    assert (state.step, state.extra, state.model_dir) == (3, {"run": "a"}, str(tmp_path / "ckpt" / "model"))
    assert torch.equal(torch.rand(3), marker[0]) and random.random() == marker[1]
    it2 = data.batches(3)
    it2.load_state_dict(state.data_state)
    assert run(lm2, opt2, it2, 3) == expected  # exact float equality
    assert_same_params(lm.model, lm2.model)
    assert lm2.model.lm_head.weight is lm2.model.model.embed_tokens.weight  # still tied after in-place load


def test_saved_model_dir_loads_with_transformers_and_generates(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    opt = create_optimizer(tiny.model, "adamw")
    save_checkpoint(tmp_path / "c", tiny.model, tiny.tokenizer, opt, None, step=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "c" / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "c" / "model")
    assert_same_params(tiny.model, model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = model.generate(**tok("The cat", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, len(tok("The cat")["input_ids"]) + 5)
    assert generate(model, tok, "The cat", max_new_tokens=5) == generate(tiny.model, tiny.tokenizer, "The cat",
                                                                         max_new_tokens=5)


class ExplodingTokenizer:
    """Stands in for a disk that fails halfway through a save."""

    def save_pretrained(self, path):
        raise OSError("disk full")


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tiny, tmp_path):
    opt = create_optimizer(tiny.model, "adamw")
    save_checkpoint(tmp_path / "ckpt", tiny.model, tiny.tokenizer, opt, {"epoch": 0, "index": 2}, step=5)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    with torch.no_grad():
        tiny.model.model.norm.weight.add_(1)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ckpt", tiny.model, ExplodingTokenizer(), opt, None, step=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dir left behind
    after = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    assert after == before
    assert load_checkpoint(tmp_path / "ckpt", restore_rng=False).step == 5


def test_saving_over_a_checkpoint_replaces_it(tiny, tmp_path):
    save_checkpoint(tmp_path / "ckpt", tiny.model, tiny.tokenizer, None, None, step=1)
    save_checkpoint(tmp_path / "ckpt", tiny.model, tiny.tokenizer, None, {"epoch": 1, "index": 0}, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    state = load_checkpoint(tmp_path / "ckpt")
    assert (state.step, state.data_state) == (2, {"epoch": 1, "index": 0})
    with pytest.raises(CheckpointError, match="has no optimizer.pt"):
        load_checkpoint(tmp_path / "ckpt", optimizer=create_optimizer(tiny.model, "adamw"))


@pytest.fixture
def ckpt(tiny, tmp_path):
    opt = create_optimizer(tiny.model, "adamw")
    return save_checkpoint(tmp_path / "ckpt", tiny.model, tiny.tokenizer, opt, {"epoch": 0, "index": 0}, step=1)


def test_missing_state_file_is_named(ckpt):
    (ckpt / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="trainer_state.json is missing") as e:
        load_checkpoint(ckpt)
    assert e.value.path == str(ckpt / "trainer_state.json")


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt", "model/model.safetensors", "model/config.json"])
def test_missing_or_truncated_files_are_named(ckpt, name):
    path = ckpt / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is corrupt") as e:
        load_checkpoint(ckpt)
    assert e.value.path == str(path) and str(path) in str(e.value)
    path.unlink()
    with pytest.raises(CheckpointError, match="is missing") as e:
        load_checkpoint(ckpt)
    assert e.value.path == str(path)


def test_corrupt_content_of_the_right_size_is_named(tiny, ckpt):
    path = ckpt / "model" / "model.safetensors"
    path.write_bytes(b"\xff" * path.stat().st_size)
    with pytest.raises(CheckpointError, match="model.safetensors' is corrupt") as e:
        load_checkpoint(ckpt, model=tiny.model)
    assert e.value.path == str(path)
    path = ckpt / "optimizer.pt"
    path.write_bytes(b"\x00" * path.stat().st_size)
    with pytest.raises(CheckpointError, match="optimizer.pt' is corrupt"):
        load_checkpoint(ckpt, optimizer=create_optimizer(tiny.model, "adamw"))
    (ckpt / "trainer_state.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="trainer_state.json' is corrupt"):
        load_checkpoint(ckpt)


def test_wrong_model_or_optimizer_is_an_error(ckpt, tiny_dir):
    other = load_model("tiny-llama", device="cpu")
    opt = torch.optim.AdamW([other.model.model.norm.weight])  # one param group of a different size
    with pytest.raises(CheckpointError, match="does not fit this optimizer"):
        load_checkpoint(ckpt, optimizer=opt)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(ckpt.parent / "nope")


def test_extra_must_be_json(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="JSON-serializable"):
        save_checkpoint(tmp_path / "c", tiny.model, tiny.tokenizer, None, None, step=0, extra={"x": object()})
    assert not (tmp_path / "c").exists()
    state = json.loads((save_checkpoint(tmp_path / "d", tiny.model, tiny.tokenizer, None, None, 0,
                                        {"lr": [1, 2]}) / "trainer_state.json").read_text())
    assert state["extra"] == {"lr": [1, 2]} and "model/model.safetensors" in state["files"]


@pytest.mark.parametrize("corrupt", ["negative", "length", "dtype"])
def test_a_corrupt_bias_correction_age_is_named_before_anything_loads(tiny_dir, data, tmp_path, corrupt):
    # Note [bias correction]: with carried moments each selected entry stores its age (int16).
    lm = load_model("tiny-llama", device="cpu")
    opt = create_optimizer(lm.model, "nanoadam", density=0.1, mask_interval=2)
    it = data.batches(3)
    run(lm, opt, it, 3)
    save_checkpoint(tmp_path / "ckpt", lm.model, lm.tokenizer, opt, it.state_dict(), step=3)
    sd = torch.load(tmp_path / "ckpt" / "optimizer.pt", weights_only=True)
    sid, st = next((k, v) for k, v in sd["state"].items() if "age" in v)
    st["age"] = {"negative": st["age"] - 100, "length": st["age"][:-1], "dtype": st["age"].float()}[corrupt]
    torch.save(sd, tmp_path / "ckpt" / "optimizer.pt")
    meta = json.loads((tmp_path / "ckpt" / "trainer_state.json").read_text())  # a well-formed file with a bad age
    meta["files"]["optimizer.pt"] = (tmp_path / "ckpt" / "optimizer.pt").stat().st_size
    (tmp_path / "ckpt" / "trainer_state.json").write_text(json.dumps(meta))
    lm2 = load_model("tiny-llama", device="cpu")
    opt2 = create_optimizer(lm2.model, "nanoadam", density=0.1, mask_interval=2)
    before = {k: v.clone() for k, v in lm2.model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"age is not a non-negative 1-d int16/int32 tensor") as e:
        load_checkpoint(tmp_path / "ckpt", model=lm2.model, optimizer=opt2)
    assert f"state.{sid}.age" in str(e.value) or f"state.{sid}.age" in str(getattr(e.value, "data", ""))
    assert all(torch.equal(v, lm2.model.state_dict()[k]) for k, v in before.items())
    assert not opt2.state  # nothing applied
