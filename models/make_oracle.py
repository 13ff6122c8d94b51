"""Build the oracle fixtures of exporter/tests/oracle.rs (issue 4, "An oracle test").

Run with the project's venv and the `retention` package importable:
  PYTHONPATH=/path/to/retention .venv/bin/python models/make_oracle.py

For GPT-2 and Llama, a tiny random-weight model is built and exported exactly as
make_fixtures.py builds `gpt2_ts17_sdpa_kv` and `llama_ts17_eager_kv` (same configs, seed,
exporter, opset, past key/value inputs), but on a longer sequence (SEQ tokens, more than one
retention chunk, not a multiple of the chunk size). Then the *same* torch model's attention is
replaced by the `retention` package's reference power retention
(`retention.reference.power_retention(Q, K, V, deg=DEG, scale=<the layer's softmax scale>,
chunk_size=CHUNK)` on (b, t, h, d) tensors after RoPE, with the unrepeated KV heads: the package
maps query head i to KV head i // r), and the logits it gives are the oracle. Into
models/fixtures/oracle/ it writes, per NAME:
  NAME.onnx                  the exported softmax model (what `power-retention rewrite` reads)
  NAME.json                  inputs, deg/chunk_size/scale used, logits shape (as make_fixtures.py)
  NAME.logits.bin            PyTorch's softmax logits (checked against ORT by make_fixtures.build)
  NAME.retention.logits.bin  the package's power-retention logits, little-endian float32
"""

import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_fixtures as mf  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from retention.reference import power_retention  # noqa: E402

OUT = os.path.join(HERE, "fixtures", "oracle")
SEQ = 40  # 2 full chunks of 16 and a partial one
DEG = 2
CHUNK = 16

ORACLES = {
    "gpt2_oracle": mf.FIXTURES["gpt2_ts17_sdpa_kv"],
    "llama_oracle": mf.FIXTURES["llama_ts17_eager_kv"],
}

SCALES = []


def retention_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An `AttentionInterface` function: (b, h, t, d) query and unrepeated (b, h_kv, t, d) key/value
    in, (b, t, h, d) out. No mask: power retention is causal, and the inputs are unpadded."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    SCALES.append(float(scaling))
    q, k, v = (z.transpose(1, 2).contiguous() for z in (query, key, value))
    out = power_retention(q, k, v, deg=DEG, scale=scaling, chunk_size=CHUNK)
    return out, None


def main():
    os.makedirs(OUT, exist_ok=True)
    mf.OUT = OUT
    mf.SEQ = SEQ
    AttentionInterface.register("power_retention", retention_attention)
    for name, spec in ORACLES.items():
        # Export the softmax model and check ORT against PyTorch (writes NAME.onnx/json/logits.bin).
        mf.build(name, spec)
        arch, attn, _, dtype, _ = spec
        meta = json.load(open(os.path.join(OUT, name + ".json")))
        feeds = meta["inputs"]
        ids = torch.tensor(feeds["input_ids"], dtype=torch.long)
        mask = torch.tensor(feeds["attention_mask"], dtype=torch.long)
        pos = torch.tensor(feeds["position_ids"], dtype=torch.long)
        assert ids.shape == (mf.BATCH, SEQ) and bool((mask == 1).all())
        # The same torch model again (same seed, same construction as build()).
        torch.manual_seed(0)
        model = mf.configs()[arch]()
        model.config._attn_implementation = attn
        model = model.to(dtype).eval()
        with torch.no_grad():
            soft = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        want_soft = np.fromfile(os.path.join(OUT, name + ".logits.bin"), dtype="<f4").reshape(soft.shape)
        # Identical weights: the rebuilt model reproduces the exported model's reference logits.
        diff = np.abs(soft.numpy() - want_soft).max()
        if diff > 1e-5:
            raise SystemExit(f"{name}: rebuilt model differs from the exported one ({diff:.1e})")
        model.config._attn_implementation = "power_retention"
        SCALES.clear()
        with torch.no_grad():
            ret = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        assert len(SCALES) == model.config.num_hidden_layers, SCALES
        ret = ret.numpy().astype("<f4")
        rel = np.linalg.norm(ret - want_soft) / np.linalg.norm(want_soft)
        ret.tofile(os.path.join(OUT, name + ".retention.logits.bin"))
        meta["oracle"] = {
            "deg": DEG,
            "chunk_size": CHUNK,
            "scales": SCALES[:],
            "logits": name + ".retention.logits.bin",
            "package": "retention 1.0.7, retention.reference.power_retention",
        }
        with open(os.path.join(OUT, name + ".json"), "w") as f:
            json.dump(meta, f, indent=1)
        print(f"{name}: scales {SCALES}, retention vs softmax logits rel {rel:.2e}")


if __name__ == "__main__":
    main()
