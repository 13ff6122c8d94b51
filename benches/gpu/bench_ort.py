"""The ops through ONNX Runtime's CUDA execution provider, against the bare kernels in the same run.

- decode: a 12-layer model of PowerRetentionStep nodes (one per layer, own state each), bf16, H 16,
  D 64, C 64, every state buffer bound in place on the device; per step: plain ORT, ORT with CUDA
  graph capture, and 12 bare pr_decode launches (ctypes, tests/gpu/prlib.py), timed with events.
- prefill: one PowerRetention node through ORT (inputs bound on the device) vs the bare pr_prefill
  launch, bf16, B 1, H 16, D 64, gated.
Prints one markdown table. Run on the GPU machine: scripts/gpu-check.sh.
"""
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto as TP
from onnx import helper

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
import prlib  # noqa: E402

LIB = os.environ.get("POWER_RETENTION_LIB", str(ROOT / ".carry" / "plugin" / "libpower_retention_ort.so"))
LAYERS, H, D, CAP = 12, 16, 64, 64
DX = D * (D + 1) // 2


def decode_model(layers):
    nodes, ins, outs = [], [], []
    t = TP.BFLOAT16
    for n in ("query", "key", "value"):
        ins.append(helper.make_tensor_value_info(n, t, ["B", 1, H, D]))
    ins.append(helper.make_tensor_value_info("log_gate", TP.FLOAT, ["B", 1, H]))
    for i in range(layers):
        spec = [("state", TP.FLOAT, ["B", H, DX, D]), ("sum_of_keys", TP.FLOAT, ["B", H, DX]), ("key_cache", t, ["B", CAP, H, D]),
                ("value_cache", t, ["B", CAP, H, D]), ("log_gate_cache", TP.FLOAT, ["B", CAP, H]), ("cache_length", TP.INT64, ["B"])]
        for n, ty, shape in spec:
            ins.append(helper.make_tensor_value_info(f"past_{n}.{i}", ty, shape))
            outs.append(helper.make_tensor_value_info(f"present_{n}.{i}", ty, shape))
        outs.append(helper.make_tensor_value_info(f"y{i}", t, ["B", 1, H, D]))
        nodes.append(helper.make_node("PowerRetentionStep", ["query", "key", "value", "log_gate"] + [f"past_{n}.{i}" for n, _, _ in spec],
                                      [f"y{i}"] + [f"present_{n}.{i}" for n, _, _ in spec], domain="power_retention", name=f"layer{i}"))
    g = helper.make_graph(nodes, "decode12", ins, outs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("power_retention", 1)])
    m.ir_version = 10
    return m.SerializeToString()


def session(m, graph):
    so = ort.SessionOptions()
    so.register_custom_ops_library(LIB)
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return ort.InferenceSession(m, so, providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1" if graph else "0"})])


def bind_view(io, name, t, output=False):
    """Binds a torch CUDA tensor's memory (no copy) as an input or a pre-allocated output."""
    code = {torch.float32: TP.FLOAT, torch.float16: TP.FLOAT16, torch.bfloat16: TP.BFLOAT16, torch.int64: TP.INT64}[t.dtype]
    (io.bind_output if output else io.bind_input)(name, "cuda", 0, code, list(t.shape), t.data_ptr())


def time_cuda(fn, reps=100, warm=10):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e-3)
    return float(np.median(times))


