// PowerRetention over a whole sequence (prefill), chunked recurrence with the state on chip.
//
// retention_prefill_kernel — grid (Dv/W, Hkv, B), 256 threads, W = 4 value columns per block. Block (t, h, b)
//   keeps the slice S[:, 4t:4t+4] of kv head h's state and a private copy of the sum of keys s in
//   shared memory for the whole sequence, and walks the chunks in order. A chunk holds CT = NQ/r
//   tokens, i.e. NQ = CT r queries (NQ = 64, or 32 for Dk = 128). Per chunk:
//   1. load the chunk's keys and queries (f32, transposed: [Dk][NQ+4]), the block's value
//      columns and the inclusive cumulative gates G (warp 0);
//   2. attention weights P[i][j] = (|scale q_i.k_j| + eps)^2 exp(G_i - G_j), j <= i, one 4x4
//      (query, key) tile per thread;
//   3. state part: thread (query group of 4, row split rs) sums phi_q(q).S[rows, :] and phi_q(q).s
//      over rows rs + RS m; a shuffle reduction over the RS lanes of the warp gives the totals;
//   4. outputs y = (state part + P V) / (state part + sum P), one (query, column) per thread;
//   5. state update S <- exp(G_end) S + sum_j exp(G_end - G_j) phi_k(k_j) v_j^T, one row per thread,
//      four tokens per shared-memory load (keys and gated values are stored token-contiguous).
//   Shared memory: the state slice (D x 4 f32), s (D f32), the chunk's keys, queries, P, values.
//   Race-freedom: a barrier separates each phase; each phase writes shared memory that no other
//   thread touches in that phase (P entries, per-query results, state rows are owned by one thread).
//   Blocks write disjoint output columns and disjoint state column slices; only block t = 0 writes
//   present_sum_of_keys. past_* may alias present_*: a block reads its past slice before the loop
//   and writes the same slice after it, and no other block touches that slice.
//   Every block redoes steps 1-2 (the attention of its chunk) and the update of s: the price of
//   keeping each state slice private to one block, so no cross-block reduction is needed.
#include <math.h>

#include "common.cuh"
#include "prefill_chunked.cuh"
#include "prefill_tc.cuh"

