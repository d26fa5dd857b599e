"""NanoAdam's compiled CPU kernels (issue 15) against the torch-op reference paths, bit for bit:
the selection, the step, the refresh with its carry, whole runs; and the fallback when they
cannot be built."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nanotune import kernels
from nanotune.optim import NanoAdam, _runs, nano_adam, nanoadam_param_groups, select_mask

ROOT = Path(__file__).resolve().parents[2]

@pytest.fixture(scope="module", autouse=True)
def built():
    """Every test here compares the kernels with the reference: they must build (setup does)."""
    status = kernels.status()
    assert status["available"], f"the CPU kernels did not build: {status['reason']}"


# ---------------------------------------------------------------- selection


def cases(n: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    special = x.clone()
    special[:: max(1, n // 7)] = float("nan")
    special[1 :: max(1, n // 5)] = float("inf")
    special[2 :: max(1, n // 3)] = -0.0
    return {
        "normal": x.to(dtype),
        "quarters": ((x * 4).round() / 4).to(dtype),  # heavy ties, as in quantized weights
        "zeros": torch.zeros(n, dtype=dtype),  # every key tied
        "three values": torch.randint(-1, 2, (n,), generator=g).to(dtype),
        "nan inf -0": special.to(dtype),
        # a tensor whose chunks differ: the window one chunk suggests misses the next
        "scaled chunks": (x * torch.arange(n).div(4096, rounding_mode="floor").remainder(5).add(1).pow(3)).to(dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, chunk", [(7, 2**15), (5000, 2**15), (3 * 2**15 + 777, 2**15), (2**16 + 5, 4096),
                                      (1000, 64)])
def test_selection_equals_the_reference(dtype, n, chunk):
    for seed, (name, x) in enumerate(cases(n, dtype, seed=n).items()):
        for density in (1e-3, 0.01, 0.1, 0.5, 0.97, 1.0):
            for criterion in ("small_weights", "large_weights", "large_grads"):
                args = dict(grad=x, chunk_size=chunk) if criterion == "large_grads" else dict(chunk_size=chunk)
                w = torch.zeros_like(x) if criterion == "large_grads" else x
                ref = select_mask(w, density, criterion, fused=False, **args)
                got = select_mask(w, density, criterion, fused=True, **args)
                assert torch.equal(ref, got), (name, density, criterion)


def test_selection_on_a_large_tensor_takes_the_window_path_and_still_equals_the_reference():
    # 64 chunks of 2**15: after the first chunk each one starts from its neighbour's window.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64 * 2**15, generator=g) * torch.linspace(0.5, 2.0, 64).repeat_interleave(2**15)
    for density in (0.01, 0.1):
        assert torch.equal(select_mask(x, density, fused=False), select_mask(x, density, fused=True))


# ---------------------------------------------------------------- the step


def state(n_params: int, k: int, p_dtype, m_dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n_params, generator=g).to(p_dtype)
    idx = torch.sort(torch.randperm(n_params, generator=g)[:k]).values.to(torch.int32)
    m = (torch.randn(k, generator=g) * 1e-3).to(m_dtype)
    v = (torch.rand(k, generator=g) * 1e-6).to(m_dtype)
    grad = (torch.randn(n_params, generator=g) * 1e-3).to(p_dtype)
    ages = torch.randint(0, 40, (k,), generator=g, dtype=torch.int32).to(torch.int16)
    return p, grad, m, v, idx, ages


@pytest.mark.parametrize("p_dtype, m_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float16, torch.float32)])
@pytest.mark.parametrize("counts", ["one", "ages", "vector", "none"])
@pytest.mark.parametrize("beta1, weight_decay", [(0.9, 0.0), (0.3, 0.1)])
def test_step_equals_the_reference(p_dtype, m_dtype, counts, beta1, weight_decay):
    """Every mask form (int16 chunk offsets, int32 indices, dense), gathered and dense
    gradients, one count or per-entry ages, lerp's two branches (beta1 0.9 and 0.3)."""
    n, chunk, density = 5 * 4096 + 123, 4096, 0.1
    p, grad, m, v, idx, ages = state(n, 0, p_dtype, m_dtype, seed=1)
    int16 = select_mask(p, density, chunk_size=chunk)
    k = int16.numel()
    _, _, m, v, _, ages = state(n, k, p_dtype, m_dtype, seed=2)
    stored = (int16 % chunk).to(torch.int16)
    masks = {"int16": (stored, density, chunk), "int32": int16, "dense": None}
    for form, mask in masks.items():
        kk = n if mask is None else k
        mm, vv = (m, v) if mask is not None else state(n, n, p_dtype, m_dtype, seed=3)[2:4]
        aa = ages if mask is not None else state(n, n, p_dtype, m_dtype, seed=3)[5]
        step = {"one": 7, "ages": (aa, 3), "vector": aa.to(torch.int32) + 3, "none": 7}[counts]
        for gathered in (False, True) if mask is not None else (False,):
            g = grad[int16.long()] if gathered else grad
            out = []
            for fused in (False, True):
                pp, m2, v2 = p.clone(), mm.clone(), vv.clone()
                nano_adam([pp], [g], [m2], [v2], [mask], [step], lr=1e-3, beta1=beta1, beta2=0.999, eps=1e-8,
                          weight_decay=weight_decay, bias_correction=counts != "none", fused=fused)
                out.append((pp, m2, v2))
            for a, b in zip(*out):
                assert torch.equal(a, b), (form, gathered, kk)
            assert not torch.equal(out[0][0], p)  # the step did something


