#!/usr/bin/env bash
# Leave-one-stage-out builds of the kernels (cuda/prefill_tc.cu's PR_TC_SKIP bits: 1 state query,
# 2 in-chunk attention, 4 state update, 8 outputs; 15 = all four) into .carry/tc/lib<bits>.so, for
# benches/gpu/prefill_stages.py on the GPU machine (carry .carry/tc). Timing experiments only.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
nvcc="${NVCC:-$root/.cuda/nvidia/cu13/bin/nvcc}"
mkdir -p "$root/.carry/tc"
for v in 0 1 2 4 8 15; do
  "$nvcc" -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -DPR_TC_SKIP=$v -Xcompiler -fPIC -shared \
    -I"$root/cuda" -L"$(dirname "$nvcc")/../lib" -cudart static -o "$root/.carry/tc/lib$v.so" "$root"/cuda/*.cu
done
echo "built $root/.carry/tc/lib{0,1,2,4,8,15}.so" >&2
