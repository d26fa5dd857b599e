"""NanoAdam's bias correction, per entry (Note [bias correction] in optim.py)."""

import copy
import io
import math

import numpy as np
import pytest
import torch

from nanotune.optim import NanoAdam, _age_cap, _step_scalars, nanoadam_param_groups

from test_optim import batches, sparse_params, tiny_llama, train

B1, B2, EPS = 0.9, 0.999, 1e-8


def trajectory(opt, model, data):
    """Runs one step per batch; per step and sparse tensor: (refreshed, mask, grad at mask, fp64 update)."""
    out = []
    for x in data:
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        before = {n: p.detach().double().reshape(-1).clone() for n, p in sparse_params(opt)}
        grads = {n: p.grad.double().reshape(-1).clone() for n, p in sparse_params(opt)}
        opt.step()
        rows = {}
        for n, p in sparse_params(opt):
            idx = opt.masks()[n].long()
            rows[n] = (idx.numpy(), grads[n][idx].numpy(), (p.detach().double().reshape(-1) - before[n])[idx].numpy())
        out.append((opt.last_step_refreshed, rows))
    return out


def reference_updates(traj, lr, policy):
    """Independent per-entry Adam in fp64: each entry's moments and count start at zero when it
    enters the mask ("carry") or at every refresh ("reset"). Yields (t, name, update, age, entered)."""
    kept = {}
    for t, (refreshed, rows) in enumerate(traj):
        for n, (idx, g, _) in rows.items():
            if n not in kept or (refreshed and policy == "reset"):
                m, v, a = np.zeros(idx.size), np.zeros(idx.size), np.zeros(idx.size, dtype=np.int64)
                entered = np.ones(idx.size, dtype=bool)
            else:
                old_idx, om, ov, oa = kept[n]
                entered = ~np.isin(idx, old_idx)
                pos = np.searchsorted(old_idx, idx).clip(max=old_idx.size - 1)
                m, v, a = (np.where(entered, 0, x[pos]) for x in (om, ov, oa))
            a = a + 1
            m = B1 * m + (1 - B1) * g
            v = B2 * v + (1 - B2) * g * g
            update = -lr * (m / (1 - B1**a)) / (np.sqrt(v / (1 - B2**a)) + EPS)
            kept[n] = (idx, m, v, a)
            yield t, n, update, a, entered


# ---------------------------------------------------------------- density 1 is torch Adam


@pytest.mark.parametrize("foreach, sparse_gradients", [(False, False), (True, False), (False, True)])
def test_density_one_with_refreshes_equals_torch_adam(foreach, sparse_gradients):
    m1 = tiny_llama()
    m2 = copy.deepcopy(m1)
    o1 = NanoAdam(nanoadam_param_groups(m1), lr=1e-3, density=1.0, bias_correction=True, mask_interval=10,
                  foreach=foreach, sparse_gradients=sparse_gradients)
    o2 = torch.optim.Adam(m2.parameters(), lr=1e-3, foreach=foreach)
    refreshes = []
    for t, x in enumerate(batches(50)):
        train(m1, o1, [x])
        refreshes += [t] if o1.last_step_refreshed else []
        train(m2, o2, [x])
    assert refreshes == [0, 10, 20, 30, 40]
    assert any(st["age"].max() > 0 for st in o1.state.values() if "age" in st)  # ages carried over refreshes
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        rel = ((a - b).abs().max() / b.abs().max()).item()
        assert rel <= 1e-6, f"{name}: relative difference {rel}"
        if not foreach and not sparse_gradients:  # the reference path follows torch's op order: same bits
            assert torch.equal(a, b), name


# ---------------------------------------------------------------- newly selected entries


@pytest.mark.parametrize("policy", ["carry", "reset"])
@pytest.mark.parametrize("foreach", [False, True])
def test_first_update_of_a_newly_selected_entry_is_at_most_lr(policy, foreach):
    lr = 1e-2
    model = tiny_llama()
    opt = NanoAdam(nanoadam_param_groups(model), lr=lr, density=0.1, mask_interval=3, bias_correction=True,
                   moments_on_refresh=policy, foreach=foreach)
    traj = trajectory(opt, model, batches(12))
    entrants_at = {}
    for t, n, _, age, _ in reference_updates(traj, lr, policy):
        _, g, got = traj[t][1][n]
        first = age == 1  # the entry's moments start from zero at this step
        entrants_at[t] = entrants_at.get(t, 0) + int(first.sum())
        assert (np.abs(got[first]) <= lr * (1 + 1e-6)).all(), f"{n} at step {t}: {np.abs(got[first]).max() / lr} lr"
        # And not less: lr * |g| / (|g| + eps), so the count really is the entry's (1), not the tensor's.
        big = first & (np.abs(g) > 1e-4)
        assert (np.abs(got[big]) >= lr * (1 - 2e-4)).all(), f"{n} at step {t}: {np.abs(got[big]).min() / lr} lr"
    assert all(entrants_at[t] > 0 for t in (0, 3, 6, 9))  # entries also enter at later refreshes
    assert all(entrants_at[t] == 0 for t in (1, 2, 4, 5))


