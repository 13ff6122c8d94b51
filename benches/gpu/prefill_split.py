"""How the chunked prefill's time splits between its three kernels (deltas, scan, query), per sequence
length and chunk: torch.profiler's CUDA time of each kernel over 10 calls of pr_prefill (bf16,
B1 H16 D64, gated, present_state written). On the GPU machine, with PR_GPU_LIB set:
    python3 benches/gpu/prefill_split.py [--chunks 512,1024]
Prints a table; the sum is kernel time only (no launch gaps), wall the time per call of 20 calls in a
row (CUDA events). --heads H times H heads instead of 16.
    python3 benches/gpu/prefill_split.py --once S CHUNK
runs one warm-up and one timed-free call at that length and chunk, for a profiler such as
    ncu --clock-control none --kernel-name regex:retention_prefill --launch-skip 3 --launch-count 3 ...
"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "tests/gpu")
import prlib  # noqa: E402

dev = "cuda"
args = sys.argv[1:]
H = 16
if "--heads" in args:  # e.g. --heads 8: that many heads instead of 16 (B Hkv decides between kernel paths)
    i = args.index("--heads")
    H = int(args[i + 1])
    del args[i:i + 2]
ONCE = args[:1] == ["--once"]
LENGTHS, CHUNKS = ((int(args[1]),), (int(args[2]),)) if ONCE else ((8192, 32768, 131072), (256, 512, 1024, 2048))
if args[:1] == ["--chunks"]:  # e.g. --chunks 512,1024: only those chunk sizes
    CHUNKS = tuple(int(c) for c in args[1].split(","))
print("| S | H | chunk | deltas ms | scan ms | query ms | sum ms | query share | wall ms |")
print("|---|---|---|---|---|---|---|---|---|")
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
        # wall: CUDA events around 20 back-to-back calls (launch gaps and kernel tails included)
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(20):
            f()
        t1.record()
        torch.cuda.synchronize()
        wall = t0.elapsed_time(t1) / 20
        print(f"| {S} | {H} | {chunk} | {t['deltas']:.3f} | {t['scan']:.3f} | {t['query']:.3f} | {s:.3f} | {t['query'] / s:.0%} "
              f"| {wall:.3f} |", flush=True)
