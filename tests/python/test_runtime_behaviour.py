"""The plugin as a Python ONNX Runtime user meets it: in-place decode buffers through IO binding,
concurrent Run calls on one session, and shape inference visible in saved optimised models.

Run with the repo's venv: .venv/bin/python -m pytest tests/python
"""
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT.parent / "shared" / "spec"))
import power_retention_gold as gold  # noqa: E402


def plugin_path():
    env = os.environ.get("POWER_RETENTION_LIB")
    if env:
        return env
    for profile in ("release", "debug"):
        p = ROOT / "target" / profile / "libpower_retention_ort.so"
        if p.exists():
            return str(p)
    pytest.fail("plugin library not built: run cargo build --release (or set POWER_RETENTION_LIB)")


STEP_IN = ["query", "key", "value", "log_gate", "past_state", "past_sum_of_keys", "past_key_cache",
           "past_value_cache", "past_log_gate_cache", "cache_length"]
STEP_OUT = ["output", "present_state", "present_sum_of_keys", "present_key_cache", "present_value_cache",
            "present_log_gate_cache", "present_cache_length"]


def model(op, inputs, outputs, **attrs):
    types = {"cache_length": TP.INT64, "present_cache_length": TP.INT64}
    node = helper.make_node(op, inputs, outputs, domain="power_retention", **attrs)
    g = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, types.get(n, TP.FLOAT), None) for n in inputs if n],
        [helper.make_tensor_value_info(n, types.get(n, TP.FLOAT), None) for n in outputs if n])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("power_retention", 1)])
    m.ir_version = 10
    return m


def session(m, threads=2):
    so = ort.SessionOptions()
    so.register_custom_ops_library(plugin_path())
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_in_place_decode_buffers_are_bit_identical_to_distinct_ones():
    """Binding each present_* output to its past_* input's OrtValue (one buffer, updated in place)
    gives exactly the outputs of a loop that copies every buffer between steps."""
    rng = np.random.default_rng(3)
    b, hq, h, d, cap, steps = 2, 4, 2, 16, 8, 21
    dx = d * (d + 1) // 2
    sess = session(model("PowerRetentionStep", STEP_IN, STEP_OUT))
    toks = [(rng.standard_normal((b, 1, hq, d)).astype(np.float32) / 2,
             rng.standard_normal((b, 1, h, d)).astype(np.float32) / 2,
             rng.standard_normal((b, 1, h, d)).astype(np.float32),
             -np.abs(rng.standard_normal((b, 1, h))).astype(np.float32) * 0.2) for _ in range(steps)]
    init = {"past_state": np.zeros((b, h, dx, d), np.float32), "past_sum_of_keys": np.zeros((b, h, dx), np.float32),
            "past_key_cache": np.zeros((b, cap, h, d), np.float32), "past_value_cache": np.zeros((b, cap, h, d), np.float32),
            "past_log_gate_cache": np.zeros((b, cap, h), np.float32), "cache_length": np.array([0, 5], np.int64)}

    # Distinct buffers: outputs copied back to inputs on the host.
    state = dict(init)
    distinct = []
    for q, k, v, g in toks:
        outs = sess.run(None, {"query": q, "key": k, "value": v, "log_gate": g, **state})
        distinct.append(outs[0])
        state = dict(zip(STEP_IN[4:], outs[1:]))

    # One buffer per pair, bound to both the input and the output.
    io = sess.io_binding()
    bufs = {name: ort.OrtValue.ortvalue_from_numpy(arr.copy()) for name, arr in init.items()}
    for past, present in zip(STEP_IN[4:], STEP_OUT[1:]):
        io.bind_ortvalue_input(past, bufs[past])
        io.bind_ortvalue_output(present, bufs[past])
    out = ort.OrtValue.ortvalue_from_numpy(np.zeros((b, 1, hq, d), np.float32))
    io.bind_ortvalue_output("output", out)
    ptrs = {n: v.data_ptr() for n, v in bufs.items()}
    for i, (q, k, v, g) in enumerate(toks):
        for name, arr in (("query", q), ("key", k), ("value", v), ("log_gate", g)):
            io.bind_cpu_input(name, arr)
        sess.run_with_iobinding(io)
        np.testing.assert_array_equal(out.numpy(), distinct[i])
    assert {n: v.data_ptr() for n, v in bufs.items()} == ptrs, "buffers were reallocated"
    for name, arr in state.items():
        np.testing.assert_array_equal(bufs[name].numpy(), arr)


def test_eight_threads_running_one_session_get_identical_results():
    rng = np.random.default_rng(5)
    b, t, hq, h, d = 2, 300, 8, 2, 32
    feeds = {"query": rng.standard_normal((b, t, hq, d)).astype(np.float32) / 3,
             "key": rng.standard_normal((b, t, h, d)).astype(np.float32) / 3,
             "value": rng.standard_normal((b, t, h, d)).astype(np.float32),
             "log_gate": -np.abs(rng.standard_normal((b, t, h))).astype(np.float32) * 0.1}
    sess = session(model("PowerRetention", list(feeds), ["output", "present_state", "present_sum_of_keys"]))
    want = sess.run(None, feeds)
    ref = gold.dense(feeds["query"], feeds["key"], feeds["value"], feeds["log_gate"])
    assert np.linalg.norm(want[0] - ref) / np.linalg.norm(ref) < 1e-5

    def work(_):
        return [sess.run(None, feeds) for _ in range(6)]

    with ThreadPoolExecutor(8) as pool:
        for runs in pool.map(work, range(8)):
            for got in runs:
                for a, e in zip(got, want):
                    np.testing.assert_array_equal(a, e)


def test_session_reports_shapes_inferred_from_the_op_table():
    """Shape inference: symbolic dims flow from the inputs to the outputs and D is computed."""
    inputs = [helper.make_tensor_value_info("query", TP.FLOAT16, ["batch", "seq", 4, 64]),
              helper.make_tensor_value_info("key", TP.FLOAT16, ["batch", "seq", 2, 64]),
              helper.make_tensor_value_info("value", TP.FLOAT16, ["batch", "seq", 2, 32])]
    node = helper.make_node("PowerRetention", ["query", "key", "value"], ["output", "present_state"], domain="power_retention")
    g = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("output", TP.FLOAT16, None),
                                                helper.make_tensor_value_info("present_state", TP.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("power_retention", 1)])
    m.ir_version = 10
    shapes = {o.name: o.shape for o in session(m).get_outputs()}
    assert shapes["output"] == ["batch", "seq", 4, 32]
    assert shapes["present_state"] == ["batch", 2, 2080, 32]


def test_an_older_runtime_is_refused_with_a_clear_status():
    """ORT 1.20 lacks API 22: registration must fail with our message, not crash the process."""
    import subprocess
    old = ROOT / ".venv-ort120" / "bin" / "python"
    if not old.exists():
        pytest.fail("ONNX Runtime 1.20 venv missing: run scripts/setup.sh")
    code = ("import onnxruntime as o, sys\n"
            "so = o.SessionOptions()\n"
            "try:\n    so.register_custom_ops_library(sys.argv[1])\nexcept Exception as e:\n    print('REFUSED', e)\n")
    out = subprocess.run([str(old), "-c", code, plugin_path()], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "REFUSED" in out.stdout and "needs ONNX Runtime API 22" in out.stdout and "1.20.1" in out.stdout, out.stdout
