// PowerRetention prefill on tensor cores: bf16 inputs, Dk 32 or 64, Dv a multiple of 8.
//
// Grid (Dv/8, Hkv, B), 256 threads (8 warps); block (cg, h, b) owns value columns [8cg, 8cg+8) of kv
// head h's state for the whole sequence and walks 64-token chunks in order. No block talks to another:
// each redoes its chunk's attention and the sum of keys, which costs far less than the state work.
//
// The state never leaves registers, and the expanded features phi(x) are never formed. With the
// compact rows (a, b >= a) grouped by a ("a-decomposition"):
//   query:  num_i = sum_a q_ia * (Q[i, :] . S[(a, :), cols])      -- one mma per (a, 16-row b tile),
//           raw bf16 queries as the A operand, the state tile as B, then a per-row scale by q_ia;
//   update: S[(a, b), cols] = e^{G_end} S + w_ab sum_j k_jb (k_ja gamma_j v_j[cols])
//           -- raw keys (transposed by ldmatrix) as A, k_ja gamma_j v_j rounded to bf16 as B;
// with w_ab = 2 (b > a), 1 (b = a), 0 (b < a: the 16-row tiles start at 16*floor(a/16), so rows below
// the diagonal exist and stay zero). Warp w owns a = w + 8 ga, ga < Dk/8: 20 tiles of 16x8 f32 at
// Dk = 64 (80 registers). A tile is moved from accumulator to B-operand layout with movmatrix.
// The normaliser uses the full symmetric 64x64 matrix M = sum_j gamma_j k_j k_j^T instead of the
// compact sum of keys (den_i = q_i^T M q_i); warp w owns the 8 columns a = w + 8 a_l of M.
// Attention inside the chunk: S = Q K^T on tensor cores, weights (|scale s| + eps)^2 e^{G_i - G_j} in
// f32, then W V with W rounded to bf16; the row sums of W (the denominator) stay f32.
//
// Precision: queries and keys are bf16 inputs, exact as operands; the state, the gated values and W
// are rounded to bf16 where they enter an mma (relative 2^-9 per element, accumulated in f32), which
// is why this path serves bf16 inputs only (2e-2 tolerance; measured ~3e-3, tests/gpu). The state
// itself is accumulated and stored in f32.
//
// Pipeline: keys/values/gates of chunk n+1 and the queries of the next (chunk, head) pair are copied
// with cp.async into the other half of double buffers while the current pair computes.
// Race-freedom: every phase that writes shared memory another thread reads ends with __syncthreads;
// the copy into a buffer half is issued only after the barrier that ends the last read of that half.
// Blocks write disjoint output columns and state column slices. present_sum_of_keys is written by the
// head's last column block only, at its very end, after its whole sequence, while the head's other
// blocks read past_sum_of_keys in their first instructions; that keeps an aliased in-place call
// correct as long as the head's blocks are not scheduled a whole sequence apart.
#include <math.h>

#include "common.cuh"
#include "mma.cuh"
#include "prefill_tc.cuh"

// Timing experiments only (leave-one-stage-out): bit 1 skips the state query, 2 the attention,
// 4 the state update, 8 the outputs. Never set in a build that anyone uses.
#ifndef PR_TC_SKIP
#define PR_TC_SKIP 0
#endif

