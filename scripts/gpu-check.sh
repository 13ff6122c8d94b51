#!/usr/bin/env bash
# The one command for a GPU machine (which has no cargo and no network). Given what
# scripts/gpu-prepare.sh built on a development machine and carried over (.carry/plugin, .carry/bin,
# .carry/gpu, .carry/spec, .whl) and ONNX Runtime's CUDA build staged with ../shared/device/ort-gpu.sh,
# it runs, from the repo root:
#   kernels   tests/gpu/test_kernels.py: the CUDA kernels alone vs a float64 oracle, every dtype, as
#             built for sm_90a and with the mma.sync paths of sm_80-89; the wgmma layout probe
#   sanitize  compute-sanitizer memcheck + racecheck on the kernel tests' small subset
#   ort       tests/gpu/test_ort_cuda.py: the plugin on ORT's CUDA EP (vs CPU EP and gold, in-place
#             decode, CUDA graphs), then benches/gpu/bench_ort.py (ORT overhead over the bare kernels)
#   bench     benches/gpu/bench_kernels.py: kernels vs the `retention` package and torch SDPA
#   lm        a GPT-2-small-shaped model (models/make_lm.py) through `power-retention generate` and
#             `power-retention bench` against the same model with stock attention and a KV cache,
#             as built and with ONNX Runtime's fused attention ops (stock_fused.onnx: MultiHeadAttention,
#             stock_gqa.onnx: GroupQueryAttention)
#   lmhf      the same on a transformers GPT-2 (GPT-2-small, fp16, random weights) exported with
#             torch.onnx (models/make_hf_lm.py) and rewritten by `power-retention rewrite`: generate
#             (equal-work check, with and without CUDA graph) and bench against the export as it is,
#             after ORT's transformer optimizer, and exported at opset 23 with ONNX's Attention op
#   lmprof    benches/gpu/profile_step.py: per-operator time of one step of each stock model of lm
#             (as built, MultiHeadAttention, GroupQueryAttention) at 1k and 32k context
#   pending   each kernel variant under .carry/pending/ (or .carry/pending.tar.xz, as carried;
#             scripts/build-gpu-test.sh --pending builds them: the
#             cuda/pending/*.patch changes, not yet built into the plugin): the kernel tests in both
#             builds, memcheck and racecheck, and the prefill's kernel times side by side with .carry/gpu's
#             (benches/gpu/prefill_split.py at chunks 512 and 1024, 16 and 8 heads, the two libraries
#             alternating, twice); PENDING="NAME..." picks variants
#   kernelsum scripts/kernel-sum.sh: the summed kernel time of one decode step of that model (ncu),
#             against generate's per-token latency with a CUDA graph
# Usage: scripts/gpu-check.sh [kernels|sanitize|ort|bench|lm|lmhf|lmprof|pending|kernelsum|all]...   (default all; logs in $OUT or /tmp)
# Ends with one summary table.
set -uo pipefail
cd "$(dirname "$0")/.."
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(all)
want() { [[ " ${parts[*]} " == *" all "* || " ${parts[*]} " == *" $1 "* ]]; }
log="${OUT:-/tmp}"
mkdir -p "$log"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/retention-1.0.7-py3-none-any.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export POWER_RETENTION_LIB=$PWD/.carry/plugin/libpower_retention_ort.so PR_GPU_LIB=$PWD/.carry/gpu/libpr_test.so
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr -c "A-Za-z0-9.\n-" "-")
summary=()
record() { summary+=("| $1 | $2 | $3 |"); }

if want kernels; then
  python3 tests/gpu/test_wgmma_probe.py > "$log/wgmma-probe.log" 2>&1
  record "wgmma probe" "$([ $? -eq 0 ] && echo pass || echo FAIL)" "$(tail -n 1 "$log/wgmma-probe.log")"
  python3 tests/gpu/test_kernels.py > "$log/kernels.log" 2>&1
  record kernels "$([ $? -eq 0 ] && echo pass || echo FAIL)" "$(grep -c -i 'ok\|pass' "$log/kernels.log") lines ok; $(tail -n 1 "$log/kernels.log")"
  PR_GPU_LIB=$PWD/.carry/gpu/nowgmma/libpr_test.so python3 tests/gpu/test_kernels.py > "$log/kernels-nowgmma.log" 2>&1
  record "kernels, mma.sync paths (sm_80-89)" "$([ $? -eq 0 ] && echo pass || echo FAIL)" "$(tail -n 1 "$log/kernels-nowgmma.log")"
