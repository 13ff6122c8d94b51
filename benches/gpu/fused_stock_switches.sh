#!/usr/bin/env bash
# On the GPU machine (after gpu-check.sh has staged ORT): does any of ONNX Runtime's attention-kernel
# switches change the step time of make_lm.py's --stock-fused model? (benches/RESULTS.md, issue 5 notes)
source /tmp/ortgpu/env.sh
export POWER_RETENTION_LIB=$PWD/.carry/plugin/libpower_retention_ort.so
python3 models/make_lm.py /tmp/lmf --preset gpt2-small --dtype float16 --max-pos 20000 --stock-fused > /dev/null 2>&1
run() {
  echo "== $1"
  env $1 timeout 90 .carry/bin/power-retention bench /tmp/lmf --stock /tmp/lmf/stock.onnx --baseline "stock fused=/tmp/lmf/stock_fused.onnx" \
    --device cuda --contexts 1024,16384 --batches 1 --steps 8 --max-cache-gib 8 --out /tmp/fx 2>&1 | grep "^B1" | sed 's/(inputs[^)]*)//g'
}
run "X=1"
run "ORT_DISABLE_FLASH_ATTENTION=1"
run "ORT_DISABLE_MEMORY_EFFICIENT_ATTENTION=1"
run "ORT_DISABLE_FLASH_ATTENTION=1 ORT_DISABLE_MEMORY_EFFICIENT_ATTENTION=1"
run "ORT_DISABLE_FLASH_ATTENTION=1 ORT_DISABLE_MEMORY_EFFICIENT_ATTENTION=1 ORT_DISABLE_TRT_FLASH_ATTENTION=1 ORT_DISABLE_FUSED_ATTENTION=1 ORT_DISABLE_FUSED_CROSS_ATTENTION=1"
