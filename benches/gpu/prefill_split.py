"""How the chunked prefill's time splits between its three kernels (deltas, scan, query), per sequence
length and chunk: torch.profiler's CUDA time of each kernel over 10 calls of pr_prefill (bf16,
B1 H16 D64, gated, present_state written). On the GPU machine, with PR_GPU_LIB set:
    python3 benches/gpu/prefill_split.py [--chunks 512,1024]
Prints a table; the sum is kernel time only (no launch gaps).
    python3 benches/gpu/prefill_split.py --once S CHUNK
runs one warm-up and one timed-free call at that length and chunk, for a profiler such as
    ncu --clock-control none --kernel-name regex:retention_prefill --launch-skip 3 --launch-count 3 ...
"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "tests/gpu")
import prlib  # noqa: E402

H, dev = 16, "cuda"
ONCE = sys.argv[1:2] == ["--once"]
LENGTHS, CHUNKS = ((int(sys.argv[2]),), (int(sys.argv[3]),)) if ONCE else ((8192, 32768, 131072), (256, 512, 1024, 2048))
if sys.argv[1:2] == ["--chunks"]:  # e.g. --chunks 512,1024: only those chunk sizes
    CHUNKS = tuple(int(c) for c in sys.argv[2].split(","))
print("| S | chunk | deltas ms | scan ms | query ms | sum ms | query share |")
print("|---|---|---|---|---|---|---|")
for S in LENGTHS:
    g = torch.Generator(device=dev)
    g.manual_seed(0)
    q, k, v = (torch.randn(1, S, H, 64, device=dev, generator=g).bfloat16() for _ in range(3))
    lg = torch.nn.functional.logsigmoid(torch.randn(1, S, H, device=dev, generator=g) + 4)
    out = torch.empty_like(q)
    nS, ns = torch.empty(1, H, 2080, 64, device=dev), torch.empty(1, H, 2080, device=dev)
    for chunk in CHUNKS:
        f = lambda: prlib.prefill(q, k, v, lg, out, 0.125, None, (nS, ns), chunk=chunk)
        for _ in range(1 if ONCE else 3):
            assert f() == 0
        torch.cuda.synchronize()
        if ONCE:
            f()
            torch.cuda.synchronize()
            continue
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                f()
            torch.cuda.synchronize()
        t = {"deltas": 0.0, "scan": 0.0, "query": 0.0}
        for e in prof.key_averages():
            for name in t:
                if f"retention_prefill_{name}_kernel" in e.key:
                    us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
                    t[name] += us / 10 / 1000  # us over 10 calls -> ms per call
        s = sum(t.values())
        print(f"| {S} | {chunk} | {t['deltas']:.3f} | {t['scan']:.3f} | {t['query']:.3f} | {s:.3f} | {t['query'] / s:.0%} |",
              flush=True)
