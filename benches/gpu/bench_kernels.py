"""Times pr_prefill / pr_decode against the `retention` package (Triton) and torch SDPA flash.

bf16, B=1, H=16 (Hq = Hkv), Dk = Dv = 64, deg 2, gated. Run on the GPU machine:
  python3 benches/gpu/bench_kernels.py [--quick] [--decode-only | --prefill-only]
Correctness is checked before timing (our output vs the package's, ||err||/||ref||). Times are medians
of CUDA-event-timed repetitions (triton.testing.do_bench, L2 flushed between repetitions for the
single-call timings). Prints one table per op.
"""
import math
import sys

import torch
import triton

sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "..", "tests", "gpu"))
import prlib  # noqa: E402

H, DK, DV = 16, 64, 64
D = DK * (DK + 1) // 2
SCALE = 1.0 / math.sqrt(DK)
BW_NOMINAL, BW_MEASURED = 3.35e12, 3.0e12      # H100 SXM HBM3: datasheet, and measured D2D copy here
TC_NOMINAL, TC_MEASURED = 989e12, 798e12       # dense bf16 tensor-core: datasheet, measured 8k^3 matmul
dev = "cuda"
quick = "--quick" in sys.argv


def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")  # ms


def inputs(B, S, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    q = torch.randn(B, S, H, DK, device=dev, generator=g).to(dtype)
    k = torch.randn(B, S, H, DK, device=dev, generator=g).to(dtype)
    v = torch.randn(B, S, H, DV, device=dev, generator=g).to(dtype)
    lg = torch.nn.functional.logsigmoid(torch.randn(B, S, H, device=dev, generator=g) + 4.0)
    return q, k, v, lg


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CHUNKS = (256, 512, 1024)  # chunk_size hints of the chunked prefill
CHUNK_DEFAULT = 512  # its default; the ratio, TF/s and %989 columns are of this one


def prefill_rows():
    import retention
    rows = []
    for S in ([2048, 8192] if quick else [2048, 8192, 32768, 131072]):
        q, k, v, lg = inputs(1, S)
        out = torch.full((1, S, H, DV), float("nan"), device=dev, dtype=torch.bfloat16)
        nS = torch.empty(1, H, D, DV, device=dev)
        ns = torch.empty(1, H, D, device=dev)
        assert prlib.prefill(q, k, v, lg, out, SCALE, None, (nS, ns)) == 0
        pkg = {}
        for c in (128, 1024):
            f = lambda c=c: retention.power_retention(q, k, v, lg, deg=2, scale=SCALE, chunk_size=c)
            y = f()
            pkg[c] = (bench(f, rep=100), rel(out, y))
        c_best = min(pkg, key=lambda c: pkg[c][0])
        ours = {c: bench(lambda c=c: prlib.prefill(q, k, v, lg, out, SCALE, None, (nS, ns), chunk=c), rep=100)
                for c in CHUNKS}
        t_one = bench(lambda: prlib.prefill(q, k, v, lg, out, SCALE, None, (nS, ns), kernel="tc"), rep=50)
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            t_sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True), rep=100)
        # useful work of the default chunk: state terms (query and update) + causal in-chunk attention
        flops = 2 * S * D * DV * (H + H) + 2 * H * S * (min(S, CHUNK_DEFAULT) / 2) * (DK + DV)
        rows.append((S, ours, t_one, pkg[c_best][0], c_best, t_sdpa, pkg[c_best][1], flops))
        del q, k, v, lg, out
        torch.cuda.empty_cache()
    print("\nPREFILL  bf16 B=1 H=16 D=64 deg=2 gated (ours: the chunked prefill with present_state, chunk hint c; one-kernel:"
          " the previous tensor-core prefill; package: best chunk of 128/1024)")
    print(f"{'shape':<18}" + "".join(f"{f'ours c{c}':>10}" for c in CHUNKS) + f"{'1-kernel':>9}{'pkg ms':>9}{'(chunk)':>8}"
          f"{'sdpa ms':>9}{'pkg/ours':>9}{'1k/ours':>8}{'sdpa/ours':>10}{'bar ms':>8}{'TF/s':>7}{'%989':>6}{'err vs pkg':>11}")
    bars = {2048: 0.25, 8192: 0.45, 32768: 1.5, 131072: 5.5}
    for S, ours, tone, tp, c, ts, err, fl in rows:
        to = ours[CHUNK_DEFAULT]
        tf = fl / (to * 1e-3) / 1e12
        print(f"{f'B1_T{S}_H16_D64':<18}" + "".join(f"{ours[c]:>10.3f}" for c in CHUNKS) + f"{tone:>9.3f}{tp:>9.3f}{c:>8}"
              f"{ts:>9.3f}{tp / to:>9.2f}{tone / to:>8.2f}{ts / to:>10.2f}{bars[S]:>8.2f}{tf:>7.1f}"
              f"{100 * tf * 1e12 / TC_NOMINAL:>6.1f}{err:>11.1e}")


