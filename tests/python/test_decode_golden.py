"""Golden tests of `PowerRetentionStep` through ONNX Runtime (CPU EP): `PowerRetention` prefill,
ragged pre-filled caches, then a decode loop whose buffers go round through the host (distinct
input/output buffers; the in-place variant is in test_runtime_behaviour.py).

Checked per step: present_cache_length follows the fold rule (n = cache_length + S; n >= C folds all
n and gives 0, else n), the present caches hold exactly the unfolded tokens (bit-exact copies).
At the end: every output vs the float64 dense gold over each sequence's whole history and vs the
`retention` package's own decode (`power_retention_inference`, switch_over_seq_len = C; committed
fixture, cases with one new token per step), with the TOLERANCES of test_golden.py; the state vs the
gold state of the folded tokens. Unused cache slots of the initial caches are NaN ("don't-care").
"""
import functools
import json

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper

import test_golden as TG

C = TG.C
G = TG.G

STEP_IN = ["query", "key", "value", "log_gate", "past_state", "past_sum_of_keys", "past_key_cache",
           "past_value_cache", "past_log_gate_cache", "cache_length"]
STEP_OUT = ["output", "present_state", "present_sum_of_keys", "present_key_cache", "present_value_cache",
            "present_log_gate_cache", "present_cache_length"]
T_PORTS = {"query", "key", "value", "past_key_cache", "past_value_cache", "output", "present_key_cache",
           "present_value_cache"}


def step_session(case, dtype, gated):
    ins = [n if (gated or "log_gate" not in n) else "" for n in STEP_IN]
    outs = [n if (gated or "log_gate" not in n) else "" for n in STEP_OUT]

    def ty(n):
        return TG.ONNX_TYPE[dtype] if n in T_PORTS else TP.INT64 if "cache_length" in n else TP.FLOAT
    attrs = {} if case.scale is None else {"scale": float(case.scale)}
    node = helper.make_node("PowerRetentionStep", ins, outs, domain="power_retention", **attrs)
    graph = helper.make_graph([node], "decode",
                              [helper.make_tensor_value_info(n, ty(n), None) for n in ins if n],
                              [helper.make_tensor_value_info(n, ty(n), None) for n in outs if n])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("power_retention", 1)])
    m.ir_version = 10
    so = ort.SessionOptions()
    so.register_custom_ops_library(TG.plugin_path())
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]), [n for n in outs if n]


def run_step(sess, outs, feeds, like):
    """One Run with NaN-prefilled output buffers shaped like the matching inputs (`like`)."""
    b = sess.io_binding()
    for n, a in feeds.items():
        if a is not None:
            b.bind_ortvalue_input(n, TG.ort_value(a))
    res = {}
    for n in outs:
        src = like[n]
        buf = (np.full(src.shape, -1, np.int64) if src.dtype == np.int64
               else np.full(src.shape, np.nan, np.float32).astype(src.dtype))
        res[n] = buf
        b.bind_ortvalue_output(n, TG.ort_value(buf))
    sess.run_with_iobinding(b)
    return res


@functools.lru_cache(maxsize=None)
def decode_fixture(name):
    path = C.decode_fixture_path(C.DECODE_BY_NAME[name])
    if not path.exists():
        pytest.fail(f"missing fixture {path}: run tests/golden/make_fixtures.py")
    with np.load(path) as z:
        return {k: (json.loads(str(z[k])) if k == "meta" else z[k]) for k in z.files}


def test_decode_fixtures_match_cases():
    import make_fixtures
    for case in C.DECODE_CASES:
        if not case.package_fixture:
            continue
        fx = decode_fixture(case.name)
        assert fx["meta"]["case"] == json.loads(json.dumps(case.__dict__)), case.name
        for dt in C.DTYPES:
            inp = C.make_decode_inputs(case, dt)
            mine = make_fixtures.input_digest({**inp, "past_state": None, "past_sum_of_keys": None})
            assert make_fixtures.digests_match(mine, fx["meta"]["input_digest"][dt]), (case.name, dt)


