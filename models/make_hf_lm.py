"""Exports a Hugging Face GPT-2 with random weights and its KV cache to ONNX, as users export one,
for the decode benchmark: the stock model the harness times, and the model the rewriter turns into
the power-retention pair.

    python3 models/make_hf_lm.py OUT [--preset gpt2-small] [--dtype float16] [--max-pos 140000]
                                     [--device cuda] [--ort-optimize]

writes
  OUT/stock.onnx        transformers' GPT2LMHeadModel (sdpa attention, as transformers exports it by
                        default) through torch.onnx (dynamo, opset 20, dynamic lengths): input_ids,
                        attention_mask, position_ids, past_key_values.{i}.key/.value (batch, heads,
                        past, head_dim) -> logits, present.{i}.key/.value
  OUT/stock_opt.onnx    with --ort-optimize: the same model after onnxruntime.transformers.optimizer
                        (model_type gpt2): LayerNorm / Gelu / SkipLayerNorm fused, attention left
                        as exported (the optimizer's GPT-2 attention fusion matches only ORT's own
                        GPT-2 export)
  OUT/export.json       what was exported, and the check below
Then `power-retention rewrite OUT/stock.onnx -o OUT` (or of stock_opt.onnx) writes prefill.onnx,
decode.onnx and retention.json beside them, with identical weights.

The export is checked: ONNX Runtime (CPU) on the written model reproduces the PyTorch logits of
the traced shapes (2 new tokens after 3), of a 7-token prompt and of one token after 9. Weights are drawn by transformers' own
initialiser from a fixed seed; nothing is downloaded.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

PRESETS = {
    # the exporter fixtures' size, for quick checks of this script
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256),
    # GPT-2 small: 12 layers, 12 heads of 64, hidden 768, vocabulary 50257
    "gpt2-small": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257),
}


def export(a):
    import onnx
    import torch
    import transformers

    from make_fixtures import WithPast  # beside this file

    cfg = PRESETS[a.preset]
    dtype = {"float32": torch.float32, "float16": torch.float16}[a.dtype]
    torch.manual_seed(a.seed)
    conf = transformers.GPT2Config(n_positions=a.max_pos, **cfg)
    conf._attn_implementation = "sdpa"
    model = transformers.GPT2LMHeadModel(conf).eval()
    model = model.to(device=a.device, dtype=dtype)
    layers, heads, hd = conf.n_layer, conf.n_head, conf.n_embd // conf.n_head
    wrapper = WithPast(model, layers).eval()  # (a new module is in training mode; the export warns)
    g = torch.Generator().manual_seed(1)

    def inputs(b, s, p):
        """Random ids for s new tokens after p past ones (batch b), their mask, positions, past."""
        ids = torch.randint(0, conf.vocab_size, (b, s), generator=g).to(a.device)
        mask = torch.ones(b, p + s, dtype=torch.long, device=a.device)
        pos = torch.arange(p, p + s, device=a.device).unsqueeze(0).repeat(b, 1)
        past = [(torch.randn(b, heads, p, hd, generator=g) * 0.5).to(device=a.device, dtype=dtype)
                for _ in range(2 * layers)]
        return (ids, mask, pos, *past)

    # Trace with 2 new tokens after 3 past ones (batch 2), so that no length is specialised.
    args = inputs(2, 2, 3)
    names = ["input_ids", "attention_mask", "position_ids"]
    out_names = ["logits"]
    for i in range(layers):
        for part in ("key", "value"):
            names.append(f"past_key_values.{i}.{part}")
            out_names.append(f"present.{i}.{part}")
    with torch.no_grad():
        want = wrapper(*args)[0].float().cpu().numpy()
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "stock.onnx")
    def export_to(dst, traced):
        # torch.export (the dynamo exporter) with every length dynamic. The TorchScript exporter
        # bakes traced lengths into transformers' mask code: its model gave 0.36 relative error at
        # other lengths than the traced ones (transformers 5.25, torch 2.15).
        auto = torch.export.Dim.AUTO
        tok = {0: auto, 1: auto}
        shapes = (tok, tok, tok, tuple({0: auto, 2: auto} for _ in traced[3:]))
        with torch.no_grad():
            torch.onnx.export(wrapper, traced, dst, input_names=names, output_names=out_names, dynamic_shapes=shapes,
                              opset_version=a.opset, dynamo=True, external_data=False, optimize=True)

    t0 = time.time()
    export_to(path, args)
    t_export = time.time() - t0
    onnx.checker.check_model(path)
    # The check: the traced shapes, a prefill (no past) and a one-token step after a longer past.
    cases = [(args, want)]
    for shape in ((1, 7, 0), (2, 1, 9)):
        cargs = inputs(*shape)
        with torch.no_grad():
            cases.append((cargs, wrapper(*cargs)[0].float().cpu().numpy()))
    cases = [({n: t.cpu().numpy() for n, t in zip(names, c)}, w) for c, w in cases]
    err = max(check(path, f, w) for f, w in cases)
    tol = 1e-4 if a.dtype == "float32" else 2e-2
    if not err <= tol:
        raise SystemExit(f"stock.onnx: ONNX Runtime differs from PyTorch, max rel err {err:.2e} > {tol:.0e}")
    report = {"source": "models/make_hf_lm.py", "preset": a.preset, "dtype": a.dtype, "max_pos": a.max_pos,
              "seed": a.seed, "torch": torch.__version__, "transformers": transformers.__version__,
              "layers": layers, "heads": heads, "head_dim": hd, "vocab": conf.vocab_size,
              "stock.onnx": {"ort_vs_torch_max_rel_err": err, "tolerance": tol, "export_s": round(t_export, 1)}}
    print(f"stock.onnx: {os.path.getsize(path) / 2**20:.0f} MiB, ORT (CPU) vs PyTorch max rel err {err:.1e}")
    if a.ort_optimize:
        # ORT's documented flow for a float16 GPU model: fuse the float32 graph, then convert.
        src = path
        if a.dtype == "float16":
            src = os.path.join(a.out, "stock_f32.tmp.onnx")
            model.float()  # in place: the wrapper traces the float32 model
            export_to(src, tuple(t.float() if t.is_floating_point() else t for t in args))
            model.to(dtype)
        from onnxruntime.transformers.optimizer import optimize_model

        opt = optimize_model(src, model_type=a.ort_model_type, num_heads=heads, hidden_size=conf.n_embd,
                             use_gpu=a.device == "cuda", only_onnxruntime=False)
        fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        if a.dtype == "float16":
            opt.convert_float_to_float16(keep_io_types=False)
            os.remove(src)
        opt_path = os.path.join(a.out, "stock_opt.onnx")
        opt.save_model_to_file(opt_path)
        err_opt = max(check(opt_path, f, w) for f, w in cases)
        if not err_opt <= tol:
            raise SystemExit(f"stock_opt.onnx: ORT differs from PyTorch, max rel err {err_opt:.2e} > {tol:.0e}")
        report["stock_opt.onnx"] = {"ort_vs_torch_max_rel_err": err_opt, "fused": fused}
        print(f"stock_opt.onnx: fused {fused}; ORT (CPU) vs PyTorch max rel err {err_opt:.1e}")
    with open(os.path.join(a.out, "export.json"), "w") as f:
        json.dump(report, f, indent=1)


def check(path, feeds, want):
    """max |ORT - torch| / max |torch| over the logits of the traced inputs, on ORT's CPU EP."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {i.name: feeds[i.name] for i in sess.get_inputs()})[0].astype(np.float32)
    return float(np.abs(got - want).max() / np.abs(want).max())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpt2-small")
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float16")
    ap.add_argument("--max-pos", type=int, default=1024, help="position-embedding rows (longest context + new tokens)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where PyTorch builds and traces the model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--opset", type=int, default=20)
    ap.add_argument("--ort-optimize", action="store_true", help="also write stock_opt.onnx (ORT's transformer optimizer)")
    ap.add_argument("--ort-model-type", default="bert",
                    help="the optimizer's model_type (its gpt2 post-processing fails on dynamo exports: a Gemm without bias)")
    export(ap.parse_args())


if __name__ == "__main__":
    sys.exit(main())
