"""The Session the sidecar's training methods wrap: order of calls, masks, checkpoints."""

import pytest
import torch

from nanotune.session import Session, SessionError

ROWS = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(40)]


@pytest.fixture
def session(tiny_dir, write_jsonl):
    s = Session()
    s.load_model("tiny-llama", device="cpu")
    s.load_dataset(str(write_jsonl(ROWS)), eval_fraction=0.1, seed=3)
    s.create_optimizer("nanoadam", lr=1e-3, density=0.1)
    return s


def test_calls_out_of_order_name_what_is_missing():
    s = Session()
    with pytest.raises(SessionError, match="load_model"):
        s.create_optimizer("nanoadam")
    with pytest.raises(SessionError, match="load_model"):
        s.train_step(lr=1e-3)


def test_mask_refreshes_only_when_told(session):
    small = {"criterion": "small_weights", "density": 0.1}
    first = session.train_step(lr=1e-2, micro_batch=2, mask=small)
    assert first["mask_refreshed"] and first["step"] == 0
    masks = {n: m.clone() for n, m in session.masks().items()}
    for _ in range(3):
        out = session.train_step(lr=1e-2, micro_batch=2)
        assert not out["mask_refreshed"]
    assert all(torch.equal(m, session.masks()[n]) for n, m in masks.items())
    out = session.train_step(lr=1e-2, micro_batch=2, mask={"criterion": "random", "density": 0.05})
    assert out["mask_refreshed"] and out["density"] == pytest.approx(0.05)
    assert not all(torch.equal(m, session.masks()[n]) for n, m in masks.items())


def test_include_exclude_and_per_tensor_densities(session):
    names = session.tensor_names()
    session.set_mask_policy({"criterion": "small_weights", "density": 0.1, "perTensor": {"mlp": 0.5},
                             "exclude": ["self_attn\\.q_proj"]}, now=True)
    sizes = {n: p.numel() for n, p in session.loaded.model.named_parameters()}
    for n, m in session.masks().items():
        if "q_proj" in n:
            assert m.numel() == 0
        elif "mlp" in n:
            assert m.numel() == pytest.approx(0.5 * sizes[n], rel=0.02)
        else:
            assert m.numel() == pytest.approx(0.1 * sizes[n], rel=0.05, abs=2)
    session.set_mask_policy({"criterion": "small_weights", "density": 0.2, "include": ["layers\\.1\\."]}, now=True)
    assert {n for n, m in session.masks().items() if m.numel()} == {n for n in names if "layers.1." in n}
    with pytest.raises(SessionError, match="criterion"):
        session.set_mask_policy({"criterion": "big", "density": 0.1})
    with pytest.raises(SessionError, match="density"):
        session.set_mask_policy({"criterion": "random", "density": 0})
    with pytest.raises(SessionError, match="regular expression"):
        session.set_mask_policy({"criterion": "random", "density": 0.1, "exclude": ["("]})


def test_checkpoint_resume_continues_identically(session, tmp_path):
    mask = {"criterion": "small_weights", "density": 0.1}
    losses = [session.train_step(lr=1e-2, micro_batch=2, grad_accum=2, mask=mask if i % 4 == 0 else None)["loss"]
              for i in range(6)]
    session.save_checkpoint(str(tmp_path / "ckpt"))
    tail = [session.train_step(lr=1e-2, micro_batch=2, grad_accum=2, mask=mask if i % 4 == 0 else None)["loss"]
            for i in range(6, 10)]

    again = Session()
    again.load_model("tiny-llama", device="cpu", seed=7)  # other weights: the checkpoint must restore them
    again.load_dataset(session.data.info["path"], eval_fraction=0.1, seed=3)
    again.create_optimizer("nanoadam", lr=1e-3, density=0.1)
    state = again.load_checkpoint(str(tmp_path / "ckpt"))
    assert state["step"] == 6 and again.step == 6
    resumed = [again.train_step(lr=1e-2, micro_batch=2, grad_accum=2, mask=mask if i % 4 == 0 else None)["loss"]
               for i in range(6, 10)]
    assert resumed == tail and len(losses) == 6
    ev = again.evaluate(batch_size=4)
    assert ev["loss"] > 0 and ev["tokens"] > 0
