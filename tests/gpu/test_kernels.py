"""GPU correctness of pr_prefill / pr_decode against a float64 torch oracle of the formulas.

Run on the GPU machine: python3 tests/gpu/test_kernels.py [--small]   (--small: the subset run under
compute-sanitizer). Every launch writes into outputs poisoned with NaN; errors are ||err||/||ref|| on
the same rounded inputs. Prints one table and exits non-zero if anything fails.
"""
import math
import sys

import torch

import prlib

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
dev = "cuda"
results = {}  # (group, dtype) -> [count, worst, fails]


def record(group, dtype, err, tol=None, ok=None):
    tol = TOL[dtype] if tol is None else tol
    ok = (err == err and err <= tol) if ok is None else ok
    r = results.setdefault((group, DT[dtype]), [0, 0.0, 0, tol])
    r[0] += 1
    r[1] = max(r[1], err if err == err else float("inf"))
    r[2] += 0 if ok else 1
    if not ok:
        print(f"FAIL {group} {DT[dtype]} err={err:.3e}", flush=True)


def rel(x, ref):
    x = x.double()
    if not torch.isfinite(x).all():
        return float("nan")
    if ref.norm() == 0:
        return x.norm().item()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def compact(dk):
    a, b = torch.triu_indices(dk, dk, device=dev)
    w = torch.where(a < b, 2.0, 1.0).double()
    return a, b, w


def phi(x, dk, key):
    a, b, w = compact(dk)
    f = x[..., a] * x[..., b]
    return f * w if key else f


GATE_BIAS = 2.0  # log gates are logsigmoid(N(0, 1) + bias); 2: about -0.15 a token


def rand_inputs(B, S, Hq, Hkv, Dk, Dv, dtype, gated, gen, gate_bias=GATE_BIAS):
    q = torch.randn(B, S, Hq, Dk, device=dev, generator=gen).to(dtype)
    k = torch.randn(B, S, Hkv, Dk, device=dev, generator=gen).to(dtype)
    v = torch.randn(B, S, Hkv, Dv, device=dev, generator=gen).to(dtype)
    lg = torch.nn.functional.logsigmoid(torch.randn(B, S, Hkv, device=dev, generator=gen) + gate_bias) if gated else None
    return q, k, v, lg


def rand_state(B, Hkv, Dk, Dv, gen, n=40):
    """A state as a real history would leave it (s > 0), in float32."""
    kh = torch.randn(B, n, Hkv, Dk, device=dev, generator=gen).double()
    vh = torch.randn(B, n, Hkv, Dv, device=dev, generator=gen).double()
    S0 = torch.einsum("bjhD,bjhv->bhDv", phi(kh, Dk, True), vh) / n
    s0 = phi(kh, Dk, True).sum(1) / n
    return S0.float().contiguous(), s0.float().contiguous()


def ref_attend(q, k, v, G, scale, S0, s0, pos_q, Dk):
    """Dense oracle for one set of queries. q (S,Hq,Dk), k/v (n,Hkv,*), G (n,Hkv) inclusive cumsum,
    pos_q (S,) window positions of the queries, S0/s0 (Hkv,D,Dv)/(Hkv,D) or None."""
    Hq, Hkv = q.shape[1], k.shape[1]
    r = Hq // Hkv
    ke, ve, Ge = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), G.repeat_interleave(r, 1)
    dots = torch.einsum("ihd,jhd->hij", q, ke)
    Gq = Ge[pos_q]  # (S, Hq)
    dG = Gq.t()[:, :, None] - Ge.t()[:, None, :]
    mask = torch.arange(k.shape[0], device=dev)[None, :] <= pos_q[:, None]
    dG = torch.where(mask[None], dG, torch.tensor(-math.inf, device=dev, dtype=dG.dtype))
    w = (scale * dots).abs().add(1e-7).pow(2) * dG.exp()
    num = torch.einsum("hij,jhv->ihv", w, ve)
    den = w.sum(-1).t()
    if S0 is not None:
        fq = phi(q, Dk, False)
        fac = scale * scale * Gq.exp()
        num = num + fac[..., None] * torch.einsum("ihD,hDv->ihv", fq, S0.double().repeat_interleave(r, 0))
        den = den + fac * torch.einsum("ihD,hD->ih", fq, s0.double().repeat_interleave(r, 0))
    return num / den[..., None]