@pytest.mark.parametrize("dtype", C.DTYPES)
@pytest.mark.parametrize("name", [c.name for c in C.DECODE_CASES])
def test_prefill_then_decode_steps(name, dtype):
    case = C.DECODE_BY_NAME[name]
    inp = C.make_decode_inputs(case, dtype)
    B, P, Cap, new, H, D = case.B, case.P, case.C, case.new, case.Hkv, case.D
    Dx = D * (D + 1) // 2
    gated = inp["log_gate"] is not None
    npdt = C.np_dtype(dtype)
    fails = []

    # prefill [0, P) with PowerRetention (P = 0 gives the zero state)
    pre = {n: (None if inp[n] is None else inp[n][:, :P]) for n in ("q", "k", "v", "q64", "k64", "v64", "log_gate")}
    pre["past_state"] = pre["past_sum_of_keys"] = None
    got = TG.run_prefill(C.Case("prefill", B, P, case.Hq, H, D, case.gate, case.scale, 64), dtype, pre)
    state = got["present_state"].astype(np.float32)
    ssum = got["present_sum_of_keys"].astype(np.float32)

    # ragged initial caches: sequence b holds tokens [P, P + L0[b]); slots beyond are NaN
    kc = np.full((B, Cap, H, D), np.nan, np.float32).astype(npdt)
    vc = kc.copy()
    gc = np.full((B, Cap, H), np.nan, np.float32)
    for b, L in enumerate(case.L0):
        kc[b, :L], vc[b, :L] = inp["k"][b, P:P + L], inp["v"][b, P:P + L]
        if gated:
            gc[b, :L] = inp["log_gate"][b, P:P + L]
    clen = np.array(case.L0, np.int64)
    lo = np.full(B, P)  # first unfolded token per sequence

    sess, outs = step_session(case, dtype, gated)
    ys = np.zeros((B, case.steps * new, case.Hq, D))
    for i in range(case.steps):
        idx = np.array([P + case.L0[b] + i * new + np.arange(new) for b in range(B)])  # (B, new)
        take = lambda a: None if a is None else np.stack([a[b, idx[b]] for b in range(B)])  # noqa: E731
        feeds = {"query": take(inp["q"]), "key": take(inp["k"]), "value": take(inp["v"]),
                 "log_gate": take(inp["log_gate"]), "past_state": state, "past_sum_of_keys": ssum,
                 "past_key_cache": kc, "past_value_cache": vc, "past_log_gate_cache": gc if gated else None,
                 "cache_length": clen}
        like = {"output": np.zeros((B, new, case.Hq, D), npdt), "present_state": state, "present_sum_of_keys": ssum,
                "present_key_cache": kc, "present_value_cache": vc, "present_log_gate_cache": gc,
                "present_cache_length": clen}
        r = run_step(sess, outs, feeds, like)
        ys[:, i * new:(i + 1) * new] = r["output"].astype(np.float64)
        n = clen + new
        want = np.where(n >= Cap, 0, n)
        if not np.array_equal(r["present_cache_length"], want):
            fails.append(f"step {i}: present_cache_length {r['present_cache_length'].tolist()}, expected {want.tolist()}")
            break
        hi = idx[:, -1] + 1
        lo = np.where(n >= Cap, hi, lo)
        for b in range(B):  # the present cache holds exactly tokens [lo, hi)
            L = int(want[b])
            same = (np.array_equal(r["present_key_cache"][b, :L].view(np.uint8), inp["k"][b, lo[b]:hi[b]].view(np.uint8))
                    and np.array_equal(r["present_value_cache"][b, :L].view(np.uint8), inp["v"][b, lo[b]:hi[b]].view(np.uint8))
                    and (not gated or np.array_equal(r["present_log_gate_cache"][b, :L], inp["log_gate"][b, lo[b]:hi[b]])))
            if not same:
                fails.append(f"step {i}, sequence {b}: present caches are not the unfolded tokens [{lo[b]}, {hi[b]})")
        if fails:
            break
        state, ssum, clen = r["present_state"], r["present_sum_of_keys"], r["present_cache_length"]
        kc, vc = r["present_key_cache"], r["present_value_cache"]
        gc = r.get("present_log_gate_cache", gc)
    assert not fails, f"{name} [{dtype}]\n  " + "\n  ".join(fails)

    # outputs vs the dense gold over each sequence's whole history, and vs the package's decode
    gy = np.zeros_like(ys)
    for b in range(B):
        end = P + case.L0[b] + case.steps * new
        g = None if not gated else inp["log_gate"][b:b + 1, :end]
        gy[b] = G.dense(inp["q64"][b:b + 1, :end], inp["k64"][b:b + 1, :end], inp["v64"][b:b + 1, :end], g,
                        scale=case.scale)[0, end - case.steps * new:]
    pkg = decode_fixture(name)[f"y_{dtype}"].astype(np.float64) if case.package_fixture else None
    fails += TG.check_output(ys, gy, pkg, dtype, "decode outputs")
    if fails:
        bad = np.abs(ys - gy).max(axis=(0, 2, 3))
        fails.append(f"max|err| per step: {np.array2string(bad, precision=1, max_line_width=200)}")

    # final state = gold state of the folded tokens [0, lo)
    for b in range(B):
        g = None if not gated else inp["log_gate"][b:b + 1, :lo[b]]
        if lo[b] == 0:
            gS, gs = np.zeros((1, H, Dx, D)), np.zeros((1, H, Dx))
        else:
            gS, gs = G.final_state(inp["k64"][b:b + 1, :lo[b]], inp["v64"][b:b + 1, :lo[b]], g, lay=G.compact_layout(D))
        fails += TG.check_state(state[b:b + 1].astype(np.float64), gS, None, dtype, f"sequence {b} final state")
        fails += TG.check_state(ssum[b:b + 1].astype(np.float64), gs, None, dtype, f"sequence {b} final sum_of_keys")
    assert not fails, f"{name} [{dtype}]\n  " + "\n  ".join(fails)


LARGE_CACHE = C.DecodeCase("dec_c1024_b1_h1_d32_g0_new2", 1, 100, (0,), 520, 2, 1, 1, 32, 0.0, None, 1024, seed=9)


def test_decode_large_cache_strongly_gated():
    """C = 1024 (PowerCoder's switch-over) with strong gating (~-0.8 per token): the window's gate
    sums reach |Γ| ~ 800 before the fold; taking exp(Γ_end − Γ_j) from float32 prefix sums loses
    ~|Γ|·2^-24 relative (the prefill's chunk_size issue, test_golden.py). Steps of 2 tokens."""
    C.DECODE_BY_NAME.setdefault(LARGE_CACHE.name, LARGE_CACHE)
    test_prefill_then_decode_steps(LARGE_CACHE.name, "float32")
