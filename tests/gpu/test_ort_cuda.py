"""The plugin on ONNX Runtime's CUDA execution provider (GPU machine only; scripts/gpu-check.sh).

Every node must run on CUDA (CPU fallback disabled). Checks: outputs and states against the CPU
provider and the float64 gold model in every dtype; prefill + in-place decode steps on device
buffers == prefill of everything; a decode step replayed from a CUDA graph gives the same results.
"""
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper

ROOT = Path(__file__).resolve().parents[2]
# The spec's gold model: beside the checkout here; carried in .carry/spec on the GPU machine.
for spec in (ROOT.parent / "shared" / "spec", ROOT / ".carry" / "spec"):
    if spec.exists():
        sys.path.insert(0, str(spec))
import power_retention_gold as gold  # noqa: E402

LIB = os.environ.get("POWER_RETENTION_LIB", str(ROOT / ".carry" / "plugin" / "libpower_retention_ort.so"))
DT = {"float32": (TP.FLOAT, np.float32), "float16": (TP.FLOAT16, np.float16)}
try:
    import ml_dtypes
    DT["bfloat16"] = (TP.BFLOAT16, ml_dtypes.bfloat16)
except ImportError:  # the GPU image has ml_dtypes with jax; keep float32/float16 otherwise
    pass
TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}
STEP_IN = ["query", "key", "value", "log_gate", "past_state", "past_sum_of_keys", "past_key_cache",
           "past_value_cache", "past_log_gate_cache", "cache_length"]
STEP_OUT = ["output", "present_state", "present_sum_of_keys", "present_key_cache", "present_value_cache",
            "present_log_gate_cache", "present_cache_length"]


def model(op, ins, outs, t, **attrs):
    def ty(n):
        if "cache_length" in n:
            return TP.INT64
        if n in ("query", "key", "value", "output") or n.endswith("key_cache") or n.endswith("value_cache"):
            return t
        return TP.FLOAT
    node = helper.make_node(op, ins, outs, domain="power_retention", **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, ty(n), None) for n in ins if n],
                          [helper.make_tensor_value_info(n, ty(n), None) for n in outs if n])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("power_retention", 1)])
    m.ir_version = 10
    return m.SerializeToString()


def session(m, cuda=True, graph=False):
    so = ort.SessionOptions()
    so.register_custom_ops_library(LIB)
    so.log_severity_level = 3
    if cuda:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        prov = [("CUDAExecutionProvider", {"enable_cuda_graph": "1" if graph else "0"})]
    else:
        prov = ["CPUExecutionProvider"]
    return ort.InferenceSession(m, so, providers=prov)


def run_bound(sess, feeds, names, shapes):
    """Runs with host buffers bound by their ONNX types (ORT's numpy conversion lacks bfloat16)."""
    io = sess.io_binding()
    code = {np.dtype(np.float32): TP.FLOAT, np.dtype(np.float16): TP.FLOAT16}
    for n, a in feeds.items():
        a = np.ascontiguousarray(a)
        feeds[n] = a
        c = TP.BFLOAT16 if a.dtype.name == "bfloat16" else code[a.dtype]
        io.bind_input(n, "cpu", 0, c, list(a.shape), a.ctypes.data)
    outs = []
    for n, (shape, c) in zip(names, shapes):
        buf = np.zeros(shape, {TP.FLOAT: np.float32, TP.FLOAT16: np.float16, TP.BFLOAT16: np.uint16}[c])
        io.bind_output(n, "cpu", 0, c, list(shape), buf.ctypes.data)
        outs.append(buf.view(DT["bfloat16"][1]) if c == TP.BFLOAT16 else buf)
    sess.run_with_iobinding(io)
    return outs


def to_f64(x):
    return np.asarray(x, np.float64)


def rel(a, b):
    a, b = to_f64(np.asarray(a)), to_f64(np.asarray(b))
    return np.inf if not np.isfinite(a).all() else float(np.linalg.norm(a - b) / np.linalg.norm(b))


CASES = [  # b, t, hq, h, d, dv, gated, past, chunk
    (2, 200, 8, 2, 64, 64, True, True, 64),
    (1, 1000, 4, 4, 32, 32, False, False, 64),
    (3, 7, 4, 1, 128, 64, True, False, 16),
    (1, 65, 2, 2, 64, 32, True, True, 128),
]


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-T{}-H{}/{}-D{}-Dv{}-g{}-p{}".format(*c[:8]))
def test_prefill_on_cuda_matches_cpu_and_gold(case, dtype):
    b, t, hq, h, d, dv, gated, past, chunk = case
    tt, nt = DT[dtype]
    rng = np.random.default_rng(t + hq)
    q = (rng.standard_normal((b, t, hq, d)) / d ** 0.25).astype(nt)
    k = (rng.standard_normal((b, t, h, d)) / d ** 0.25).astype(nt)
    v = rng.standard_normal((b, t, h, dv)).astype(nt)
    feeds = {"query": q, "key": k, "value": v}
    lg = None
    if gated:
        lg = np.log(1 / (1 + np.exp(-(rng.standard_normal((b, t, h)) + 2)))).astype(np.float32)
        feeds["log_gate"] = lg
    S0 = s0 = None
    if past:
        pk = rng.standard_normal((b, 20, h, d)) / d ** 0.25
        S0, s0 = gold.final_state(pk, rng.standard_normal((b, 20, h, dv)), None, lay=gold.compact_layout(d))
        feeds["past_state"], feeds["past_sum_of_keys"] = S0.astype(np.float32), s0.astype(np.float32)
    ins = [n if n in feeds else "" for n in ["query", "key", "value", "log_gate", "past_state", "past_sum_of_keys"]]
    m = model("PowerRetention", ins, ["output", "present_state", "present_sum_of_keys"], tt, chunk_size=chunk)
    dx = d * (d + 1) // 2
    shapes = [((b, t, hq, dv), tt), ((b, h, dx, dv), TP.FLOAT), ((b, h, dx), TP.FLOAT)]
    got = run_bound(session(m), feeds, ["output", "present_state", "present_sum_of_keys"], shapes)
    cpu = run_bound(session(m, cuda=False), feeds, ["output", "present_state", "present_sum_of_keys"], shapes)
    f64 = [x.astype(np.float64) for x in (q, k, v)]
    if past:
        # the gold model's initial-state path uses the package's tiled layout
        want = gold.dense(*f64, lg, S0=gold.compact_to_tiled(S0, d), s0=gold.compact_to_tiled(s0[..., None], d)[..., 0])
    else:
        want = gold.dense(*f64, lg)
    assert rel(got[0], want) <= TOL[dtype], f"cuda vs gold {rel(got[0], want):.2e}"
    assert rel(got[0], cpu[0]) <= TOL[dtype], f"cuda vs cpu {rel(got[0], cpu[0]):.2e}"
    # The CPU kernels and the CUDA SIMT kernel accumulate the state in f32 from f32 operands (2e-5);
    # the tensor-core kernel (bf16 inputs) rounds the state and gated values to bf16 where they
    # enter an mma, as the package does, so bf16 gets the bf16 tolerance.
    state_tol = TOL[dtype] if dtype == "bfloat16" else 2e-5
    for g, c in zip(got[1:], cpu[1:]):
        assert rel(g, c) <= state_tol, f"state cuda vs cpu {rel(g, c):.2e}"


