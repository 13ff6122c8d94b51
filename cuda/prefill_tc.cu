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
constexpr int kThreads = 256, kWarps = 8, kC = 64, kCols = 8;

struct Shape {
  int64_t B, S;
  int Hq, Hkv, Dv, r;
};

template <int DK>
struct Cfg {
  static constexpr int D = DK * (DK + 1) / 2;
  static constexpr int NA = DK / 8;  // a values per warp: a = warp + 8 ga
  static constexpr int MT = DK / 16;  // 16-row tiles over b, and k16 steps over Dk
  static constexpr int KP = DK + 8;  // row pitch (bf16) of queries and keys: conflict-free ldmatrix
  // sum over x < ga of (MT - x/2), closed form so that it folds to a constant after unrolling
  __host__ __device__ static constexpr int tiles_before(int ga) { return ga * MT - (ga / 2) * ((ga - 1) / 2); }
  static constexpr int NTILES = tiles_before(NA);
  static constexpr int oK = 0;                             // bf16 [2][kC][KP] keys
  static constexpr int oQ = oK + 2 * kC * KP * 2;          // bf16 [2][kC][KP] queries of one head
  static constexpr int oV = oQ + 2 * kC * KP * 2;          // bf16 [2][kC][8] the block's value columns
  static constexpr int oG = oV + 2 * kC * kCols * 2;       // f32 [2][kC] log gates
  static constexpr int oGd = oG + 2 * kC * 4;              // f64 [kC] inclusive cumulative gates
  static constexpr int oPart = oGd + kC * 8;               // f32 [8][kC][8] state-part numerators per warp
  static constexpr int oDPart = oPart + kWarps * kC * kCols * 4;  // f32 [8][kC] state-part denominators
  static constexpr int oAPart = oDPart + kWarps * kC * 4;  // f32 [2][kC][8] attention numerators (key halves)
  static constexpr int oADPart = oAPart + 2 * kC * kCols * 4;  // f32 [2][kC]
  static constexpr int oBq = oADPart + 2 * kC * 4;         // uint2 [8][NTILES][32] state tiles as B fragments
  static constexpr int bytes = oBq + kWarps * NTILES * 32 * 8;
};

template <int DK>
__device__ __forceinline__ int64_t crow(int a, int b) {
  return static_cast<int64_t>(a) * (2 * DK - a + 1) / 2 + (b - a);
}

__device__ __forceinline__ float key_weight(int a, int b) { return b > a ? 2.f : (b == a ? 1.f : 0.f); }

__device__ __forceinline__ float bf(bf16 x) { return __bfloat162float(x); }

