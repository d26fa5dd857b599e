"""The teacher-student toy: gradients, masks, and a few-step run end to end."""
import json

import pytest
import torch

from nanotune.reproduce import teacher_student as ts


def small_problem(seed=0, S=3, n=6, d=2, N=50):
    gen = torch.Generator().manual_seed(seed)
    Wt, at = ts.teacher_neurons(S, 2, d, gen)
    W, a = ts.student_init(S, n, d, gen)
    X = torch.randn(S, N, d, generator=gen, dtype=torch.float64)
    return W, a, X, ts.target(Wt, at, X)


def test_student_starts_as_zero_function_and_teacher_is_unit_norm():
    W, a, X, _ = small_problem()
    assert ts.forward(W, a, X)[0].abs().max() < 1e-12  # summation order leaves rounding only
    Wt, at = ts.teacher_neurons(4, 3, 2, torch.Generator().manual_seed(1))
    assert torch.allclose(Wt.norm(dim=-1), torch.ones(4, 3, dtype=torch.float64))
    assert set(at.unique().tolist()) <= {-1.0, 1.0}


def test_manual_gradients_match_autograd():
    W, a, X, y = small_problem()
    W = W + 0.3 * torch.randn_like(W)  # break the symmetry so all terms matter
    loss, gW, ga = ts.loss_and_grads(W, a, X, y)
    Wr, ar = W.clone().requires_grad_(), a.clone().requires_grad_()
    ref = 0.5 * ((ts.forward(Wr, ar, X)[0] - y) ** 2).mean(1)
    ref.sum().backward()
    assert torch.allclose(loss, ref.detach()) and torch.allclose(gW, Wr.grad) and torch.allclose(ga, ar.grad)


@pytest.mark.parametrize("criterion", ["small_weights", "large_grads"])
def test_masked_step_changes_only_selected_entries(criterion):
    W, a, X, y = small_problem(S=4, n=10)
    W = W + 0.1 * torch.randn(W.shape, generator=torch.Generator().manual_seed(5), dtype=W.dtype)
    _, gW, ga = ts.loss_and_grads(W, a, X, y)
    density = 0.2  # 4 of 20 W entries, 2 of 10 a entries per seed
    W1, a1, _ = ts.train(W, a, X, y, steps=1, lr=0.5, criterion=criterion, density=density)
    for before, after, grad, k in ((W, W1, gW, 4), (a, a1, ga, 2)):
        flat_b, flat_a, flat_g = before.reshape(4, -1), after.reshape(4, -1), grad.reshape(4, -1)
        score = -flat_b.abs() if criterion == "small_weights" else flat_g.abs()
        expected = torch.zeros_like(flat_b, dtype=torch.bool).scatter_(1, score.topk(k, 1).indices, True)
        mask = ts.select_mask(before, grad, criterion, density).reshape(4, -1)
        assert torch.equal(mask, expected) and (mask.sum(1) == k).all()
        # Outside the mask: bit-identical. Inside: exactly one GD step.
        assert torch.equal(flat_a[~mask], flat_b[~mask])
        assert torch.allclose(flat_a[mask], (flat_b - 0.5 * flat_g)[mask])
        assert (flat_a[mask] != flat_b[mask]).any()


def test_select_mask_rejects_unknown_criterion():
    with pytest.raises(ValueError, match="criterion must be"):
        ts.select_mask(torch.zeros(1, 3), torch.zeros(1, 3), "random", 0.5)


def test_few_step_run_writes_report(tmp_path):
    cfg = ts.ToyConfig(seeds=2, n_train=64, n_test=128, pretrain_steps=30, finetune_steps=20, log_every=10,
                       extra_neurons=(1,), densities=(0.1,), mask_intervals=(1, 0))
    result = ts.run(cfg, progress=lambda *_: None)
    runs = result["runs"]
    assert [(r["criterion"], r["density"], r["mask_interval"]) for r in runs] == [
        ("dense", 1.0, 1), ("small_weights", 0.1, 1), ("large_grads", 0.1, 1),
        ("small_weights", 0.1, 0), ("large_grads", 0.1, 0)]
    for r in runs:
        assert len(r["test_loss"]) == len(r["l2_shift"]) == 2 and len(r["curve_median"]) == 3
        assert all(v > 0 for v in r["l2_shift"])
    json.dumps(result)  # the report's JSON must serialise
    md = ts.markdown(result)
    assert "| 1 | small_weights | 10% | every 1 |" in md and "| 1 | large_grads | 10% | static |" in md
    assert "0.0094" in md and "| 1 | 10% | static |" in md
    assert ts.main(["--out", str(tmp_path), "--seeds", "2", "--pretrain-steps", "5", "--finetune-steps", "5",
                    "--mask-intervals", "3"]) == 0
    assert (tmp_path / "teacher_student.md").read_text().startswith("# Teacher-student toy")


def test_static_mask_never_moves_other_entries():
    W, a, X, y = small_problem(S=2, n=10)
    _, gW, ga = ts.loss_and_grads(W, a, X, y)
    mask = ts.select_mask(W, gW, "large_grads", 0.2)
    W1, _, _ = ts.train(W, a, X, y, steps=5, lr=0.5, criterion="large_grads", density=0.2, mask_interval=0)
    assert torch.equal(W1[~mask], W[~mask]) and not torch.equal(W1[mask], W[mask])