def decode_rows():
    import retention
    rows = []
    C = 64
    for B, layers in ((1, 24), (64, 2)):
        q, k, v, lg = inputs(B, 1, seed=1)
        lay = []
        for _ in range(layers):
            st = torch.randn(B, H, D, DV, device=dev) * 0.01
            ss = torch.rand(B, H, D, device=dev) + 1.0
            kc, vc = (torch.randn(B, C, H, d, device=dev).to(torch.bfloat16) for d in (DK, DV))
            lgc = torch.nn.functional.logsigmoid(torch.randn(B, C, H, device=dev) + 4.0)
            cl = torch.zeros(B, dtype=torch.int64, device=dev)
            out = torch.empty(B, 1, H, DV, device=dev, dtype=torch.bfloat16)
            lay.append((st, ss, kc, vc, lgc, cl, out))

        def step():
            for (st, ss, kc, vc, lgc, cl, out) in lay:
                prlib.decode(q, k, v, lg, out, SCALE, st, ss, kc, vc, lgc, cl)

        def graph_of(step):
            for _ in range(C + 3):
                step()
            torch.cuda.synchronize()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            g = torch.cuda.CUDAGraph()
            with torch.cuda.stream(s):
                with torch.cuda.graph(g, stream=s):
                    step()
            torch.cuda.synchronize()
            return g

        def timed(run):
            nof, fold = [], []
            for _ in range(3 if quick else 8):
                for L in lay:
                    L[5].zero_()
                torch.cuda.synchronize()
                e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
                e0.record()
                for _ in range(C - 1):
                    run()
                e1.record()
                run()  # n = C: the fold step
                e2.record()
                torch.cuda.synchronize()
                nof.append(e0.elapsed_time(e1) / (C - 1) / layers)
                fold.append(e1.elapsed_time(e2) / layers)
            return sorted(nof)[len(nof) // 2] * 1e3, sorted(fold)[len(fold) // 2] * 1e3  # us per layer

        g = graph_of(step)
        eager_nf, eager_f = timed(step)
        graph_nf, graph_f = timed(g.replay)
        # the package: one step of power_retention_inference on a 32-token window, bf16 tiled state
        Dt = 256 * ((DK // 16) * (DK // 16 + 1) // 2)
        pst = torch.randn(B, H, Dt, DV, device=dev).to(torch.bfloat16) * 0.01
        pss = torch.rand(B, H, Dt, device=dev) + 1.0
        wk, wv = kc[:, :32].contiguous(), vc[:, :32].contiguous()
        wl = lgc[:, :32].contiguous()
        f = lambda: retention.power_retention_inference(q, wk, wv, wl, initial_state=pst, sum_of_keys=pss, deg=2,
                                                        scale=SCALE, switch_over_seq_len=None)
        f()
        t_pkg = bench(f, rep=200) * 1e3
        state_bytes = B * H * (D * DV + D) * 4
        rows.append((B, layers, eager_nf, graph_nf, eager_f, graph_f, t_pkg, state_bytes))
    print(f"\nDECODE  bf16 H=16 D=64 deg=2 gated, C=64, one new token; per layer, state rotated over N layers "
          f"(mean window 31 tokens; fold = the step that folds 64 tokens)")
    print(f"{'shape':<14}{'layers':>7}{'eager us':>9}{'graph us':>9}{'fold eag':>9}{'fold grf':>9}{'pkg us':>9}"
          f"{'pkg/ours':>9}{'bar us':>7}{'GB/s':>7}{'%3.35T':>7}{'%3.0T':>6}{'per step':>9}")
    for B, layers, enf, gnf, ef, gf, tp, sb in rows:
        bar = 10.0 if B == 1 else 180.0
        best = min(enf, gnf)
        gbs = sb / (best * 1e-6) / 1e9
        amortised = ((C - 1) * gnf + gf) / C  # one fold every C steps
        print(f"{f'B{B}_H16_D64':<14}{layers:>7}{enf:>9.2f}{gnf:>9.2f}{ef:>9.2f}{gf:>9.2f}{tp:>9.1f}{tp / best:>9.1f}"
              f"{bar:>7.0f}{gbs:>7.0f}{100 * gbs * 1e9 / BW_NOMINAL:>7.1f}{100 * gbs * 1e9 / BW_MEASURED:>6.1f}{amortised:>9.2f}")


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    if "--prefill-only" not in sys.argv:
        decode_rows()
    if "--decode-only" not in sys.argv:
        prefill_rows()
