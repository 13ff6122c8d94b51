#!/usr/bin/env bash
# Installs nvcc 13.0 (matches the GPU machine's driver 580 = CUDA 13.0) from PyPI into .cuda/.
# Idempotent: does nothing when the pinned nvcc is already there. Prints the CUDA_PATH to export.
# Every package is pinned: nvcc's own dependencies are unpinned and would pull 13.5 headers/cicc,
# whose PTX a 580 driver cannot load; cccl is not a dependency but cuda_fp16.h needs it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
target="${1:-$root/.cuda}"
prefix="$target/nvidia/cu13"
if [ -x "$prefix/bin/nvcc" ] && "$prefix/bin/nvcc" --version | grep -q 'V13.0.88'; then
  echo "nvcc 13.0.88 already installed" >&2
else
  python3 -m pip install --quiet --no-cache-dir --upgrade --target "$target" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
"$prefix/bin/nvcc" --version | tail -n 2 >&2
echo "export CUDA_PATH=$prefix"