# ---------------------------------------------------------------- whole runs


def tiny_llama(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(dtype)


def run(model, opt, steps, seed=5, micro=1):
    g = torch.Generator().manual_seed(seed)
    data = [torch.randint(0, 128, (4, 16), generator=g) for _ in range(3)]
    losses = []
    for i in range(steps):
        opt.zero_grad()
        for part in data[i % 3].chunk(micro):
            loss = model(input_ids=part, labels=part).loss / micro
            loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_same_optimizer(a: NanoAdam, b: NanoAdam, ma, mb):
    for x, y in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(x, y)
    for p, q in zip((p for g in a.param_groups for p in g["params"]), (q for g in b.param_groups for q in g["params"])):
        sa, sb = a.state[p], b.state[q]
        assert sa.keys() == sb.keys()
        for key in sa:
            if torch.is_tensor(sa[key]):
                assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
            else:
                assert sa[key] == sb[key], key


@pytest.mark.parametrize("kw", [
    dict(),
    dict(moments_on_refresh="reset"),
    dict(bias_correction=False, weight_decay=0.1),
    dict(moments_dtype=torch.bfloat16, index_dtype=torch.int32),
    dict(criterion="large_grads"),
    dict(criterion="random"),
    dict(sparse_gradients=True),
    dict(density_interval=2, final_density=0.02, total_steps=8),  # k changes: the carry is not in place
    dict(chunk_size=64, density=0.3),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults")
def test_a_run_with_the_kernels_equals_the_reference_run(kw):
    opts = dict(lr=2e-2, density=0.1, mask_interval=3) | kw
    m1, m2 = tiny_llama(), tiny_llama()
    ref = NanoAdam(nanoadam_param_groups(m1), fused=False, foreach=False, **opts)
    fast = NanoAdam(nanoadam_param_groups(m2), fused=True, **opts)
    assert run(m1, ref, 10, micro=2) == run(m2, fast, 10, micro=2)
    assert_same_optimizer(ref, fast, m1, m2)


def test_a_bf16_model_with_the_kernels_equals_the_reference():
    m1, m2 = tiny_llama(dtype=torch.bfloat16), tiny_llama(dtype=torch.bfloat16)
    ref = NanoAdam(nanoadam_param_groups(m1), lr=1e-2, density=0.05, mask_interval=2, fused=False)
    fast = NanoAdam(nanoadam_param_groups(m2), lr=1e-2, density=0.05, mask_interval=2, fused=True)
    assert run(m1, ref, 7) == run(m2, fast, 7)
    assert_same_optimizer(ref, fast, m1, m2)


def test_policy_swaps_and_frozen_tensors_with_the_kernels_equal_the_reference():
    m1, m2 = tiny_llama(), tiny_llama()
    ref = NanoAdam(nanoadam_param_groups(m1), lr=1e-2, density=0.1, mask_interval=None, fused=False)
    fast = NanoAdam(nanoadam_param_groups(m2), lr=1e-2, density=0.1, mask_interval=None, fused=True)
    for opt, model in ((ref, m1), (fast, m2)):
        run(model, opt, 3)
        opt.refresh_mask(density={r"layers\.0\.": 0.0, r"mlp": 0.3})  # freeze layer 0, denser MLPs
        run(model, opt, 3)
        opt.refresh_mask(criterion="large_weights", density=0.05)
        run(model, opt, 3)
    assert_same_optimizer(ref, fast, m1, m2)


def test_state_moves_between_the_kernels_and_the_reference():
    """A checkpoint written on one path resumes on the other, bit for bit."""
    m1, m2 = tiny_llama(), tiny_llama()
    kw = dict(lr=1e-2, density=0.1, mask_interval=2)
    a = NanoAdam(nanoadam_param_groups(m1), fused=True, **kw)
    run(m1, a, 4)
    b = NanoAdam(nanoadam_param_groups(m2), fused=False, **kw)
    m2.load_state_dict(m1.state_dict())
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert run(m1, a, 5, seed=9) == run(m2, b, 5, seed=9)
    assert_same_optimizer(a, b, m1, m2)


def test_masks_taken_before_an_in_place_refresh_keep_their_values():
    model = tiny_llama()
    opt = NanoAdam(nanoadam_param_groups(model), lr=5e-2, density=0.1, mask_interval=2, index_dtype=torch.int32,
                   fused=True)
    run(model, opt, 2)
    before = opt.masks()
    saved = {k: v.clone() for k, v in before.items()}
    run(model, opt, 4)  # two refreshes, in place
    after = opt.masks()
    for name in before:
        assert torch.equal(before[name], saved[name])
    assert any(not torch.equal(after[n], saved[n]) for n in saved)  # the masks did move


# ---------------------------------------------------------------- without the kernels


def python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "python"), **env})


