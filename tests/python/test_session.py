"""The Session the sidecar's training methods wrap: order of calls, masks, checkpoints."""

import json

import pytest
import torch

from nanotune.checkpoint import CheckpointError
from nanotune.session import Session, SessionError
from nanotune import wire
from nanotune.wire import MaskDecision, PolicyState

ROWS = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(40)]


@pytest.fixture
def session(tiny_dir, write_jsonl):
    s = Session(device="cpu")
    s.load_model(path="tiny-llama")
    s.load_dataset(path=str(write_jsonl(ROWS)), eval_fraction=0.1, seed=3)
    s.create_optimizer(wire.CreateOptimizerParams(name="nanoadam", lr=1e-3, density=0.1))
    return s


def test_calls_out_of_order_name_what_is_missing():
    s = Session()
    with pytest.raises(SessionError, match="load_model"):
        s.create_optimizer(name="nanoadam")
    with pytest.raises(SessionError, match="load_model"):
        s.train_step(lr=1e-3)


def test_mask_refreshes_only_when_told(session):
    small = {"criterion": "small_weights", "density": 0.1}
    first = session.train_step(lr=1e-2, micro_batch=2, mask=small)
    assert first.mask_refreshed and first.step == 0
    masks = {n: m.clone() for n, m in session.masks().items()}
    for _ in range(3):
        out = session.train_step(lr=1e-2, micro_batch=2)
        assert not out.mask_refreshed
    assert all(torch.equal(m, session.masks()[n]) for n, m in masks.items())
    out = session.train_step(lr=1e-2, micro_batch=2, mask={"criterion": "random", "density": 0.05})
    assert out.mask_refreshed and out.density == pytest.approx(0.05)
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
    losses = [session.train_step(lr=1e-2, micro_batch=2, grad_accum=2, mask=mask if i % 4 == 0 else None).loss
              for i in range(6)]
    session.save_checkpoint(path=str(tmp_path / "ckpt"))
    tail = [session.train_step(lr=1e-2, micro_batch=2, grad_accum=2, mask=mask if i % 4 == 0 else None).loss
            for i in range(6, 10)]

    again = Session()
    again.load_model(path="tiny-llama", device="cpu", seed=7)  # other weights: the checkpoint must restore them
    again.load_dataset(path=session.data.info["path"], eval_fraction=0.1, seed=3)
    again.create_optimizer(name="nanoadam", lr=1e-3, density=0.1)
    state = again.load_checkpoint(path=str(tmp_path / "ckpt"))
    assert state.step == 6 and again.step == 6
    resumed = [again.train_step(lr=1e-2, micro_batch=2, grad_accum=2, mask=mask if i % 4 == 0 else None).loss
               for i in range(6, 10)]
    assert resumed == tail and len(losses) == 6
    ev = again.evaluate(batch_size=4)
    assert ev.loss > 0 and ev.tokens > 0 and ev.step == 10


def test_a_mask_decision_is_a_wire_struct_or_its_wire_form(session):
    as_struct = MaskDecision(criterion="small_weights", density=0.1, per_tensor={"mlp": 0.5})
    session.set_mask_policy(as_struct, now=True)
    by_struct = {n: m.clone() for n, m in session.masks().items()}
    session.set_mask_policy({"criterion": "small_weights", "density": 0.1, "perTensor": {"mlp": 0.5}}, now=True)
    assert session.mask == as_struct
    assert all(torch.equal(m, session.masks()[n]) for n, m in by_struct.items())
    with pytest.raises(SessionError, match="mask.per_tensor"):  # Python names are not the wire form
        session.set_mask_policy({"criterion": "random", "density": 0.1, "per_tensor": {}})