template <int DK>
__global__ void __launch_bounds__(kThreads, 1) prefill_tc_kernel(const PrPrefillParams p, const Shape sh) {
  using C = Cfg<DK>;
  constexpr int NA = C::NA, MT = C::MT, KP = C::KP, NTILES = C::NTILES, D = C::D;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* Ks = reinterpret_cast<bf16*>(smem + C::oK);
  bf16* Qs = reinterpret_cast<bf16*>(smem + C::oQ);
  bf16* Vs = reinterpret_cast<bf16*>(smem + C::oV);
  float* Gs = reinterpret_cast<float*>(smem + C::oG);
  double* Gd = reinterpret_cast<double*>(smem + C::oGd);
  float* part = reinterpret_cast<float*>(smem + C::oPart);
  float* dpart = reinterpret_cast<float*>(smem + C::oDPart);
  float* apart = reinterpret_cast<float*>(smem + C::oAPart);
  float* adpart = reinterpret_cast<float*>(smem + C::oADPart);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int cg = blockIdx.x, n0 = cg * kCols, hk = blockIdx.y, bb = blockIdx.z;
  // Each lane keeps the bf16 B fragments of its own state tiles here (written and read by the same
  // thread, so no barrier): registers cannot hold them next to the f32 tiles.
  uint2* bqs = reinterpret_cast<uint2*>(smem + C::oBq) + warp * NTILES * 32 + (tid & 31);
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

  float st[NTILES][4];  // st[tile(ga, m)]: S[(a, 16m + g (+8)), n0 + 2t (+1)]
  float ms[MT][4];      // M[16m + g (+8)][a = warp + 8 (2t (+1))]
  auto keep_b = [&](int ti) {
    uint2 b;
    mma::c_to_b(st[ti], b.x, b.y);
    bqs[ti * 32] = b;
  };
#pragma unroll
  for (int ga = 0; ga < NA; ++ga) {
    const int a = warp + 8 * ga;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < ga / 2) continue;  // constant trip counts: every index into st stays static
      const int ti = C::tiles_before(ga) + m - ga / 2;
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
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int b = 16 * m + g + 8 * (e >> 1), a = warp + 8 * (2 * t + (e & 1));
      float v = 0.f;
      if (p.past_sum_of_keys != nullptr && a < DK)
        v = p.past_sum_of_keys[bh * D + (a <= b ? crow<DK>(a, b) : crow<DK>(b, a))] * (a == b ? 1.f : 0.5f);
      ms[m][e] = v;
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

    // Cumulative gates of the chunk, in f64 (long strongly gated chunks lose |G| 2^-24 in f32).
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
    __syncthreads();
    const double g_end = Gd[kC - 1];  // gates of padding tokens are 0
    const float decay = expf(static_cast<float>(g_end));

    // The state S_{n-1} as B operands, shared by every query head of the group.
    uint32_t bm[MT][2];
#pragma unroll
    for (int m = 0; m < MT; ++m) mma::c_to_b(ms[m], bm[m][0], bm[m][1]);

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
        float P[NA][4], qm[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int ga = 0; ga < NA; ++ga) P[ga][0] = P[ga][1] = P[ga][2] = P[ga][3] = 0.f;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          uint32_t A[4];
          mma::ldsm_x4(A, Qc + (16 * it + arow) * KP + 16 * m + acol);
#pragma unroll
          for (int ga = 0; ga < NA; ++ga) {
            if (ga / 2 <= m) {
              const uint2 bq = bqs[(C::tiles_before(ga) + m - ga / 2) * 32];
              mma::mma_bf16(P[ga], A, bq.x, bq.y);
            }
          }
          mma::mma_bf16(qm, A, bm[m][0], bm[m][1]);
        }
        const int i0 = 16 * it + g, i1 = i0 + 8;
        float num[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int ga = 0; ga < NA; ++ga) {
          const int a = warp + 8 * ga;
          const float q0 = bf(Qc[i0 * KP + a]), q1 = bf(Qc[i1 * KP + a]);
          num[0] += q0 * P[ga][0];
          num[1] += q0 * P[ga][1];
          num[2] += q1 * P[ga][2];
          num[3] += q1 * P[ga][3];
        }
        const int a0 = warp + 16 * t, a1 = a0 + 8;
        float d0 = 0.f, d1 = 0.f;
        if (a0 < DK) {
          d0 += bf(Qc[i0 * KP + a0]) * qm[0];
          d1 += bf(Qc[i1 * KP + a0]) * qm[2];
        }
        if (a1 < DK) {
          d0 += bf(Qc[i0 * KP + a1]) * qm[1];
          d1 += bf(Qc[i1 * KP + a1]) * qm[3];
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
      // Attention inside the chunk: warp w takes query tile w/2 against keys [32 (w%2), +32).
      {
        const int ita = warp >> 1, jh = warp & 1, j0 = 32 * jh;
        const int i0 = 16 * ita + g, i1 = i0 + 8;
        float an[4] = {0.f, 0.f, 0.f, 0.f}, ad0 = 0.f, ad1 = 0.f;
        if (j0 <= 16 * ita + 15) {
          float s[4][4];
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            uint32_t A[4];
            mma::ldsm_x4(A, Qc + (16 * ita + arow) * KP + 16 * m + acol);
#pragma unroll
            for (int np = 0; np < 2; ++np) {
              uint32_t Bk[4];
              mma::ldsm_x4(Bk, Kc + (j0 + 16 * np + krow) * KP + 16 * m + kcol);
              mma::mma_bf16(s[2 * np], A, Bk[0], Bk[1]);
              mma::mma_bf16(s[2 * np + 1], A, Bk[2], Bk[3]);
            }
          }
          const double gi0 = Gd[i0], gi1 = Gd[i1];
#pragma unroll
          for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int i = e < 2 ? i0 : i1;
              const int j = j0 + 8 * nt + 2 * t + (e & 1);
              float w = 0.f;
              if (j <= i) w = attn_weight(s[nt][e], p.scale, static_cast<float>((e < 2 ? gi0 : gi1) - Gd[j]));
              s[nt][e] = w;
            }
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
            ad0 += s[nt][0] + s[nt][1];
            ad1 += s[nt][2] + s[nt][3];
          }
          ad0 += __shfl_xor_sync(0xffffffffu, ad0, 1);
          ad0 += __shfl_xor_sync(0xffffffffu, ad0, 2);
          ad1 += __shfl_xor_sync(0xffffffffu, ad1, 1);
          ad1 += __shfl_xor_sync(0xffffffffu, ad1, 2);
          uint32_t vb[4];
          mma::ldsm_x4_t(vb, Vc + (j0 + lane) * kCols);
