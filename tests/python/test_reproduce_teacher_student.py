"""The teacher-student toy: loss and gradients, masks, NanoAdam runs, NaN counts, the report."""
import json
import math

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


@pytest.mark.parametrize("loss, c", [("mse", 1.0), ("half_mse", 0.5)])
def test_manual_gradients_match_autograd(loss, c):
    W, a, X, y = small_problem()
    W = W + 0.3 * torch.randn_like(W)  # break the symmetry so all terms matter
    value, gW, ga = ts.loss_and_grads(W, a, X, y, loss)
    Wr, ar = W.clone().requires_grad_(), a.clone().requires_grad_()
    # The paper's "MSE": torch's MSELoss (mean, no 1/2), per seed.
    ref = torch.stack([c * torch.nn.functional.mse_loss(ts.forward(Wr, ar, X)[0][s], y[s]) for s in range(3)])
    ref.sum().backward()
    assert torch.allclose(value, ref.detach()) and torch.allclose(gW, Wr.grad) and torch.allclose(ga, ar.grad)
    assert torch.allclose(ts.test_loss(W, a, X, y, loss), ref.detach())


@pytest.mark.parametrize("criterion", ["small_weights", "large_weights", "random", "large_grads"])
def test_masked_step_changes_only_selected_entries(criterion):
    W, a, X, y = small_problem(S=4, n=10)
    W = W + 0.1 * torch.randn(W.shape, generator=torch.Generator().manual_seed(5), dtype=W.dtype)
    _, gW, ga = ts.loss_and_grads(W, a, X, y)
    density = 0.2  # 4 of 20 W entries, 2 of 10 a entries per seed
    W1, a1, _ = ts.train(W, a, X, y, steps=1, lr=0.5, criterion=criterion, density=density,
                         generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)  # the same draws as train's: W first, then a
    for before, after, grad, k in ((W, W1, gW, 4), (a, a1, ga, 2)):
        flat_b, flat_a, flat_g = before.reshape(4, -1), after.reshape(4, -1), grad.reshape(4, -1)
        mask = ts.select_mask(before, grad, criterion, density, gen).reshape(4, -1)
        assert (mask.sum(1) == k).all()  # per seed, per layer
        if criterion != "random":
            score = {"small_weights": -flat_b.abs(), "large_weights": flat_b.abs(),
                     "large_grads": flat_g.abs()}[criterion]
            expected = torch.zeros_like(flat_b, dtype=torch.bool).scatter_(1, score.topk(k, 1).indices, True)
            assert torch.equal(mask, expected)
        # Outside the mask: bit-identical. Inside: exactly one GD step.
        assert torch.equal(flat_a[~mask], flat_b[~mask])
        assert torch.allclose(flat_a[mask], (flat_b - 0.5 * flat_g)[mask])
        assert (flat_a[mask] != flat_b[mask]).any()


def test_select_mask_rejects_unknown_criterion():
    with pytest.raises(ValueError, match="criterion must be"):
        ts.select_mask(torch.zeros(1, 3), torch.zeros(1, 3), "smallest", 0.5)


def test_static_mask_never_moves_other_entries():
    W, a, X, y = small_problem(S=2, n=10)
    _, gW, ga = ts.loss_and_grads(W, a, X, y)
    mask = ts.select_mask(W, gW, "large_grads", 0.2)
    W1, _, _ = ts.train(W, a, X, y, steps=5, lr=0.5, criterion="large_grads", density=0.2, mask_interval=0)
    assert torch.equal(W1[~mask], W[~mask]) and not torch.equal(W1[mask], W[mask])


def test_nanoadam_rows_run_nanoadam_on_the_same_entries_as_masked_gd():
    W, a, X, y = small_problem(S=3, n=20)
    W = W + 0.1 * torch.randn(W.shape, generator=torch.Generator().manual_seed(2), dtype=W.dtype)
    W1, a1, info = ts.nanoadam_train(W, a, X, y, steps=7, lr=1e-2, criterion="small_weights", density=0.1,
                                     mask_interval=100)
    opt = info["optimizer"]
    from nanotune.optim import NanoAdam

    assert isinstance(opt, NanoAdam)
    states = [opt.state[p] for g in opt.param_groups for p in g["params"]]
    assert [s["exp_avg"].numel() for s in states] == [3 * 4, 3 * 2]  # moments for k entries per seed only
    assert all(int(s["step"]) == 7 for s in states)
    # m = 100 > 7 steps: exactly the k smallest |w| of each seed's layer moved, as masked GD's.
    G1, b1, _ = ts.train(W, a, X, y, steps=7, lr=0.1, criterion="small_weights", density=0.1, mask_interval=100)
    for before, nano, gd, k in ((W, W1, G1, 4), (a, a1, b1, 2)):
        moved = (nano != before).reshape(3, -1)
        assert (moved.sum(1) == k).all()
        expected = ts.select_mask(before, None, "small_weights", 0.1).reshape(3, -1)
        assert torch.equal(moved, expected) and torch.equal((gd != before).reshape(3, -1), expected)

