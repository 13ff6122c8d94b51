"""Build the exporter's fixture corpus: tiny random-weight GPT models exported to ONNX.

Run with the project's venv: `.venv/bin/python models/make_fixtures.py [--only NAME ...]`
(the dynamo fixtures need `onnxscript`). No downloads: every model is built from a tiny config
with a fixed seed. The sources: torch.onnx (TorchScript and dynamo) exports of transformers
models and of hand-written nanoGPT/GPT-2-classic modules, ORT's transformer optimizer over one
of them, and two graphs written with onnx.helper in the layouts ORT's GPT-2 converter
(com.microsoft.Attention) and onnxruntime-genai (GroupQueryAttention) produce. For each fixture
NAME it writes into models/fixtures/:
  NAME.onnx        the model
  NAME.json        the fixed inputs, the family, and what `inspect` must find ("expected")
  NAME.logits.bin  PyTorch's logits for those inputs, little-endian, in the model's dtype
and checks that ONNX Runtime reproduces the PyTorch logits before keeping the files.
gpt2_ts17_sdpa_kv is the README's demo model (GPT-2 as transformers exports it by default).
"""

import argparse
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers
from transformers import DynamicCache

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
VOCAB = 256
BATCH, SEQ = 2, 7


def configs():
    common = dict(vocab_size=VOCAB, tie_word_embeddings=False)
    llama_like = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **common,
    )
    return {
        "gpt2": lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=VOCAB
            )
        ),
        "llama": lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**llama_like)
        ),
        "qwen2": lambda: transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(**llama_like)
        ),
        "phi3": lambda: transformers.Phi3ForCausalLM(
            transformers.Phi3Config(**llama_like, pad_token_id=0)
        ),
        "gptj": lambda: transformers.GPTJForCausalLM(
            transformers.GPTJConfig(
                n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128,
                vocab_size=VOCAB,
            )
        ),
        # Sliding-window attention (window 4 < the 7 test tokens): must be refused.
        "mistral_sliding": lambda: transformers.MistralForCausalLM(
            transformers.MistralConfig(**llama_like, sliding_window=4)
        ),
        "gptneo": lambda: transformers.GPTNeoForCausalLM(
            transformers.GPTNeoConfig(
                hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=128,
                attention_types=[[["global", "local"], 1]], window_size=4,
                vocab_size=VOCAB,
            )
        ),
    }


class ClassicAttention(torch.nn.Module):
    """Hand-written causal attention as older code bases export it (no transformers):
    `masked_fill` on a float tril buffer (nanoGPT, P4), `sdpa(is_causal=True)` (nanoGPT flash,
    M4 Trilu), or GPT-2 <= 4.4x's bool bias buffer + `Where` + a shape-derived `Div` (P1a)."""

    def __init__(self, mode, n_embd=64, n_head=4, block=128):
        super().__init__()
        self.mode, self.n_head = mode, n_head
        self.c_attn = torch.nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = torch.nn.Linear(n_embd, n_embd)
        tril = torch.tril(torch.ones(block, block)).view(1, 1, block, block)
        self.register_buffer("bias", tril.bool() if mode == "bias_where" else tril)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        if self.mode == "flash":
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if self.mode == "masked_fill":
                att = (q @ k.transpose(-2, -1)) * (1.0 / (k.size(-1) ** 0.5))
                att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            else:
                att = (q @ k.transpose(-2, -1)) / torch.full([], v.size(-1) ** 0.5)
                kv = k.size(-2)
                mask = self.bias[:, :, kv - t : kv, :kv]
                att = torch.where(mask, att, torch.finfo(att.dtype).min)
            y = torch.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class ClassicLM(torch.nn.Module):
    def __init__(self, mode, n_embd=64, layers=2):
        super().__init__()
        self.wte = torch.nn.Embedding(VOCAB, n_embd)
        self.wpe = torch.nn.Embedding(128, n_embd)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(
                torch.nn.ModuleDict(
                    dict(
                        ln_1=torch.nn.LayerNorm(n_embd),
                        attn=ClassicAttention(mode, n_embd),
                        ln_2=torch.nn.LayerNorm(n_embd),
                        mlp=torch.nn.Sequential(
                            torch.nn.Linear(n_embd, 4 * n_embd),
                            torch.nn.GELU(),
                            torch.nn.Linear(4 * n_embd, n_embd),
                        ),
                    )
                )
            )
        self.ln_f = torch.nn.LayerNorm(n_embd)
        self.lm_head = torch.nn.Linear(n_embd, VOCAB, bias=False)
        self.config = transformers.PretrainedConfig(num_hidden_layers=layers)

    def forward(self, input_ids, position_ids):
        x = self.wte(input_ids) + self.wpe(position_ids)
        for blk in self.blocks:
            x = x + blk["attn"](blk["ln_1"](x))
            x = x + blk["mlp"](blk["ln_2"](x))
        return self.lm_head(self.ln_f(x))