FALLBACK = """
import warnings, torch
from nanotune import kernels
from nanotune.optim import NanoAdam
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    p = torch.nn.Parameter(torch.randn(300))
    opt = NanoAdam([p], lr=1e-2, density=0.1)
    for _ in range(3):
        p.grad = torch.randn(300)
        opt.step()
print("reason:", kernels.status()["reason"])
print("warnings:", sum("did not build" in str(w.message) for w in caught))
try:
    NanoAdam([torch.nn.Parameter(torch.randn(8))], fused=True)
except ValueError as e:
    print("fused=True:", e)
"""


@pytest.mark.parametrize("how", ["NANOTUNE_KERNELS=0", "no compiler"])
def test_without_the_kernels_nanoadam_runs_the_torch_paths_and_says_why(tmp_path, how):
    env = {"NANOTUNE_KERNELS": "0"} if how == "NANOTUNE_KERNELS=0" else \
        {"CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    r = python(FALLBACK, **env)
    assert r.returncode == 0, r.stderr
    if how == "NANOTUNE_KERNELS=0":
        assert "reason: NANOTUNE_KERNELS=0" in r.stdout
        assert "warnings: 0" in r.stdout
    else:
        assert "no-such-compiler" in r.stdout or "Error" in r.stdout, r.stdout
        assert "warnings: 1" in r.stdout  # said once, not at every step
    assert "fused=True: Invalid fused=True: nanotune's CPU kernels did not load" in r.stdout


def test_nanotune_kernels_1_makes_a_failed_build_an_error(tmp_path):
    r = python("from nanotune import kernels; kernels.cpu()", NANOTUNE_KERNELS="1",
               CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    assert r.returncode != 0
    assert "CPU kernels did not build" in r.stderr


def test_an_unknown_nanotune_kernels_value_is_an_error():
    r = python("from nanotune import kernels; kernels.cpu()", NANOTUNE_KERNELS="yes")
    assert r.returncode != 0 and "Invalid NANOTUNE_KERNELS: 'yes'" in r.stderr


def test_the_step_and_refresh_run_the_kernels_by_default_on_the_cpu():
    """fused=None takes the kernels: the optimizer's refresh writes int16 masks in place."""
    model = tiny_llama()
    opt = NanoAdam(nanoadam_param_groups(model), lr=1e-2, density=0.1, mask_interval=2)
    assert opt._fused(opt.param_groups[0])
    run(model, opt, 2)
    p = opt.param_groups[0]["params"][1]
    idx = opt.state[p]["idx"]
    run(model, opt, 2)  # a refresh at the same density
    assert opt.state[p]["idx"] is idx
    assert not NanoAdam._fused(NanoAdam(nanoadam_param_groups(tiny_llama()), fused=False).param_groups[0])
    assert not NanoAdam._fused(NanoAdam(nanoadam_param_groups(tiny_llama()), foreach=True).param_groups[0])


def test_runs_helper_matches_selected_count():
    from nanotune.optim import selected_count

    for n, d, c in ((7, 0.5, 4), (100_000, 0.01, 2**15), (3 * 2**15, 0.1, 2**15)):
        runs = _runs(n, d, c)
        assert sum(runs[i + 2] * runs[i + 3] for i in range(0, len(runs), 4)) == selected_count(n, d, c)