def time_wall(fn, reps=100, warm=10):
    """ORT runs synchronise their own stream before returning; a wall clock times a whole run."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def decode_rows(B):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(B)
    q = (torch.randn(B, 1, H, D, device=dev, generator=g) / 8).bfloat16()
    k = (torch.randn(B, 1, H, D, device=dev, generator=g) / 8).bfloat16()
    v = torch.randn(B, 1, H, D, device=dev, generator=g).bfloat16()
    lg = -torch.rand(B, 1, H, device=dev, generator=g) * 0.05
    layers = []
    for i in range(LAYERS):
        layers.append({"state": torch.randn(B, H, DX, D, device=dev, generator=g) * 0.01, "sum_of_keys": torch.rand(B, H, DX, device=dev, generator=g) + 1,
                       "key_cache": torch.randn(B, CAP, H, D, device=dev, generator=g).bfloat16() / 8, "value_cache": torch.randn(B, CAP, H, D, device=dev, generator=g).bfloat16(),
                       "log_gate_cache": -torch.rand(B, CAP, H, device=dev, generator=g) * 0.05, "cache_length": torch.full((B,), CAP // 2, dtype=torch.int64, device=dev),
                       "y": torch.empty(B, 1, H, D, device=dev, dtype=torch.bfloat16)})
    m = decode_model(LAYERS)
    results = {}
    for graph in (False, True):
        sess = session(m, graph)
        io = sess.io_binding()
        for n, t in (("query", q), ("key", k), ("value", v), ("log_gate", lg)):
            bind_view(io, n, t)
        for i, L in enumerate(layers):
            for n in ("state", "sum_of_keys", "key_cache", "value_cache", "log_gate_cache", "cache_length"):
                bind_view(io, f"past_{n}.{i}", L[n])
                bind_view(io, f"present_{n}.{i}", L[n], output=True)
            bind_view(io, f"y{i}", L["y"], output=True)
        # The window is reset each step so every timed step does the same (non-folding) work.
        def run():
            for L in layers:
                L["cache_length"].fill_(CAP // 2)
            sess.run_with_iobinding(io)
        results[graph] = time_wall(run)
    scale = 1 / D ** 0.5

    def bare():
        for L in layers:
            L["cache_length"].fill_(CAP // 2)
        st = prlib.stream_handle()
        for L in layers:
            prm = prlib.decode_params(q, k, v, lg, L["y"], scale, L["state"], L["sum_of_keys"], L["key_cache"], L["value_cache"], L["log_gate_cache"], L["cache_length"])
            assert prlib.lib.pr_decode(prlib.ctypes.byref(prm), st) == 0
    fills = time_cuda(lambda: [L["cache_length"].fill_(CAP // 2) for L in layers])
    kernels = time_cuda(bare) - fills
    return kernels, results[False], results[True]


def prefill_rows(S):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(S)
    q = (torch.randn(1, S, H, D, device=dev, generator=g) / 8).bfloat16()
    k = (torch.randn(1, S, H, D, device=dev, generator=g) / 8).bfloat16()
    v = torch.randn(1, S, H, D, device=dev, generator=g).bfloat16()
    lg = torch.nn.functional.logsigmoid(torch.randn(1, S, H, device=dev, generator=g) + 4)
    out = torch.empty_like(q)
    n = helper.make_node("PowerRetention", ["query", "key", "value", "log_gate"], ["output"], domain="power_retention")
    gr = helper.make_graph([n], "p", [helper.make_tensor_value_info(x, TP.BFLOAT16, None) for x in ("query", "key", "value")] +
                           [helper.make_tensor_value_info("log_gate", TP.FLOAT, None)], [helper.make_tensor_value_info("output", TP.BFLOAT16, None)])
    mm = helper.make_model(gr, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("power_retention", 1)])
    mm.ir_version = 10
    sess = session(mm.SerializeToString(), False)
    io = sess.io_binding()
    for name, t in (("query", q), ("key", k), ("value", v), ("log_gate", lg)):
        bind_view(io, name, t)
    bind_view(io, "output", out, output=True)
    t_ort = time_wall(lambda: sess.run_with_iobinding(io), reps=20, warm=3)
    # the bare kernel ORT's node runs: the chunked pair unless the plugin was told not to use it
    kernel = "tc" if os.environ.get("POWER_RETENTION_CHUNKED_PREFILL") == "0" else "auto"
    t_k = time_cuda(lambda: prlib.prefill(q, k, v, lg, out, 1 / D ** 0.5, kernel=kernel), reps=20, warm=3)
    return t_k, t_ort


def main():
    print(f"device: {torch.cuda.get_device_name()}, onnxruntime {ort.__version__}")
    print("\n| what | bare kernels | through ORT | ratio | ORT + CUDA graph | ratio |\n|---|---|---|---|---|---|")
    for B in (1, 64):
        kern, plain, graph = decode_rows(B)
        print(f"| decode step, {LAYERS} layers, B{B}_H{H}_D{D}_C{CAP} bf16 | {kern * 1e6:.1f} µs | {plain * 1e6:.1f} µs | {plain / kern:.2f}x | {graph * 1e6:.1f} µs | {graph / kern:.2f}x |")
    for S in (2048, 8192, 32768, 131072):
        tk, to = prefill_rows(S)
        print(f"| prefill B1_T{S}_H{H}_D{D} bf16 gated | {tk * 1e3:.3f} ms | {to * 1e3:.3f} ms | {to / tk:.2f}x | - | - |")


if __name__ == "__main__":
    main()
