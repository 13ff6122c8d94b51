"""Make the committed package fixtures tests/golden/data/<case>.npz (run once; needs torch, einops and
the `retention` 1.0.7 wheel, e.g. `PYTHONPATH=/path/to/unpacked/wheel python tests/golden/make_fixtures.py`).

For every case of cases.py and every dtype (float32, float16, bfloat16) it runs
`retention.reference.power_retention` on the CPU on the case's inputs rounded to that dtype
(chunk_size = the case's chunk, return_final_state=True, scale as in the case) and stores, as float32:
    y_<dtype>            the package's output (B, S, Hq, Dv)
    state_<dtype>        its final state, converted exactly to our compact layout (B, Hkv, D, Dv)
    sum_of_keys_<dtype>  its final sum of keys, compact (B, Hkv, D)
(states only where Case.store_state(dtype), to keep data/ small), plus `meta` (the case, the package
version, checksums of the inputs so that a changed generator is detected). Inputs are not stored: the
tests regenerate them from the seed.

For the PowerRetentionStep cases (cases.DECODE_CASES with one new token per step) it also stores
data/<decode case>.npz: y_<dtype> (B, steps, Hq, Dv), the package's per-token decode outputs
(`retention.reference.power_retention_inference`, switch_over_seq_len = C; see run_package_decode).

Package quirks handled here (power-retention.md §3.3, §9): S = 0 is not passed to the package (it
cannot chunk an empty sequence; the fixture holds the empty output only); the package keeps the state
in the input dtype and requires `initial_state` in that dtype (our float32 past state is rounded to it
for the package only — that rounding is part of the package's error, not ours); `sum_of_keys` is float32;
the package's state is in its 16x16-tiled layout and is converted with
power_retention_gold.tiled_to_compact.
"""
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cases as C  # noqa: E402


def input_digest(inp):
    """Checksums of the inputs (sum and sum of |x| per tensor, float64): the tests compare them with
    a relative tolerance of 1e-6, so a changed generator is caught but a last-bit difference of libm
    (logsigmoid) between machines is not a false alarm."""
    out = {}
    for n in ("q", "k", "v", "log_gate", "past_state", "past_sum_of_keys"):
        x = inp[n]
        if x is not None:
            x = np.asarray(x).astype(np.float64)
            out[n] = [float(x.sum()), float(np.abs(x).sum()), list(x.shape)]
    return out


def digests_match(a, b, rtol=1e-6):
    """True when two input_digest results agree (same tensors and shapes, checksums within rtol)."""
    if set(a) != set(b):
        return False
    return all(list(a[n][2]) == list(b[n][2]) and np.allclose(a[n][:2], b[n][:2], rtol=rtol, atol=1e-9 * max(1.0, b[n][1]))
               for n in a)


def run_package(case, dtype, inp):
    import torch
    from retention.reference import power_retention
    G = C.gold_module()
    td = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    T = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a).astype(np.float32))).to(td)  # noqa: E731
    kw = {}
    if inp["log_gate"] is not None:
        kw["log_G"] = torch.from_numpy(inp["log_gate"])
    if inp["past_state"] is not None:
        S0 = G.compact_to_tiled(inp["past_state"].astype(np.float64), case.D)
        s0 = G.compact_to_tiled(inp["past_sum_of_keys"].astype(np.float64)[..., None], case.D)[..., 0]
        kw["initial_state"] = torch.from_numpy(S0.astype(np.float32)).to(td)
        kw["sum_of_keys"] = torch.from_numpy(s0.astype(np.float32))
    out = power_retention(Q=T(inp["q"]), K=T(inp["k"]), V=T(inp["v"]), deg=2, scale=case.scale,
                          chunk_size=case.chunk, return_final_state=True, **kw)
    y, S, s = out
    y = y.float().numpy()
    if S is None:  # t' < switch_over cannot happen with padding to the chunk; kept for safety
        return y, None, None
    S = G.tiled_to_compact(S.double().numpy(), case.D).astype(np.float32)
    s = G.tiled_to_compact(s.double().numpy()[..., None], case.D)[..., 0].astype(np.float32)
    return y, S, s