#pragma unroll
          for (int kk = 0; kk < 2; ++kk) {
            const uint32_t Aw[4] = {mma::pack_bf16(s[2 * kk][0], s[2 * kk][1]), mma::pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                    mma::pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                    mma::pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            mma::mma_bf16(an, Aw, vb[2 * kk], vb[2 * kk + 1]);
          }
        }
        float* aw = apart + jh * kC * kCols;
        *reinterpret_cast<float2*>(aw + i0 * kCols + 2 * t) = make_float2(an[0], an[1]);
        *reinterpret_cast<float2*>(aw + i1 * kCols + 2 * t) = make_float2(an[2], an[3]);
        if (t == 0) {
          adpart[jh * kC + i0] = ad0;
          adpart[jh * kC + i1] = ad1;
        }
      }
#endif
      __syncthreads();

#if !(PR_TC_SKIP & 8)
      // Outputs: y = (attention + f_i state part) / (its row sums + f_i q^T M q), f_i = scale^2 e^{G_i}.
      {
        const int i = tid >> 2, c = 2 * (tid & 3);
        float nx = 0.f, ny = 0.f, dd = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          const float2 v = *reinterpret_cast<const float2*>(part + (w * kC + i) * kCols + c);
          nx += v.x;
          ny += v.y;
          dd += dpart[w * kC + i];
        }
        const float f = sc2 * expf(static_cast<float>(Gd[i]));
        const float2 a0v = *reinterpret_cast<const float2*>(apart + i * kCols + c);
        const float2 a1v = *reinterpret_cast<const float2*>(apart + (kC + i) * kCols + c);
        const float den = adpart[i] + adpart[kC + i] + f * dd;
        if (t0 + i < S) {
          const __nv_bfloat162 y = __floats2bfloat162_rn((a0v.x + a1v.x + f * nx) / den, (a0v.y + a1v.y + f * ny) / den);
          *reinterpret_cast<__nv_bfloat162*>(out + ((bb * S + t0 + i) * sh.Hq + hk * r + h) * sh.Dv + n0 + c) = y;
        }
      }
#endif
      __syncthreads();
    }

#if !(PR_TC_SKIP & 4)
    // State update with this chunk's keys and values.
    {
      // This thread's B-fragment tokens are j = 16 s + 2t + {0, 1, 8, 9}; gm = exp(G_end - G_j).
      auto tok = [&](int s, int e) { return 16 * s + 2 * t + (e & 1) + 8 * (e >> 1); };
      auto gm = [&](int j) { return expf(static_cast<float>(g_end - Gd[j])); };
      auto kv = [&](int j, int a) { return bf(Kc[j * KP + a]); };
      uint32_t bmu[4][2];  // gamma_j k_{j, a}, a = warp + 8 g: the B operand of M's update
      {
        const int a = warp + 8 * g;
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          bmu[s][0] = bmu[s][1] = 0u;
          if (a < DK) {
            bmu[s][0] = mma::pack_bf16(kv(tok(s, 0), a) * gm(tok(s, 0)), kv(tok(s, 1), a) * gm(tok(s, 1)));
            bmu[s][1] = mma::pack_bf16(kv(tok(s, 2), a) * gm(tok(s, 2)), kv(tok(s, 3), a) * gm(tok(s, 3)));
          }
        }
      }
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        if (4 * hf >= NA) continue;
        uint32_t bu[4][4][2];  // k_ja gamma_j v_j[n0 + g] for a = warp + 8 (4 hf + gl)
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          float vg[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) vg[e] = gm(tok(s, e)) * bf(Vc[tok(s, e) * kCols + g]);
#pragma unroll
          for (int gl = 0; gl < 4; ++gl) {
            const int a = warp + 8 * (4 * hf + gl);
            bu[gl][s][0] = mma::pack_bf16(kv(tok(s, 0), a) * vg[0], kv(tok(s, 1), a) * vg[1]);
            bu[gl][s][1] = mma::pack_bf16(kv(tok(s, 2), a) * vg[2], kv(tok(s, 3), a) * vg[3]);
          }
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < 2 * hf) continue;
          // Token steps outermost: the (up to) five accumulations below are independent chains.
          float tm[4] = {0.f, 0.f, 0.f, 0.f}, tp[4][4];
