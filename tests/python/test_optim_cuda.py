"""NanoAdam on CUDA (run by bench/gpu_check.sh on a GPU machine; skipped without CUDA)."""

import copy

import pytest
import torch

from nanotune.optim import NanoAdam, nanoadam_param_groups, select_mask

from test_optim import batches, sparse_params, tiny_llama, train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_masks_equal_cpu_masks_bit_for_bit():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(300_000).to(dtype)
        for criterion in ("small_weights", "large_weights"):
            assert torch.equal(select_mask(w, 0.1, criterion), select_mask(w.cuda(), 0.1, criterion).cpu())


@cuda
@pytest.mark.parametrize("sparse_gradients", [False, True])
def test_cuda_fast_path_matches_cpu_reference_path(sparse_gradients):
    cpu = tiny_llama()
    gpu = copy.deepcopy(cpu).cuda()
    kw = dict(lr=1e-2, density=0.1, mask_interval=3)
    o_cpu = NanoAdam(nanoadam_param_groups(cpu), foreach=False, **kw)
    o_gpu = NanoAdam(nanoadam_param_groups(gpu), sparse_gradients=sparse_gradients, **kw)  # foreach on CUDA
    data = batches(6)
    train(cpu, o_cpu, data)
    train(gpu, o_gpu, [x.cuda() for x in data])
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(m, o_gpu.masks()[n].cpu()) for n, m in o_cpu.masks().items())


@cuda
def test_cuda_bf16_sparse_gradients_equal_dense_path():
    m1 = tiny_llama(dtype=torch.bfloat16).cuda()
    m2 = copy.deepcopy(m1)
    dense = NanoAdam(nanoadam_param_groups(m1), lr=1e-2, density=0.1, mask_interval=3)
    sparse = NanoAdam(nanoadam_param_groups(m2), lr=1e-2, density=0.1, mask_interval=3, sparse_gradients=True)
    data = [x.cuda() for x in batches(5, bsz=4)]
    train(m1, dense, data, micro=2)
    train(m2, sparse, data, micro=2)
    for (_, a), (_, b) in zip(sparse_params(dense), sparse_params(sparse)):
        assert torch.equal(a, b)