fi
if want sanitize; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --kernel-name kns=retention_ --error-exitcode 9 \
      python3 tests/gpu/test_kernels.py --small > "$log/sanitize-$tool.log" 2>&1
    rc=$?
    record "sanitize $tool" "$([ $rc -eq 0 ] && echo pass || echo FAIL)" "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log/sanitize-$tool.log" | tail -n 1)"
  done
fi
if want ort; then
  (
    source /tmp/ortgpu/env.sh || exit 3
    python3 -m pytest tests/gpu/test_ort_cuda.py -q -p no:cacheprovider > "$log/ort-tests.log" 2>&1
    echo "tests rc $?" >> "$log/ort-tests.log"
    python3 benches/gpu/bench_ort.py > "$log/ort-bench.log" 2>&1
  )
  record "plugin on ORT CUDA EP" "$(grep -q ' failed' "$log/ort-tests.log" && echo FAIL || echo pass)" "$(grep -E 'passed|failed' "$log/ort-tests.log" | tail -n 1)"
  while IFS= read -r line; do record "ORT vs bare kernels" "-" "$line"; done < <(grep '^| decode\|^| prefill' "$log/ort-bench.log")
fi
if want bench; then
  python3 benches/gpu/bench_kernels.py ${BENCH_ARGS:-} > "$log/bench.log" 2>&1
  record "kernels vs package" "$([ $? -eq 0 ] && echo done || echo FAIL)" "table in $log/bench.log"
fi
if want lm; then
  (
    source /tmp/ortgpu/env.sh || exit 3
    python3 models/make_lm.py /tmp/lm --preset gpt2-small --dtype float16 --max-pos 140000 --stock-fused --stock-gqa > "$log/lm.log" 2>&1
    .carry/bin/power-retention generate /tmp/lm --device cuda --new-tokens 48 --prompt-lengths 40,100,7,300 >> "$log/lm.log" 2>&1
    echo "generate rc $?" >> "$log/lm.log"
    .carry/bin/power-retention generate /tmp/lm --device cuda --cuda-graph --new-tokens 48 --prompt-lengths 40,100,7,300 > "$log/lm-graph.log" 2>&1
    echo "generate rc $?" >> "$log/lm-graph.log"
    .carry/bin/power-retention bench /tmp/lm --stock /tmp/lm/stock.onnx --baseline "stock fused=/tmp/lm/stock_fused.onnx" \
      --baseline "stock GQA=/tmp/lm/stock_gqa.onnx" --device cuda ${LM_GRAPH:-} \
      --contexts ${LM_CONTEXTS:-1024,4096,16384,32768,65536,131072} --batches 1,8 --steps ${LM_STEPS:-30} \
      --max-cache-gib 24 --out "$log/results" --device-name "$gpu" >> "$log/lm.log" 2>&1
    echo "bench rc $?" >> "$log/lm.log"
  )
  record "LM generate (GPT-2-small shape, fp16)" "$(grep -q 'generate rc 0' "$log/lm.log" && echo pass || echo FAIL)" "$(grep -E 'per-token|per-step|equal-work' "$log/lm.log" | head -n 3 | tr '\n' ' ')"
  record "LM generate, CUDA graph" "$(grep -q 'generate rc 0' "$log/lm-graph.log" && echo pass || echo FAIL)" "$(grep -E 'per-token|per-step|equal-work|Error|error' "$log/lm-graph.log" | head -n 3 | tr '\n' ' ')"
  record "LM bench vs stock attention" "$(grep -q 'bench rc 0' "$log/lm.log" && echo done || echo FAIL)" "$(ls "$log"/results/*.md 2>/dev/null | head -n 1)"