namespace pr {
namespace {

constexpr int kThreads = 256;
constexpr int kCols = 4;  // value columns per block

template <int DK>
struct PrefillCfg {
  static constexpr int D = DK * (DK + 1) / 2;
  static constexpr int NQ = DK >= 128 ? 32 : 64;  // queries per chunk
  static constexpr int RS = 4 * kThreads / NQ;    // row splits in the state part (lanes of one warp)
  static constexpr int QS = NQ + 4;               // row stride of the transposed queries
  static constexpr int KS = NQ + 4;               // row stride of the transposed keys and gated values
  static constexpr int kS = 0;
  static constexpr int ks = kS + D * kCols;
  static constexpr int kK = ks + D;
  static constexpr int kQ = (kK + DK * KS + 3) / 4 * 4;
  static constexpr int kP = kQ + DK * QS;
  static constexpr int kV = kP + NQ * (NQ + 1);
  static constexpr int kVh = kV + NQ * kCols;
  static constexpr int kG = kVh + (kCols + 1) * KS;
  static constexpr int kNum = kG + NQ;
  static constexpr int kEnd = kNum + NQ * (kCols + 1);
  static constexpr size_t bytes = sizeof(float) * kEnd;
  static_assert(RS <= 32 && (RS & (RS - 1)) == 0, "row splits reduce within a warp");
  static_assert(NQ <= 64, "gate scan: two tokens per lane of one warp");
};

template <typename T, int DK>
__global__ void __launch_bounds__(kThreads) retention_prefill_kernel(const PrPrefillParams p, PrefillShape sh) {
  using Cfg = PrefillCfg<DK>;
  constexpr int D = Cfg::D, NQ = Cfg::NQ, RS = Cfg::RS, QS = Cfg::QS, KS = Cfg::KS;
  constexpr int NT = kThreads, W = kCols;
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  float* S_s = smem + Cfg::kS;
  float* s_s = smem + Cfg::ks;
  float* kT_s = smem + Cfg::kK;  // [Dk][KS]: key d of token j at d * KS + j, zero for j >= ct
  float* qT_s = smem + Cfg::kQ;
  float* P_s = smem + Cfg::kP;
  float* v_s = smem + Cfg::kV;
  float* vhT_s = smem + Cfg::kVh;  // [W + 1][KS]: gated values, then the gate coefficient
  float* g_s = smem + Cfg::kG;
  float* num_s = smem + Cfg::kNum;

  const int c0 = blockIdx.x * W, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x;
  const int r = sh.r;
  const int CT = NQ / r;
  const int64_t bh = static_cast<int64_t>(b) * sh.Hkv + h;
  const T* q_g = static_cast<const T*>(p.query);
  const T* k_g = static_cast<const T*>(p.key);
  const T* v_g = static_cast<const T*>(p.value);
  T* out = static_cast<T*>(p.output);
  const float sc2 = p.scale * p.scale;

  for (int row = tid; row < D; row += NT) {
    float4 sv = make_float4(0.f, 0.f, 0.f, 0.f);
    float ss = 0.f;
    if (p.past_state != nullptr) {
      sv = *reinterpret_cast<const float4*>(p.past_state + (bh * D + row) * sh.Dv + c0);
      ss = p.past_sum_of_keys[bh * D + row];
    }
    reinterpret_cast<float4*>(S_s)[row] = sv;
    s_s[row] = ss;
  }

  for (int64_t t0 = 0; t0 < sh.S; t0 += CT) {
    const int ct = static_cast<int>(sh.S - t0 < CT ? sh.S - t0 : CT);
    const int nqc = ct * r;
    // 1. chunk inputs
    for (int k = tid; k < NQ * DK; k += NT) {
      const int j = k / DK, d = k % DK;
      kT_s[d * KS + j] = j < ct ? to_f32<T>(k_g[((b * sh.S + t0 + j) * sh.Hkv + h) * DK + d]) : 0.f;
    }
    for (int k = tid; k < NQ * DK; k += NT) {
      const int qi = k / DK, d = k % DK;
      float x = 0.f;
      if (qi < nqc) x = to_f32<T>(q_g[((b * sh.S + t0 + qi / r) * sh.Hq + h * r + qi % r) * DK + d]);
      qT_s[d * QS + qi] = x;
    }
    for (int k = tid; k < ct * W; k += NT) {
      const int j = k / W, w = k % W;
      v_s[k] = to_f32<T>(v_g[((b * sh.S + t0 + j) * sh.Hkv + h) * sh.Dv + c0 + w]);
    }
    if (tid < 32) {
      float x0 = 0.f, x1 = 0.f;
      if (p.log_gate != nullptr) {
        if (2 * tid < ct) x0 = p.log_gate[(b * sh.S + t0 + 2 * tid) * sh.Hkv + h];
        if (2 * tid + 1 < ct) x1 = p.log_gate[(b * sh.S + t0 + 2 * tid + 1) * sh.Hkv + h];
      }
      const float incl = warp_inclusive_scan(x0 + x1);
      if (2 * tid < NQ) g_s[2 * tid] = incl - x1;
      if (2 * tid + 1 < NQ) g_s[2 * tid + 1] = incl;
    }
    __syncthreads();

    // 2. attention weights inside the chunk
    for (int t = tid; t < (NQ / 4) * (NQ / 4); t += NT) {
      const int qg = t / (NQ / 4), kg = t % (NQ / 4);
      const int i0 = 4 * qg, j0 = 4 * kg;
      if (i0 >= nqc || j0 >= ct) continue;
      float dot[4][4] = {};
#pragma unroll 8
      for (int d = 0; d < DK; ++d) {
        const float4 q4 = *reinterpret_cast<const float4*>(qT_s + d * QS + i0);
        const float qv[4] = {q4.x, q4.y, q4.z, q4.w};
        const float4 k4 = *reinterpret_cast<const float4*>(kT_s + d * KS + j0);
        const float kv[4] = {k4.x, k4.y, k4.z, k4.w};
#pragma unroll
        for (int ii = 0; ii < 4; ++ii)
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) dot[ii][jj] += qv[ii] * kv[jj];
      }
#pragma unroll
      for (int ii = 0; ii < 4; ++ii) {
        const int qi = i0 + ii;
        const int tok = qi / r;
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          const int j = j0 + jj;
          float wt = 0.f;
          if (qi < nqc && j < ct && j <= tok) wt = attn_weight(dot[ii][jj], p.scale, g_s[tok] - g_s[j]);
          P_s[qi * (NQ + 1) + j] = wt;
        }
      }
    }

