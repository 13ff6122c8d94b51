#!/usr/bin/env bash
# Builds the standalone test library (.carry/gpu/libpr_test.so: the cuda/*.cu launchers, cudart
# static) that tests/gpu/ and benches/gpu/ load with ctypes on the GPU machine. Run here, then carry
# .carry/gpu to the device. ARCHS overrides the targets (default: sm_90a for the H100/H200).
# With --pending, also the same libraries with the patches of cuda/pending/series applied to a copy
# of cuda/: .carry/pending/<name>/ has <name> on top of every patch before it in series (the last one
# has them all), and .carry/pending/<name>-alone/ has <name> alone where it applies alone (the first
# patch's stack is itself alone). `scripts/gpu-check.sh pending` tests and times them against
# .carry/gpu.
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
# one wait a line: set -e ignores a failure inside an && list
wait %1
wait %2
wait %3

[ "${1:-}" = --pending ] || exit 0
rm -rf "$root/.carry/pending"
# cuda/pending/series: the patches in the order they stack
mapfile -t patches < <(grep -v '^#' "$root/cuda/pending/series" | sed "s|^|$root/cuda/pending/|")
[ ${#patches[@]} -gt 0 ] || { echo "cuda/pending/series lists no patch" >&2; exit 0; }
variant() {  # variant NAME PATCH...: cuda/ with the patches applied in order, built as NAME
  local name="$1"; shift
  local src; src="$(mktemp -d)"
  cp -r "$root/cuda" "$src/cuda"
  for pf in "$@"; do (cd "$src" && git apply "$pf") || { echo "$pf does not apply" >&2; return 1; }; done
  mkdir -p "$root/.carry/pending/$name/nowgmma"
  # (quoted includes resolve beside the including file: the patched headers)
  build "$root/.carry/pending/$name/libpr_test.so" "$src"/cuda/*.cu & local p1=$!
  build "$root/.carry/pending/$name/nowgmma/libpr_test.so" -DPR_NO_WGMMA "$src"/cuda/*.cu & local p2=$!
  wait $p1
  wait $p2
  rm -rf "$src"
}
applies_alone() {  # applies_alone PATCH: it applies to the tree without the patches before it
  local tmp rc=0
  tmp="$(mktemp -d)"
  cp -r "$root/cuda" "$tmp/"
  (cd "$tmp" && git apply --check "$1" 2>/dev/null) || rc=1
  rm -rf "$tmp"
  return $rc
}
for i in "${!patches[@]}"; do
  pf="${patches[$i]}"
  variant "$(basename "$pf" .patch)" "${patches[@]:0:$((i + 1))}"
  if [ "$i" -gt 0 ] && applies_alone "$pf"; then variant "$(basename "$pf" .patch)-alone" "$pf"; fi
done
# The variants compress to a sixth (xz), so that they travel to the device beside .carry/gpu/ within
# a call's 64 MiB: carry .carry/pending.tar.xz; gpu-check.sh pending unpacks it.
tar -C "$root/.carry" -cJf "$root/.carry/pending.tar.xz" pending
du -h "$root/.carry/pending.tar.xz" >&2