fi
if want lmhf; then
  (
    hf=/tmp/hf
    # Exported before the GPU build of ONNX Runtime is put on the path: its staged copy leaves out
    # onnxruntime.transformers (the optimizer), which the machine's own CPU build has.
    mk() { python3 models/make_hf_lm.py "$@" --preset gpt2-small --dtype float16 --max-pos 140000 --device cuda; }
    # LMHF_ATTENTION_OP=0 skips the opset-23 export (ONNX's Attention op) and its baseline.
    attn=${LMHF_ATTENTION_OP:-1}
    { mk $hf --ort-optimize && { [ "$attn" = 0 ] || mk $hf/opset23 --opset 23; }; } > "$log/lmhf.log" 2>&1
    echo "export rc $?" >> "$log/lmhf.log"
    source /tmp/ortgpu/env.sh || exit 3
    .carry/bin/power-retention rewrite $hf/stock.onnx -o $hf >> "$log/lmhf.log" 2>&1
    for g in "" --cuda-graph; do
      .carry/bin/power-retention generate $hf --device cuda $g --new-tokens 48 --prompt-lengths 40,100,7,300 >> "$log/lmhf.log" 2>&1
      echo "generate${g:+ graph} rc $?" >> "$log/lmhf.log"
    done
    extra=(); [ "$attn" = 0 ] || extra=(--baseline "ONNX Attention op=$hf/opset23/stock.onnx")
    .carry/bin/power-retention bench $hf --stock $hf/stock.onnx --baseline "ORT-optimized=$hf/stock_opt.onnx" \
      "${extra[@]}" --device cuda --cuda-graph \
      --contexts ${LM_CONTEXTS:-1024,4096,16384,32768,65536,131072} --batches 1,8 --steps ${LM_STEPS:-30} \
      --max-cache-gib 24 --out "$log/results-hf" --device-name "$gpu" >> "$log/lmhf.log" 2>&1
    echo "bench rc $?" >> "$log/lmhf.log"
  )
  record "HF GPT-2 export" "$(grep -q 'export rc 0' "$log/lmhf.log" && echo pass || echo FAIL)" "$(grep -E '^stock' "$log/lmhf.log" | tr '\n' ' ')"
  record "HF GPT-2 generate (eager, graph)" "$(grep -q 'generate graph rc 0' "$log/lmhf.log" && grep -q 'generate rc 0' "$log/lmhf.log" && echo pass || echo FAIL)" "$(grep -E 'per-token|equal-work' "$log/lmhf.log" | tr '\n' ' ')"
  record "HF GPT-2 bench" "$(grep -q 'bench rc 0' "$log/lmhf.log" && echo done || echo FAIL)" "$(ls "$log"/results-hf/*.md 2>/dev/null | head -n 1)"
fi
if want lmprof; then
  (
    : > "$log/lmprof.log"
    source /tmp/ortgpu/env.sh || exit 3
    [ -f /tmp/lm/stock_gqa.onnx ] || python3 models/make_lm.py /tmp/lm --preset gpt2-small --dtype float16 --max-pos 140000 --stock-fused --stock-gqa >> "$log/lmprof.log" 2>&1
    for ctx in 1024 32768; do
      python3 benches/gpu/profile_step.py /tmp/lm/stock.onnx /tmp/lm/stock_fused.onnx /tmp/lm/stock_gqa.onnx --context $ctx >> "$log/lmprof.log" 2>&1
    done
    echo "lmprof rc $?" >> "$log/lmprof.log"
  )
  while IFS= read -r line; do record "stock step profile" "-" "$line"; done < <(grep 'per run (wall)' "$log/lmprof.log")
fi
if want kernelsum; then
  (
    : > "$log/kernelsum.log"
    source /tmp/ortgpu/env.sh || exit 3
    [ -f /tmp/lm/retention.json ] || python3 models/make_lm.py /tmp/lm --preset gpt2-small --dtype float16 --max-pos 140000 --stock-fused >> "$log/kernelsum.log" 2>&1
    OUT="$log" scripts/kernel-sum.sh /tmp/lm "${KSUM_PROMPTS:-100}" >> "$log/kernelsum.log" 2>&1
    echo "kernelsum rc $?" >> "$log/kernelsum.log"
  )
  record "kernel sum per decode step (ncu)" "$(grep -q 'kernelsum rc 0' "$log/kernelsum.log" && echo done || echo FAIL)" "$(grep -E '^kernel time per decode step|^per-token latency|ncu not found' "$log/kernelsum.log" | tr '\n' ' ')"
