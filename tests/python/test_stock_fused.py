"""models/make_lm.py's stock_fused.onnx (ONNX Runtime's fused attention op with a KV cache) gives
the logits of stock.onnx (hand-built softmax attention, same weights) on the CPU: a prompt from an
empty cache, then single-token decode steps, for MultiHeadAttention (equal heads) and
GroupQueryAttention (grouped heads, and equal heads with stock_gqa.onnx).

Run with the repo's venv: .venv/bin/python -m pytest tests/python
"""
import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[2]
# Loaded by path: putting models/ on sys.path would shadow tests/golden/make_fixtures.py with
# models/make_fixtures.py for the golden tests that import it later in the same session.
_spec = importlib.util.spec_from_file_location("make_lm", ROOT / "models" / "make_lm.py")
make_lm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_lm)

CONFIGS = {
    "gqa": make_lm.PRESETS["tiny"],  # 4 query heads over 2 kv heads, gated (the gate is unused by stock)
    "mha": dict(make_lm.PRESETS["tiny"], hkv=4, gated=False),
}


def session(kind, cfg, dtype):
    m, _ = make_lm.build(kind, cfg, dtype, 64)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def greedy(sess, cfg, dtype, prompt, steps):
    """Logits of the prompt's last position and of each step, feeding back the argmax."""
    past = {f"past_key_values.{i}.{n}": np.zeros((1, cfg["hkv"], 0, cfg["d"]), make_lm.NP[dtype])
            for i in range(cfg["layers"]) for n in ("key", "value")}
    tokens, pos, out = list(prompt), 0, []
    for _ in range(steps + 1):
        feeds = {"input_ids": np.array([tokens], np.int64),
                 "position_ids": np.arange(pos, pos + len(tokens), dtype=np.int64)[None], **past}
        names = [o.name for o in sess.get_outputs()]
        res = dict(zip(names, sess.run(None, feeds)))
        last = res["logits"][0, -1].astype(np.float64)
        out.append(last)
        pos += len(tokens)
        tokens = [int(last.argmax())]
        past = {k: res[k.replace("past_key_values", "present")] for k in past}
    return np.stack(out)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("kind,heads", [("stock_fused", "gqa"), ("stock_fused", "mha"), ("stock_gqa", "mha")])
def test_fused_attention_gives_the_stock_logits(kind, heads, dtype):
    cfg = CONFIGS[heads]
    fused = make_lm.build(kind, cfg, dtype, 64)[0]
    ops = {n.op_type for n in fused.graph.node if n.domain == "com.microsoft"}
    assert ops == {"MultiHeadAttention" if (kind, heads) == ("stock_fused", "mha") else "GroupQueryAttention"}
    assert not {"Softmax", "Where"} & {n.op_type for n in fused.graph.node}
    prompt = [3, 17, 200, 5, 9, 1, 44, 128, 7]
    try:
        got = greedy(session(kind, cfg, dtype), cfg, dtype, prompt, 12)
    except ort.capi.onnxruntime_pybind11_state.NotImplemented as e:  # no CPU kernel for this dtype
        pytest.skip(str(e).splitlines()[0])
    want = greedy(session("stock", cfg, dtype), cfg, dtype, prompt, 12)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < (1e-5 if dtype == "float32" else 5e-3), err