    // 3. state part
    {
      const int qg = tid / RS, rs = tid % RS;
      const int i0 = 4 * qg;
      float acc[4][W + 1] = {};
      if (i0 < nqc) {
        int a = 0, off = 0;
        advance_row<DK>(a, off, rs);
        for (int row = rs; row < D; row += RS) {
          const int bb = a + off;
          const float4 sv = reinterpret_cast<const float4*>(S_s)[row];
          const float ss = s_s[row];
          const float4 qa = *reinterpret_cast<const float4*>(qT_s + a * QS + i0);
          const float4 qb = *reinterpret_cast<const float4*>(qT_s + bb * QS + i0);
          const float f[4] = {qa.x * qb.x, qa.y * qb.y, qa.z * qb.z, qa.w * qb.w};
#pragma unroll
          for (int ii = 0; ii < 4; ++ii) {
            acc[ii][0] += f[ii] * sv.x;
            acc[ii][1] += f[ii] * sv.y;
            acc[ii][2] += f[ii] * sv.z;
            acc[ii][3] += f[ii] * sv.w;
            acc[ii][W] += f[ii] * ss;
          }
          advance_row<DK>(a, off, RS);
        }
      }
#pragma unroll
      for (int ii = 0; ii < 4; ++ii)
#pragma unroll
        for (int w = 0; w <= W; ++w) {
          float v = acc[ii][w];
#pragma unroll
          for (int o = RS / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
          acc[ii][w] = v;
        }
      if (rs == 0) {
#pragma unroll
        for (int ii = 0; ii < 4; ++ii) {
          const int qi = i0 + ii;
          if (qi >= nqc) continue;
          const float fac = sc2 * expf(g_s[qi / r]);
#pragma unroll
          for (int w = 0; w <= W; ++w) num_s[qi * (W + 1) + w] = fac * acc[ii][w];
        }
      }
    }
    __syncthreads();

    // 4. outputs, and the gated values of the update
    const float g_end = g_s[ct - 1];
    for (int t = tid; t < nqc * W; t += NT) {
      const int qi = t / W, w = t % W;
      const int tok = qi / r;
      float num = num_s[qi * (W + 1) + w], den = num_s[qi * (W + 1) + W];
      for (int j = 0; j <= tok; ++j) {
        const float pw = P_s[qi * (NQ + 1) + j];
        num += pw * v_s[j * W + w];
        den += pw;
      }
      out[((b * sh.S + t0 + tok) * sh.Hq + h * r + qi % r) * sh.Dv + c0 + w] = from_f32<T>(num / den);
    }
    for (int j = tid; j < NQ; j += NT) {
      const float coef = j < ct ? expf(g_end - g_s[j]) : 0.f;
#pragma unroll
      for (int w = 0; w < W; ++w) vhT_s[w * KS + j] = j < ct ? coef * v_s[j * W + w] : 0.f;
      vhT_s[W * KS + j] = coef;
    }
    __syncthreads();

    // 5. state update
    {
      const float decay = expf(g_end);
      int a = 0, off = 0;
      advance_row<DK>(a, off, tid);
      for (int row = tid; row < D; row += NT) {
        const int bb = a + off;
        float4 sv = reinterpret_cast<float4*>(S_s)[row];
        float ss = s_s[row];
        sv.x *= decay;
        sv.y *= decay;
        sv.z *= decay;
        sv.w *= decay;
        ss *= decay;
        const float kw = a < bb ? 2.f : 1.f;
        // Four tokens per step: tokens >= ct have zero keys and gated values.
        for (int j = 0; j < ct; j += 4) {
          const float4 ka = *reinterpret_cast<const float4*>(kT_s + a * KS + j);
          const float4 kb = *reinterpret_cast<const float4*>(kT_s + bb * KS + j);
          const float f[4] = {kw * ka.x * kb.x, kw * ka.y * kb.y, kw * ka.z * kb.z, kw * ka.w * kb.w};
          float part[W + 1];
#pragma unroll
          for (int w = 0; w <= W; ++w) {
            const float4 vh = *reinterpret_cast<const float4*>(vhT_s + w * KS + j);
            part[w] = f[0] * vh.x + f[1] * vh.y + f[2] * vh.z + f[3] * vh.w;
          }
          sv.x += part[0];
          sv.y += part[1];
          sv.z += part[2];
          sv.w += part[3];
          ss += part[W];
        }
        reinterpret_cast<float4*>(S_s)[row] = sv;
        s_s[row] = ss;
        advance_row<DK>(a, off, NT);
      }
    }
    __syncthreads();
  }

