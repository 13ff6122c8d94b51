"""Builds a GPT-style language model with random weights directly with onnx.helper (numpy only, no
torch), in two forms with identical weights:

- power retention: prefill.onnx (PowerRetention) + decode.onnx (PowerRetentionStep, every state
  tensor an input and an output) + retention.json, what the harness drives;
- stock attention: stock.onnx, causal softmax attention with a KV cache (past_key_values.i.key /
  .value in, present.i.key / .value out), the baseline the harness times against;
- with --stock-fused, also stock_fused.onnx: the same model and interface with ONNX Runtime's fused
  attention op, what onnxruntime.transformers.optimizer produces where it fuses (it does not match
  this hand-built graph): com.microsoft.MultiHeadAttention (query/key/value (B, S, H·D), past/present
  (B, H, S, D), unidirectional; flash attention on the CUDA EP in float16), or
  com.microsoft.GroupQueryAttention where query heads are grouped (seqlens_k and
  total_sequence_length computed in the graph from the shapes);
- with --stock-gqa, also stock_gqa.onnx: the same with GroupQueryAttention for any head grouping,
  equal heads too (ONNX Runtime's decoder attention op, the one onnxruntime-genai's models use).

Per layer (no norms, for brevity): x += Wo·Attn(Wq x, Wk x, Wv x [, log_gate = logsigmoid(Wg x + 3)]);
x += W2·relu(W1 x); logits = Wout·x with x = tok_emb[input_ids] + pos_emb[position_ids].

    python models/make_lm.py models/tiny_retention --stock-fused    # the bundled tiny model (GQA 4/2, gated)
    python models/make_lm.py OUT --preset gpt2-small --dtype float16 --max-pos 140000 --stock-fused   # the GPU benchmark's
"""
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import argparse

PRESETS = {
    # vocab, hidden, layers, query heads, kv heads, head dim, window capacity, gated
    "tiny": dict(vocab=256, hidden=64, layers=2, hq=4, hkv=2, d=16, cap=16, gated=True),
    "gpt2-small": dict(vocab=50257, hidden=768, layers=12, hq=12, hkv=12, d=64, cap=64, gated=False),
}
NP = {"float32": np.float32, "float16": np.float16}
TT = {"float32": TP.FLOAT, "float16": TP.FLOAT16}