# name: (arch, attention implementation, with past key/values, dtype, opset); names with
# "dynamo" use the torch.export-based exporter, the others TorchScript.
FIXTURES = {
    "gpt2_ts17_eager": ("gpt2", "eager", False, torch.float32, 17),
    "gpt2_ts14_sdpa_kv": ("gpt2", "sdpa", True, torch.float32, 14),
    "llama_ts17_eager_kv": ("llama", "eager", True, torch.float32, 17),
    "llama_ts17_sdpa": ("llama", "sdpa", False, torch.float32, 17),
    "llama_ts17_eager_fp16": ("llama", "eager", False, torch.float16, 17),
    "qwen2_ts17_sdpa_kv": ("qwen2", "sdpa", True, torch.float32, 17),
    "phi3_ts17_eager_kv": ("phi3", "eager", True, torch.float32, 17),
    "gptj_ts17_eager": ("gptj", "eager", False, torch.float32, 17),
    "gptj_ts17_eager_kv": ("gptj", "eager", True, torch.float32, 17),
    "gptneo_ts17_eager": ("gptneo", "eager", False, torch.float32, 17),
    "mistral_ts17_sliding": ("mistral_sliding", "eager", False, torch.float32, 17),
    # The README's demo model: GPT-2 as transformers exports it by default (sdpa, with a cache).
    "gpt2_ts17_sdpa_kv": ("gpt2", "sdpa", True, torch.float32, 17),
    "gpt2_dynamo20_sdpa": ("gpt2", "sdpa", False, torch.float32, 20),
    "llama_dynamo20_sdpa_kv": ("llama", "sdpa", True, torch.float32, 20),
    # GPT-2 with its cache as `models/make_hf_lm.py` exports it for the decode benchmark: dynamo at
    # opset 20 (unfused), and at opset 23 (ONNX `Attention` over the concatenated cache).
    "gpt2_dynamo20_sdpa_kv": ("gpt2", "sdpa", True, torch.float32, 20),
    "gpt2_dynamo23_sdpa_kv": ("gpt2", "sdpa", True, torch.float32, 23),
    "llama_dynamo23_sdpa": ("llama", "sdpa", False, torch.float32, 23),
    "nanogpt_ts17_noflash": ("classic", "masked_fill", False, torch.float32, 17),
    "nanogpt_ts17_flash": ("classic", "flash", False, torch.float32, 17),
    "nanogpt_dynamo23_flash": ("classic", "flash", False, torch.float32, 23),
    "gpt2classic_ts14_bias": ("classic", "bias_where", False, torch.float32, 14),
}


class NoPast(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return out.logits


class WithPast(torch.nn.Module):
    """Flat past/present tensors, so the export has `past_key_values.i.{key,value}` inputs."""

    def __init__(self, model, layers):
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.layers)]
        try:
            cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        except TypeError:  # older transformers: no ddp_cache_data / config arguments
            cache = DynamicCache.from_legacy_cache(tuple(pairs))
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present = []
        pkv = out.past_key_values
        if hasattr(pkv, "layers"):
            for layer in pkv.layers:
                present += [layer.keys, layer.values]
        else:
            for k, v in pkv.to_legacy_cache():
                present += [k, v]
        return (out.logits, *present)


def kv_shape(model):
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return kv, head_dim


def local_layers(model):
    if getattr(model.config, "sliding_window", None):
        return model.config.num_hidden_layers
    return sum(t == "local" for t in getattr(model.config, "attention_layers", []))