fi
if want pending; then
  [ -d .carry/pending ] || [ ! -f .carry/pending.tar.xz ] || tar -C .carry -xJf .carry/pending.tar.xz
  # PENDING="packed-rows fused-scan-alone" picks variants (default: every one, the whole series
  # first), for when one call's 10 minutes cannot hold every variant's two test runs, two
  # sanitizers and timings.
  names=${PENDING:-$(grep -v '^#' cuda/pending/series | sed 's/\.patch$//' | tac) $(ls .carry/pending 2>/dev/null | grep -- '-alone$')}
  for name in $names; do
    dir=.carry/pending/$name
    [ -f "$dir/libpr_test.so" ] || { record "pending $name" "FAIL" "no $dir/libpr_test.so"; continue; }
    PR_GPU_LIB=$PWD/$dir/libpr_test.so python3 tests/gpu/test_kernels.py > "$log/pending-$name-kernels.log" 2>&1
    krc=$?
    record "pending $name: kernels" "$([ $krc -eq 0 ] && echo pass || echo FAIL)" "$(tail -n 1 "$log/pending-$name-kernels.log")"
    PR_GPU_LIB=$PWD/$dir/nowgmma/libpr_test.so python3 tests/gpu/test_kernels.py > "$log/pending-$name-nowgmma.log" 2>&1
    record "pending $name: kernels, mma.sync" "$([ $? -eq 0 ] && echo pass || echo FAIL)" "$(tail -n 1 "$log/pending-$name-nowgmma.log")"
    for tool in memcheck racecheck; do
      PR_GPU_LIB=$PWD/$dir/libpr_test.so compute-sanitizer --tool "$tool" --kernel-name kns=retention_ --error-exitcode 9 \
        python3 tests/gpu/test_kernels.py --small > "$log/pending-$name-$tool.log" 2>&1
      rc=$?
      record "pending $name: $tool" "$([ $rc -eq 0 ] && echo pass || echo FAIL)" "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log/pending-$name-$tool.log" | tail -n 1)"
    done
    for round in 1 2; do
      for lib in "$PWD/.carry/gpu" "$PWD/$dir"; do
        tag=$([ "$lib" = "$PWD/.carry/gpu" ] && echo built || echo "$name")
        # 16 heads as in the bench; 8, the fewest that cuda/pending/fused-scan.patch fuses
        { PR_GPU_LIB=$lib/libpr_test.so python3 benches/gpu/prefill_split.py --chunks 512,1024
          PR_GPU_LIB=$lib/libpr_test.so python3 benches/gpu/prefill_split.py --chunks 512,1024 --heads 8; } > "$log/pending-split-$tag-$round.log" 2>&1
        while IFS= read -r line; do record "prefill split, $tag, round $round" "-" "$line"; done < <(grep '^| [0-9]' "$log/pending-split-$tag-$round.log")
      done
    done
    # The figures the bars are about, with the package measured in the same run, once, for the
    # first variant whose kernel tests pass: its prefill and decode, and the built decode beside it.
    if [ $krc -eq 0 ] && [ -z "${pending_benched:-}" ]; then
      pending_benched=1
      PR_GPU_LIB=$PWD/$dir/libpr_test.so python3 benches/gpu/bench_kernels.py > "$log/pending-$name-bench.log" 2>&1
      record "pending $name: kernels vs package" "$([ $? -eq 0 ] && echo done || echo FAIL)" "tables in $log/pending-$name-bench.log"
      python3 benches/gpu/bench_kernels.py --decode-only > "$log/pending-built-decode-bench.log" 2>&1
      record "built: decode vs package" "$([ $? -eq 0 ] && echo done || echo FAIL)" "table in $log/pending-built-decode-bench.log"
    fi
  done
fi

echo
echo "GPU: $gpu, driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)"
echo "| check | result | detail |"
echo "|---|---|---|"
printf '%s\n' "${summary[@]}"