namespace pr {
namespace tc {
namespace {

using bf16 = __nv_bfloat16;
constexpr int kThreads = 512, kWarps = 16, kC = 64, kCols = 8;

template <int DK>
struct Cfg {
  static constexpr int D = DK * (DK + 1) / 2;
  static constexpr int NA = DK / kWarps;  // a values per warp: a = warp + 16 ga, in b-tile group ga
  static constexpr int MT = DK / 16;      // 16-row tiles over b, and k16 steps over Dk
  static constexpr int KP = DK + 8;       // row pitch (bf16) of queries and keys: conflict-free ldmatrix
  static constexpr int TP = kC + 8;       // row pitch (bf16) of the transposed keys
  // tiles of a values ga' < ga: sum of (MT - ga'), closed form so that it folds after unrolling
  __host__ __device__ static constexpr int tiles_before(int ga) { return ga * MT - ga * (ga - 1) / 2; }
  static constexpr int NTILES = tiles_before(NA);
  // M (Dk x Dk, f32) in 16x8 tiles x = m + MT cgp (rows 16m.., columns 8cgp..): warp w owns x = w and
  // w + 16 where they exist; both have m = w % MT.
  static constexpr int MTILES = MT * (DK / 8);
  static constexpr int NM = MTILES > kWarps ? 2 : 1;
  static constexpr int oK = 0;                                    // bf16 [2][kC][KP] keys
  static constexpr int oQ = oK + 2 * kC * KP * 2;                 // bf16 [2][kC][KP] queries of one head
  static constexpr int oV = oQ + 2 * kC * KP * 2;                 // bf16 [2][kC][8] the block's value columns
  static constexpr int oG = oV + 2 * kC * kCols * 2;              // f32 [2][kC] log gates
  static constexpr int oGd = oG + 2 * kC * 4;                     // f64 [kC] inclusive cumulative gates
  static constexpr int oKT = oGd + kC * 8;                        // bf16 [DK][TP] keys, transposed
  static constexpr int oPart = oKT + DK * TP * 2;                 // f32 [16][kC][8] state-part numerators
  static constexpr int oDPart = oPart + kWarps * kC * kCols * 4;  // f32 [16][kC] state-part denominators
  static constexpr int oAPart = oDPart + kWarps * kC * 4;         // f32 [4][kC][8] attention numerators
  static constexpr int oADPart = oAPart + 4 * kC * kCols * 4;     // f32 [4][kC]
  static constexpr int oBq = oADPart + 4 * kC * 4;                // uint2 [16][NTILES][32] state B fragments
  static constexpr int bytes = oBq + kWarps * NTILES * 32 * 8;
};

template <int DK>
__global__ void __launch_bounds__(kThreads, 1) retention_prefill_tc_kernel(const PrPrefillParams p, const PrefillShape sh) {
  using C = Cfg<DK>;
  constexpr int NA = C::NA, MT = C::MT, KP = C::KP, TP = C::TP, NTILES = C::NTILES, D = C::D, NM = C::NM;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* Ks = reinterpret_cast<bf16*>(smem + C::oK);
  bf16* Qs = reinterpret_cast<bf16*>(smem + C::oQ);
  bf16* Vs = reinterpret_cast<bf16*>(smem + C::oV);
  float* Gs = reinterpret_cast<float*>(smem + C::oG);
  double* Gd = reinterpret_cast<double*>(smem + C::oGd);
  bf16* KT = reinterpret_cast<bf16*>(smem + C::oKT);
  float* part = reinterpret_cast<float*>(smem + C::oPart);
  float* dpart = reinterpret_cast<float*>(smem + C::oDPart);
  float* apart = reinterpret_cast<float*>(smem + C::oAPart);
  float* adpart = reinterpret_cast<float*>(smem + C::oADPart);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int cg = blockIdx.x, n0 = cg * kCols, hk = blockIdx.y, bb = blockIdx.z;
  // Each lane keeps the bf16 B fragments of its own state tiles here (written and read by the same
  // thread, so no barrier): registers cannot hold them next to the f32 tiles.
  uint2* bqs = reinterpret_cast<uint2*>(smem + C::oBq) + warp * NTILES * 32 + lane;
  const int64_t bh = static_cast<int64_t>(bb) * sh.Hkv + hk;
  const int64_t S = sh.S;
  const int r = sh.r;
  const bf16* qptr = static_cast<const bf16*>(p.query);
  const bf16* kptr = static_cast<const bf16*>(p.key);
  const bf16* vptr = static_cast<const bf16*>(p.value);
  bf16* out = static_cast<bf16*>(p.output);
  const float sc2 = p.scale * p.scale;
  // ldmatrix row addresses: A operand (non-transposed 16x16), and the key tiles (B of Q K^T, A of K^T V)
  const int arow = (lane & 7) + ((lane >> 3) & 1) * 8, acol = (lane >> 4) * 8;
  const int krow = (lane & 7) + (lane >> 4) * 8, kcol = ((lane >> 3) & 1) * 8;

  float st[NTILES][4];  // st[tile(ga, m)]: S[(a, 16m + g (+8)), n0 + 2t (+1)], a = warp + 16 ga, m >= ga
  float ms[2][4];       // M tile x = warp + 16 u: M[16 mw + g (+8)][8 (x / MT) + 2t (+1)]
  const int mw = warp % MT;
  auto m_tile_ok = [&](int u) { return warp + kWarps * u < C::MTILES; };
  auto m_col = [&](int u) { return 8 * ((warp + kWarps * u) / MT); };
  auto keep_b = [&](int ti) {
    uint2 b;
    mma::c_to_b(st[ti], b.x, b.y);
    bqs[ti * 32] = b;
  };
#pragma unroll
  for (int ga = 0; ga < NA; ++ga) {
    const int a = warp + 16 * ga;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < ga) continue;  // constant trip counts: every index into st stays static
      const int ti = C::tiles_before(ga) + m - ga;
#pragma unroll
      for (int h8 = 0; h8 < 2; ++h8) {
        const int b = 16 * m + g + 8 * h8;
        float2 v = make_float2(0.f, 0.f);
        if (p.past_state != nullptr && b >= a)
          v = *reinterpret_cast<const float2*>(p.past_state + (bh * D + crow<DK>(a, b)) * sh.Dv + n0 + 2 * t);
        st[ti][2 * h8] = v.x;
        st[ti][2 * h8 + 1] = v.y;
      }
      keep_b(ti);
    }
  }
#pragma unroll
  for (int u = 0; u < 2; ++u)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int b = 16 * mw + g + 8 * (e >> 1), a = m_col(u) + 2 * t + (e & 1);
      float v = 0.f;
      if (p.past_sum_of_keys != nullptr && u < NM && m_tile_ok(u))
        v = p.past_sum_of_keys[bh * D + (a <= b ? crow<DK>(a, b) : crow<DK>(b, a))] * (a == b ? 1.f : 0.5f);
      ms[u][e] = v;
    }