def build(name, spec):
    arch, attn, with_past, dtype, opset = spec
    torch.manual_seed(0)
    if arch == "classic":
        model = ClassicLM(attn)
    else:
        model = configs()[arch]()
        model.config._attn_implementation = attn
    model = model.to(dtype).eval()
    layers = model.config.num_hidden_layers
    rng = np.random.default_rng(1)
    ids = torch.from_numpy(rng.integers(0, VOCAB, size=(BATCH, SEQ))).long()
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    pos = torch.arange(SEQ).unsqueeze(0).repeat(BATCH, 1)
    args = [ids, mask, pos]
    names = ["input_ids", "attention_mask", "position_ids"]
    out_names = ["logits"]
    axes = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total_seq"},
        "position_ids": {0: "batch", 1: "seq"},
        "logits": {0: "batch", 1: "seq"},
    }
    if arch == "classic":
        # Hand-written models take no attention mask.
        del args[1], names[1], axes["attention_mask"]
    if with_past:
        kv, hd = kv_shape(model)
        wrapper = WithPast(model, layers)
        for i in range(layers):
            for part in ("key", "value"):
                t = torch.zeros(BATCH, kv, 0, hd, dtype=dtype)
                args.append(t)
                names.append(f"past_key_values.{i}.{part}")
                out_names.append(f"present.{i}.{part}")
                axes[names[-1]] = {0: "batch", 2: "past_seq"}
                axes[out_names[-1]] = {0: "batch", 2: "total_seq"}
    elif arch == "classic":
        wrapper = model
    else:
        wrapper = NoPast(model)
    with torch.no_grad():
        ref = wrapper(*args)
        ref = ref[0] if isinstance(ref, tuple) else ref
    path = os.path.join(OUT, name + ".onnx")
    dynamo = "dynamo" in name
    export_args = args
    if dynamo and with_past:
        # torch.export specialises a 0-length past to 0: trace with 2 past tokens (and a mask
        # covering them), run with 0 like every fixture.
        export_args = [ids, torch.ones(BATCH, SEQ + 2, dtype=torch.long), pos + 2]
        export_args += [torch.zeros(a.shape[0], a.shape[1], 2, a.shape[3], dtype=dtype) for a in args[3:]]
    shapes = {}
    if dynamo and with_past:
        auto = torch.export.Dim.AUTO
        tok = {0: auto, 1: auto}
        shapes = {"dynamic_shapes": (tok, tok, tok, tuple({0: auto, 2: auto} for _ in args[3:]))}
    else:
        shapes = {"dynamic_axes": axes}
    torch.onnx.export(
        wrapper,
        tuple(export_args),
        path,
        input_names=names,
        output_names=out_names,
        **shapes,
        opset_version=opset,
        dynamo=dynamo,
        **({"external_data": False, "optimize": True} if dynamo else {}),
    )
    onnx.checker.check_model(onnx.load(path), full_check=True)
    feeds = {n: a.numpy() for n, a in zip(names, args)}
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: feeds[i.name] for i in sess.get_inputs()}
    got = sess.run(["logits"], feeds)[0]
    want = ref.numpy()
    tol = 1e-4 if dtype == torch.float32 else 5e-3
    err = np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-6)
    if err > tol:
        raise SystemExit(f"{name}: ORT differs from PyTorch (rel {err:.2e})")
    want.astype("<f4" if dtype == torch.float32 else "<f2").tofile(
        os.path.join(OUT, name + ".logits.bin")
    )
    meta = {
        "inputs": {n: feeds[n].tolist() for n in feeds if feeds[n].size > 0},
        "empty_inputs": {
            n: {"shape": list(feeds[n].shape), "dtype": str(feeds[n].dtype)}
            for n in feeds
            if feeds[n].size == 0
        },
        "logits": {"shape": list(want.shape), "dtype": str(want.dtype)},
        "family": {"arch": arch, "attention": attn, "past": with_past, "opset": opset, "exporter": "dynamo" if "dynamo" in name else "torchscript"},
        "layers": layers,
        # What `power-retention inspect` must report: GPT-Neo's local layers are refused.
        "expected": {
            "blocks": layers - local_layers(model),
            "rejected": local_layers(model),
        },
    }
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(meta, f, indent=1)
    size = os.path.getsize(path)
    print(f"{name}: {size / 1e6:.2f} MB, ort vs torch rel err {err:.1e}")


