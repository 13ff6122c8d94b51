"""Where one decode step of a KV-cache model goes, per operator, on ONNX Runtime's CUDA EP.

    python3 benches/gpu/profile_step.py MODEL.onnx [MODEL.onnx ...] [--context 1024] [--batch 1] [--runs 20] [--device cpu]

Each model runs one-token steps with random caches of `context` tokens, every input and output on
the device through IO binding (as `power-retention bench` drives it), with ORT's profiler on. It
prints the wall time per run and, per operator type, the kernel time per run and the provider the
nodes ran on; the gap between the two is ORT's own time. It exists to explain a baseline that is
slower than its kernels should make it (the fused-attention stock models, RESULTS.md).
"""
import argparse
import collections
import json
import os
import time

import numpy as np
import onnxruntime as ort

PROVIDER = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
NP = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def feeds(sess, batch, context, device):
    """Device values for every input: ids/positions (batch, 1), caches (batch, heads, context, d)."""
    out = {}
    rng = np.random.default_rng(0)
    for i in sess.get_inputs():
        dims = []
        for d in i.shape:
            if isinstance(d, int):
                dims.append(d)
            elif "batch" in d:
                dims.append(batch)
            elif d in ("seq", "sequence_length") or "seq" == d:
                dims.append(1)
            else:  # the past length, whatever the export calls it
                dims.append(context)
        if i.name.startswith("past") and len(dims) == 4:
            dims[2] = context
        if i.name == "attention_mask":
            dims = [batch, context + 1]
        ty = NP[i.type]
        if ty in (np.int64, np.int32):
            v = np.full(dims, context if "position" in i.name else 1, dtype=ty)
        else:
            v = rng.uniform(-1, 1, dims).astype(ty)
        out[i.name] = ort.OrtValue.ortvalue_from_numpy(v, device, 0)
    return out


def profile(path, batch, context, runs, device):
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join("/tmp", os.path.basename(path) + "-prof")
    sess = ort.InferenceSession(path, so, providers=[PROVIDER[device]])
    vals = feeds(sess, batch, context, device)
    b = sess.io_binding()
    for k, v in vals.items():
        b.bind_ortvalue_input(k, v)
    for o in sess.get_outputs():
        b.bind_output(o.name, device)
    for _ in range(3):
        sess.run_with_iobinding(b)
    t = time.perf_counter()
    for _ in range(runs):
        sess.run_with_iobinding(b)
    wall = (time.perf_counter() - t) / runs
    events = json.load(open(sess.end_profiling()))
    total, count, prov = collections.Counter(), collections.Counter(), {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            total[op] += e["dur"]
            count[op] += 1
            prov.setdefault(op, set()).add(e["args"].get("provider", "?"))
    n = runs + 3
    print(f"\n{os.path.basename(path)}: B{batch} context {context}: {wall * 1e3:.3f} ms per run (wall), "
          f"{sum(total.values()) / n / 1e3:.3f} ms of node time per run")
    print("| op | provider | nodes per run | node time per run, us |")
    print("|---|---|---|---|")
    for op, d in total.most_common(8):
        print(f"| {op} | {','.join(sorted(prov[op]))} | {count[op] / n:.0f} | {d / n:.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--device", choices=list(PROVIDER), default="cuda", help="cpu: to try it without a GPU")
    a = ap.parse_args()
    for m in a.models:
        profile(m, a.batch, a.context, a.runs, a.device)


if __name__ == "__main__":
    main()
