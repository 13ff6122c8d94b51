#!/usr/bin/env bash
# Builds the standalone test library (.carry/gpu/libpr_test.so: the cuda/*.cu launchers, cudart
# static) that tests/gpu/ and benches/gpu/ load with ctypes on the GPU machine. Run here, then carry
# .carry/gpu to the device. ARCHS overrides the targets (default: sm_90a for the H100/H200).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
nvcc="${NVCC:-}"
if [ -z "$nvcc" ]; then
  for c in "${CUDA_PATH:-}/bin/nvcc" "${CUDA_HOME:-}/bin/nvcc" "$(command -v nvcc || true)" "$root/.cuda/nvidia/cu13/bin/nvcc"; do
    if [ -n "$c" ] && [ -x "$c" ]; then nvcc="$c"; break; fi
  done
fi
[ -n "$nvcc" ] || { echo "nvcc not found: run scripts/install-nvcc.sh" >&2; exit 1; }
prefix="$(cd "$(dirname "$(readlink -f "$nvcc")")/.." && pwd)"
archs="${ARCHS:--gencode=arch=compute_90a,code=sm_90a}"
mkdir -p "$root/.carry/gpu"
"$nvcc" -O3 -std=c++17 -Xcompiler -fPIC -shared $archs -I"$root/cuda" -L"$prefix/lib" -cudart static \
  -o "$root/.carry/gpu/libpr_test.so" "$root"/cuda/*.cu
echo "built $root/.carry/gpu/libpr_test.so" >&2
