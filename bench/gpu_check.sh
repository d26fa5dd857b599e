#!/usr/bin/env bash
# The GPU check of issue 6, as one script for a lent GPU machine (see bench/RESULTS.md):
# installs the carried wheels (pyzmq, msgspec; optional bitsandbytes), runs the CUDA
# unit tests and bench/gpu.py on the Llama 3.2 3B architecture, and writes the table
# and the logs under $OUT (default ./gpu-out).
#
# Prepare here (x86_64 wheels for the machine's Python, 3.12 on our H100 image):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl pyzmq msgspec bitsandbytes
# then run it with `.whl` carried:  bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/python:${PYTHONPATH:-} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'; } 2>&1 | tee "$OUT/device.txt"
python3 -m pytest -q tests/python/test_optim.py tests/python/test_optim_cuda.py tests/python/test_bias_correction.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
timeout 420 python3 bench/gpu.py --steps 20 --warmup 3 --json "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.md"