@pytest.mark.parametrize("bias_correction, factor", [(True, 1.0), (False, 0.1 / math.sqrt(0.001))])
def test_nanoadam_first_step_is_adams(bias_correction, factor):
    # Adam's first step moves every selected entry by lr (bias-corrected) or 3.16 lr
    # (Algorithm 1 as written), whatever the gradient's scale: GD would not.
    W, a, X, y = small_problem(S=3, n=20)
    W1, a1, _ = ts.nanoadam_train(W, a, X, y, steps=1, lr=1e-2, criterion="large_grads", density=0.1,
                                  bias_correction=bias_correction)
    for before, after in ((W, W1), (a, a1)):
        delta = (after - before)[after != before].abs()
        assert delta.numel() == 3 * (4 if before.dim() == 3 else 2)
        assert torch.allclose(delta, torch.full_like(delta, 1e-2 * factor), rtol=1e-4)


def test_dense_nanoadam_with_bias_correction_is_torch_adam():
    W, a, X, y = small_problem(S=2, n=6)
    W1, a1, _ = ts.nanoadam_train(W, a, X, y, steps=5, lr=1e-2, criterion="dense", bias_correction=True)
    Wr, ar = W.clone().requires_grad_(), a.clone().requires_grad_()
    opt = torch.optim.Adam([Wr, ar], lr=1e-2, foreach=False)
    for _ in range(5):
        _, gW, ga = ts.loss_and_grads(Wr.detach(), ar.detach(), X, y)
        Wr.grad, ar.grad = gW, ga
        opt.step()
    # NanoAdam does its math in fp32, so equal up to fp32 rounding of float64 weights.
    assert torch.allclose(W1, Wr.detach(), atol=1e-6) and torch.allclose(a1, ar.detach(), atol=1e-6)
    assert not torch.allclose(W1, W, atol=1e-4)


def test_divergence_is_counted_per_seed():
    W, a, X, y = small_problem(S=3, n=6)
    nan_step, final = ts.divergence(W, a, X, y, steps=200, lr=50.0)
    assert (nan_step >= 0).all() and torch.isnan(final).all()
    nan_step, final = ts.divergence(W, a, X, y, steps=200, lr=0.1)
    assert (nan_step < 0).all() and torch.isfinite(final).all()
    _, _, info = ts.train(W, a, X, y, steps=200, lr=50.0)
    assert (info["nan_step"] >= 0).all()
    # A diverged seed is None in every measure, and left out of the means.
    W1, a1, info = ts.train(W, a, X, y, steps=3, lr=0.1)
    info["nan_step"][1] = 2
    m = ts._measure(W1, a1, W, a, info["nan_step"], None)
    assert m["nan"] == [False, True, False] and m["l2_raw"][1] is None and m["l2_ms"][1] is None
    assert ts._mean([1.0, None, 3.0]) == 2.0 and ts._median([None, 5.0]) == 5.0


def test_quick_run_has_every_row_nan_counts_and_both_l2(tmp_path):
    assert ts.main(["--out", str(tmp_path), "--quick"]) == 0
    result = json.loads((tmp_path / "teacher_student.json").read_text())
    cfg, runs = result["config"], result["runs"]
    S, n_params = cfg["seeds"], result["n_params"]
    assert n_params == 60
    rows = [(r["optimizer"], r["bias_correction"], r["rule"], r["mask_interval"]) for r in runs]
    expected = [("masked_gd", None, "dense", None)] + [
        ("masked_gd", None, rule, m) for m in (1, 100) for rule in ts.MASKED_RULES]
    for bc in (False, True):
        expected += [("nanoadam", bc, "dense", None)] + [
            ("nanoadam", bc, rule, m) for m in (1, 100) for rule in ts.MASKED_RULES]
    assert rows == expected
    for r in runs:
        assert len(r["nan"]) == len(r["test_loss"]) == len(r["l2_raw"]) == len(r["l2_ms"]) == S
        assert r["lr"] == (cfg["gd_lr"] if r["optimizer"] == "masked_gd" else cfg["adam_lr"])
        for raw, ms, bad in zip(r["l2_raw"], r["l2_ms"], r["nan"]):
            if not bad:
                assert raw > 0 and ms == pytest.approx(raw ** 2 / n_params, rel=1e-9)
        if r["rule"] == "dense":
            assert r["moved"] == [60] * S
        elif r["mask_interval"] == 100:  # 20 steps < m: one mask, k = 4 of W + 2 of a
            assert r["moved"] == [6] * S
        else:
            assert all(v >= 6 for v in r["moved"])
    assert result["paper_pretrain"]["lr"] == 2.0 and len(result["paper_pretrain"]["nan_step"]) == S
    md = (tmp_path / "teacher_student.md").read_text()
    assert md.startswith("# Teacher-student toy")
    for label in ("masked GD", "NanoAdam, bias correction off", "NanoAdam, bias correction on"):
        for rule in ts.RULES:
            assert f"| 1 | {label} | {'—' if rule == 'dense' else 100} | {rule} |" in md
    assert "| 0.0094 | 0.027 |" in md and "| 0.017 | 0.057 |" in md
    assert "## Where we still disagree with the paper" in md and "Pretraining at the paper's lr 2.0" in md


