"""Per-run wall time of a KV-cache model's one-token steps when the cache grows by one token each
step (present fed back as past, as `power-retention bench` does), against steps that repeat one
length. Tells a per-shape cost in ONNX Runtime (the first run at each new length) from a steady one.

    python3 benches/gpu/grow_step.py MODEL.onnx [--context 1024] [--steps 10] [--device cuda]
"""
import argparse
import time

import numpy as np
import onnxruntime as ort

from profile_step import PROVIDER, feeds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", choices=list(PROVIDER), default="cuda")
    a = ap.parse_args()
    sess = ort.InferenceSession(a.model, providers=[PROVIDER[a.device]])
    vals = feeds(sess, 1, a.context, a.device)
    outs = [o.name for o in sess.get_outputs()]
    for mode in ("same length", "growing"):
        v = dict(vals)
        times = []
        for step in range(a.steps):
            b = sess.io_binding()
            for k, x in v.items():
                b.bind_ortvalue_input(k, x)
            for o in outs:
                b.bind_output(o, a.device)
            t = time.perf_counter()
            sess.run_with_iobinding(b)
            times.append(time.perf_counter() - t)
            if mode == "growing":
                got = dict(zip(outs, b.get_outputs()))
                for k in v:
                    if k.startswith("past_key_values."):
                        v[k] = got[k.replace("past_key_values.", "present.")]
                    elif k == "position_ids":
                        v[k] = ort.OrtValue.ortvalue_from_numpy(np.full([1, 1], a.context + step + 1, np.int64), a.device, 0)
        print(f"{a.model} {mode}: ms per run " + " ".join(f"{t * 1e3:.2f}" for t in times))


if __name__ == "__main__":
    main()
