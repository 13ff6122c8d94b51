#!/usr/bin/env bash
# One-time (idempotent) set-up of everything the build and tests need, from PyPI and crates.io:
#   .venv          ONNX Runtime 1.31.1 (its libonnxruntime.so serves the Rust `ort` crate too), onnx, numpy, pytest
#   .venv-ort120   ONNX Runtime 1.20.1, to check that the plugin refuses a too-old runtime cleanly
#   .cuda          nvcc 13.0 from PyPI (only with --cuda), to compile the CUDA kernels
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r scripts/requirements.txt
if [[ ! -x .venv-ort120/bin/python ]]; then
  "$py" -m venv .venv-ort120
fi
.venv-ort120/bin/python -m pip install -q --disable-pip-version-check onnxruntime==1.20.1 numpy==2.4.6
if [[ ${1:-} == --cuda ]]; then
  bash scripts/install-nvcc.sh
fi
echo "ORT_DYLIB_PATH=$(ls "$PWD"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -1)"