def test_cli_switches(tmp_path):
    assert ts.main(["--out", str(tmp_path), "--quick", "--bias-correction", "on", "--mask-intervals", "3",
                    "--optimizers", "nanoadam", "--loss", "half_mse", "--paper-pretrain-lr", "0"]) == 0
    result = json.loads((tmp_path / "teacher_student.json").read_text())
    assert {(r["optimizer"], r["bias_correction"], r["mask_interval"]) for r in result["runs"]} == {
        ("nanoadam", True, None), ("nanoadam", True, 3)}
    assert result["config"]["loss"] == "half_mse" and result["paper_pretrain"] is None


def _fake_result(small, large, random_=(0.5, 0.5)):
    """A two-seed result with one masked setting; small/large/random: (loss, l2_raw) for every seed."""
    def run(rule, loss, l2, nan=(False, False)):
        return {"extra": 1, "optimizer": "masked_gd", "rule": rule, "mask_interval": 1, "bias_correction": None,
                "lr": 1.0, "density": 0.1, "nan": list(nan),
                "test_loss": [None if b else loss for b in nan], "l2_raw": [None if b else l2 for b in nan],
                "l2_ms": [None if b else l2 ** 2 / 60 for b in nan], "moved": [6, 6],
                "moved_max_abs": [0.1, 0.1], "curve_median": []}
    runs = [run("small_weights", *small), run("large_grads", *large), run("random", *random_),
            run("large_weights", 0.9, 0.9, nan=(True, False))]
    cfg = {"seeds": 2, "loss": "mse", "pretrain_lr": 0.5, "extra_neurons": [1], "student_neurons": 20,
           "teacher_neurons": 2, "input_dim": 2, "n_train": 8, "n_test": 8, "dtype": "float32",
           "pretrain_steps": 1, "paper_pretrain_lr": 2.0, "finetune_steps": 1, "gd_lr": 1.0, "adam_lr": 0.01,
           "bias_corrections": [False], "density": 0.1, "optimizers": ["masked_gd"]}
    return {"config": cfg, "runs": runs, "paper_pretrain": {"lr": 2.0, "nan_step": [6, -1], "final_train_loss": []},
            "pretrain_nan": 0, "pretrain_test_loss": [1e-7, 1e-7], "finetune_start_test_loss": {"1": [0.2, 0.3]},
            "n_params": 60}


def test_disagreement_paragraph_follows_the_numbers():
    md = ts.markdown(_fake_result(small=(0.01, 0.02), large=(0.02, 0.05)))
    assert "holds in 1 of 1 settings" in md and "lowest mean test loss **small_weights**" in md
    assert "diverged in 1/2 seeds" in md and "NaN: large_weights 1" in md and "largest moved |θ| 0.10" in md
    assert "masked GD 1/8" in md  # NaN summary: runs x seeds
    md = ts.markdown(_fake_result(small=(0.03, 0.02), large=(0.02, 0.05)))
    assert "holds in none of our 1 settings" in md and "lowest mean test loss **large_grads**" in md
    assert "small NOT lower, 0/2 seeds" in md
    v = ts.verdicts(_fake_result(small=(0.01, 0.09), large=(0.02, 0.05)))[0]
    assert v["vs_large_grads"]["test_loss"]["small_lower"] and not v["vs_large_grads"]["l2_raw"]["small_lower"]
    assert v["nan"]["large_weights"] == 1 and v["ranking"][-1] == "large_weights"
    assert math.isclose(v["vs_large_grads"]["l2_ms"]["small"], 0.09 ** 2 / 60)