def run_package_decode(case, dtype, inp):
    """The package's decode protocol per sequence (spec §4.1, "prefill returns the state, window
    starts empty"): prefill P tokens with power_retention, then one power_retention_inference call
    per new token with K/V/log_G = the unfolded window including that token and
    switch_over_seq_len = C; when the window reaches C tokens the returned state replaces the old one
    and the window restarts after the token. Returns outputs (B, steps, Hq, Dv) float32."""
    import torch
    from retention.reference import power_retention, power_retention_inference
    td = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    T = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a).astype(np.float32))).to(td)  # noqa: E731
    q, k, v, g = inp["q"], inp["k"], inp["v"], inp["log_gate"]
    gate = (lambda b, lo, hi: None) if g is None else (lambda b, lo, hi: torch.from_numpy(np.ascontiguousarray(g[b:b + 1, lo:hi])))
    ys = np.zeros((case.B, case.steps, case.Hq, case.D), np.float32)
    for b in range(case.B):
        S = s = None
        if case.P > 0:
            _, S, s = power_retention(Q=T(q[b:b + 1, :case.P]), K=T(k[b:b + 1, :case.P]), V=T(v[b:b + 1, :case.P]),
                                      log_G=gate(b, 0, case.P), deg=2, scale=case.scale, chunk_size=16,
                                      return_final_state=True)
            assert S is not None
        lo = case.P
        for i in range(case.steps):
            t = case.P + case.L0[b] + i
            y, S2, s2 = power_retention_inference(Q=T(q[b:b + 1, t:t + 1]), K=T(k[b:b + 1, lo:t + 1]),
                                                  V=T(v[b:b + 1, lo:t + 1]), log_G=gate(b, lo, t + 1),
                                                  initial_state=S, sum_of_keys=s, deg=2, scale=case.scale,
                                                  switch_over_seq_len=case.C)
            ys[b, i] = y[0, 0].float().numpy()
            if t + 1 - lo >= case.C:
                S, s, lo = S2, s2, t + 1
    return ys


def main_decode(names=None):
    import torch
    torch.set_num_threads(2)
    for case in C.DECODE_CASES:
        if (names and case.name not in names) or not case.package_fixture:
            continue
        arrays, digests = {}, {}
        for dtype in C.DTYPES:
            inp = C.make_decode_inputs(case, dtype)
            digests[dtype] = input_digest({**inp, "past_state": None, "past_sum_of_keys": None})
            arrays[f"y_{dtype}"] = run_package_decode(case, dtype, inp)
        meta = {"case": dict(case.__dict__), "function": "retention.reference.power_retention_inference",
                "torch": torch.__version__, "input_digest": digests}
        np.savez_compressed(C.decode_fixture_path(case), meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
        print(f"{case.name:34s} {C.decode_fixture_path(case).stat().st_size / 1e3:8.1f} kB", flush=True)


def main(names=None):
    import torch
    import retention
    torch.set_num_threads(2)
    torch.manual_seed(0)
    version = getattr(retention, "__version__", None)
    if version is None:
        from importlib.metadata import version as v
        version = v("retention")
    C.DATA.mkdir(exist_ok=True)
    for case in C.CASES:
        if names and case.name not in names:
            continue
        t0 = time.time()
        arrays = {}
        digests = {}
        for dtype in C.DTYPES:
            inp = C.make_inputs(case, dtype)
            digests[dtype] = input_digest(inp)
            if case.S == 0:
                arrays[f"y_{dtype}"] = np.zeros((case.B, 0, case.Hq, case.D), np.float32)
                continue
            y, S, s = run_package(case, dtype, inp)
            arrays[f"y_{dtype}"] = y
            if case.store_state(dtype) and S is not None:
                arrays[f"state_{dtype}"] = S
                arrays[f"sum_of_keys_{dtype}"] = s
        meta = {"case": {k: v for k, v in case.__dict__.items()}, "package": f"retention {version}",
                "function": "retention.reference.power_retention", "torch": torch.__version__,
                "input_digest": digests}
        np.savez_compressed(C.fixture_path(case), meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
        print(f"{case.name:34s} {time.time() - t0:6.1f}s  {C.fixture_path(case).stat().st_size / 1e3:8.1f} kB", flush=True)
    main_decode(names)
    total = sum(p.stat().st_size for p in C.DATA.glob("*.npz"))
    print(f"total {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
