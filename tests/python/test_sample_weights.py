"""Session.sample_weights: the |w| vs |grad| sample of one tensor (Note [weight samples])."""

import pytest
import torch

from nanotune import wire
from nanotune.session import Session, SessionError

ROWS = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(40)]


def _session(write_jsonl, **opt):
    s = Session(device="cpu")
    s.load_model(path="tiny-llama")
    s.load_dataset(path=str(write_jsonl(ROWS)), seed=3)
    s.create_optimizer(wire.CreateOptimizerParams(name="nanoadam", lr=1e-3, density=0.1, **opt))
    return s


def test_sample_is_the_last_steps_weights_and_gradients_with_the_mask(tiny_dir, write_jsonl):
    s = _session(write_jsonl)
    first = s.sample_weights(count=500)
    name = first.tensor
    assert first.step is None and first.grads is None and first.in_mask is None  # no step, no mask yet
    assert name == next(t.name for t in first.tensors if t.masked)
    idx = first.indices
    assert idx.dtype == torch.int64 and idx.numel() == 500 and torch.equal(idx, idx.unique())  # distinct, sorted
    param = dict(s.loaded.model.named_parameters())[name]
    assert torch.equal(first.weights, param.detach().reshape(-1)[idx].float())

    # What the step saw: weights before the update and the accumulated gradient, both at idx.
    seen = {}
    param.register_post_accumulate_grad_hook(lambda p: seen.update(g=p.grad.detach().reshape(-1).clone()))
    before = param.detach().reshape(-1)[idx].clone()
    s.train_step(lr=1e-2, micro_batch=2, mask={"criterion": "small_weights", "density": 0.1})
    out = s.sample_weights(count=500)
    assert out.step == 1 and torch.equal(out.indices, idx)
    assert torch.equal(out.weights, before.float())
    assert torch.equal(out.grads, seen["g"][idx].float())
    mask = s.masks([name])[name].long()
    assert torch.equal(out.in_mask.bool(), torch.isin(idx, mask))
    assert 0 < int(out.in_mask.sum()) < 500  # density 0.1 of a uniform sample: some, not all
    # Small-weights selection: the sampled entries in the mask are the small ones (at the step's weights).
    assert before[out.in_mask.bool()].abs().max() <= before[~out.in_mask.bool()].abs().min()


def test_switching_tensors_restarts_the_watch_and_bad_names_are_named(tiny_dir, write_jsonl):
    s = _session(write_jsonl)
    s.train_step(lr=1e-2, micro_batch=2, mask={"criterion": "small_weights", "density": 0.1})
    first = s.sample_weights()
    other = next(t.name for t in first.tensors if t.masked and t.name != first.tensor)
    switched = s.sample_weights(tensor=other, count=64)
    assert switched.tensor == other and switched.step is None and switched.grads is None
    assert switched.indices.numel() == 64
    s.train_step(lr=1e-2, micro_batch=2)
    assert s.sample_weights(tensor=other, count=64).step == 2
    with pytest.raises(SessionError, match="no trainable tensor named 'nope'") as e:
        s.sample_weights(tensor="nope")
    assert e.value.field == "tensor"


def test_sparse_gradients_have_no_dense_gradient_to_sample(tiny_dir, write_jsonl):
    s = _session(write_jsonl, sparse_gradients=True)
    s.sample_weights(count=100)
    s.train_step(lr=1e-2, micro_batch=2, mask={"criterion": "small_weights", "density": 0.1})
    out = s.sample_weights(count=100)
    assert out.step == 1 and out.grads is None and out.weights.numel() == 100


def test_a_refused_step_leaves_the_sample(tiny_dir, write_jsonl):
    s = _session(write_jsonl)
    s.train_step(lr=1e-2, micro_batch=2, mask={"criterion": "small_weights", "density": 0.1})
    s.sample_weights(count=100)
    s.train_step(lr=1e-2, micro_batch=2)
    before = s.sample_weights(count=100)
    with torch.no_grad():
        s.loaded.model.get_input_embeddings().weight.fill_(float("nan"))
    with pytest.raises(Exception, match="non-finite|NaN|nan"):
        s.train_step(lr=1e-2, micro_batch=2)
    after = s.sample_weights(count=100)
    assert after.step == before.step == 2 and torch.equal(after.grads, before.grads)
