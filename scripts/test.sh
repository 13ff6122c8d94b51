#!/usr/bin/env bash
# The whole test suite, as CI runs it (`.ci/run` calls this). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
setup_args=()
[[ ${POWER_RETENTION_CPU_ONLY:-0} == 1 ]] || setup_args+=(--cuda)
eval "export $(bash scripts/setup.sh "${setup_args[@]}" | grep '^ORT_DYLIB_PATH=')"
features=()
if [[ ${POWER_RETENTION_CPU_ONLY:-0} != 1 ]]; then
  export CUDA_PATH=$PWD/.cuda/nvidia/cu13 POWER_RETENTION_REQUIRE_CUDA=1
  features=(--features cuda)
fi

echo "== format and lints"
cargo fmt --all -- --check
# --release: shares the build script's nvcc output with the release build below.
cargo clippy --release --workspace --all-targets "${features[@]}" -- -D warnings

echo "== kernel patches waiting for a GPU run (cuda/pending) still apply and compile"
bash scripts/check-pending.sh

echo "== Rust tests (plugin through ONNX Runtime, exporter)"
cargo build --release -p power-retention-ort "${features[@]}"
export POWER_RETENTION_LIB=$PWD/target/release/libpower_retention_ort.so
cargo test --release --workspace "${features[@]}"

echo "== fuzzing the rewriter's model parser and matcher (bounded)"
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them, and
# without a sanitizer runtime nothing but libFuzzer's coverage instrumentation is needed.
command -v cargo-fuzz >/dev/null || cargo install -q --locked cargo-fuzz
(cd exporter && RUSTC_BOOTSTRAP=1 cargo fuzz run parse_and_rewrite --sanitizer none -- \
  -max_total_time="${FUZZ_SECONDS:-20}" -seed=1 2>&1 | grep -E '^Done|ERROR|panicked|deadly' )

echo "== Python tests (plugin loaded by onnxruntime $(.venv/bin/python -c 'import onnxruntime as o; print(o.__version__)'))"
.venv/bin/python -m pytest tests/python -q