def build_ort_fused(name):
    """P6: ClassicLM's weights as an ORT-optimised graph: com.microsoft.Attention (packed QKV
    weights, unidirectional, a raw 2-D mask and a stacked (2, b, H, past, d) cache), as ORT's
    GPT-2 converter and transformer optimizer write it."""
    from onnx import TensorProto, helper, numpy_helper

    torch.manual_seed(0)
    model = ClassicLM("masked_fill").eval()
    layers, heads, e = 2, 4, 64
    inits, nodes = [], []

    def w(name, t):
        inits.append(numpy_helper.from_array(t.detach().numpy().astype(np.float32), name))
        return name

    def layer_norm(x, ln, out):
        nodes.append(helper.make_node("LayerNormalization", [x, w(out + ".w", ln.weight), w(out + ".b", ln.bias)], [out], epsilon=1e-5, axis=-1))
        return out

    def linear(x, lin, out):
        nodes.append(helper.make_node("MatMul", [x, w(out + ".W", lin.weight.T)], [out + ".mm"]))
        nodes.append(helper.make_node("Add", [out + ".mm", w(out + ".bias", lin.bias)], [out]))
        return out

    nodes.append(helper.make_node("Gather", [w("wte", model.wte.weight), "input_ids"], ["tok"]))
    nodes.append(helper.make_node("Gather", [w("wpe", model.wpe.weight), "position_ids"], ["pos"]))
    nodes.append(helper.make_node("Add", ["tok", "pos"], ["x0"]))
    nodes.append(helper.make_node("Cast", ["attention_mask"], ["mask_i32"], to=TensorProto.INT32))
    x = "x0"
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_seq"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
    ]
    for i, blk in enumerate(model.blocks):
        attn = blk["attn"]
        h = layer_norm(x, blk["ln_1"], f"h{i}.ln_1")
        inputs.append(helper.make_tensor_value_info(f"past_{i}", TensorProto.FLOAT, [2, "batch", heads, "past_seq", e // heads]))
        outputs.append(helper.make_tensor_value_info(f"present_{i}", TensorProto.FLOAT, [2, "batch", heads, "total_seq", e // heads]))
        nodes.append(
            helper.make_node(
                "Attention",
                [h, w(f"h{i}.qkv.W", attn.c_attn.weight.T), w(f"h{i}.qkv.b", attn.c_attn.bias), "mask_i32", f"past_{i}"],
                [f"h{i}.attn", f"present_{i}"],
                domain="com.microsoft",
                name=f"/h.{i}/Attention",
                num_heads=heads,
                unidirectional=1,
            )
        )
        a = linear(f"h{i}.attn", attn.c_proj, f"h{i}.proj")
        nodes.append(helper.make_node("Add", [x, a], [f"x{i}a"]))
        h2 = layer_norm(f"x{i}a", blk["ln_2"], f"h{i}.ln_2")
        f1 = linear(h2, blk["mlp"][0], f"h{i}.fc")
        nodes.append(helper.make_node("Gelu", [f1], [f"h{i}.gelu"]))
        f2 = linear(f"h{i}.gelu", blk["mlp"][2], f"h{i}.fc2")
        nodes.append(helper.make_node("Add", [f"x{i}a", f2], [f"x{i + 1}"]))
        x = f"x{i + 1}"
    hf = layer_norm(x, model.ln_f, "ln_f")
    nodes.append(helper.make_node("MatMul", [hf, w("lm_head", model.lm_head.weight.T)], ["logits"]))
    graph = helper.make_graph(nodes, "ort_fused_gpt", inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return model, m, layers, heads


def save_ort_fused(name):
    model, m, layers, heads = build_ort_fused(name)
    path = os.path.join(OUT, name + ".onnx")
    onnx.save(m, path)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, size=(BATCH, SEQ)).astype(np.int64)
    pos = np.tile(np.arange(SEQ), (BATCH, 1)).astype(np.int64)
    with torch.no_grad():
        want = model(torch.from_numpy(ids), torch.from_numpy(pos)).numpy()
    feeds = {"input_ids": ids, "attention_mask": np.ones((BATCH, SEQ), np.int64), "position_ids": pos}
    for i in range(layers):
        feeds[f"past_{i}"] = np.zeros((2, BATCH, heads, 0, 64 // heads), np.float32)
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    err = np.abs(got - want).max() / np.abs(want).max()
    if err > 1e-4:
        raise SystemExit(f"{name}: ORT differs from PyTorch (rel {err:.2e})")
    want.astype("<f4").tofile(os.path.join(OUT, name + ".logits.bin"))
    meta = {
        "inputs": {n: v.tolist() for n, v in feeds.items() if v.size > 0},
        "empty_inputs": {n: {"shape": list(v.shape), "dtype": str(v.dtype)} for n, v in feeds.items() if v.size == 0},
        "logits": {"shape": list(want.shape), "dtype": "float32"},
        "family": {"arch": "classic", "attention": "com.microsoft.Attention", "past": True, "opset": 20, "exporter": "onnx.helper (ORT fused layout)"},
        "layers": layers,
        "expected": {"blocks": layers, "rejected": 0},
    }
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{name}: {os.path.getsize(path) / 1e6:.2f} MB, ort vs torch rel err {err:.1e}")


def save_genai_gqa(name):
    """P7: a Llama built the way onnxruntime-genai's model builder writes it: one packed QKV
    MatMul into com.microsoft.GroupQueryAttention (in-op RoPE from cos/sin caches, in-op GQA,
    past/present key/value (b, Hkv, past, d), seqlens_k and total_sequence_length from the
    attention mask). Weights and reference logits from the same tiny random HF Llama."""
    from onnx import TensorProto, helper, numpy_helper

    torch.manual_seed(0)
    hf = configs()["llama"]().eval()
    cfg = hf.config
    heads, kv, e = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    d = e // heads
    inits, nodes = [], []

    def w(name, t):
        arr = t.detach().numpy() if isinstance(t, torch.Tensor) else t
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    def const_i64(name, v):
        inits.append(numpy_helper.from_array(np.asarray(v, dtype=np.int64), name))
        return name

    def rms(x, weight, out):
        nodes.append(helper.make_node("Mul", [x, x], [out + ".sq"]))
        nodes.append(helper.make_node("ReduceMean", [out + ".sq"], [out + ".ms"], axes=[-1], keepdims=1))
        nodes.append(helper.make_node("Add", [out + ".ms", w(out + ".eps", np.array(cfg.rms_norm_eps))], [out + ".var"]))
        nodes.append(helper.make_node("Sqrt", [out + ".var"], [out + ".std"]))
        nodes.append(helper.make_node("Div", [x, out + ".std"], [out + ".n"]))
        nodes.append(helper.make_node("Mul", [out + ".n", w(out + ".w", weight)], [out]))
        return out

    def mm(x, lin, out):
        nodes.append(helper.make_node("MatMul", [x, w(out + ".W", lin.weight.T)], [out]))
        return out

    inv_freq = 1.0 / (cfg.rope_parameters["rope_theta"] ** (np.arange(0, d, 2) / d))
    freqs = np.outer(np.arange(cfg.max_position_embeddings), inv_freq)
    w("cos_cache", np.cos(freqs))
    w("sin_cache", np.sin(freqs))
    nodes.append(helper.make_node("Gather", [w("embed", hf.model.embed_tokens.weight), "input_ids"], ["x0"]))
    nodes.append(helper.make_node("ReduceSum", ["attention_mask", const_i64("one_axis", [1])], ["mask_sum"], keepdims=0))
    nodes.append(helper.make_node("Sub", ["mask_sum", const_i64("one", 1)], ["seqlens_i64"]))
    nodes.append(helper.make_node("Cast", ["seqlens_i64"], ["seqlens_k"], to=TensorProto.INT32))
    nodes.append(helper.make_node("Shape", ["attention_mask"], ["mask_shape"]))
    nodes.append(helper.make_node("Gather", ["mask_shape", const_i64("idx1", 1)], ["total_i64"], axis=0))
    nodes.append(helper.make_node("Cast", ["total_i64"], ["total_sequence_length"], to=TensorProto.INT32))
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_seq"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])]
    x = "x0"
    for i, layer in enumerate(hf.model.layers):
        at = layer.self_attn
        h = rms(x, layer.input_layernorm.weight, f"l{i}.ln1")
        wqkv = torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight], 0).T
        nodes.append(helper.make_node("MatMul", [h, w(f"l{i}.qkv.W", wqkv)], [f"l{i}.qkv"]))
        for part in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{part}", TensorProto.FLOAT, ["batch", kv, "past_seq", d]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{part}", TensorProto.FLOAT, ["batch", kv, "total_seq", d]))
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [f"l{i}.qkv", "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
                [f"l{i}.attn", f"present.{i}.key", f"present.{i}.value"],
                domain="com.microsoft",
                name=f"/model/layers.{i}/attn/GroupQueryAttention",
                num_heads=heads,
                kv_num_heads=kv,
                do_rotary=1,
                scale=d ** -0.5,
            )
        )
        o = mm(f"l{i}.attn", at.o_proj, f"l{i}.o")
        nodes.append(helper.make_node("Add", [x, o], [f"l{i}.res"]))
        h2 = rms(f"l{i}.res", layer.post_attention_layernorm.weight, f"l{i}.ln2")
        g = mm(h2, layer.mlp.gate_proj, f"l{i}.gate")
        u = mm(h2, layer.mlp.up_proj, f"l{i}.up")
        nodes.append(helper.make_node("Sigmoid", [g], [f"l{i}.sig"]))
        nodes.append(helper.make_node("Mul", [g, f"l{i}.sig"], [f"l{i}.silu"]))
        nodes.append(helper.make_node("Mul", [f"l{i}.silu", u], [f"l{i}.act"]))
        dn = mm(f"l{i}.act", layer.mlp.down_proj, f"l{i}.down")
        nodes.append(helper.make_node("Add", [f"l{i}.res", dn], [f"x{i + 1}"]))
        x = f"x{i + 1}"
    hfin = rms(x, hf.model.norm.weight, "norm")
    mm(hfin, hf.lm_head, "logits")
    graph = helper.make_graph(nodes, "genai_llama", inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    path = os.path.join(OUT, name + ".onnx")
    onnx.save(m, path)

    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, size=(BATCH, SEQ)).astype(np.int64)
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(BATCH, SEQ, dtype=torch.long), use_cache=False).logits.numpy()
    feeds = {"input_ids": ids, "attention_mask": np.ones((BATCH, SEQ), np.int64)}
    for i in range(cfg.num_hidden_layers):
        for part in ("key", "value"):
            feeds[f"past_key_values.{i}.{part}"] = np.zeros((BATCH, kv, 0, d), np.float32)
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    err = np.abs(got - want).max() / np.abs(want).max()
    if err > 1e-4:
        raise SystemExit(f"{name}: ORT differs from PyTorch (rel {err:.2e})")
    want.astype("<f4").tofile(os.path.join(OUT, name + ".logits.bin"))
    meta = {
        "inputs": {n: v.tolist() for n, v in feeds.items() if v.size > 0},
        "empty_inputs": {n: {"shape": list(v.shape), "dtype": str(v.dtype)} for n, v in feeds.items() if v.size == 0},
        "logits": {"shape": list(want.shape), "dtype": "float32"},
        "family": {"arch": "llama", "attention": "com.microsoft.GroupQueryAttention", "past": True, "opset": 17, "exporter": "onnx.helper (onnxruntime-genai layout)"},
        "layers": cfg.num_hidden_layers,
        "expected": {"blocks": cfg.num_hidden_layers, "rejected": 0},
    }
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{name}: {os.path.getsize(path) / 1e6:.2f} MB, ort vs torch rel err {err:.1e}")


def save_ort_optimized(src, name):
    """ORT's transformer optimizer over an HF export: fused LayerNorm/Gelu ops around attention
    it leaves unfused (the notes' `*_ortopt`); same inputs and reference logits as `src`."""
    import shutil

    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(os.path.join(OUT, src + ".onnx"), model_type="gpt2", num_heads=4, hidden_size=64)
    path = os.path.join(OUT, name + ".onnx")
    opt.save_model_to_file(path)
    meta = json.load(open(os.path.join(OUT, src + ".json")))
    want = np.fromfile(os.path.join(OUT, src + ".logits.bin"), dtype="<f4").reshape(meta["logits"]["shape"])
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        if i.name in meta["inputs"]:
            feeds[i.name] = np.array(meta["inputs"][i.name], dtype=np.int64)
        else:
            e = meta["empty_inputs"][i.name]
            feeds[i.name] = np.zeros(e["shape"], dtype=e["dtype"])
    got = sess.run(["logits"], feeds)[0]
    err = np.abs(got - want).max() / np.abs(want).max()
    if err > 1e-4:
        raise SystemExit(f"{name}: ORT differs from PyTorch (rel {err:.2e})")
    shutil.copy(os.path.join(OUT, src + ".logits.bin"), os.path.join(OUT, name + ".logits.bin"))
    meta["family"]["exporter"] += " + onnxruntime.transformers.optimizer"
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{name}: {os.path.getsize(path) / 1e6:.2f} MB, ort vs torch rel err {err:.1e}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--only", nargs="*")
    a = p.parse_args()
    os.makedirs(OUT, exist_ok=True)
    for name, spec in FIXTURES.items():
        if a.only and name not in a.only:
            continue
        build(name, spec)
    if not a.only or "gpt2_ts17_sdpa_kv_ortopt" in a.only:
        save_ort_optimized("gpt2_ts17_sdpa_kv", "gpt2_ts17_sdpa_kv_ortopt")
    if not a.only or "gpt2_ortfused_kv" in a.only:
        save_ort_fused("gpt2_ortfused_kv")
    if not a.only or "llama_genai_gqa_kv" in a.only:
        save_genai_gqa("llama_genai_gqa_kv")


if __name__ == "__main__":
    sys.exit(main())