def step_buffers(b, h, d, dv, cap, nt, lengths):
    dx = d * (d + 1) // 2
    return {"past_state": np.zeros((b, h, dx, dv), np.float32), "past_sum_of_keys": np.zeros((b, h, dx), np.float32),
            "past_key_cache": np.zeros((b, cap, h, d), nt), "past_value_cache": np.zeros((b, cap, h, dv), nt),
            "past_log_gate_cache": np.zeros((b, cap, h), np.float32), "cache_length": np.array(lengths, np.int64)}


@pytest.mark.parametrize("graph", [False, True], ids=["plain", "cuda_graph"])
@pytest.mark.parametrize("cap", [1, 16, 64])
def test_prefill_then_in_place_steps_on_device_equal_prefill_of_everything(cap, graph):
    dtype = "float16"
    tt, nt = DT[dtype]
    b, hq, h, d, dv, p, steps = 3, 8, 2, 64, 64, 50, 70
    rng = np.random.default_rng(cap)
    total = p + steps
    q = (rng.standard_normal((b, total, hq, d)) / d ** 0.25).astype(nt)
    k = (rng.standard_normal((b, total, h, d)) / d ** 0.25).astype(nt)
    v = rng.standard_normal((b, total, h, dv)).astype(nt)
    lg = np.log(1 / (1 + np.exp(-(rng.standard_normal((b, total, h)) + 3)))).astype(np.float32)
    want = gold.dense(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), lg)
    pre = session(model("PowerRetention", ["query", "key", "value", "log_gate"], ["output", "present_state", "present_sum_of_keys"], tt))
    _, st, sk = pre.run(None, {"query": q[:, :p], "key": k[:, :p], "value": v[:, :p], "log_gate": lg[:, :p]})
    init = step_buffers(b, h, d, dv, cap, nt, [0] * b)
    init["past_state"], init["past_sum_of_keys"] = st, sk
    step = session(model("PowerRetentionStep", STEP_IN, STEP_OUT, tt), graph=graph)
    io = step.io_binding()
    dev = {n: ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for n, a in init.items()}
    for past, present in zip(STEP_IN[4:], STEP_OUT[1:]):
        io.bind_ortvalue_input(past, dev[past])
        io.bind_ortvalue_output(present, dev[past])
    tok = {n: ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for n, a in
           {"query": q[:, p:p + 1].copy(), "key": k[:, p:p + 1].copy(), "value": v[:, p:p + 1].copy(), "log_gate": lg[:, p:p + 1].copy()}.items()}
    for n, val in tok.items():
        io.bind_ortvalue_input(n, val)
    out = ort.OrtValue.ortvalue_from_numpy(np.zeros((b, 1, hq, dv), nt), "cuda", 0)
    io.bind_ortvalue_output("output", out)
    if graph:
        # With CUDA graphs ORT runs the model several times inside the first Run (warm-up, capture,
        # replay), which would apply this stateful step more than once: capture first, then put
        # the buffers back. Every later Run is one replay, i.e. one step.
        step.run_with_iobinding(io)
        for n, a in init.items():
            dev[n].update_inplace(a)
    errs, lens = [], []
    for i in range(p, total):
        for n, src in (("query", q), ("key", k), ("value", v), ("log_gate", lg)):
            tok[n].update_inplace(np.ascontiguousarray(src[:, i:i + 1]))
        step.run_with_iobinding(io)
        errs.append(rel(out.numpy(), want[:, i:i + 1]))
        lens.append(int(dev["cache_length"].numpy()[0]))
    bad = [j for j, e in enumerate(errs) if e > TOL[dtype]]
    assert not bad, (f"C={cap} graph={graph}: {len(bad)} bad steps, first {bad[0]} (err {errs[bad[0]]:.2e}); "
                     f"errors of steps 0-5 {[f'{e:.1e}' for e in errs[:6]]}, cache lengths {lens[:8]}")
    lengths = dev["cache_length"].numpy()
    assert (lengths == (steps % cap if cap > 1 else 0)).all(), lengths