def build(kind, cfg, dtype="float32", max_pos=1024, rng_seed=0):
    """kind: 'prefill' | 'decode' | 'stock' | 'stock_fused' | 'stock_gqa'. Returns (model, state description)."""
    VOCAB, HIDDEN, LAYERS, HQ, HKV, D, CAP = (cfg[k] for k in ("vocab", "hidden", "layers", "hq", "hkv", "d", "cap"))
    DX = D * (D + 1) // 2
    decode = kind == "decode"
    fused = kind in ("stock_fused", "stock_gqa")
    gqa = kind == "stock_gqa" or (fused and HQ != HKV)
    T = TT[dtype]
    rng = np.random.default_rng(rng_seed)
    inits, nodes = [], []

    def w(name, *shape, scale=None):
        scale = scale if scale is not None else 1.0 / np.sqrt(shape[0])
        inits.append(numpy_helper.from_array((rng.standard_normal(shape, dtype=np.float32) * scale).astype(NP[dtype]), name))
        return name

    def const(name, values, dtype=np.int64):
        inits.append(numpy_helper.from_array(np.array(values, dtype=dtype), name))
        return name

    def node(op, ins, outs, **attrs):
        nodes.append(helper.make_node(op, ins, outs, **attrs))
        return outs[0]

    w("tok_emb", VOCAB, HIDDEN, scale=1.0)
    w("pos_emb", max_pos, HIDDEN, scale=0.1)
    x = node("Add", [node("Gather", ["tok_emb", "input_ids"], ["tok"]), node("Gather", ["pos_emb", "position_ids"], ["pos"])], ["x0"])
    if not fused:  # (the fused op takes (B, S, H·D) and scales itself)
        const("shape_q", [0, 0, HQ, D])
        const("shape_kv", [0, 0, HKV, D])
        const("shape_g", [0, 0, HKV])
        const("shape_h", [0, 0, HQ * D])
        const("three", [3.0], NP[dtype])
        const("scale", [1.0 / np.sqrt(D)], NP[dtype])
        const("ax2", [2])
    if kind == "stock":
        # Causal mask over (new positions) x (all positions): key j visible to query i iff j <= past + i.
        node("Shape", ["input_ids"], ["ids_shape"])
        node("Gather", ["ids_shape", const("one_i", 1)], ["s_new"], axis=0)
        node("Shape", ["past_key_values.0.key"], ["past_shape"])
        node("Gather", ["past_shape", const("two_i", 2)], ["s_past"], axis=0)
        node("Add", ["s_new", "s_past"], ["s_all"])
        node("Range", [const("zero_i", 0), "s_all", "one_i"], ["k_pos"])
        node("Range", ["s_past", "s_all", "one_i"], ["q_pos"])
        node("Unsqueeze", ["q_pos", const("ax1", [1])], ["q_col"])
        node("LessOrEqual", ["k_pos", "q_col"], ["causal"])
        const("neg", [-1e4 if dtype == "float16" else -1e30], NP[dtype])
    if gqa:
        # GroupQueryAttention's lengths: every sequence has past + new tokens (no padding).
        node("Shape", ["input_ids"], ["ids_shape"])
        node("Gather", ["ids_shape", const("one_i", 1)], ["s_new"], axis=0)
        node("Shape", ["past_key_values.0.key"], ["past_shape"])
        node("Gather", ["past_shape", const("two_i", 2)], ["s_past"], axis=0)
        node("Add", ["s_new", "s_past"], ["s_all"])
        node("Cast", ["s_all"], ["total_seq_len"], to=TP.INT32)
        node("Slice", ["ids_shape", const("zero_1", [0]), const("one_1", [1])], ["batch_1"])
        node("Expand", [node("Sub", ["s_all", const("one_s", 1)], ["s_last"]), "batch_1"], ["seqlens_k64"])
        node("Cast", ["seqlens_k64"], ["seqlens_k"], to=TP.INT32)
    inputs, outputs, state = [], [], []
    for i in range(LAYERS):
        qm = node("MatMul", [x, w(f"wq{i}", HIDDEN, HQ * D)], [f"q{i}"])
        if not fused:
            q = node("Reshape", [qm, "shape_q"], [f"qh{i}"])
        km = node("MatMul", [x, w(f"wk{i}", HIDDEN, HKV * D)], [f"k{i}"])
        if not fused:
            k = node("Reshape", [km, "shape_kv"], [f"kh{i}"])
        vm = node("MatMul", [x, w(f"wv{i}", HIDDEN, HKV * D)], [f"v{i}"])
        if not fused:
            v = node("Reshape", [vm, "shape_kv"], [f"vh{i}"])
        g = None
        if cfg["gated"] and fused:  # stock attention ignores the gate: draw its weights (as w does), keep nothing
            rng.standard_normal((HIDDEN, HKV), dtype=np.float32)
        elif cfg["gated"]:
            gl = node("Add", [node("MatMul", [x, w(f"wg{i}", HIDDEN, HKV, scale=0.1)], [f"gp{i}"]), "three"], [f"gl{i}"])
            g = node("Reshape", [node("Neg", [node("Softplus", [node("Neg", [gl], [f"ng{i}"])], [f"sp{i}"])], [f"lg{i}"]), "shape_g"], [f"lgh{i}"])
            if dtype != "float32":
                g = node("Cast", [g], [f"lgf{i}"], to=TP.FLOAT)
        if kind in ("stock", "stock_fused", "stock_gqa"):
            if fused:
                y = fused_attention(node, i, qm, km, vm, HQ, HKV, D, T, inputs, outputs, gqa)
            else:
                y = node("Reshape", [stock_attention(node, i, q, k, v, HQ, HKV, D, T, inputs, outputs), "shape_h"], [f"yh{i}"])
            y = node("MatMul", [y, w(f"wo{i}", HQ * D, HIDDEN, scale=0.5 / np.sqrt(HQ * D))], [f"o{i}"])
            x = node("Add", [x, y], [f"x{i}a"])
            m = node("MatMul", [node("Relu", [node("MatMul", [x, w(f"w1{i}", HIDDEN, 4 * HIDDEN)], [f"m{i}"])], [f"r{i}"]), w(f"w2{i}", 4 * HIDDEN, HIDDEN, scale=0.5 / np.sqrt(4 * HIDDEN))], [f"m2{i}"])
            x = node("Add", [x, m], [f"x{i}b"])
            continue
        names = {r: f"{r}.{i}" for r in ("state", "sum_of_keys", "key_cache", "value_cache", "log_gate_cache", "cache_length")}
        if decode:
            roles = ("state", "sum_of_keys", "key_cache", "value_cache", "log_gate_cache", "cache_length")
            used = [r for r in roles if g is not None or r != "log_gate_cache"]
            ins = [q, k, v, g or ""] + [f"past_{names[r]}" if r in used else "" for r in roles]
            outs = [f"y{i}"] + [f"present_{names[r]}" if r in used else "" for r in roles]
            node("PowerRetentionStep", ins, outs, domain="power_retention")
            shapes = {"state": ([-1, HKV, DX, D], TP.FLOAT), "sum_of_keys": ([-1, HKV, DX], TP.FLOAT), "key_cache": ([-1, CAP, HKV, D], T),
                      "value_cache": ([-1, CAP, HKV, D], T), "log_gate_cache": ([-1, CAP, HKV], TP.FLOAT), "cache_length": ([-1], TP.INT64)}
            shapes = {r: shapes[r] for r in used}
            for role, (shape, ty) in shapes.items():
                dims = ["batch" if d < 0 else d for d in shape]
                inputs.append(helper.make_tensor_value_info(f"past_{names[role]}", ty, dims))
                outputs.append(helper.make_tensor_value_info(f"present_{names[role]}", ty, dims))
                state.append({"layer": i, "role": role,
                              "prefill_output": f"present_{names[role]}" if role in ("state", "sum_of_keys") else None,
                              "decode_input": f"past_{names[role]}", "decode_output": f"present_{names[role]}",
                              "shape": shape, "dtype": {TP.INT64: "int64", TP.FLOAT: "float32", TP.FLOAT16: "float16"}[ty]})
        else:
            node("PowerRetention", [q, k, v, g or ""], [f"y{i}", f"present_{names['state']}", f"present_{names['sum_of_keys']}"], domain="power_retention")
            outputs.append(helper.make_tensor_value_info(f"present_{names['state']}", TP.FLOAT, ["batch", HKV, DX, D]))
            outputs.append(helper.make_tensor_value_info(f"present_{names['sum_of_keys']}", TP.FLOAT, ["batch", HKV, DX]))
        y = node("MatMul", [node("Reshape", [f"y{i}", "shape_h"], [f"yh{i}"]), w(f"wo{i}", HQ * D, HIDDEN, scale=0.5 / np.sqrt(HQ * D))], [f"o{i}"])
        x = node("Add", [x, y], [f"x{i}a"])
        m = node("MatMul", [node("Relu", [node("MatMul", [x, w(f"w1{i}", HIDDEN, 4 * HIDDEN)], [f"m{i}"])], [f"r{i}"]), w(f"w2{i}", 4 * HIDDEN, HIDDEN, scale=0.5 / np.sqrt(4 * HIDDEN))], [f"m2{i}"])
        x = node("Add", [x, m], [f"x{i}b"])
    node("MatMul", [x, w("wout", HIDDEN, VOCAB)], ["logits"])
    graph = helper.make_graph(
        nodes, f"lm_{kind}",
        [helper.make_tensor_value_info("input_ids", TP.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("position_ids", TP.INT64, ["batch", "seq"])] + inputs,
        [helper.make_tensor_value_info("logits", T, ["batch", "seq", VOCAB])] + outputs, inits)
    opsets = [helper.make_opsetid("", 17)] + {"stock": [], "stock_fused": [helper.make_opsetid("com.microsoft", 1)],
                                                   "stock_gqa": [helper.make_opsetid("com.microsoft", 1)]}.get(
        kind, [helper.make_opsetid("power_retention", 1)])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="power-retention-ort models/make_lm.py")
    model.ir_version = 10
    return model, state