  const int nchunks = static_cast<int>((S + kC - 1) / kC);
  const int npairs = nchunks * r;
  auto issue_kvg = [&](int n, int buf) {
    const int64_t t0 = static_cast<int64_t>(n) * kC;
    constexpr int SEG = DK / 8;
    for (int k = tid; k < kC * SEG; k += kThreads) {
      const int j = k / SEG, s8 = k % SEG;
      const bool ok = t0 + j < S;
      const bf16* src = ok ? kptr + ((bb * S + t0 + j) * sh.Hkv + hk) * DK + 8 * s8 : kptr;
      mma::cp_async16(Ks + (buf * kC + j) * KP + 8 * s8, src, ok ? 16 : 0);
    }
    if (tid < kC) {
      const int j = tid;
      const bool ok = t0 + j < S;
      const bf16* src = ok ? vptr + ((bb * S + t0 + j) * sh.Hkv + hk) * sh.Dv + n0 : vptr;
      mma::cp_async16(Vs + (buf * kC + j) * kCols, src, ok ? 16 : 0);
    } else if (tid < 2 * kC) {
      const int j = tid - kC;
      float* dst = Gs + buf * kC + j;
      if (p.log_gate != nullptr) {
        const bool ok = t0 + j < S;
        mma::cp_async4(dst, ok ? p.log_gate + (bb * S + t0 + j) * sh.Hkv + hk : p.log_gate, ok ? 4 : 0);
      } else {
        *dst = 0.f;
      }
    }
  };
  auto issue_q = [&](int n, int h, int buf) {
    const int64_t t0 = static_cast<int64_t>(n) * kC;
    constexpr int SEG = DK / 8;
    for (int k = tid; k < kC * SEG; k += kThreads) {
      const int j = k / SEG, s8 = k % SEG;
      const bool ok = t0 + j < S;
      const bf16* src = ok ? qptr + ((bb * S + t0 + j) * sh.Hq + hk * r + h) * DK + 8 * s8 : qptr;
      mma::cp_async16(Qs + (buf * kC + j) * KP + 8 * s8, src, ok ? 16 : 0);
    }
  };

