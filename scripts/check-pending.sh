#!/usr/bin/env bash
# CI guard for cuda/pending/ (kernel changes waiting for a GPU run): every patch of series applies
# to the tree on its own, all of them apply in the series' order, and the chunked prefill with all
# of them compiles for sm_90a (wgmma) and with the mma.sync paths, so that a patch cannot rot while
# it waits. NVCC or CUDA_PATH as for build.rs; without nvcc only the apply checks run.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
mapfile -t patches < <(grep -v '^#' "$root/cuda/pending/series")
[ ${#patches[@]} -gt 0 ] || { echo "cuda/pending/series lists no patch"; exit 0; }
for f in "$root"/cuda/pending/*.patch; do
  printf '%s\n' "${patches[@]}" | grep -qxF "$(basename "$f")" || { echo "$f is not in cuda/pending/series" >&2; exit 1; }
done
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for pf in "${patches[@]}"; do
  rm -rf "$tmp/alone" && mkdir "$tmp/alone" && cp -r "$root/cuda" "$tmp/alone/"
  (cd "$tmp/alone" && git apply --check "$root/cuda/pending/$pf") || { echo "$pf does not apply to the tree" >&2; exit 1; }
done
cp -r "$root/cuda" "$tmp/"
for pf in "${patches[@]}"; do
  (cd "$tmp" && git apply "$root/cuda/pending/$pf") || { echo "$pf does not apply after the ones before it in series" >&2; exit 1; }
done
echo "every pending patch applies alone and in series: ${patches[*]}"
nvcc="${NVCC:-${CUDA_PATH:+$CUDA_PATH/bin/nvcc}}"
[ -n "$nvcc" ] && [ -x "$nvcc" ] || { echo "no nvcc: pending patches not compiled"; exit 0; }
for flags in "" -DPR_NO_WGMMA; do
  "$nvcc" -O1 -std=c++17 -rdc=true -gencode=arch=compute_90a,code=sm_90a $flags -c "$tmp/cuda/prefill_chunked.cu" -o "$tmp/x.o"
done
echo "the chunked prefill with every pending patch compiles (sm_90a, wgmma and mma.sync)"
