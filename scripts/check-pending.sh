#!/usr/bin/env bash
# CI guard for cuda/pending/ (kernel changes waiting for a GPU run): every patch is listed in
# series, the patches apply in the series' order (each on top of the ones before it), and the
# chunked prefill with every prefix of the series compiles for sm_90a (wgmma) and with the mma.sync
# paths, so that no patch can rot while it waits. Also says which patches apply alone to the tree.
# NVCC or CUDA_PATH as for build.rs; without nvcc only the apply checks run.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
mapfile -t patches < <(grep -v '^#' "$root/cuda/pending/series")
[ ${#patches[@]} -gt 0 ] || { echo "cuda/pending/series lists no patch"; exit 0; }
for f in "$root"/cuda/pending/*.patch; do
  printf '%s\n' "${patches[@]}" | grep -qxF "$(basename "$f")" || { echo "$f is not in cuda/pending/series" >&2; exit 1; }
done
nvcc="${NVCC:-${CUDA_PATH:+$CUDA_PATH/bin/nvcc}}"
[ -n "$nvcc" ] && [ -x "$nvcc" ] || nvcc=""
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/stack" && cp -r "$root/cuda" "$tmp/stack/"
alone=()
for pf in "${patches[@]}"; do
  (cd "$tmp/stack" && git apply "$root/cuda/pending/$pf") || { echo "$pf does not apply on top of the patches before it in series" >&2; exit 1; }
  rm -rf "$tmp/alone" && mkdir "$tmp/alone" && cp -r "$root/cuda" "$tmp/alone/"
  (cd "$tmp/alone" && git apply --check "$root/cuda/pending/$pf" 2>/dev/null) && alone+=("$pf")
  if [ -n "$nvcc" ]; then
    for flags in "" -DPR_NO_WGMMA; do
      "$nvcc" -O1 -std=c++17 -rdc=true -gencode=arch=compute_90a,code=sm_90a $flags -c "$tmp/stack/cuda/prefill_chunked.cu" -o "$tmp/x.o" ||
        { echo "the chunked prefill does not compile with the series up to $pf ($flags)" >&2; exit 1; }
    done
  fi
done
echo "the pending patches apply in series: ${patches[*]}; alone too: ${alone[*]:-none}"
[ -n "$nvcc" ] && echo "the chunked prefill compiles with every prefix of the series (sm_90a, wgmma and mma.sync)" || echo "no nvcc: pending patches not compiled"