  if (p.present_state != nullptr) {
    for (int row = tid; row < D; row += NT)
      *reinterpret_cast<float4*>(p.present_state + (bh * D + row) * sh.Dv + c0) = reinterpret_cast<float4*>(S_s)[row];
  }
  if (p.present_sum_of_keys != nullptr && blockIdx.x == 0) {
    for (int row = tid; row < D; row += NT) p.present_sum_of_keys[bh * D + row] = s_s[row];
  }
}

template <typename T, int DK>
cudaError_t launch_prefill(const PrPrefillParams& p, const PrefillShape& sh, cudaStream_t stream) {
  using Cfg = PrefillCfg<DK>;
  if (sh.r > Cfg::NQ) return cudaErrorInvalidValue;
  auto kernel = retention_prefill_kernel<T, DK>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(Cfg::bytes));
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(sh.Dv / kCols), static_cast<unsigned>(sh.Hkv), static_cast<unsigned>(sh.B));
  kernel<<<grid, kThreads, Cfg::bytes, stream>>>(p, sh);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_dk(const PrPrefillParams& p, const PrefillShape& sh, cudaStream_t stream) {
  switch (p.key_dim) {
    case 32: return launch_prefill<T, 32>(p, sh, stream);
    case 64: return launch_prefill<T, 64>(p, sh, stream);
    case 128: return launch_prefill<T, 128>(p, sh, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace pr

extern "C" uint64_t pr_prefill_workspace_bytes(const PrPrefillParams* params) {
  return params == nullptr ? 0 : pr::prefill_chunked_workspace_bytes(*params);
}

namespace {
// Shared validation of pr_prefill and pr_prefill_simt: 1 = invalid, 0 = nothing to launch, -1 = launch.
int validate(const PrPrefillParams* params) {
  if (params == nullptr) return cudaErrorInvalidValue;
  const PrPrefillParams& p = *params;
  if (p.deg != 2 || p.batch < 0 || p.batch > 65535 || p.seq_len < 0 || p.q_heads < 1 || p.kv_heads < 1 ||
      p.kv_heads > 65535 || p.q_heads % p.kv_heads != 0 || p.value_dim < 4 || p.value_dim % pr::kCols != 0 ||
      (p.past_state == nullptr) != (p.past_sum_of_keys == nullptr) || !isfinite(p.scale))
    return cudaErrorInvalidValue;
  if (p.seq_len > 0 && (p.query == nullptr || p.key == nullptr || p.value == nullptr || p.output == nullptr))
    return cudaErrorInvalidValue;
  if (p.dtype != PR_DTYPE_F32 && p.dtype != PR_DTYPE_F16 && p.dtype != PR_DTYPE_BF16) return cudaErrorInvalidValue;
  if (p.key_dim != 32 && p.key_dim != 64 && p.key_dim != 128) return cudaErrorInvalidValue;
  return p.batch == 0 ? 0 : -1;
}

int simt(const PrPrefillParams& p, cudaStream_t s) {
  const pr::PrefillShape sh = pr::prefill_shape(p);
  switch (p.dtype) {
    case PR_DTYPE_F32: return pr::dispatch_dk<float>(p, sh, s);
    case PR_DTYPE_F16: return pr::dispatch_dk<__half>(p, sh, s);
    default: return pr::dispatch_dk<__nv_bfloat16>(p, sh, s);
  }
}
}  // namespace

extern "C" int32_t pr_prefill_segment_chunks(const PrPrefillParams* params) {
  return params == nullptr || validate(params) >= 0 ? 0 : pr::prefill_chunked_segment_chunks(*params);
}

extern "C" int pr_prefill(const PrPrefillParams* params, void* stream) {
  const int v = validate(params);
  if (v >= 0) return v;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (pr::prefill_chunked_fits(*params)) return pr::prefill_chunked(*params, s);
  if (pr::prefill_tc_supports(*params)) return pr::prefill_tc(*params, s);
  return simt(*params, s);
}

extern "C" int pr_prefill_simt(const PrPrefillParams* params, void* stream) {
  const int v = validate(params);
  if (v >= 0) return v;
  return simt(*params, static_cast<cudaStream_t>(stream));
}