def ref_fold(k, v, G, S0, s0, Dk):
    """State after folding tokens k/v (n,Hkv,*) with inclusive cumsum G into S0/s0 (or zero)."""
    coef = (G[-1][None] - G).exp()
    fk = phi(k, Dk, True) * coef[..., None]
    S = torch.einsum("jhD,jhv->hDv", fk, v)
    s = fk.sum(0)
    if S0 is not None:
        S = S + G[-1].exp()[:, None, None] * S0.double()
        s = s + G[-1].exp()[:, None] * s0.double()
    return S, s


def cumsum_or_zero(lg, shape):
    return torch.zeros(shape, device=dev, dtype=torch.float64) if lg is None else lg.double().cumsum(0)


def check_prefill(B, S, Hq, Hkv, Dk, Dv, dtype, gated, past, gen, kernel="auto", chunk=0, segmented=False,
                  gate_bias=GATE_BIAS):
    """kernel: "auto" (pr_prefill with its workspace: the chunked kernels for bf16 Dk = Dv = 64),
    "tc" (no workspace: the one-kernel tensor-core path for bf16 Dk 32/64) or "simt".
    segmented: "auto" given half the workspace it asks for, so that the sequence runs in segments
    (the state carried through present_*); then once more without present_* (carried through the
    workspace), which must give the same output bit for bit.
    gate_bias: see GATE_BIAS."""
    q, k, v, lg = rand_inputs(B, S, Hq, Hkv, Dk, Dv, dtype, gated, gen, gate_bias)
    scale = 1.0 / math.sqrt(Dk)
    D = Dk * (Dk + 1) // 2
    S0, s0 = rand_state(B, Hkv, Dk, Dv, gen) if past else (None, None)
    out = torch.full((B, S, Hq, Dv), float("nan"), device=dev, dtype=dtype)
    nS = torch.full((B, Hkv, D, Dv), float("nan"), device=dev)
    ns = torch.full((B, Hkv, D), float("nan"), device=dev)
    half = (lambda n: n // 2) if segmented else None
    pst = (S0, s0) if past else None
    rc = prlib.prefill(q, k, v, lg, out, scale, pst, (nS, ns), kernel=kernel, chunk=chunk, workspace_bytes=half)
    torch.cuda.synchronize()
    assert rc == 0, rc
    chunked = kernel == "auto" and dtype == torch.bfloat16 and Dk == 64 and Dv == 64 and S > 0
    seg = prlib.last_segment_chunks
    nchunks = -(-S // (chunk or 512))
    record("prefill path" + (" (chunked)" if chunked else f" ({kernel})"), dtype, 0.0, ok=(seg > 0) == chunked)
    if segmented:
        # Without present_* the state is carried in the workspace: f32 (B, Hkv, D, Dv) and (B, Hkv, D),
        # each rounded up to 256 bytes, on top of the same segments' states.
        a256 = lambda x: -(-x // 256) * 256
        carry = a256(B * Hkv * D * Dv * 4) + a256(B * Hkv * D * 4)
        out2 = torch.full_like(out, float("nan"))
        rc2 = prlib.prefill(q, k, v, lg, out2, scale, pst, None, chunk=chunk, workspace_bytes=lambda n: n // 2 + carry)
        torch.cuda.synchronize()
        seg2 = prlib.last_segment_chunks
        # seg2 may exceed seg where the layout has no present_*-sized carry (cuda/pending/fused-scan.patch)
        record("prefill segments", dtype, 0.0, ok=rc2 == 0 and 0 < seg < nchunks and 0 < seg2 < nchunks)
        # same arithmetic: the state carried between segments is the kernel's own f32 state, so
        # neither the segmenting nor where the carry lives changes a bit of the output
        record("prefill carry-independent", dtype, 0.0, ok=torch.equal(out, out2))
    if past and chunked:
        # present_* aliasing past_* (the contract of retention.h): the same bits as separate buffers
        pS, ps = S0.clone(), s0.clone()
        out3 = torch.full_like(out, float("nan"))
        rc3 = prlib.prefill(q, k, v, lg, out3, scale, (pS, ps), (pS, ps), kernel=kernel, chunk=chunk, workspace_bytes=half)
        torch.cuda.synchronize()
        record("prefill in place", dtype, 0.0,
               ok=rc3 == 0 and torch.equal(out3, out) and torch.equal(pS, nS) and torch.equal(ps, ns))
    eo = es = 0.0
    for b in range(B):
        G = cumsum_or_zero(None if lg is None else lg[b], (S, Hkv))
        ref = ref_attend(q[b].double(), k[b].double(), v[b].double(), G, scale,
                         None if S0 is None else S0[b], None if s0 is None else s0[b], torch.arange(S, device=dev), Dk)
        eo = max(eo, rel(out[b], ref))
        if S > 0:
            RS, Rs = ref_fold(k[b].double(), v[b].double(), G, None if S0 is None else S0[b], None if s0 is None else s0[b], Dk)
        elif S0 is not None:
            RS, Rs = S0[b].double(), s0[b].double()
        else:
            RS, Rs = torch.zeros_like(nS[b]).double(), torch.zeros_like(ns[b]).double()
        es = max(es, rel(nS[b], RS), rel(ns[b], Rs))
    tag = ("" if kernel == "auto" else f" ({kernel})") + (f" chunk {chunk}" if chunk else "") + (
        " segmented" if segmented else "") + (f" gates {gate_bias:+g}" if gate_bias != GATE_BIAS else "")
    record("prefill out" + tag, dtype, eo)
    record("prefill state" + tag, dtype, es, tol=1e-4 if dtype == torch.float32 else TOL[dtype])


def check_decode(B, Snew, Hq, Hkv, Dk, Dv, C, dtype, gated, lengths, gen):
    D = Dk * (Dk + 1) // 2
    scale = 1.0 / math.sqrt(Dk)
    q, k, v, lg = rand_inputs(B, Snew, Hq, Hkv, Dk, Dv, dtype, gated, gen)
    _, kc, vc, lgc = rand_inputs(B, C, Hkv, Hkv, Dk, Dv, dtype, gated, gen)
    S0, s0 = rand_state(B, Hkv, Dk, Dv, gen)
    state, ssum = S0.clone(), s0.clone()
    kc0, vc0 = kc.clone(), vc.clone()
    lgc0 = None if lgc is None else lgc.clone()
    clen = torch.tensor(lengths, device=dev, dtype=torch.int64)
    out = torch.full((B, Snew, Hq, Dv), float("nan"), device=dev, dtype=dtype)
    rc = prlib.decode(q, k, v, lg, out, scale, state, ssum, kc, vc, lgc, clen)
    torch.cuda.synchronize()
    assert rc == 0, rc
    eo = es = 0.0
    ok_meta = True
    for b in range(B):
        L = lengths[b]
        if L < 0 or L > C:
            ok_meta &= bool(torch.isnan(out[b].float()).all()) and torch.equal(state[b], S0[b]) and torch.equal(ssum[b], s0[b])
            ok_meta &= torch.equal(kc[b], kc0[b]) and int(clen[b]) == L
            continue
        wk = torch.cat([kc0[b, :L], k[b]]).double()
        wv = torch.cat([vc0[b, :L], v[b]]).double()
        wl = None if lg is None else torch.cat([lgc0[b, :L], lg[b]])
        n = L + Snew
        G = cumsum_or_zero(wl, (n, Hkv))
        ref = ref_attend(q[b].double(), wk, wv, G, scale, S0[b], s0[b], torch.arange(L, n, device=dev), Dk)
        eo = max(eo, rel(out[b], ref))
        if n >= C:
            RS, Rs = ref_fold(wk, wv, G, S0[b], s0[b], Dk)
            es = max(es, rel(state[b], RS), rel(ssum[b], Rs))
            ok_meta &= int(clen[b]) == 0
        else:
            ok_meta &= torch.equal(state[b], S0[b]) and torch.equal(ssum[b], s0[b]) and int(clen[b]) == n
            ok_meta &= torch.equal(kc[b, L:n], k[b]) and torch.equal(vc[b, L:n], v[b]) and torch.equal(kc[b, :L], kc0[b, :L])
            if lg is not None:
                ok_meta &= torch.equal(lgc[b, L:n], lg[b])
    record("decode out", dtype, eo)
    record("decode state", dtype, es, tol=1e-4 if dtype == torch.float32 else TOL[dtype])
    record("decode cache/len", dtype, 0.0 if ok_meta else 1.0, tol=0.5)


def check_continuation(dtype, gated, gen, S1=37, S2=32, C=16, B=2, Hq=4, Hkv=2, Dk=64, Dv=64):
    """prefill(S1+S2) == prefill(S1) then S2 single-token steps (outputs and, after the last fold, state)."""
    D = Dk * (Dk + 1) // 2
    scale = 1.0 / math.sqrt(Dk)
    q, k, v, lg = rand_inputs(B, S1 + S2, Hq, Hkv, Dk, Dv, dtype, gated, gen)
    full = torch.full((B, S1 + S2, Hq, Dv), float("nan"), device=dev, dtype=dtype)
    fS = torch.empty(B, Hkv, D, Dv, device=dev)
    fs = torch.empty(B, Hkv, D, device=dev)
    assert prlib.prefill(q, k, v, lg, full, scale, None, (fS, fs)) == 0
    head = torch.full((B, S1, Hq, Dv), float("nan"), device=dev, dtype=dtype)
    state = torch.empty(B, Hkv, D, Dv, device=dev)
    ssum = torch.empty(B, Hkv, D, device=dev)
    sl = lambda t, a, b_: None if t is None else t[:, a:b_].contiguous()
    assert prlib.prefill(sl(q, 0, S1), sl(k, 0, S1), sl(v, 0, S1), sl(lg, 0, S1), head, scale, None, (state, ssum)) == 0
    kc = torch.zeros(B, C, Hkv, Dk, device=dev, dtype=dtype)
    vc = torch.zeros(B, C, Hkv, Dv, device=dev, dtype=dtype)
    lgc = None if lg is None else torch.zeros(B, C, Hkv, device=dev)
    clen = torch.zeros(B, dtype=torch.int64, device=dev)
    steps = []
    for t in range(S1, S1 + S2):
        o = torch.full((B, 1, Hq, Dv), float("nan"), device=dev, dtype=dtype)
        assert prlib.decode(sl(q, t, t + 1), sl(k, t, t + 1), sl(v, t, t + 1), sl(lg, t, t + 1), o, scale,
                            state, ssum, kc, vc, lgc, clen) == 0
        steps.append(o)
    torch.cuda.synchronize()
    stepped = torch.cat(steps, 1).double()
    e_out = rel(stepped, full[:, S1:].double())
    e_head = rel(head, full[:, :S1].double())
    e_state = max(rel(state, fS.double()), rel(ssum, fs.double()))
    record("prefill==prefill+steps", dtype, max(e_out, e_head, e_state))
    record("steps empty cache", dtype, 0.0 if int(clen.max()) == 0 else 1.0, tol=0.5)


def main(small):
    ok, got, want = prlib.abi_layout_matches()
    print("ABI layout matches ctypes mirror:", ok, flush=True)
    if not ok:
        print("lib:", got, "\nctypes:", want)
    gen = torch.Generator(device=dev)
    gen.manual_seed(1234)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    if small:
        # 600: segments; 1100 x 8 heads: the fused scan of cuda/pending/fused-scan.patch (B Hkv >= 8)
        shapes = [(1, 7, 4, 2, 32, 32), (1, 65, 2, 2, 64, 64), (1, 600, 2, 2, 64, 64), (1, 1100, 8, 8, 64, 64)]
        flags = [(True, True)]
    else:
        shapes = [(1, 1, 1, 1, 32, 32), (2, 7, 4, 4, 64, 64), (1, 63, 8, 2, 64, 64), (1, 65, 4, 4, 32, 32),
                  (2, 200, 8, 2, 64, 64), (1, 1000, 4, 4, 64, 64), (1, 130, 2, 1, 128, 128), (1, 77, 4, 2, 32, 64),
                  (1, 0, 2, 2, 32, 32), (1, 4100, 2, 2, 64, 64), (3, 129, 16, 2, 64, 8),
                  # B Hkv >= 8, cuda/pending/fused-scan.patch's fused scan: 3 / 5 chunks, GQA (one chunk: (2, 7, 4, 4))
                  (2, 1100, 8, 4, 64, 64)]
        flags = [(g, pst) for g in (False, True) for pst in (False, True)]
    for dtype in dtypes:
        for (B, S, Hq, Hkv, Dk, Dv) in shapes:
            for gated, past in flags:
                check_prefill(B, S, Hq, Hkv, Dk, Dv, dtype, gated, past, gen)
                if dtype == torch.bfloat16 and Dk <= 64:  # a tensor-core path ran: check the others too
                    if Dk == 64 and Dv == 64:  # "auto" was the chunked kernels
                        check_prefill(B, S, Hq, Hkv, Dk, Dv, dtype, gated, past, gen, kernel="tc")
                        if S > 256:  # several chunks of the shortest length, in one and in several segments
                            check_prefill(B, S, Hq, Hkv, Dk, Dv, dtype, gated, past, gen, chunk=256)
                            check_prefill(B, S, Hq, Hkv, Dk, Dv, dtype, gated, past, gen, chunk=256, segmented=True)
                    check_prefill(B, S, Hq, Hkv, Dk, Dv, dtype, gated, past, gen, kernel="simt")
    # Strong gates (bias -2: about -2.1 a token, so a 64-key tile spans ~190 in log2, more than the
    # factored weights of cuda/pending/prefill-latency.patch allow) and mixed ones (bias 0: tiles on
    # both sides of that limit).
    for bias in (-2.0, 0.0):
        for (B, S, Hq, Hkv) in ([(1, 600, 2, 2)] if small else [(1, 1000, 4, 2), (2, 600, 2, 2)]):
            check_prefill(B, S, Hq, Hkv, 64, 64, torch.bfloat16, True, True, gen, gate_bias=bias)
            check_prefill(B, S, Hq, Hkv, 64, 64, torch.bfloat16, True, True, gen, chunk=256, gate_bias=bias)
    caps = [16] if small else [1, 16, 64]
    # Dv 8 and 128 (with Dk 64 too), Dk 32 with Dv 96 (12 column blocks), GQA.
    heads = [(4, 2, 32, 32)] if small else [(4, 4, 64, 64), (8, 2, 64, 64), (2, 1, 32, 64), (2, 2, 128, 128),
                                             (4, 2, 32, 8), (2, 2, 64, 128), (2, 1, 32, 96)]
    for dtype in dtypes:
        for C in caps:
            for Snew in sorted({1, min(3, C)}):
                for (Hq, Hkv, Dk, Dv) in heads:
                    for gated in ((True,) if small else (False, True)):
                        lengths = sorted({0, C // 2, C - Snew, C - 1, C} & set(range(0, C + 1)))
                        check_decode(len(lengths), Snew, Hq, Hkv, Dk, Dv, C, dtype, gated, lengths, gen)
        check_decode(3, 1, 4, 4, 32, 32, 8, dtype, True, [-1, 3, 9], gen)  # invalid lengths -> NaN, untouched
        if not small:
            # a grid large enough for the 32-column blocks (B Hkv Dv/32 >= 1024)
            check_decode(64, 1, 16, 16, 64, 64, 16, dtype, True, [i % 17 for i in range(64)], gen)
            # GQA r 8: 10 groups of 4 queries; a window (C 300) longer than one pass of the gate scan
            check_decode(2, 5, 32, 4, 64, 64, 300, dtype, True, [0, 296], gen)
        for gated in ((True,) if small else (False, True)):
            check_continuation(dtype, gated, gen, S2=(16 if small else 32))
    torch.cuda.synchronize()
    print(f"\n{'check':<34}{'dtype':<6}{'cases':>6}{'worst':>11}{'tol':>9}  result")
    bad = 0
    for (g, d), (n, worst, fails, tol) in results.items():
        bad += fails
        print(f"{g:<34}{d:<6}{n:>6}{worst:>11.2e}{tol:>9.0e}  {'PASS' if fails == 0 else f'FAIL x{fails}'}")
    print("ALL PASS" if bad == 0 and ok else f"FAILURES: {bad}")
    return 0 if bad == 0 and ok else 1


if __name__ == "__main__":
    sys.exit(main("--small" in sys.argv))