  if (nchunks > 0) {
    issue_kvg(0, 0);
    issue_q(0, 0, 0);
    mma::cp_async_commit();
  }
  for (int n = 0; n < nchunks; ++n) {
    const int buf = n & 1;
    const int64_t t0 = static_cast<int64_t>(n) * kC;
    mma::cp_async_wait_all();
    __syncthreads();
    if (n + 1 < nchunks) {
      issue_kvg(n + 1, buf ^ 1);
      mma::cp_async_commit();
    }
    const bf16* Kc = Ks + buf * kC * KP;
    const bf16* Vc = Vs + buf * kC * kCols;
    const float* Gr = Gs + buf * kC;

    // Cumulative gates of the chunk, in f64 (long strongly gated chunks lose |G| 2^-24 in f32);
    // keys transposed (one 16x16 block per warp, ldmatrix.trans then 32-bit stores).
    if (warp == 0) {
      const double x0 = Gr[2 * lane], x1 = Gr[2 * lane + 1];
      double v = x0 + x1;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const double u = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += u;
      }
      Gd[2 * lane] = v - x1;
      Gd[2 * lane + 1] = v;
    }
    for (int blk = warp; blk < (kC / 16) * MT; blk += kWarps) {
      const int j0 = 16 * (blk / MT), d0 = 16 * (blk % MT);
      uint32_t x[4];
      mma::ldsm_x4_t(x, Kc + (j0 + krow) * KP + d0 + kcol);
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
        *reinterpret_cast<uint32_t*>(KT + (d0 + (mi & 1) * 8 + g) * TP + j0 + (mi >> 1) * 8 + 2 * t) = x[mi];
    }
    __syncthreads();
    const double g_end = Gd[kC - 1];  // gates of padding tokens are 0
    const float decay = expf(static_cast<float>(g_end));

    uint32_t bm[2][2];  // M_{n-1} as B operands
#pragma unroll
    for (int u = 0; u < 2; ++u) mma::c_to_b(ms[u], bm[u][0], bm[u][1]);

    for (int h = 0; h < r; ++h) {
      const int pi = n * r + h, qb = pi & 1;
      if (h > 0) {
        mma::cp_async_wait_all();
        __syncthreads();
      }
      if (pi + 1 < npairs) {
        issue_q(h + 1 < r ? n : n + 1, h + 1 < r ? h + 1 : 0, qb ^ 1);
        mma::cp_async_commit();
      }
      const bf16* Qc = Qs + qb * kC * KP;

#if !(PR_TC_SKIP & 1)
      // State part: this warp's a values, every query row of the chunk.
#pragma unroll
      for (int it = 0; it < kC / 16; ++it) {
        float P[NA][4], qm[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int ga = 0; ga < NA; ++ga) P[ga][0] = P[ga][1] = P[ga][2] = P[ga][3] = 0.f;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          uint32_t A[4];
          mma::ldsm_x4(A, Qc + (16 * it + arow) * KP + 16 * m + acol);
#pragma unroll
          for (int ga = 0; ga < NA; ++ga) {
            if (ga <= m) {
              const uint2 bq = bqs[(C::tiles_before(ga) + m - ga) * 32];
              mma::mma_bf16(P[ga], A, bq.x, bq.y);
            }
          }
          if (m == mw) {  // this warp's part of q^T M q: b in tile mw, a in its M columns
#pragma unroll
            for (int u = 0; u < NM; ++u)
              if (m_tile_ok(u)) mma::mma_bf16(qm[u], A, bm[u][0], bm[u][1]);
          }
        }
        const int i0 = 16 * it + g, i1 = i0 + 8;
        float num[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int ga = 0; ga < NA; ++ga) {
          const int a = warp + 16 * ga;
          const float q0 = bf(Qc[i0 * KP + a]), q1 = bf(Qc[i1 * KP + a]);
          num[0] += q0 * P[ga][0];
          num[1] += q0 * P[ga][1];
          num[2] += q1 * P[ga][2];
          num[3] += q1 * P[ga][3];
        }
        float d0 = 0.f, d1 = 0.f;
#pragma unroll
        for (int u = 0; u < NM; ++u) {
          if (!m_tile_ok(u)) continue;
          const int a = m_col(u) + 2 * t;
          const float2 x0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(Qc + i0 * KP + a));
          const float2 x1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(Qc + i1 * KP + a));
          d0 += x0.x * qm[u][0] + x0.y * qm[u][1];
          d1 += x1.x * qm[u][2] + x1.y * qm[u][3];
        }
        d0 += __shfl_xor_sync(0xffffffffu, d0, 1);
        d0 += __shfl_xor_sync(0xffffffffu, d0, 2);
        d1 += __shfl_xor_sync(0xffffffffu, d1, 1);
        d1 += __shfl_xor_sync(0xffffffffu, d1, 2);
        float* pw = part + warp * kC * kCols;
        *reinterpret_cast<float2*>(pw + i0 * kCols + 2 * t) = make_float2(num[0], num[1]);
        *reinterpret_cast<float2*>(pw + i1 * kCols + 2 * t) = make_float2(num[2], num[3]);
        if (t == 0) {
          dpart[warp * kC + i0] = d0;
          dpart[warp * kC + i1] = d1;
        }
      }
