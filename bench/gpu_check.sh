#!/usr/bin/env bash
# The GPU check, as one script for a lent GPU machine (see bench/RESULTS.md): installs
# the carried wheels (pyzmq, msgspec; optional bitsandbytes), then, each step under its
# own timeout so one slow step cannot take the others' time, writing logs under $OUT
# (default ./gpu-out):
#   1. the CUDA unit tests (optimizer, CUDA-only paths, bias correction), and the compiled
#      CPU kernels against the reference on this machine's CPU and torch build (they build
#      with the carried ninja wheel where the image has a C++ compiler; else they fail
#      saying so, and the rest goes on);
#   2. bench/gpu.py on the Llama 3.2 3B architecture: peak memory and step time of
#      AdamW, NanoAdam (dense and sparse gradients), AdamW-8bit and MicroAdam (where
#      ista-daslab-optimizers and its CUDA kernels are installed; else its row says so),
#      uncapped;
#   3. the headline: the same with each process capped at 24 GiB of GPU memory
#      (torch.cuda.set_per_process_memory_fraction);
#   4. bench/gpu_wire.py: the 3B run through the wire (a Python DEALER client drives a
#      real sidecar, capped at 24 GiB: load_model, load_dataset, create_optimizer,
#      train_step, save_checkpoint), since the device image has no Node;
#   5. a sidecar group on the GPU (torchrun, one rank, nccl): the 3B run through the wire
#      under DDP with NanoAdam's sparse all-reduce, and under FSDP2 (one GPU: world size 1,
#      so it checks the CUDA paths of nanotune.distributed, not speed-up).
#
# Prepare here (x86_64 wheels for the machine's Python, 3.12 on our H100/H200 image):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pyzmq msgspec bitsandbytes ninja
# then run it with `.whl` carried:  bash bench/gpu_check.sh   (about 9 minutes at most)
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/python:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NANOTUNE_CACHE=/tmp/nanotune-cache
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'; } 2>&1 | tee "$OUT/device.txt"
echo "== 1. CUDA tests, and the CPU kernels"; timeout 100 python3 -m pytest -q -p no:cacheprovider tests/python/test_optim.py tests/python/test_optim_cuda.py tests/python/test_bias_correction.py 2>&1 | tail -8 | tee "$OUT/tests.txt"
PATH=/tmp/site/bin:$PATH timeout 120 python3 -m pytest -q -p no:cacheprovider tests/python/test_optim_kernels.py 2>&1 | tail -4 | tee "$OUT/kernels.txt"
echo "== 2. 3B uncapped"; timeout 200 python3 bench/gpu.py --steps 10 --warmup 2 --variants adamw,nanoadam,nanoadam-sparse,adamw8bit,microadam --json "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.md"
echo "== 3. 3B capped at 24 GiB"; timeout 100 python3 bench/gpu.py --steps 5 --warmup 2 --variants adamw,nanoadam-sparse,nanoadam --memory-cap-gib 24 --json "$OUT/gpu24.json" 2>&1 | tee "$OUT/gpu24.md"
echo "== 4. 3B through the wire, capped at 24 GiB"; timeout 170 python3 bench/gpu_wire.py --steps 10 --memory-cap-gib 24 --json "$OUT/wire.json" 2>&1 | grep -v "shards\|Loading weights" | tee "$OUT/wire.md"
echo "== 5. 3B in a sidecar group on CUDA (1 rank, nccl)"; { timeout 120 python3 bench/gpu_wire.py --steps 5 --nproc 1 --parallel ddp --variants nanoadam-sparse --json "$OUT/group-ddp.json"; timeout 120 python3 bench/gpu_wire.py --steps 5 --nproc 1 --parallel fsdp --variants nanoadam --json "$OUT/group-fsdp.json"; } 2>&1 | grep -v "shards\|Loading weights" | tee "$OUT/group.md"
echo "== done"
