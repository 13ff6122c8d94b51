"""Where the tensor-core prefill's time goes: times pr_prefill (bf16, B1 H16 D64, gated) at 8k and 32k
tokens for each leave-one-stage-out build of scripts/build-prefill-variants.sh, one process per
library. On the GPU machine: python3 benches/gpu/prefill_stages.py (carry .carry/tc). Prints a table.
"""
import os, sys, subprocess, json
if len(sys.argv) > 1:
    import torch
    sys.path.insert(0, "tests/gpu")
    import prlib
    S = int(sys.argv[1]); H = 16; dev = "cuda"
    g = torch.Generator(device=dev); g.manual_seed(0)
    q = torch.randn(1, S, H, 64, device=dev, generator=g).bfloat16()
    k = torch.randn(1, S, H, 64, device=dev, generator=g).bfloat16()
    v = torch.randn(1, S, H, 64, device=dev, generator=g).bfloat16()
    lg = torch.nn.functional.logsigmoid(torch.randn(1, S, H, device=dev, generator=g) + 4)
    out = torch.empty_like(q); nS = torch.empty(1, H, 2080, 64, device=dev); ns = torch.empty(1, H, 2080, device=dev)
    f = lambda: prlib.prefill(q, k, v, lg, out, 0.125, None, (nS, ns), kernel="tc")
    for _ in range(3): f()
    ts = []
    for _ in range(15):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); f(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); print(json.dumps({"ms": ts[len(ts)//2]}))
else:
    names = {0: "full", 1: "no query", 2: "no attention", 4: "no update", 8: "no outputs", 15: "none (loads, gates, loop)"}
    print("| variant | S=8192 ms | S=32768 ms |")
    print("|---|---|---|")
    for vbit, name in names.items():
        env = dict(os.environ, PR_GPU_LIB=os.path.abspath(f".carry/tc/lib{vbit}.so"))
        r = [json.loads(subprocess.run([sys.executable, __file__, str(S)], env=env, capture_output=True, text=True).stdout.strip().splitlines()[-1])["ms"] for S in (8192, 32768)]
        print(f"| {name} | {r[0]:.3f} | {r[1]:.3f} |")