#endif
#if !(PR_TC_SKIP & 2)
      // Attention inside the chunk: warp w takes query tile w/4 against keys [16 (w%4), +16).
      {
        const int ita = warp >> 2, jq = warp & 3, j0 = 16 * jq;
        const int i0 = 16 * ita + g, i1 = i0 + 8;
        float an[4] = {0.f, 0.f, 0.f, 0.f}, ad0 = 0.f, ad1 = 0.f;
        if (jq <= ita) {
          float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            uint32_t A[4], Bk[4];
            mma::ldsm_x4(A, Qc + (16 * ita + arow) * KP + 16 * m + acol);
            mma::ldsm_x4(Bk, Kc + (j0 + krow) * KP + 16 * m + kcol);
            mma::mma_bf16(s[0], A, Bk[0], Bk[1]);
            mma::mma_bf16(s[1], A, Bk[2], Bk[3]);
          }
          const double gi0 = Gd[i0], gi1 = Gd[i1];
#pragma unroll
          for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int i = e < 2 ? i0 : i1;
              const int j = j0 + 8 * nt + 2 * t + (e & 1);
              float w = 0.f;
              if (j <= i) w = attn_weight(s[nt][e], p.scale, static_cast<float>((e < 2 ? gi0 : gi1) - Gd[j]));
              s[nt][e] = w;
            }
          ad0 = s[0][0] + s[0][1] + s[1][0] + s[1][1];
          ad1 = s[0][2] + s[0][3] + s[1][2] + s[1][3];
          ad0 += __shfl_xor_sync(0xffffffffu, ad0, 1);
          ad0 += __shfl_xor_sync(0xffffffffu, ad0, 2);
          ad1 += __shfl_xor_sync(0xffffffffu, ad1, 1);
          ad1 += __shfl_xor_sync(0xffffffffu, ad1, 2);
          uint32_t vb[2];
          mma::ldsm_x2_t(vb, Vc + (j0 + (lane & 15)) * kCols);
          const uint32_t Aw[4] = {mma::pack_bf16(s[0][0], s[0][1]), mma::pack_bf16(s[0][2], s[0][3]),
                                  mma::pack_bf16(s[1][0], s[1][1]), mma::pack_bf16(s[1][2], s[1][3])};
          mma::mma_bf16(an, Aw, vb[0], vb[1]);
        }
        float* aw = apart + jq * kC * kCols;
        *reinterpret_cast<float2*>(aw + i0 * kCols + 2 * t) = make_float2(an[0], an[1]);
        *reinterpret_cast<float2*>(aw + i1 * kCols + 2 * t) = make_float2(an[2], an[3]);
        if (t == 0) {
          adpart[jq * kC + i0] = ad0;
          adpart[jq * kC + i1] = ad1;
        }
      }
