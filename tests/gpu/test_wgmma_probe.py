"""The wgmma building blocks of cuda/mma.cuh in isolation (GPU machine, sm_90a): one m64n72k16 with A
from registers and B an MN-major core tile in shared memory, twice into the same accumulators,
against torch's matmul of the same bf16 inputs. Exact up to f32 summation order (inputs are bf16,
products exact in f32): tolerance 1e-5 relative. Run: python3 tests/gpu/test_wgmma_probe.py
(PR_WGMMA_PROBE_LIB, default .carry/gpu/libwgmma_probe.so)."""
import ctypes
import os
import sys

import torch


def main():
    lib = ctypes.CDLL(os.environ.get("PR_WGMMA_PROBE_LIB", ".carry/gpu/libwgmma_probe.so"))
    g = torch.Generator(device="cuda").manual_seed(7)
    A = torch.randn(64, 16, device="cuda", generator=g).to(torch.bfloat16)
    B = torch.randn(16, 72, device="cuda", generator=g).to(torch.bfloat16)
    D = torch.full((64, 72), float("nan"), device="cuda")
    done = torch.zeros(1, dtype=torch.int32, device="cuda")
    rc = lib.pr_wgmma_probe(ctypes.c_void_p(A.data_ptr()), ctypes.c_void_p(B.data_ptr()),
                            ctypes.c_void_p(D.data_ptr()), ctypes.c_void_p(done.data_ptr()))
    torch.cuda.synchronize()
    want = 2 * (A.double() @ B.double())
    err = ((D.double() - want).abs().max() / want.abs().max()).item()
    ok = rc == 0 and int(done.item()) == 1 and err < 1e-5
    print(f"wgmma probe: launch rc {rc}, compiled {int(done.item())}, worst rel err {err:.2e} (tol 1e-5): "
          f"{'PASS' if ok else 'FAIL'}")
    if not ok and err == err:
        bad = ((D.double() - want).abs() > 1e-3 * want.abs().max()).nonzero()[:8].tolist()
        print("first wrong (row, col):", bad)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
