#!/usr/bin/env bash
# CI guard for cuda/pending/ (kernel changes waiting for a GPU run): every patch is listed in
# series, the patches apply in the series' order (each on top of the ones before it), and every
# cuda/*.cu compiles with all of them, for sm_90a (wgmma) and with the mma.sync paths, so that no
# patch can rot while it waits (the variants of each prefix are built by
# `scripts/build-gpu-test.sh --pending`). Also says which patches apply alone to the tree.
# NVCC or CUDA_PATH as for build.rs; without nvcc only the apply checks run.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
mapfile -t patches < <(grep -v '^#' "$root/cuda/pending/series")
[ ${#patches[@]} -gt 0 ] || { echo "cuda/pending/series lists no patch"; exit 0; }
for f in "$root"/cuda/pending/*.patch; do
  printf '%s\n' "${patches[@]}" | grep -qxF "$(basename "$f")" || { echo "$f is not in cuda/pending/series" >&2; exit 1; }
done
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/stack" && cp -r "$root/cuda" "$tmp/stack/"
alone=()
for pf in "${patches[@]}"; do
  (cd "$tmp/stack" && git apply "$root/cuda/pending/$pf") || { echo "$pf does not apply on top of the patches before it in series" >&2; exit 1; }
  rm -rf "$tmp/alone" && mkdir "$tmp/alone" && cp -r "$root/cuda" "$tmp/alone/"
  (cd "$tmp/alone" && git apply --check "$root/cuda/pending/$pf" 2>/dev/null) && alone+=("$pf")
done
echo "the pending patches apply in series: ${patches[*]}; alone too: ${alone[*]:-none}"
nvcc="${NVCC:-${CUDA_PATH:+$CUDA_PATH/bin/nvcc}}"
[ -n "$nvcc" ] && [ -x "$nvcc" ] || { echo "no nvcc: pending patches not compiled"; exit 0; }
compile_all() {  # compile_all TAG FLAGS...
  local tag="$1"; shift
  for f in "$tmp"/stack/cuda/*.cu; do
    "$nvcc" -O1 -std=c++17 -rdc=true -gencode=arch=compute_90a,code=sm_90a "$@" -c "$f" -o "$tmp/$tag-$(basename "$f").o" ||
      { echo "cuda/$(basename "$f") does not compile with the pending patches ($tag)" >&2; return 1; }
  done
}
compile_all wgmma & w=$!
compile_all mma.sync -DPR_NO_WGMMA & m=$!
wait $w  # (one wait a line: set -e ignores a failure inside an && list)
wait $m
echo "every cuda/*.cu compiles with all the pending patches (sm_90a, wgmma and mma.sync)"