#endif
      __syncthreads();

#if !(PR_TC_SKIP & 8)
      // Outputs: y = (attention + f_i state part) / (its row sums + f_i q^T M q), f_i = scale^2 e^{G_i}.
      if (tid < kC * kCols / 2) {
        const int i = tid >> 2, c = 2 * (tid & 3);
        float nx = 0.f, ny = 0.f, dd = 0.f, ax = 0.f, ay = 0.f, ad = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          const float2 v = *reinterpret_cast<const float2*>(part + (w * kC + i) * kCols + c);
          nx += v.x;
          ny += v.y;
          dd += dpart[w * kC + i];
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float2 v = *reinterpret_cast<const float2*>(apart + (q * kC + i) * kCols + c);
          ax += v.x;
          ay += v.y;
          ad += adpart[q * kC + i];
        }
        const float f = sc2 * expf(static_cast<float>(Gd[i]));
        const float den = ad + f * dd;
        if (t0 + i < S) {
          const __nv_bfloat162 y = __floats2bfloat162_rn((ax + f * nx) / den, (ay + f * ny) / den);
          *reinterpret_cast<__nv_bfloat162*>(out + ((bb * S + t0 + i) * sh.Hq + hk * r + h) * sh.Dv + n0 + c) = y;
        }
      }
#endif
      if (h + 1 < r) __syncthreads();  // partial sums are rewritten by the next head
    }

#if !(PR_TC_SKIP & 4)
    // State update with this chunk's keys and values. This thread's B-fragment tokens are
    // j = 16 s + 2t + {0, 1} and + 8; gm_j = exp(G_end - G_j).
    {
      uint32_t vgp[4][2], gmp[4][2];  // (gm_j v_j[n0 + g]) pairs and gm_j pairs, bf16
#pragma unroll
      for (int s = 0; s < 4; ++s)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = 16 * s + 2 * t + 8 * e;
          const float gm0 = expf(static_cast<float>(g_end - Gd[j])), gm1 = expf(static_cast<float>(g_end - Gd[j + 1]));
          vgp[s][e] = mma::pack_bf16(gm0 * bf(Vc[j * kCols + g]), gm1 * bf(Vc[(j + 1) * kCols + g]));
          gmp[s][e] = mma::pack_bf16(gm0, gm1);
        }
      // M += K^T diag(gm) K on this warp's tiles: rows b in tile mw, columns a = m_col(u) + g.
      {
        float tm[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          uint32_t A[4];
          mma::ldsm_x4_t(A, Kc + (16 * s + krow) * KP + 16 * mw + kcol);
#pragma unroll
          for (int u = 0; u < NM; ++u) {
            if (!m_tile_ok(u)) continue;
            const bf16* kr = KT + (m_col(u) + g) * TP + 16 * s + 2 * t;
            mma::mma_bf16(tm[u], A, mma::mul_bf16x2(*reinterpret_cast<const uint32_t*>(kr), gmp[s][0]),
                          mma::mul_bf16x2(*reinterpret_cast<const uint32_t*>(kr + 8), gmp[s][1]));
          }
        }
#pragma unroll
        for (int u = 0; u < NM; ++u)
#pragma unroll
          for (int e = 0; e < 4; ++e) ms[u][e] = decay * ms[u][e] + tm[u][e];
      }
      constexpr int HALVES = (NA + 1) / 2;
