#!/usr/bin/env bash
# On the development machine: builds and gathers what scripts/gpu-check.sh needs on a GPU machine
# (which has no cargo and no network) into .carry/ (git-ignored):
#   .carry/plugin/libpower_retention_ort.so   the plugin with its CUDA kernels (stripped)
#   .carry/bin/power-retention                the CLI (generate/bench drive ORT's CUDA EP)
#   .carry/gpu/libpr_test.so                  the kernels alone, for the ctypes tests and benchmarks
#   .carry/spec/power_retention_gold.py       the spec's float64 gold model
#   .whl/retention-1.0.7-py3-none-any.whl     the reference package
#   .carry/pending.tar.xz                     with --pending: the cuda/pending/ kernel variants
# ONNX Runtime with its CUDA EP travels separately: ../shared/device/ort-gpu.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "export $(bash scripts/setup.sh --cuda | grep '^ORT_DYLIB_PATH=')"
export CUDA_PATH=$PWD/.cuda/nvidia/cu13 POWER_RETENTION_REQUIRE_CUDA=1
cargo build --release -p power-retention-ort --features cuda
cargo build --release -p power-retention-exporter
mkdir -p .carry/plugin .carry/bin .carry/spec .whl
strip -o .carry/plugin/libpower_retention_ort.so target/release/libpower_retention_ort.so
strip -o .carry/bin/power-retention target/release/power-retention
bash scripts/build-gpu-test.sh "$@"  # --pending: also the cuda/pending/ variants (.carry/pending.tar.xz)
cp ../shared/spec/power_retention_gold.py .carry/spec/
[ -f .whl/retention-1.0.7-py3-none-any.whl ] || python3 -m pip download -q --no-deps -d .whl retention==1.0.7
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
du -sh .carry/plugin .carry/bin .carry/gpu .carry/spec .whl