@pytest.mark.parametrize("policy", ["carry", "reset"])
def test_every_update_matches_per_entry_adam_reference(policy):
    lr = 1e-2
    model = tiny_llama()
    opt = NanoAdam(nanoadam_param_groups(model), lr=lr, density=0.1, mask_interval=3, bias_correction=True,
                   moments_on_refresh=policy)
    traj = trajectory(opt, model, batches(10))
    ages_seen = set()
    for t, n, want, age, _ in reference_updates(traj, lr, policy):
        got = traj[t][1][n][2]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-8, err_msg=f"{n} at step {t}")
        ages_seen |= set(np.unique(age).tolist())
    assert max(ages_seen) == 10 if policy == "carry" else max(ages_seen) == 3
    # The stored ages are the reference's: carry keeps them, reset stores none.
    state = opt.state[sparse_params(opt)[1][1]]
    assert ("age" in state) == (policy == "carry")


def test_uncorrected_switch_moves_a_new_entry_by_about_3x_lr():
    """bias_correction=False stays Algorithm 1 literally: (1 - beta1) / sqrt(1 - beta2) = 3.16x lr."""
    lr = 1e-2
    model = tiny_llama()
    opt = NanoAdam(nanoadam_param_groups(model), lr=lr, density=0.1, mask_interval=3, bias_correction=False)
    traj = trajectory(opt, model, batches(1))
    for n, (_, g, got) in traj[0][1].items():
        big = np.abs(g) > 1e-3
        np.testing.assert_allclose(np.abs(got[big]) / lr, (1 - B1) / math.sqrt(1 - B2), rtol=1e-3)
    assert all("age" not in st for st in opt.state.values())


def test_corrected_by_default_a_new_entry_moves_about_lr():
    """The default (Note [bias correction], chosen from the reproductions) is corrected per entry."""
    lr = 1e-2
    model = tiny_llama()
    opt = NanoAdam(nanoadam_param_groups(model), lr=lr, density=0.1, mask_interval=3)
    assert all(g["bias_correction"] for g in opt.param_groups)
    traj = trajectory(opt, model, batches(1))
    for n, (_, g, got) in traj[0][1].items():
        big = np.abs(g) > 1e-3
        np.testing.assert_allclose(np.abs(got[big]) / lr, 1.0, rtol=1e-3)


# ---------------------------------------------------------------- the dense group


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_dense_group_is_torch_adam_by_default(foreach, weight_decay):
    m1 = tiny_llama()
    m2 = copy.deepcopy(m1)
    groups = nanoadam_param_groups(m1)
    opt = NanoAdam(groups, lr=1e-2, density=0.05, mask_interval=3, weight_decay=weight_decay, foreach=foreach)
    dense1 = [p for g in groups if not g["sparse"] for p in g["params"]]
    ids = {id(p) for p in dense1}
    dense2 = [q for p, q in zip(m1.parameters(), m2.parameters()) if id(p) in ids]
    # NanoAdam's decay is decoupled: AdamW's; with weight_decay 0 AdamW is Adam.
    ref = torch.optim.AdamW(dense2, lr=1e-2, weight_decay=weight_decay, foreach=foreach)
    assert dense1 and all(g["bias_correction"] for g in opt.param_groups if not g["sparse"])
    for x in batches(20):
        opt.zero_grad()
        m1(input_ids=x, labels=x).loss.backward()
        for p, q in zip(dense1, dense2):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(dense1, dense2):
        assert torch.equal(p, q)  # same ops in the same order on the same inputs: same bits


