"""ctypes binding of cuda/retention.h for the GPU tests and benchmarks (torch tensors in, no copies)."""
import ctypes
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
LIB_PATH = os.environ.get("PR_GPU_LIB", os.path.join(_HERE, "..", "..", ".carry", "gpu", "libpr_test.so"))

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
c_i64, c_i32, c_f32, c_ptr, c_u64 = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p, ctypes.c_uint64


class PrPrefillParams(ctypes.Structure):
    _fields_ = [
        ("batch", c_i64), ("seq_len", c_i64), ("q_heads", c_i32), ("kv_heads", c_i32),
        ("key_dim", c_i32), ("value_dim", c_i32), ("deg", c_i32), ("dtype", c_i32), ("scale", c_f32),
        ("chunk_size", c_i32), ("query", c_ptr), ("key", c_ptr), ("value", c_ptr), ("log_gate", c_ptr),
        ("past_state", c_ptr), ("past_sum_of_keys", c_ptr), ("output", c_ptr), ("present_state", c_ptr),
        ("present_sum_of_keys", c_ptr), ("workspace", c_ptr), ("workspace_bytes", c_u64),
    ]


class PrDecodeParams(ctypes.Structure):
    _fields_ = [
        ("batch", c_i64), ("new_tokens", c_i64), ("cache_capacity", c_i64), ("q_heads", c_i32),
        ("kv_heads", c_i32), ("key_dim", c_i32), ("value_dim", c_i32), ("deg", c_i32), ("dtype", c_i32),
        ("scale", c_f32), ("reserved", c_i32), ("query", c_ptr), ("key", c_ptr), ("value", c_ptr),
        ("log_gate", c_ptr), ("output", c_ptr), ("state", c_ptr), ("sum_of_keys", c_ptr), ("key_cache", c_ptr),
        ("value_cache", c_ptr), ("log_gate_cache", c_ptr), ("cache_length", c_ptr),
    ]


lib = ctypes.CDLL(LIB_PATH)
lib.pr_prefill.argtypes = [ctypes.POINTER(PrPrefillParams), c_ptr]
lib.pr_prefill.restype = ctypes.c_int
lib.pr_prefill_simt.argtypes = [ctypes.POINTER(PrPrefillParams), c_ptr]
lib.pr_prefill_simt.restype = ctypes.c_int
lib.pr_decode.argtypes = [ctypes.POINTER(PrDecodeParams), c_ptr]
lib.pr_decode.restype = ctypes.c_int
lib.pr_prefill_workspace_bytes.argtypes = [ctypes.POINTER(PrPrefillParams)]
lib.pr_prefill_workspace_bytes.restype = c_u64
lib.pr_prefill_segment_chunks.argtypes = [ctypes.POINTER(PrPrefillParams)]
lib.pr_prefill_segment_chunks.restype = c_i32
lib.pr_abi_layout.argtypes = [ctypes.POINTER(c_u64), c_i32]
lib.pr_abi_layout.restype = c_i32


def abi_layout_matches():
    n = lib.pr_abi_layout(None, 0)
    buf = (c_u64 * n)()
    lib.pr_abi_layout(buf, n)
    mine = [1, ctypes.sizeof(PrPrefillParams)] + [getattr(PrPrefillParams, f).offset for f, _ in PrPrefillParams._fields_]
    mine += [ctypes.sizeof(PrDecodeParams)] + [getattr(PrDecodeParams, f).offset for f, _ in PrDecodeParams._fields_]
    return list(buf) == mine, list(buf), mine


def _p(t):
    return None if t is None else t.data_ptr()


def stream_handle():
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


def prefill_params(q, k, v, lg, out, scale, past=None, present=None, chunk=0):
    B, S, Hq, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    pS, ps = past if past is not None else (None, None)
    nS, ns = present if present is not None else (None, None)
    return PrPrefillParams(B, S, Hq, Hkv, Dk, Dv, 2, DTYPE_CODE[q.dtype], scale, 0, _p(q), _p(k), _p(v), _p(lg),
                           _p(pS), _p(ps), _p(out), _p(nS), _p(ns), None, 0)


_workspaces = {}
last_segment_chunks = 0


def workspace(nbytes):
    """A cached device buffer of at least nbytes (reused across calls, as ORT's arena would)."""
    w = _workspaces.get("ws")
    if w is None or w.numel() < nbytes:
        _workspaces["ws"] = w = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return w


def prefill(q, k, v, lg, out, scale, past=None, present=None, kernel="auto", chunk=0, workspace_bytes=None):
    """pr_prefill as ORT calls it (kernel "auto": given the workspace it asks for, so the chunked
    chunked path runs where it applies), "tc" (no workspace: the one-kernel tensor-core path where
    it applies) or "simt" (pr_prefill_simt). chunk is the chunk_size hint. workspace_bytes, a
    function of the bytes asked for, gives "auto" a workspace of another size (shorter segments).
    Returns pr_prefill's rc; last_segment_chunks is then the chunks per segment of the chunked
    path (0 when another path ran)."""
    global last_segment_chunks
    assert kernel in ("auto", "tc", "simt"), kernel
    prm = prefill_params(q, k, v, lg, out, scale, past, present)
    prm.chunk_size = chunk
    if kernel == "auto":
        n = lib.pr_prefill_workspace_bytes(ctypes.byref(prm))
        if n > 0 and workspace_bytes is not None:
            n = workspace_bytes(n)
        if n > 0:
            prm.workspace, prm.workspace_bytes = workspace(n).data_ptr(), n
    last_segment_chunks = 0 if kernel == "simt" else lib.pr_prefill_segment_chunks(ctypes.byref(prm))
    return (lib.pr_prefill_simt if kernel == "simt" else lib.pr_prefill)(ctypes.byref(prm), stream_handle())


def decode_params(q, k, v, lg, out, scale, state, ssum, kc, vc, lgc, clen):
    B, S, Hq, Dk = q.shape
    Hkv, Dv, C = k.shape[2], v.shape[3], kc.shape[1]
    return PrDecodeParams(B, S, C, Hq, Hkv, Dk, Dv, 2, DTYPE_CODE[q.dtype], scale, 0, _p(q), _p(k), _p(v), _p(lg),
                          _p(out), _p(state), _p(ssum), _p(kc), _p(vc), _p(lgc), _p(clen))


def decode(*args):
    prm = decode_params(*args)
    return lib.pr_decode(ctypes.byref(prm), stream_handle())
