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
out="$root/.carry/gpu"
mkdir -p "$out/nowgmma"
build() {  # build OUTPUT EXTRA_FLAGS... SOURCES...
  local o="$1"; shift
  "$nvcc" -O3 -std=c++17 -rdc=true -Xcompiler -fPIC -shared $archs -I"$root/cuda" -L"$prefix/lib" -cudart static -o "$o" "$@"
  echo "built $o" >&2
}
# The library as the plugin has it (relocatable device code, as cc builds it for build.rs); the same
# with the mma.sync paths that sm_80-89 run (-DPR_NO_WGMMA), so that an H100 tests them too; the
# wgmma layout probe.
build "$out/libpr_test.so" "$root"/cuda/*.cu &
build "$out/nowgmma/libpr_test.so" -DPR_NO_WGMMA "$root"/cuda/*.cu &
build "$out/libwgmma_probe.so" "$root/tests/gpu/wgmma_probe.cu" &
wait %1 && wait %2 && wait %3