def stock_attention(node, i, q, k, v, HQ, HKV, D, T, inputs, outputs):
    """Causal softmax attention with a KV cache in (batch, heads, seq, head_dim) layout."""
    perm = [0, 2, 1, 3]
    qt = node("Transpose", [q], [f"qt{i}"], perm=perm)
    kt = node("Transpose", [k], [f"kt{i}"], perm=perm)
    vt = node("Transpose", [v], [f"vt{i}"], perm=perm)
    for n in ("key", "value"):
        inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{n}", T, ["batch", HKV, "past", D]))
        outputs.append(helper.make_tensor_value_info(f"present.{i}.{n}", T, ["batch", HKV, "total", D]))
    ka = node("Concat", [f"past_key_values.{i}.key", kt], [f"present.{i}.key"], axis=2)
    va = node("Concat", [f"past_key_values.{i}.value", vt], [f"present.{i}.value"], axis=2)
    if HQ != HKV:  # grouped-query attention: repeat each kv head for its query heads
        r = HQ // HKV
        node("Constant", [], [f"rep{i}"], value=helper.make_tensor(f"rep{i}v", TP.INT64, [5], [1, 1, r, 1, 1]))
        def rep(t, tag):
            x5 = node("Unsqueeze", [t, "ax2"], [f"rep_{tag}5_{i}"])
            shape = node("Constant", [], [f"rep_{tag}s_{i}"], value=helper.make_tensor(f"rep_{tag}sv_{i}", TP.INT64, [4], [0, HQ, -1, D]))
            return node("Reshape", [node("Tile", [x5, f"rep{i}"], [f"rep_{tag}t_{i}"]), shape], [f"rep_{tag}r_{i}"])
        ka, va = rep(ka, "k"), rep(va, "v")
    s = node("Mul", [node("MatMul", [qt, node("Transpose", [ka], [f"kT{i}"], perm=[0, 1, 3, 2])], [f"sc{i}"]), "scale"], [f"ss{i}"])
    s = node("Where", ["causal", s, "neg"], [f"sm{i}"])
    p = node("Softmax", [s], [f"p{i}"], axis=-1)
    return node("Transpose", [node("MatMul", [p, va], [f"pv{i}"])], [f"y{i}"], perm=perm)


