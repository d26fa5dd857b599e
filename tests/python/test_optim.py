"""NanoAdam against the paper's Algorithm 1 (issue 2) and the sparse-gradient mode (issue 6)."""

import copy
import io
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nanotune.optim import NanoAdam, nanoadam_param_groups, select_mask, selected_count

VOCAB = 128


def tiny_llama(seed=0, hidden=32, inter=64, vocab=VOCAB, layers=2, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(dtype)


def batches(n, seed=1, bsz=2, seq=16, vocab=VOCAB, distinct=4):
    """n batches cycling over `distinct` random ones, so a model can learn them."""
    g = torch.Generator().manual_seed(seed)
    pool = [torch.randint(0, vocab, (bsz, seq), generator=g) for _ in range(distinct)]
    return [pool[i % distinct] for i in range(n)]


def train(model, opt, data, micro=1):
    """One optimizer step per element of data; each element split into `micro` micro-batches."""
    losses = []
    for x in data:
        opt.zero_grad()
        total = 0.0
        for part in x.chunk(micro):
            loss = model(input_ids=part, labels=part).loss / micro
            loss.backward()
            total += loss.item()
        opt.step()
        losses.append(total)
    return losses


def sparse_params(opt):
    return [(n.split("=")[0], p) for g in opt.param_groups if g["sparse"]
            for n, p in zip(g["names"], g["params"])]


def reference_bottom_k(w, density, chunk):
    """Independent reference: numpy stable argsort of |w| per chunk (ties: lower index first)."""
    flat = w.detach().float().abs().reshape(-1).numpy()
    out = []
    for start in range(0, flat.size, chunk):
        part = flat[start:start + chunk]
        k = min(part.size, max(1, math.floor(density * part.size + 0.5)))
        out.extend(sorted(start + np.argsort(part, kind="stable")[:k]))
    return np.array(out, dtype=np.int64)


# ---------------------------------------------------------------- acceptance 2


def test_full_density_with_bias_correction_matches_torch_adam():
    m1 = tiny_llama()
    m2 = copy.deepcopy(m1)
    o1 = NanoAdam(nanoadam_param_groups(m1), lr=1e-3, density=1.0, bias_correction=True)
    o2 = torch.optim.Adam(m2.parameters(), lr=1e-3)
    data = batches(50)
    l1 = train(m1, o1, data)
    train(m2, o2, data)
    assert l1[-1] < l1[0]
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        rel = ((a - b).abs().max() / b.abs().max()).item()
        assert rel <= 1e-6, f"{name}: relative difference {rel}"


# ---------------------------------------------------------------- acceptance 3


def test_only_masked_entries_change_and_masks_are_bottom_k_on_schedule():
    model = tiny_llama()
    chunk = 256  # small chunks so every tensor has several, plus a tail
    opt = NanoAdam(nanoadam_param_groups(model), lr=1e-2, density=0.1, mask_interval=4,
                   chunk_size=chunk)
    refresh_steps = []
    weights_at_refresh = {}
    for t, x in enumerate(batches(13)):
        before = {n: p.detach().clone() for n, p in sparse_params(opt)}
        old_masks = {n: m.clone() for n, m in opt.masks().items()}
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        masks = opt.masks()
        if opt.last_step_refreshed:
            refresh_steps.append(t)
            weights_at_refresh = before
        else:
            for n in masks:
                assert torch.equal(masks[n], old_masks[n]), f"{n} mask changed off schedule at {t}"
        for n, p in sparse_params(opt):
            changed = (p.detach() != before[n]).reshape(-1).nonzero().reshape(-1)
            assert set(changed.tolist()) <= set(masks[n].tolist()), f"{n}: update outside the mask"
            assert changed.numel() > 0.5 * masks[n].numel()  # the mask really trains
            expected = reference_bottom_k(weights_at_refresh[n], 0.1, chunk)
            assert np.array_equal(masks[n].numpy(), expected), f"{n}: mask is not bottom-k at step {t}"
    assert refresh_steps == [0, 4, 8, 12]


def test_dense_group_is_plain_adam_and_sparse_group_is_masked():
    model = tiny_llama()
    groups = nanoadam_param_groups(model)
    dense_names = [n for g in groups if not g["sparse"] for n in g["names"]]
    assert dense_names and all("norm" in n for n in dense_names)
    opt = NanoAdam(groups, lr=1e-2, density=0.05)
    norms_before = [p.detach().clone() for g in groups if not g["sparse"] for p in g["params"]]
    train(model, opt, batches(1))
    norms_after = [p for g in groups if not g["sparse"] for p in g["params"]]
    for a, b in zip(norms_before, norms_after):
        assert (a != b).all()  # dense Adam moves every entry of a norm weight


def test_ties_are_broken_by_lower_index():
    w = torch.tensor([3.0, 1.0, -1.0, 1.0, 2.0, 1.0, -3.0, 0.5])
    assert select_mask(w, 0.375, "small_weights").tolist() == [1, 2, 7]
    assert select_mask(w, 0.25, "large_weights").tolist() == [0, 6]
    w16 = torch.ones(1000, dtype=torch.bfloat16)
    assert select_mask(w16, 0.01, "small_weights").tolist() == list(range(10))


def test_criteria_select_what_they_say():
    torch.manual_seed(0)
    w = torch.randn(4096)
    grad = torch.randn(4096)
    k = 41
    small = select_mask(w, 0.01, "small_weights")
    large = select_mask(w, 0.01, "large_weights")
    by_grad = select_mask(w, 0.01, "large_grads", grad=grad)
    assert set(small.tolist()) == set(w.abs().argsort()[:k].tolist())
    assert set(large.tolist()) == set(w.abs().argsort(descending=True)[:k].tolist())
    assert set(by_grad.tolist()) == set(grad.abs().argsort(descending=True)[:k].tolist())
    g1 = torch.Generator().manual_seed(1)
    r1 = select_mask(w, 0.01, "random", generator=g1)
    r2 = select_mask(w, 0.01, "random", generator=torch.Generator().manual_seed(1))
    assert torch.equal(r1, r2) and r1.numel() == k and not torch.equal(r1, small)
    with pytest.raises(ValueError, match="large_grads"):
        select_mask(w, 0.01, "large_grads")


# ---------------------------------------------------------------- acceptance 4


def test_linear_density_decay_every_d_steps():
    model = tiny_llama()
    opt = NanoAdam(nanoadam_param_groups(model), lr=1e-3, density=0.1, final_density=0.04,
                   density_interval=5, total_steps=20, mask_interval=1000)
    name, p = sparse_params(opt)[1]
    seen = []
    for t, x in enumerate(batches(25)):
        train(model, opt, [x])
        expected = 0.1 + (0.04 - 0.1) * min(1.0, (t // 5) * 5 / 20)
        assert opt.current_density == pytest.approx(expected)
        assert opt.masks()[name].numel() == selected_count(p.numel(), expected)
        seen.append((t, opt.last_step_refreshed))
    # mask_interval is huge: refreshes come only from density changes (and t = 0)
    assert [t for t, r in seen if r] == [0, 5, 10, 15, 20]
    assert opt.current_density == pytest.approx(0.04)


# ---------------------------------------------------------------- acceptance 5


@pytest.mark.parametrize("criterion", ["small_weights", "random"])
def test_stop_save_load_resume_is_bit_for_bit(criterion):
    opts = dict(lr=5e-3, density=0.1, mask_interval=7, density_interval=10, final_density=0.05,
                total_steps=100, criterion=criterion, moments_dtype=torch.bfloat16)
    data = batches(100)
    full = tiny_llama()
    fresh_copy = copy.deepcopy(full)
    full_opt = NanoAdam(nanoadam_param_groups(full), **opts)
    full_losses = train(full, full_opt, data)

    first = fresh_copy
    first_opt = NanoAdam(nanoadam_param_groups(first), **opts)
    losses = train(first, first_opt, data[:50])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": first_opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed = tiny_llama(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    resumed_opt = NanoAdam(nanoadam_param_groups(resumed), **opts)
    resumed_opt.load_state_dict(saved["optim"])
    some_state = next(iter(resumed_opt.state.values()))
    assert some_state["exp_avg"].dtype == torch.bfloat16  # load keeps state dtypes
    losses += train(resumed, resumed_opt, data[50:])
    assert losses == full_losses
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for n, m in full_opt.masks().items():
        assert torch.equal(m, resumed_opt.masks()[n])


# ---------------------------------------------------------------- acceptance 6


@pytest.mark.parametrize("density", [0.01, 0.1])
@pytest.mark.parametrize("moments_dtype, index_dtype", [
    (None, torch.int16), (None, torch.int32), (torch.bfloat16, torch.int16)])
def test_state_bytes_match_stored_entries(density, moments_dtype, index_dtype):
    model = tiny_llama(hidden=128, inter=512, vocab=1024)
    opt = NanoAdam(nanoadam_param_groups(model), lr=1e-3, density=density,
                   moments_dtype=moments_dtype, index_dtype=index_dtype)
    train(model, opt, batches(1, vocab=1024))
    moment = 2 if moments_dtype == torch.bfloat16 else 4
    index = 2 if index_dtype == torch.int16 else 4
    age = 2  # bias_correction (the default) with carried moments: an int16 age per entry
    need = sum(density * p.numel() * (2 * moment + index + age) for _, p in sparse_params(opt))
    assert abs(opt.state_bytes("sparse") - need) / need < 0.05
    dense = sum(2 * moment * p.numel() for g in opt.param_groups if not g["sparse"] for p in g["params"])
    assert opt.state_bytes("dense") == pytest.approx(dense, rel=0.05)
    assert opt.state_bytes() == opt.state_bytes("sparse") + opt.state_bytes("dense")


def test_int16_and_int32_masks_train_identically():
    m1 = tiny_llama()
    m2 = copy.deepcopy(m1)
    kw = dict(lr=1e-2, density=0.1, mask_interval=3, chunk_size=300)
    o1 = NanoAdam(nanoadam_param_groups(m1), index_dtype=torch.int16, **kw)
    o2 = NanoAdam(nanoadam_param_groups(m2), index_dtype=torch.int32, **kw)
    data = batches(7)
    assert train(m1, o1, data) == train(m2, o2, data)
    assert next(iter(o1.state.values()))["idx"].dtype == torch.int16
    for n, m in o1.masks().items():
        assert torch.equal(m, o2.masks()[n])
    with pytest.raises(ValueError, match="chunk_size"):
        NanoAdam(m1.parameters(), chunk_size=2**16)


# ---------------------------------------------------------------- acceptance 8


@pytest.mark.parametrize("kwargs, name", [
    (dict(density=0.0), "density"),
    (dict(density=1.5), "density"),
    (dict(criterion="biggest"), "criterion"),
    (dict(lr=-1e-3), "lr"),
    (dict(moments_on_refresh="keep"), "moments_on_refresh"),
    (dict(mask_interval=0), "mask_interval"),
    (dict(density_interval=10), "final_density"),
    (dict(density_interval=10, final_density=0.01), "total_steps"),
    (dict(final_density=2.0), "final_density"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=rf"Invalid {name}\b"):
        NanoAdam(tiny_llama().parameters(), **kwargs)


# ---------------------------------------------------------------- Note [moments on mask refresh]


@pytest.mark.parametrize("policy", ["carry", "reset"])
def test_moments_on_refresh(policy):
    model = tiny_llama()
    opt = NanoAdam(nanoadam_param_groups(model), lr=5e-2, density=0.2, mask_interval=3,
                   moments_on_refresh=policy)
    train(model, opt, batches(3))  # steps 0..2 on the first mask
    name, p = sparse_params(opt)[1]
    old = {k: opt.state[p][k].clone() for k in ("idx", "exp_avg", "exp_avg_sq")}
    opt.refresh_mask()
    new = opt.state[p]
    stays = np.isin(new["idx"].numpy(), old["idx"].numpy())
    assert 0 < stays.sum() < stays.size  # the refresh kept some indices and changed others
    pos = np.searchsorted(old["idx"].numpy(), new["idx"].numpy()[stays])
    for key in ("exp_avg", "exp_avg_sq"):
        assert (new[key][torch.from_numpy(~stays)] == 0).all()
        kept = new[key][torch.from_numpy(stays)]
        if policy == "carry":
            assert torch.equal(kept, old[key][torch.from_numpy(pos)])
            assert (kept != 0).any()
        else:
            assert (kept == 0).all()


# ---------------------------------------------------------------- Note [tied tensors]


def test_tied_tensor_appears_once_and_rule_is_switchable():
    model = tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for tied, sparse in (("sparse", True), ("dense", False)):
        groups = nanoadam_param_groups(model, tied=tied)
        hits = [(g["sparse"], n) for g in groups for n, p in zip(g["names"], g["params"])
                if p is model.lm_head.weight]
        assert hits == [(sparse, "model.embed_tokens.weight=lm_head.weight")]
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    untied = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=4,
                                          num_key_value_heads=2, tie_word_embeddings=False))
    dense = [n for g in nanoadam_param_groups(untied) if not g["sparse"] for n in g["names"]]
    assert "lm_head.weight" in dense and "model.embed_tokens.weight" not in dense


def test_bf16_parameters_train_and_untouched_entries_stay_bit_identical():
    model = tiny_llama(dtype=torch.bfloat16)
    opt = NanoAdam(nanoadam_param_groups(model), lr=1e-2, density=0.1, mask_interval=2)
    for x in batches(3):
        before = {n: p.detach().clone() for n, p in sparse_params(opt)}
        train(model, opt, [x])
        for n, p in sparse_params(opt):
            assert p.dtype == torch.bfloat16
            outside = torch.ones(p.numel(), dtype=torch.bool)
            outside[opt.masks()[n].long()] = False
            assert torch.equal(p.detach().reshape(-1)[outside], before[n].reshape(-1)[outside])
            assert (p.detach() != before[n]).any()


def test_per_tensor_density_and_criterion_from_refresh_mask():
    model = tiny_llama()
    opt = NanoAdam(nanoadam_param_groups(model), lr=1e-3, density=0.1, mask_interval=None)
    train(model, opt, batches(1))
    opt.refresh_mask(density={r"mlp\.": 0.5}, criterion="large_weights")
    for n, p in sparse_params(opt):
        want = 0.5 if "mlp." in n else 0.1
        assert opt.masks()[n].numel() == selected_count(p.numel(), want)
        assert torch.equal(opt.masks()[n], select_mask(p, want, "large_weights"))
    assert all(g["criterion"] == "large_weights" for g in opt.param_groups if g["sparse"])
    with pytest.raises(ValueError, match="density"):
        opt.refresh_mask(density={"mlp": 1.5})
    with pytest.raises(ValueError, match="criterion"):
        opt.refresh_mask(criterion="huge")
    opt.zero_grad()
    with pytest.raises(ValueError, match="large_grads"):
        opt.refresh_mask(criterion="large_grads")


@pytest.mark.parametrize("bucket", [2**24, 3000])  # one launch, or many buckets
def test_foreach_fast_path_equals_reference_path(bucket, monkeypatch):
    monkeypatch.setattr("nanotune.optim._FOREACH_BUCKET", bucket)
    m1 = tiny_llama()
    m2 = copy.deepcopy(m1)
    kw = dict(lr=1e-2, density=0.1, mask_interval=3, bias_correction=True, weight_decay=0.1)
    o1 = NanoAdam(nanoadam_param_groups(m1), foreach=False, **kw)
    o2 = NanoAdam(nanoadam_param_groups(m2), foreach=True, **kw)
    data = batches(8)
    assert train(m1, o1, data) == train(m2, o2, data)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- issue 6: sparse gradients


@pytest.mark.parametrize("criterion, dtype", [
    ("small_weights", torch.float32), ("large_grads", torch.float32), ("small_weights", torch.bfloat16)])
def test_sparse_gradient_mode_equals_dense_path_with_accumulation(criterion, dtype):
    m1 = tiny_llama(dtype=dtype)
    m2 = copy.deepcopy(m1)
    kw = dict(lr=1e-2, density=0.1, mask_interval=3, criterion=criterion)
    dense = NanoAdam(nanoadam_param_groups(m1), **kw)
    sparse = NanoAdam(nanoadam_param_groups(m2), sparse_gradients=True, **kw)
    data = batches(7, bsz=4)
    seen_dense_grad = []
    for x in data:
        sparse.zero_grad()
        for part in x.chunk(2):
            (m2(input_ids=part, labels=part).loss / 2).backward()
        seen_dense_grad.append(any(p.grad is not None for _, p in sparse_params(sparse)))
        sparse.step()
    train(m1, dense, data, micro=2)
    for a, b in zip(m1.parameters(), m2.parameters()):
        if dtype == torch.bfloat16:  # accumulated in the gradient's dtype on both paths: exact
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for n, m in dense.masks().items():
        assert torch.equal(m, sparse.masks()[n])
    # Dense gradients of sparse tensors exist only on large_grads refresh steps (0, 3, 6).
    expected = [t % 3 == 0 for t in range(7)] if criterion == "large_grads" else [False] * 7
    assert seen_dense_grad == expected


def test_per_tensor_density_zero_freezes_a_tensor():
    model = tiny_llama()
    opt = NanoAdam(nanoadam_param_groups(model), lr=1e-2, density=0.1, mask_interval=None)
    train(model, opt, batches(1))
    opt.refresh_mask(density={r"self_attn": 0.0})
    frozen = {n: p.detach().clone() for n, p in sparse_params(opt) if "self_attn" in n}
    train(model, opt, batches(3))
    for n, p in sparse_params(opt):
        if n in frozen:
            assert torch.equal(p, frozen[n]) and opt.masks()[n].numel() == 0
    assert opt.state_bytes("sparse") > 0
