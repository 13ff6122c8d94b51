"""Builds a tiny power-retention language model as a prefill/decode pair plus retention.json,
directly with onnx.helper (no torch): the harness's own test fixture, independent of the rewriter.

Architecture per layer (pre-norm-free for brevity, random weights, seed fixed):
    x += Wo · PowerRetention(Wq x, Wk x, Wv x, log_gate = logsigmoid(Wg x + 3))   (GQA: 4 query heads, 2 kv heads)
    x += W2 · relu(W1 x)
logits = Wout · x, x = tok_emb[input_ids] + pos_emb[position_ids].

    .venv/bin/python models/make_tiny_retention.py models/tiny_retention
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

VOCAB, HIDDEN, LAYERS, HQ, HKV, D, MAXPOS, CAP = 256, 64, 2, 4, 2, 16, 1024, 16
DX = D * (D + 1) // 2


def build(decode: bool, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    inits, nodes = [], []

    def w(name, *shape, scale=None):
        scale = scale if scale is not None else 1.0 / np.sqrt(shape[0])
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def const(name, values, dtype=np.int64):
        inits.append(numpy_helper.from_array(np.array(values, dtype=dtype), name))
        return name

    def node(op, ins, outs, **attrs):
        nodes.append(helper.make_node(op, ins, outs, **attrs))
        return outs[0]

    w("tok_emb", VOCAB, HIDDEN, scale=1.0)
    w("pos_emb", MAXPOS, HIDDEN, scale=0.1)
    x = node("Add", [node("Gather", ["tok_emb", "input_ids"], ["tok"]), node("Gather", ["pos_emb", "position_ids"], ["pos"])], ["x0"])
    const("shape_q", [0, 0, HQ, D])
    const("shape_kv", [0, 0, HKV, D])
    const("shape_g", [0, 0, HKV])
    const("shape_h", [0, 0, HQ * D])
    const("three", [3.0], np.float32)
    inputs, outputs, state = [], [], []
    for i in range(LAYERS):
        q = node("Reshape", [node("MatMul", [x, w(f"wq{i}", HIDDEN, HQ * D)], [f"q{i}"]), "shape_q"], [f"qh{i}"])
        k = node("Reshape", [node("MatMul", [x, w(f"wk{i}", HIDDEN, HKV * D)], [f"k{i}"]), "shape_kv"], [f"kh{i}"])
        v = node("Reshape", [node("MatMul", [x, w(f"wv{i}", HIDDEN, HKV * D)], [f"v{i}"]), "shape_kv"], [f"vh{i}"])
        gl = node("Add", [node("MatMul", [x, w(f"wg{i}", HIDDEN, HKV, scale=0.1)], [f"gp{i}"]), "three"], [f"gl{i}"])
        g = node("Reshape", [node("Neg", [node("Softplus", [node("Neg", [gl], [f"ng{i}"])], [f"sp{i}"])], [f"lg{i}"]), "shape_g"], [f"lgh{i}"])
        names = {r: f"{r}.{i}" for r in ("state", "sum_of_keys", "key_cache", "value_cache", "log_gate_cache", "cache_length")}
        if decode:
            ins = [q, k, v, g] + [f"past_{names[r]}" for r in ("state", "sum_of_keys", "key_cache", "value_cache", "log_gate_cache", "cache_length")]
            outs = [f"y{i}"] + [f"present_{names[r]}" for r in ("state", "sum_of_keys", "key_cache", "value_cache", "log_gate_cache", "cache_length")]
            node("PowerRetentionStep", ins, outs, domain="power_retention")
            shapes = {"state": ([-1, HKV, DX, D], TP.FLOAT), "sum_of_keys": ([-1, HKV, DX], TP.FLOAT), "key_cache": ([-1, CAP, HKV, D], TP.FLOAT),
                      "value_cache": ([-1, CAP, HKV, D], TP.FLOAT), "log_gate_cache": ([-1, CAP, HKV], TP.FLOAT), "cache_length": ([-1], TP.INT64)}
            for role, (shape, ty) in shapes.items():
                dims = ["batch" if d < 0 else d for d in shape]
                inputs.append(helper.make_tensor_value_info(f"past_{names[role]}", ty, dims))
                outputs.append(helper.make_tensor_value_info(f"present_{names[role]}", ty, dims))
                state.append({"layer": i, "role": role,
                              "prefill_output": f"present_{names[role]}" if role in ("state", "sum_of_keys") else None,
                              "decode_input": f"past_{names[role]}", "decode_output": f"present_{names[role]}",
                              "shape": shape, "dtype": "int64" if ty == TP.INT64 else "float32"})
        else:
            node("PowerRetention", [q, k, v, g], [f"y{i}", f"present_{names['state']}", f"present_{names['sum_of_keys']}"], domain="power_retention")
            outputs.append(helper.make_tensor_value_info(f"present_{names['state']}", TP.FLOAT, ["batch", HKV, DX, D]))
            outputs.append(helper.make_tensor_value_info(f"present_{names['sum_of_keys']}", TP.FLOAT, ["batch", HKV, DX]))
        y = node("MatMul", [node("Reshape", [f"y{i}", "shape_h"], [f"yh{i}"]), w(f"wo{i}", HQ * D, HIDDEN, scale=0.5 / np.sqrt(HQ * D))], [f"o{i}"])
        x = node("Add", [x, y], [f"x{i}a"])
        m = node("MatMul", [node("Relu", [node("MatMul", [x, w(f"w1{i}", HIDDEN, 4 * HIDDEN)], [f"m{i}"])], [f"r{i}"]), w(f"w2{i}", 4 * HIDDEN, HIDDEN, scale=0.5 / np.sqrt(4 * HIDDEN))], [f"m2{i}"])
        x = node("Add", [x, m], [f"x{i}b"])
    node("MatMul", [x, w("wout", HIDDEN, VOCAB)], ["logits"])
    graph = helper.make_graph(
        nodes, "tiny_retention_" + ("decode" if decode else "prefill"),
        [helper.make_tensor_value_info("input_ids", TP.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("position_ids", TP.INT64, ["batch", "seq"])] + inputs,
        [helper.make_tensor_value_info("logits", TP.FLOAT, ["batch", "seq", VOCAB])] + outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("power_retention", 1)],
                              producer_name="power-retention-ort models/make_tiny_retention.py")
    model.ir_version = 10
    return model, state


def main(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prefill, _ = build(decode=False)
    decode, state = build(decode=True)
    onnx.save(prefill, out / "prefill.onnx")
    onnx.save(decode, out / "decode.onnx")
    io = {"input_ids": "input_ids", "position_ids": "position_ids", "attention_mask": None, "logits": "logits"}
    manifest = {"format": 1, "source": "models/make_tiny_retention.py", "deg": 2, "chunk_size": 64, "cache_capacity": CAP,
                "prefill": {"file": "prefill.onnx", **io}, "decode": {"file": "decode.onnx", **io}, "state": state}
    (out / "retention.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {out}/prefill.onnx, decode.onnx, retention.json")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "models/tiny_retention")
