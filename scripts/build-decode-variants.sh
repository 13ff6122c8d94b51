#!/usr/bin/env bash
# Builds of the kernels with other settings of the sm_90 decode kernel (cuda/decode_sm90.cu:
# PR_DECODE_THREADS threads, PR_DECODE_ROWS rows per register batch, PR_DECODE_MIN_BLOCKS blocks per
# SM, PR_DECODE_NO_LENGTH) into .carry/dv/lib<name>.so, for timing with
# PR_GPU_LIB=<path> python3 benches/gpu/bench_kernels.py --decode-only on the GPU machine (carry
# .carry/dv). VARIANTS lists name=flag,flag,... entries. Timing experiments only.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
nvcc="${NVCC:-$root/.cuda/nvidia/cu13/bin/nvcc}"
arch=-gencode=arch=compute_90a,code=sm_90a
obj="$root/target/decode-variants"
mkdir -p "$root/.carry/dv" "$obj"
for f in "$root"/cuda/*.cu; do
  [ "$(basename "$f")" = decode_sm90.cu ] && continue
  "$nvcc" -O3 -std=c++17 $arch -Xcompiler -fPIC -I"$root/cuda" -c "$f" -o "$obj/$(basename "$f" .cu).o" &
done
wait
for v in ${VARIANTS:-t512_nolen=-DPR_DECODE_NO_LENGTH=1 t256=-DPR_DECODE_THREADS=256,-DPR_DECODE_MIN_BLOCKS=2}; do
  name="${v%%=*}"
  flags="${v#*=}"
  # shellcheck disable=SC2086
  "$nvcc" -O3 -std=c++17 $arch ${flags//,/ } -Xcompiler -fPIC -I"$root/cuda" -c "$root/cuda/decode_sm90.cu" -o "$obj/decode_sm90_$name.o"
  ls "$obj"/*.o | grep -v '/decode_sm90' | xargs "$nvcc" $arch -shared -L"$(dirname "$nvcc")/../lib" -cudart static \
    -o "$root/.carry/dv/lib$name.so" "$obj/decode_sm90_$name.o"
done
echo "built $(ls "$root"/.carry/dv)" >&2
