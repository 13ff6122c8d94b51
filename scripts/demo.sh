#!/usr/bin/env bash
# The main job on the bundled default, on the CPU: rewrite a tiny GPT-2 (random weights, exported
# by torch.onnx, in models/fixtures) into power retention, then generate with the state kept in
# place, checking that decoding reproduces the prefill logits. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "export $(bash scripts/setup.sh | grep '^ORT_DYLIB_PATH=')"
cargo build --release -q -p power-retention-ort -p power-retention-exporter
model=${1:-models/fixtures/gpt2_ts14_sdpa_kv.onnx}
out=target/demo/$(basename "$model" .onnx)
target/release/power-retention rewrite "$model" -o "$out"
target/release/power-retention generate "$out" --new-tokens "${NEW_TOKENS:-64}" --sampling "${SAMPLING:-top-k=20,t=0.8}" --seed 1