#pragma unroll
      for (int hf = 0; hf < HALVES; ++hf) {
        uint32_t bu[2][4][2];  // k_ja gm_j v_j[n0 + g] for a = warp + 16 (2 hf + gl)
#pragma unroll
        for (int gl = 0; gl < 2; ++gl) {
          const int a = warp + 16 * (2 * hf + gl);
#pragma unroll
          for (int s = 0; s < 4; ++s)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              bu[gl][s][e] = a < DK ? mma::mul_bf16x2(*reinterpret_cast<const uint32_t*>(KT + a * TP + 16 * s + 2 * t + 8 * e), vgp[s][e]) : 0u;
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < 2 * hf) continue;
          // Token steps outermost: the two accumulations below are independent chains.
          float tp[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
          for (int s = 0; s < 4; ++s) {
            uint32_t A[4];  // K^T[b tile m][token step s]
            mma::ldsm_x4_t(A, Kc + (16 * s + krow) * KP + 16 * m + kcol);
#pragma unroll
            for (int gl = 0; gl < 2; ++gl) {
              const int ga = 2 * hf + gl;
              if (ga < NA && ga <= m) mma::mma_bf16(tp[gl], A, bu[gl][s][0], bu[gl][s][1]);
            }
          }
#pragma unroll
          for (int gl = 0; gl < 2; ++gl) {
            const int ga = 2 * hf + gl;
            if (ga < NA && ga <= m) {
              const int ti = C::tiles_before(ga) + m - ga;
              const int a = warp + 16 * ga, b0 = 16 * m + g;
              const float w0 = key_weight(a, b0), w1 = key_weight(a, b0 + 8);
              st[ti][0] = decay * st[ti][0] + w0 * tp[gl][0];
              st[ti][1] = decay * st[ti][1] + w0 * tp[gl][1];
              st[ti][2] = decay * st[ti][2] + w1 * tp[gl][2];
              st[ti][3] = decay * st[ti][3] + w1 * tp[gl][3];
              keep_b(ti);
            }
          }
        }
      }
    }
#endif
  }

  if (p.present_state != nullptr) {
#pragma unroll
    for (int ga = 0; ga < NA; ++ga) {
      const int a = warp + 16 * ga;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < ga) continue;
        const int ti = C::tiles_before(ga) + m - ga;
#pragma unroll
        for (int h8 = 0; h8 < 2; ++h8) {
          const int b = 16 * m + g + 8 * h8;
          if (b >= a)
            *reinterpret_cast<float2*>(p.present_state + (bh * D + crow<DK>(a, b)) * sh.Dv + n0 + 2 * t) =
                make_float2(st[ti][2 * h8], st[ti][2 * h8 + 1]);
        }
      }
    }
  }
  if (p.present_sum_of_keys != nullptr && cg == static_cast<int>(gridDim.x) - 1) {
#pragma unroll
    for (int u = 0; u < NM; ++u)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int b = 16 * mw + g + 8 * (e >> 1), a = m_col(u) + 2 * t + (e & 1);
        if (m_tile_ok(u) && b >= a) p.present_sum_of_keys[bh * D + crow<DK>(a, b)] = (a == b ? 1.f : 2.f) * ms[u][e];
      }
  }
}

template <int DK>
cudaError_t launch(const PrPrefillParams& p, cudaStream_t stream) {
  auto kernel = retention_prefill_tc_kernel<DK>;
  const cudaError_t e =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Cfg<DK>::bytes));
  if (e != cudaSuccess) return e;
  const PrefillShape sh = prefill_shape(p);
  const dim3 grid(static_cast<unsigned>(p.value_dim / kCols), static_cast<unsigned>(p.kv_heads),
                  static_cast<unsigned>(p.batch));
  kernel<<<grid, kThreads, Cfg<DK>::bytes, stream>>>(p, sh);
  return cudaGetLastError();
}

}  // namespace
}  // namespace tc

bool prefill_tc_supports(const PrPrefillParams& p) {
  return p.dtype == PR_DTYPE_BF16 && (p.key_dim == 32 || p.key_dim == 64) && p.value_dim % tc::kCols == 0 &&
         aligned(p.query, 16) && aligned(p.key, 16) && aligned(p.value, 16) && aligned(p.output, 4) &&
         aligned(p.past_state, 8) && aligned(p.present_state, 8);
}

cudaError_t prefill_tc(const PrPrefillParams& p, cudaStream_t stream) {
  return p.key_dim == 32 ? tc::launch<32>(p, stream) : tc::launch<64>(p, stream);
}

}  // namespace pr
