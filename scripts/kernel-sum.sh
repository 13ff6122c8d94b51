#!/usr/bin/env bash
# On a GPU machine: the summed GPU kernel time of one decode step of `power-retention generate`,
# measured with Nsight Compute, and the per-token latency of the same generate (CUDA graph) against
# it (the bar: latency within 1.5x the kernels' sum).
#
# Difference method: two ncu runs of generate (ORT's CUDA EP, no CUDA graph, no equal-work check),
# identical but for --new-tokens A < B. Kernel time of run B minus run A, divided by B - A, is the
# kernel time of one decode step: session set-up, prefill and the first A - 1 steps are the same
# in both runs and cancel. With B - 1 below the window capacity C (64 in models/make_lm.py), no
# step folds its window into the state, so this is the typical step (a folding step, one in C,
# costs more). Kernels only: memory copies (ids in, logits out) are not counted.
#
# Usage: scripts/kernel-sum.sh [MODEL_DIR] [PROMPT_LENGTHS]      (defaults: /tmp/lm 100; "100,100" = batch 2)
#   env: PR_BIN      the CLI (default .carry/bin/power-retention)
#        NCU         Nsight Compute's CLI (default ncu)
#        KSUM_TOKENS the two --new-tokens values (default "4 36")
#        OUT         where the reports and logs go (default /tmp; files in $OUT/kernel-sum/)
#        ORT_DYLIB_PATH / POWER_RETENTION_LIB as for generate (scripts/gpu-check.sh: source /tmp/ortgpu/env.sh)
# Prints "kernel time per decode step: ...", the kernels making it up, and "per-token latency ...".
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-/tmp/lm}
prompts=${2:-100}
bin=${PR_BIN:-.carry/bin/power-retention}
ncu=${NCU:-ncu}
read -r a b <<< "${KSUM_TOKENS:-4 36}"
out=${OUT:-/tmp}/kernel-sum
mkdir -p "$out"
export POWER_RETENTION_LIB=${POWER_RETENTION_LIB:-$PWD/.carry/plugin/libpower_retention_ort.so}
command -v "$ncu" >/dev/null || { echo "ncu not found: put Nsight Compute on PATH or set NCU=/path/to/ncu"; exit 2; }
[ "$a" -lt "$b" ] || { echo "KSUM_TOKENS: want A < B, got '$a $b'"; exit 2; }
args=(generate "$model" --device cuda --no-check --prompt-lengths "$prompts" --seed 0)
for n in "$a" "$b"; do
  if ! "$ncu" --clock-control none --cache-control none --metrics gpu__time_duration.sum -f -o "$out/run-$n" \
      "$bin" "${args[@]}" --new-tokens "$n" > "$out/run-$n.log" 2>&1; then
    tail -n 20 "$out/run-$n.log"; exit 1
  fi
  "$ncu" --import "$out/run-$n.ncu-rep" --csv --page raw --print-units base > "$out/run-$n.csv"
done
if ! "$bin" "${args[@]}" --new-tokens "$b" --cuda-graph > "$out/graph.log" 2>&1; then
  tail -n 20 "$out/graph.log"; exit 1
fi
python3 - "$out/run-$a.csv" "$out/run-$b.csv" "$a" "$b" "$prompts" "$out/graph.log" <<'PY'
import csv, re, sys
from collections import Counter

METRIC = "gpu__time_duration.sum"
TO_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}


def kernels(path):
    """(kernel name, µs) per profiled kernel launch, from ncu --csv --page raw."""
    rows = list(csv.reader(open(path, newline="")))
    head = next(i for i, r in enumerate(rows) if METRIC in r)
    cols = rows[head]
    names = [c for c in ("Kernel Name", "Demangled Name", "Function Name", "Name") if c in cols]
    t, ident = cols.index(METRIC), cols.index("ID") if "ID" in cols else 0
    name = cols.index(names[0]) if names else ident
    unit, out = "nsecond", []
    for r in rows[head + 1:]:
        if len(r) <= t:
            continue
        if not r[ident].strip().isdigit():  # the units row
            unit = r[t].strip() or unit
            continue
        out.append((r[name], float(r[t].replace(",", "")) * TO_US[unit]))
    return out


fa, fb, a, b, prompts, graph_log = sys.argv[1:]
steps = int(b) - int(a)
ka, kb = kernels(fa), kernels(fb)
per_step = (sum(t for _, t in kb) - sum(t for _, t in ka)) / steps
count = (len(kb) - len(ka)) / steps
batch = len(prompts.split(","))
print(f"kernel time per decode step: {per_step:.1f} us ({count:.1f} kernels per step; runs of {a} and {b} "
      f"new tokens, batch {batch}, prompt lengths {prompts})")
by_name = Counter()
for n, t in kb:
    by_name[n] += t / steps
for n, t in ka:
    by_name[n] -= t / steps
print("  kernels per step, us (name: total per step):")
for n, t in sorted(by_name.items(), key=lambda x: -x[1])[:15]:
    if t > 0.05:
        print(f"    {t:9.2f}  {n[:110]}")
m = re.search(r"per-token latency median ([0-9.]+) ms", open(graph_log).read())
if m:
    lat = float(m.group(1)) * 1e3
    print(f"per-token latency with CUDA graph: {lat / 1e3:.3f} ms median = {lat / per_step:.2f}x the kernel sum (bar 1.5x)")
    breakdown = re.search(r"per-step medians\s+(.*)", open(graph_log).read())
    if breakdown:
        print(f"  per-step medians: {breakdown.group(1)}")
else:
    print("per-token latency with CUDA graph: not found in " + graph_log)
PY