#pragma unroll
          for (int gl = 0; gl < 4; ++gl) tp[gl][0] = tp[gl][1] = tp[gl][2] = tp[gl][3] = 0.f;
#pragma unroll
          for (int s = 0; s < 4; ++s) {
            uint32_t A[4];  // K^T[b tile m][token step s]
            mma::ldsm_x4_t(A, Kc + (16 * s + krow) * KP + 16 * m + kcol);
            if (hf == 0) mma::mma_bf16(tm, A, bmu[s][0], bmu[s][1]);
#pragma unroll
            for (int gl = 0; gl < 4; ++gl) {
              const int ga = 4 * hf + gl;
              if (ga < NA && ga / 2 <= m) mma::mma_bf16(tp[gl], A, bu[gl][s][0], bu[gl][s][1]);
            }
          }
          if (hf == 0) {
#pragma unroll
            for (int e = 0; e < 4; ++e) ms[m][e] = decay * ms[m][e] + tm[e];
          }
#pragma unroll
          for (int gl = 0; gl < 4; ++gl) {
            const int ga = 4 * hf + gl;
            if (ga < NA && ga / 2 <= m) {
              const int ti = C::tiles_before(ga) + m - ga / 2;
              const int a = warp + 8 * ga, b0 = 16 * m + g;
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
      const int a = warp + 8 * ga;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < ga / 2) continue;
        const int ti = C::tiles_before(ga) + m - ga / 2;
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
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int b = 16 * m + g + 8 * (e >> 1), a = warp + 8 * (2 * t + (e & 1));
        if (a < DK && b >= a) p.present_sum_of_keys[bh * D + crow<DK>(a, b)] = (a == b ? 1.f : 2.f) * ms[m][e];
      }
  }
}

template <int DK>
cudaError_t launch(const PrPrefillParams& p, cudaStream_t stream) {
  auto kernel = prefill_tc_kernel<DK>;
  const cudaError_t e =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Cfg<DK>::bytes));
  if (e != cudaSuccess) return e;
  const Shape sh{p.batch, p.seq_len, p.q_heads, p.kv_heads, p.value_dim, p.q_heads / p.kv_heads};
  const dim3 grid(static_cast<unsigned>(p.value_dim / kCols), static_cast<unsigned>(p.kv_heads),
                  static_cast<unsigned>(p.batch));
  kernel<<<grid, kThreads, Cfg<DK>::bytes, stream>>>(p, sh);
  return cudaGetLastError();
}

bool aligned(const void* ptr, uintptr_t n) { return (reinterpret_cast<uintptr_t>(ptr) % n) == 0; }

}  // namespace
}  // namespace tc

bool prefill_tc_supports(const PrPrefillParams& p) {
  return p.dtype == PR_DTYPE_BF16 && (p.key_dim == 32 || p.key_dim == 64) && p.value_dim % tc::kCols == 0 &&
         tc::aligned(p.query, 16) && tc::aligned(p.key, 16) && tc::aligned(p.value, 16) && tc::aligned(p.output, 4) &&
         tc::aligned(p.past_state, 8) && tc::aligned(p.present_state, 8);
}

cudaError_t prefill_tc(const PrPrefillParams& p, cudaStream_t stream) {
  return p.key_dim == 32 ? tc::launch<32>(p, stream) : tc::launch<64>(p, stream);
}

}  // namespace pr