def test_dense_bias_correction_false_keeps_the_uncorrected_dense_update():
    m1 = tiny_llama()
    groups = nanoadam_param_groups(m1)
    opt = NanoAdam(groups, lr=1e-2, density=0.05, dense_bias_correction=False)
    dense = [p for g in groups if not g["sparse"] for p in g["params"]]
    before = [p.detach().double().clone() for p in dense]
    x = batches(1)[0]
    m1(input_ids=x, labels=x).loss.backward()
    g = [p.grad.double().abs() for p in dense]
    opt.step()
    assert all(g["bias_correction"] is False for g in opt.param_groups if not g["sparse"])
    for p, b, g in zip(dense, before, g):
        # (1 - beta1) g / (sqrt(1 - beta2) |g| + eps): about 3.16 lr where |g| >> eps
        want = 1e-2 * (1 - B1) * g / (math.sqrt(1 - B2) * g + EPS)
        torch.testing.assert_close((p.detach().double() - b).abs(), want, rtol=1e-5, atol=1e-9)
        assert ((p.detach().double() - b).abs() > 3 * 1e-2).any()
    # A dense group that sets its own bias_correction keeps it.
    own = NanoAdam([{"params": dense, "sparse": False, "bias_correction": False}], dense_bias_correction=True)
    assert own.param_groups[0]["bias_correction"] is False


# ---------------------------------------------------------------- paths, checkpoints, memory


@pytest.mark.parametrize("policy", ["carry", "reset"])
@pytest.mark.parametrize("dtype, moments_dtype", [(torch.float32, None), (torch.bfloat16, torch.bfloat16)])
def test_foreach_single_tensor_and_sparse_gradient_paths_agree(policy, dtype, moments_dtype):
    models = [tiny_llama(dtype=dtype)]
    models += [copy.deepcopy(models[0]) for _ in range(2)]
    kw = dict(lr=1e-2, density=0.1, mask_interval=3, bias_correction=True, moments_on_refresh=policy,
              moments_dtype=moments_dtype)
    opts = [NanoAdam(nanoadam_param_groups(models[0]), foreach=False, **kw),
            NanoAdam(nanoadam_param_groups(models[1]), foreach=True, **kw),
            NanoAdam(nanoadam_param_groups(models[2]), foreach=False, sparse_gradients=True, **kw)]
    data = batches(8, bsz=4)
    losses = [train(m, o, data, micro=2) for m, o in zip(models, opts)]
    assert losses[0] == losses[1]
    for other in models[1:]:
        for a, b in zip(models[0].parameters(), other.parameters()):
            if dtype == torch.bfloat16:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    ages = [{n: o.state[p].get("age") for n, p in sparse_params(o)} for o in opts]
    for n, a in ages[0].items():
        assert (a is None) == (policy == "reset")
        assert all(a is None or torch.equal(a, other[n]) for other in ages[1:])


def test_ages_survive_state_dict_round_trip_bit_for_bit():
    opts = dict(lr=5e-3, density=0.1, mask_interval=7, bias_correction=True, moments_dtype=torch.bfloat16)
    data = batches(60)
    full = tiny_llama()
    first = copy.deepcopy(full)
    full_opt = NanoAdam(nanoadam_param_groups(full), **opts)
    full_losses = train(full, full_opt, data)

    first_opt = NanoAdam(nanoadam_param_groups(first), **opts)
    losses = train(first, first_opt, data[:45])
    ages = [st["age"] for st in first_opt.state.values() if "age" in st]
    assert ages and all(a.dtype == torch.int16 for a in ages)
    assert len({int(v) for a in ages for v in a.unique()}) > 2  # entries of different ages
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": first_opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed = tiny_llama(seed=123)
    resumed.load_state_dict(saved["model"])
    resumed_opt = NanoAdam(nanoadam_param_groups(resumed), **opts)
    resumed_opt.load_state_dict(saved["optim"])
    for (n, p), (_, q) in zip(sparse_params(first_opt), sparse_params(resumed_opt)):
        a, b = first_opt.state[p]["age"], resumed_opt.state[q]["age"]
        assert a.dtype == b.dtype == torch.int16 and torch.equal(a, b), n
    losses += train(resumed, resumed_opt, data[45:])
    assert losses == full_losses
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_files_keep_the_ages(tiny_dir, tmp_path):
    from nanotune.checkpoint import load_checkpoint, save_checkpoint
    from nanotune.models import load_model
    from nanotune.training import create_optimizer

    lm = load_model("tiny-llama", device="cpu")
    opt = create_optimizer(lm.model, "nanoadam", density=0.1, mask_interval=2, bias_correction=True)
    x = torch.randint(0, 100, (2, 12))
    for _ in range(5):
        opt.zero_grad()
        lm.model(input_ids=x, labels=x).loss.backward()
        opt.step()
    save_checkpoint(tmp_path / "ckpt", lm.model, lm.tokenizer, opt, None, step=5)
    lm2 = load_model(tmp_path / "ckpt" / "model", device="cpu")
    opt2 = create_optimizer(lm2.model, "nanoadam", density=0.1, mask_interval=2, bias_correction=True)
    load_checkpoint(tmp_path / "ckpt", optimizer=opt2)
    saved = [st["age"] for st in opt.state.values() if "age" in st]
    loaded = [st["age"] for st in opt2.state.values() if "age" in st]
    assert saved and len(saved) == len(loaded)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(saved, loaded))