def test_checkpoint_extra_keeps_the_mask_the_optimizer_and_the_callers_parts(session, tmp_path):
    mask = MaskDecision(criterion="small_weights", density=0.1, per_tensor={"mlp": 0.5})
    session.train_step(lr=1e-2, micro_batch=2, mask=mask)
    extra = wire.CheckpointExtra(policy=PolicyState(name="smallWeights", activated_at=0), config={"steps": 3},
                                 user={"note": "x"})
    session.save_checkpoint(path=str(tmp_path / "c"), extra=extra)
    saved = json.loads((tmp_path / "c" / "trainer_state.json").read_text())["extra"]
    assert saved == {"mask": {"criterion": "small_weights", "density": 0.1, "perTensor": {"mlp": 0.5}},
                     "optimizer": {"name": "nanoadam", "lr": 1e-3, "density": 0.1},
                     "policy": {"name": "smallWeights", "activatedAt": 0}, "config": {"steps": 3},
                     "user": {"note": "x"}}
    session.set_mask_policy({"criterion": "random", "density": 0.2})
    out = session.load_checkpoint(path=str(tmp_path / "c"))
    assert out.extra.mask == mask == session.mask
    assert out.extra.policy == PolicyState(name="smallWeights", activated_at=0)
    assert out.extra.optimizer == session.optimizer_params


def test_keyword_arguments_are_checked_against_the_schema(session):
    with pytest.raises(SessionError, match="params.microBatch: Expected `int` >= 1"):
        session.train_step(lr=1e-3, micro_batch=0)  # the schema's constraint, not a hand-written check
    with pytest.raises(SessionError, match="unexpected keyword argument 'densty'|'densty'"):
        session.create_optimizer(name="nanoadam", densty=0.1)
    with pytest.raises(SessionError, match="'density' is a NanoAdam option"):
        session.create_optimizer(name="adamw", density=0.1)
    with pytest.raises(TypeError, match="pass a TrainStepParams"):
        session.train_step(wire.EvaluateParams())


def test_the_checkpoint_keeps_the_optimizer_config_without_the_generation(session, tmp_path):
    out = session.create_optimizer(wire.CreateOptimizerParams(name="nanoadam", density=0.2,
                                                              generation=session.generation))
    assert out.generation == session.generation and type(session.optimizer_params) is wire.OptimizerConfig
    session.train_step(lr=1e-2, micro_batch=2, mask={"criterion": "small_weights", "density": 0.2})
    session.save_checkpoint(path=str(tmp_path / "c"))
    saved = json.loads((tmp_path / "c" / "trainer_state.json").read_text())["extra"]["optimizer"]
    assert saved == {"name": "nanoadam", "density": 0.2}
    config = session.load_checkpoint(path=str(tmp_path / "c")).extra.optimizer
    again = Session(device="cpu")
    again.load_model(path="tiny-llama")
    assert again.create_optimizer(config).generation == 2  # a checkpoint's config builds the same optimizer
    assert again.optimizer_params == config


def test_a_checkpoint_of_other_data_of_the_same_size_does_not_load(session, tmp_path, write_jsonl):
    session.train_step(lr=1e-2, micro_batch=2, mask={"criterion": "small_weights", "density": 0.1})
    session.save_checkpoint(path=str(tmp_path / "c"))
    other = Session(device="cpu")
    other.load_model(path="tiny-llama")
    rows = [{**r, "output": r["output"] + "!"} for r in ROWS]  # as many examples, other tokens
    other.load_dataset(path=str(write_jsonl(rows, "other.jsonl")), eval_fraction=0.1, seed=3)
    other.create_optimizer(name="nanoadam", lr=1e-3, density=0.1)
    weights = {n: p.clone() for n, p in other.loaded.model.named_parameters()}
    with pytest.raises(CheckpointError, match="tokenized examples differ") as e:
        other.load_checkpoint(path=str(tmp_path / "c"))
    assert e.value.code == "INVALID_PARAMS" and e.value.data["key"] == "data_state.fingerprint"
    assert all(torch.equal(p, weights[n]) for n, p in other.loaded.model.named_parameters())
    assert other.step == 0 and other.batches is None and not any(other.optimizer.state.values())