def fused_attention(node, i, q, k, v, HQ, HKV, D, T, inputs, outputs, gqa):
    """ONNX Runtime's fused causal attention with a KV cache: q (B, S, HQ·D), k/v (B, S, HKV·D),
    past/present (B, HKV, S, D) as in stock_attention; returns (B, S, HQ·D). MultiHeadAttention
    unless gqa (GroupQueryAttention, which needs the graph's seqlens_k and total_seq_len)."""
    for n in ("key", "value"):
        inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{n}", T, ["batch", HKV, "past", D]))
        outputs.append(helper.make_tensor_value_info(f"present.{i}.{n}", T, ["batch", HKV, "total", D]))
    past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    present = [f"present.{i}.key", f"present.{i}.value"]
    scale = float(1.0 / np.sqrt(D))
    if not gqa:
        # inputs: query, key, value, bias, key_padding_mask, attention_bias, past_key, past_value
        return node("MultiHeadAttention", [q, k, v, "", "", ""] + past, [f"y{i}"] + present, domain="com.microsoft",
                    num_heads=HQ, unidirectional=1, scale=scale)
    # inputs: query, key, value, past_key, past_value, seqlens_k, total_sequence_length
    return node("GroupQueryAttention", [q, k, v] + past + ["seqlens_k", "total_seq_len"], [f"y{i}"] + present,
                domain="com.microsoft", num_heads=HQ, kv_num_heads=HKV, scale=scale)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--dtype", choices=sorted(NP), default="float32")
    ap.add_argument("--max-pos", type=int, default=1024)
    ap.add_argument("--no-stock", action="store_true", help="skip the stock-attention model")
    ap.add_argument("--stock-fused", action="store_true",
                    help="also write stock_fused.onnx: the stock model with ONNX Runtime's fused attention op")
    ap.add_argument("--stock-gqa", action="store_true",
                    help="also write stock_gqa.onnx: the stock model with GroupQueryAttention (any heads)")
    a = ap.parse_args()
    cfg = PRESETS[a.preset]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = ("prefill", "decode") + (() if a.no_stock else ("stock",)) + (("stock_fused",) if a.stock_fused else ()) \
        + (("stock_gqa",) if a.stock_gqa else ())
    for kind in kinds:
        model, state = build(kind, cfg, a.dtype, a.max_pos)
        onnx.save(model, out / f"{kind}.onnx")
        if kind == "decode":
            io = {"input_ids": "input_ids", "position_ids": "position_ids", "attention_mask": None, "logits": "logits"}
            manifest = {"format": 1, "source": f"models/make_lm.py --preset {a.preset} --dtype {a.dtype}", "deg": 2, "chunk_size": 64,
                        "cache_capacity": cfg["cap"], "prefill": {"file": "prefill.onnx", **io}, "decode": {"file": "decode.onnx", **io}, "state": state}
            (out / "retention.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {out}: prefill.onnx, decode.onnx, retention.json" + ("" if a.no_stock else ", stock.onnx")
          + (", stock_fused.onnx" if a.stock_fused else "") + (", stock_gqa.onnx" if a.stock_gqa else ""))


if __name__ == "__main__":
    main()