def test_state_without_ages_counts_the_tensors_steps_until_the_next_refresh():
    """State saved before ages existed (or bias_correction switched on mid-run): the old count."""
    model = tiny_llama()
    opt = NanoAdam(nanoadam_param_groups(model), lr=1e-2, density=0.1, mask_interval=3, bias_correction=True)
    data = batches(7)
    train(model, opt, data[:5])  # refreshes at 0 and 3
    for st in opt.state.values():
        st.pop("age", None)
    train(model, opt, data[5:6])  # step 5 runs on the tensor's count
    train(model, opt, data[6:])  # step 6 refreshes: every survivor aged 6 (not 3, its steps since 3), entrants 0
    ages = [st["age"] for st in opt.state.values() if "age" in st]
    assert ages and {int(v) for a in ages for v in a.unique()} == {0, 6}


@pytest.mark.parametrize("policy, betas, extra", [
    ("carry", (0.9, 0.999), 2), ("carry", (0.9, 0.9995), 4), ("reset", (0.9, 0.999), 0)])
def test_state_bytes_count_the_ages(policy, betas, extra):
    def run(bias_correction):
        model = tiny_llama(hidden=64, inter=256, vocab=512)
        opt = NanoAdam(nanoadam_param_groups(model), lr=1e-3, density=0.1, betas=betas, mask_interval=2,
                       bias_correction=bias_correction, moments_on_refresh=policy)
        train(model, opt, batches(3, vocab=512))
        return opt

    on, off = run(True), run(False)
    k = sum(on.state[p]["idx"].numel() for _, p in sparse_params(on))
    assert on.state_bytes("sparse") - off.state_bytes("sparse") == extra * k
    assert on.state_bytes("dense") == off.state_bytes("dense")


# ---------------------------------------------------------------- the factors


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.999, 0.9), (0.75, 0.999), (0.0, 0.99)])
def test_per_entry_factors_equal_torch_adams_and_saturation_changes_no_bit(betas):
    b1, b2 = betas
    cap = _age_cap(b1, b2)
    ages = [1, 2, 3, 10, 100, cap - 1, cap, cap + 1, 2 * cap, 10**6]
    lrs = np.random.default_rng(0).uniform(1e-6, 1e-1, 300).tolist()
    for lr in lrs:
        s_vec, c_vec = _step_scalars(torch.tensor(ages), lr, b1, b2, True)
        for a, s, c in zip(ages, s_vec.tolist(), c_vec.tolist()):
            # torch.optim.Adam's per-step numbers, as its fp32 kernels use them.
            want_s = np.float32(lr / (1 - b1**a))
            want_c = np.float32((1 - b2**a) ** 0.5)
            assert (s, c) == (want_s, want_c), (lr, a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sparse_gradients", [False, True])
def test_cuda_fast_path_with_ages_matches_cpu_reference_path(sparse_gradients):
    cpu = tiny_llama()
    gpu = copy.deepcopy(cpu).cuda()
    kw = dict(lr=1e-2, density=0.1, mask_interval=3, bias_correction=True)
    o_cpu = NanoAdam(nanoadam_param_groups(cpu), foreach=False, **kw)
    o_gpu = NanoAdam(nanoadam_param_groups(gpu), sparse_gradients=sparse_gradients, **kw)  # foreach on CUDA
    data = batches(8)
    train(cpu, o_cpu, data)
    train(gpu, o_gpu, [x.cuda() for x in data])
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-4, atol=1e-5)
    for (n, p), (_, q) in zip(sparse_params(o_cpu), sparse_params(o_gpu)):
        assert torch.equal(o_cpu.state[p]["age"], o_gpu.state[q]["age"].cpu()), n


@pytest.mark.parametrize("foreach", [False, True])
def test_a_dense_group_of_matrices_is_torch_adam(foreach):
    # A 2-D dense tensor (an untied head): its moments keep the tensor's shape, the update runs flat.
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 5))
    q = torch.nn.Parameter(p.detach().clone())
    ours = NanoAdam([{"params": [p], "sparse": False}], lr=1e-2, foreach=foreach)
    ref = torch.optim.Adam([q], lr=1e-2, foreach=False)
    for _ in range(5):
        g = torch.randn(6, 5)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert ours.state[p]["exp_avg"].shape == (6, 5)
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=0)
