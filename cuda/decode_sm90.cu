// PowerRetentionStep on compute capability 9.0: one cluster kernel per step, plus the
// one-thread-per-sequence length kernel of decode_common.cuh, which overlaps it.
//
// retention_decode_rows_kernel<T, DK, QG> — grid (P, Hkv, B) in clusters of P = 1, 2, 4 or 8 blocks
//   along x (one cluster per sequence b and kv head h), 256 threads.
//   Split: block k of a cluster owns the compact state rows [R_k, R_{k+1}) (about D/P of them, every
//   value column) of state[b, h] and sum_of_keys[b, h], and the window tokens j = k (mod P). Inside a
//   block, TPR = Dv/4 threads share a state row, one float4 of columns each, so a warp reads whole
//   rows (coalesced) and a block 256/TPR rows per pass; the same TPR threads share a window token
//   (each takes a slice of the key dot product, then a shuffle reduction). Per group of QG queries
//   (QG = 1 when S r = 1, else 4) each block sums its share of the numerators (Dv) and the
//   denominator; rank 0 adds the P partial sums through distributed shared memory and writes the
//   outputs.
//   Latency, which bounds B = 1: the first batch of state rows is requested before anything else (the
//   rows do not depend on the cache length), and one batch is in flight while the other is used.
//   End of step: with the window full (n = L + S >= C) every block folds the whole window into its
//   own rows of the state and of the sum of keys, which no other block reads. Otherwise rank 0 appends
//   the new tokens at cache slots [L, L+S), which no block of this step reads (window tokens j < L
//   come from the cache, j >= L from the inputs).
//   cache_length[b] is read once per block into shared memory; then allow_next_kernel lets the
//   length kernel rewrite it while this kernel still runs (it waits for this kernel before it exits).
// The P partial sums use cluster barriers: a block's partial sums are read remotely between the two
// barriers of a query group, and nothing else is shared between blocks.
#include <cooperative_groups.h>
#include <math.h>
#include <stdlib.h>

#include <atomic>

#include "decode_common.cuh"

namespace cg = cooperative_groups;

namespace pr {
namespace {

#ifndef PR_DECODE_THREADS
#define PR_DECODE_THREADS 512
#endif
constexpr int kThreads = PR_DECODE_THREADS;
constexpr int kMaxDv = 128;   // TPR = Dv/4 threads per state row: one warp at most
constexpr int kFold = 32;     // window tokens per fold tile
constexpr int kMaxSplit = 8;  // the portable cluster size
// Rows per register batch (two batches in flight) for one query per group, and blocks per SM the
// registers are sized for; overridable for benchmark builds (scripts/build-decode-variants.sh).
#ifndef PR_DECODE_ROWS
#define PR_DECODE_ROWS 2
#endif
#ifndef PR_DECODE_MIN_BLOCKS
#define PR_DECODE_MIN_BLOCKS 1
#endif
// Timing experiments only: 1 leaves the length kernel out (cache_length is then never advanced).
#ifndef PR_DECODE_NO_LENGTH
#define PR_DECODE_NO_LENGTH 0
#endif

// Compact row -> (a, b): the largest a with start(a) = a(2DK + 1 - a)/2 <= row, from the quadratic's
// root and one integer correction (float rounding is off by at most one for D < 2^24).
template <int DK>
__device__ __forceinline__ int row_pair(int row) {
  constexpr float t = 2.f * DK + 1.f;
  int a = static_cast<int>((t - sqrtf(t * t - 8.f * static_cast<float>(row))) * 0.5f);
  a = a < 0 ? 0 : (a > DK - 1 ? DK - 1 : a);
  if (a * (2 * DK + 1 - a) / 2 > row) --a;
  else if ((a + 1) * (2 * DK - a) / 2 <= row) ++a;
  return a | ((a + row - a * (2 * DK + 1 - a) / 2) << 16);
}

// R state rows of one thread (stride RPP): a float4 of its columns, the sum-of-keys entry, and the
// packed (a, b) pair; rows at or past the block's end are zero.
template <int R>
struct RowBatch {
  float4 v[R];
  float s[R];
  int ab[R];
};

template <int DK, int R>
__device__ __forceinline__ void load_rows(RowBatch<R>& bt, int& row, const float* S_g, const float* s_g, int Dv,
                                          int R1, int RPP) {
#pragma unroll
  for (int u = 0; u < R; ++u) {
    const int r = row + u * RPP;
    if (r < R1) {
      bt.v[u] = *reinterpret_cast<const float4*>(S_g + static_cast<int64_t>(r) * Dv);
      bt.s[u] = s_g[r];
      bt.ab[u] = row_pair<DK>(r);
    } else {
      bt.v[u] = make_float4(0.f, 0.f, 0.f, 0.f);
      bt.s[u] = 0.f;
      bt.ab[u] = 0;
    }
  }
  row += R * RPP;
}

template <int DK, int QG, int R>
__device__ __forceinline__ void use_rows(const RowBatch<R>& bt, const float (&q_s)[QG][DK], float (&acc)[QG][4],
                                         float (&den)[QG]) {
#pragma unroll
  for (int u = 0; u < R; ++u) {
    const int a = bt.ab[u] & 0xffff, bb = bt.ab[u] >> 16;
#pragma unroll
    for (int qq = 0; qq < QG; ++qq) {
      const float f = q_s[qq][a] * q_s[qq][bb];
      acc[qq][0] += f * bt.v[u].x;
      acc[qq][1] += f * bt.v[u].y;
      acc[qq][2] += f * bt.v[u].z;
      acc[qq][3] += f * bt.v[u].w;
      den[qq] += f * bt.s[u];
    }
  }
}

// Four consecutive elements (8- or 16-byte aligned) as f32.
template <typename T>
__device__ __forceinline__ float4 load4_f32(const T* p) {
  if constexpr (sizeof(T) == 4) {
    return __ldg(reinterpret_cast<const float4*>(p));
  } else {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
    return make_float4(to_f32<T>(e[0]), to_f32<T>(e[1]), to_f32<T>(e[2]), to_f32<T>(e[3]));
  }
}

template <typename T, int DK, int QG>
__device__ __forceinline__ void load_queries(const PrDecodeParams& p, const DecodeShape& sh, int b, int h, int64_t q0,
                                             float (&q_s)[QG][DK]) {
  const T* q_g = static_cast<const T*>(p.query);
  const int64_t nq = sh.S * sh.r;
  for (int k = threadIdx.x; k < QG * DK; k += kThreads) {
    const int qq = k / DK, d = k % DK;
    const int64_t qi = q0 + qq;
    float x = 0.f;
    if (qi < nq) {
      const int64_t i = qi / sh.r;
      const int rr = static_cast<int>(qi % sh.r);
      x = to_f32<T>(q_g[((b * sh.S + i) * sh.Hq + h * sh.r + rr) * DK + d]);
    }
    q_s[qq][d] = x;
  }
}

// Floats of dynamic shared memory: window gates (2C, rounded to float4), then the fold tile (keys
// kFold x (DK+1), gated values kFold x Dv, coefficients kFold).
__host__ __device__ constexpr int64_t gate_floats(int64_t C) { return (2 * C + 3) / 4 * 4; }
__host__ __device__ constexpr int64_t key_tile_floats(int dk) { return (kFold * (dk + 1) + 3) / 4 * 4; }

template <typename T, int DK, int QG>
__global__ void __launch_bounds__(kThreads, PR_DECODE_MIN_BLOCKS) retention_decode_rows_kernel(const PrDecodeParams p, const DecodeShape sh,
                                                                         const int tpr_log2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int D = DK * (DK + 1) / 2;
  constexpr int NT = kThreads;
  constexpr int NW = NT / 32;
  constexpr int R = QG == 1 ? PR_DECODE_ROWS : (PR_DECODE_ROWS + 1) / 2;
  extern __shared__ __align__(16) float dyn_s[];
  __shared__ float q_s[QG][DK];
  __shared__ float red_s[NW][QG][kMaxDv + 1];
  __shared__ float part_s[QG][kMaxDv + 1];
  __shared__ float scan_s[NW + 1];
  __shared__ int64_t len_s;
  __shared__ float gnew_s[NT];  // new tokens' log gates, for the one-pass gate scan

  cg::cluster_group cluster = cg::this_cluster();
  const int P = gridDim.x, rank = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int TPR = 1 << tpr_log2, cgi = tid & (TPR - 1), rs = tid >> tpr_log2, RPP = NT >> tpr_log2;
  const int Dv = sh.Dv;
  const int per = (D + P - 1) / P;
  const int R0 = rank * per, R1 = min(D, R0 + per);
  const int64_t bh = static_cast<int64_t>(b) * sh.Hkv + h;
  float* S_g = p.state + bh * D * Dv + 4 * cgi;
  float* s_g = p.sum_of_keys + bh * D;
  const int64_t nq = sh.S * sh.r;
  T* out = static_cast<T*>(p.output);

  // Everything that does not depend on the cache length is requested first: the first state rows,
  // the queries, and (when the whole window fits one pass of the scan) the gates of cache slot tid and
  // of new token tid, which the length then selects from.
  RowBatch<R> A, B;
  int cur = R0 + rs;
  load_rows<DK, R>(A, cur, S_g, s_g, Dv, R1, RPP);
  if (tid == 0) len_s = p.cache_length[b];
  load_queries<T, DK, QG>(p, sh, b, h, 0, q_s);
  const bool one_pass = sh.C + sh.S <= NT;  // n <= C + S
  float gate_cached = 0.f;
  if (one_pass && p.log_gate != nullptr) {
    if (tid < sh.C) gate_cached = p.log_gate_cache[(b * sh.C + tid) * sh.Hkv + h];
    if (tid < sh.S) gnew_s[tid] = p.log_gate[(b * sh.S + tid) * sh.Hkv + h];
  }
  __syncthreads();
  const int64_t L = len_s;
  allow_next_kernel();  // every thread has its copy of the length: the length kernel may rewrite it

  if (L < 0 || L > sh.C) {  // whole cluster (same b): NaN outputs, nothing else written
    if (rank == 0) {
      for (int64_t k = tid; k < nq * Dv; k += NT) {
        const int64_t qi = k / Dv, i = qi / sh.r;
        const int rr = static_cast<int>(qi % sh.r);
        out[((b * sh.S + i) * sh.Hq + h * sh.r + rr) * Dv + k % Dv] = from_f32<T>(nanf(""));
      }
    }
    return;
  }
  const int64_t n = L + sh.S;
  // The first window token of this thread (group 0's round 0), requested before the gate scan.
  const int64_t j_first = rank + static_cast<int64_t>(P) * rs;
  constexpr int kPre = DK / 8;  // key elements held for it: rows of TPR >= 8 threads (Dv >= 32)
  const bool pre = j_first < n && (DK >> tpr_log2) <= kPre;
  float kfirst[kPre];
  float4 vfirst = make_float4(0.f, 0.f, 0.f, 0.f);
  if (pre) {
    const T* kp = window_key<T>(p, sh, b, h, L, j_first, DK);
#pragma unroll
    for (int e = 0; e < kPre; ++e)
      if (e < (DK >> tpr_log2)) kfirst[e] = to_f32<T>(kp[cgi + (e << tpr_log2)]);
    vfirst = load4_f32<T>(window_value<T>(p, sh, b, h, L, j_first) + 4 * cgi);
  }
  float* g_s = dyn_s;
  if (one_pass) {
    float x = 0.f;
    if (p.log_gate != nullptr && tid < n) x = tid < L ? gate_cached : gnew_s[tid - L];
    float total;
    const float incl = block_inclusive_scan<NT>(x, scan_s, &total);
    if (tid < n) g_s[tid] = incl;
    __syncthreads();
  } else {
    window_gate_cumsum<NT>(p, sh, b, h, L, n, g_s, scan_s);
  }
  const float sc2 = p.scale * p.scale;

  for (int64_t q0 = 0; q0 < nq; q0 += QG) {
    if (q0 > 0) {  // the previous group's q_s reads ended at its cluster barrier
      load_queries<T, DK, QG>(p, sh, b, h, q0, q_s);
      cur = R0 + rs;
      load_rows<DK, R>(A, cur, S_g, s_g, Dv, R1, RPP);
      __syncthreads();
    }
    float acc[QG][4], den[QG];
#pragma unroll
    for (int qq = 0; qq < QG; ++qq) {
      acc[qq][0] = acc[qq][1] = acc[qq][2] = acc[qq][3] = 0.f;
      den[qq] = 0.f;
    }
    // State part: phi_q(q) . S[rows, cols] and phi_q(q) . s[rows], batch B loading while A is used.
    for (;;) {
      const bool more = cur < R1;
      if (more) load_rows<DK, R>(B, cur, S_g, s_g, Dv, R1, RPP);
      use_rows<DK, QG, R>(A, q_s, acc, den);
      if (!more) break;
      const bool more2 = cur < R1;
      if (more2) load_rows<DK, R>(A, cur, S_g, s_g, Dv, R1, RPP);
      use_rows<DK, QG, R>(B, q_s, acc, den);
      if (!more2) break;
    }
    // The state is decayed by every window gate up to the query's own position.
#pragma unroll
    for (int qq = 0; qq < QG; ++qq) {
      const int64_t qi = q0 + qq;
      const float fac = qi < nq ? sc2 * expf(g_s[L + qi / sh.r]) : 0.f;
      acc[qq][0] *= fac;
      acc[qq][1] *= fac;
      acc[qq][2] *= fac;
      acc[qq][3] *= fac;
      den[qq] *= fac;
    }

    // Window part: this block's tokens j = rank + P m, m = rs + RPP t; a token attends to the
    // queries at window positions >= j. The round count is the same for every thread (shuffles).
    const int64_t last_q = q0 + QG - 1 < nq ? q0 + QG - 1 : nq - 1;
    const int64_t jmax = L + last_q / sh.r;
    const int64_t mcount = jmax >= rank ? (jmax - rank) / P + 1 : 0;
    const int64_t rounds = (mcount + RPP - 1) / RPP;
    for (int64_t t = 0; t < rounds; ++t) {
      const int64_t m = rs + static_cast<int64_t>(RPP) * t;
      const int64_t j = rank + static_cast<int64_t>(P) * m;
      const bool valid = m < mcount;
      float dot[QG];
#pragma unroll
      for (int qq = 0; qq < QG; ++qq) dot[qq] = 0.f;
      float4 vv = make_float4(0.f, 0.f, 0.f, 0.f);
      if (valid && pre && q0 == 0 && t == 0) {  // j == j_first, prefetched
#pragma unroll
        for (int e = 0; e < kPre; ++e) {
          if (e < (DK >> tpr_log2)) {
#pragma unroll
            for (int qq = 0; qq < QG; ++qq) dot[qq] += q_s[qq][cgi + (e << tpr_log2)] * kfirst[e];
          }
        }
        vv = vfirst;
      } else if (valid) {
        const T* kp = window_key<T>(p, sh, b, h, L, j, DK);
        for (int d = cgi; d < DK; d += TPR) {
          const float kd = to_f32<T>(kp[d]);
#pragma unroll
          for (int qq = 0; qq < QG; ++qq) dot[qq] += q_s[qq][d] * kd;
        }
        vv = load4_f32<T>(window_value<T>(p, sh, b, h, L, j) + 4 * cgi);
      }
      for (int o = TPR >> 1; o > 0; o >>= 1)
#pragma unroll
        for (int qq = 0; qq < QG; ++qq) dot[qq] += __shfl_xor_sync(0xffffffffu, dot[qq], o);
      if (valid) {
        const float gj = g_s[j];
#pragma unroll
        for (int qq = 0; qq < QG; ++qq) {
          const int64_t qi = q0 + qq;
          if (qi >= nq) continue;
          const int64_t pos = L + qi / sh.r;
          if (j > pos) continue;
          const float wt = attn_weight(dot[qq], p.scale, g_s[pos] - gj);
          acc[qq][0] += wt * vv.x;
          acc[qq][1] += wt * vv.y;
          acc[qq][2] += wt * vv.z;
          acc[qq][3] += wt * vv.w;
          den[qq] += wt;
        }
      }
    }

    // Block sums: threads of one column slice across a warp by shuffles (den is the same in the TPR
    // threads of a row or token, so lane 0's sum counts each once), then across warps.
#pragma unroll
    for (int qq = 0; qq < QG; ++qq) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float v = acc[qq][c];
        for (int o = TPR; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane < TPR) red_s[warp][qq][4 * lane + c] = v;
      }
      float dn = den[qq];
      for (int o = TPR; o < 32; o <<= 1) dn += __shfl_xor_sync(0xffffffffu, dn, o);
      if (lane == 0) red_s[warp][qq][Dv] = dn;
    }
    __syncthreads();
    for (int k = tid; k < QG * (Dv + 1); k += NT) {
      const int qq = k / (Dv + 1), c = k % (Dv + 1);
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < NW; ++w) v += red_s[w][qq][c];
      part_s[qq][c] = v;
    }
    cluster.sync();
    if (rank == 0) {  // cluster sums into red_s[0] (free again), then num / den
      for (int k = tid; k < QG * (Dv + 1); k += NT) {
        const int qq = k / (Dv + 1), c = k % (Dv + 1);
        float v = 0.f;
        for (int r = 0; r < P; ++r) v += cluster.map_shared_rank(&part_s[0][0], r)[qq * (kMaxDv + 1) + c];
        red_s[0][qq][c] = v;
      }
      __syncthreads();
      for (int k = tid; k < QG * Dv; k += NT) {
        const int qq = k / Dv, c = k % Dv;
        const int64_t qi = q0 + qq;
        if (qi < nq) {
          const int64_t i = qi / sh.r;
          const int rr = static_cast<int>(qi % sh.r);
          out[((b * sh.S + i) * sh.Hq + h * sh.r + rr) * Dv + c] = from_f32<T>(red_s[0][qq][c] / red_s[0][qq][Dv]);
        }
      }
    }
    cluster.sync();  // part_s was read remotely up to here; the next group rewrites it and q_s
  }

  if (n < sh.C) {  // append the new tokens (slots [L, n) are read by no block of this step)
    if (rank == 0) {
      T* kc = static_cast<T*>(p.key_cache);
      T* vc = static_cast<T*>(p.value_cache);
      const T* kn = static_cast<const T*>(p.key);
      const T* vn = static_cast<const T*>(p.value);
      for (int64_t k = tid; k < sh.S * DK; k += NT) {
        const int64_t i = k / DK, e = k % DK;
        kc[((b * sh.C + L + i) * sh.Hkv + h) * DK + e] = kn[((b * sh.S + i) * sh.Hkv + h) * DK + e];
      }
      for (int64_t k = tid; k < sh.S * Dv; k += NT) {
        const int64_t i = k / Dv, e = k % Dv;
        vc[((b * sh.C + L + i) * sh.Hkv + h) * Dv + e] = vn[((b * sh.S + i) * sh.Hkv + h) * Dv + e];
      }
      if (p.log_gate != nullptr) {
        for (int64_t i = tid; i < sh.S; i += NT)
          p.log_gate_cache[(b * sh.C + L + i) * sh.Hkv + h] = p.log_gate[(b * sh.S + i) * sh.Hkv + h];
      }
    }
    return;
  }

  // Fold the n window tokens into this block's rows:
  // S <- exp(G_end) S + sum_j exp(G_end - G_j) phi_k(k_j) v_j^T, s <- exp(G_end) s + sum_j ... phi_k(k_j).
  float* kf_s = dyn_s + gate_floats(sh.C);  // [kFold][DK + 1]
  float* vh_s = kf_s + key_tile_floats(DK);  // [kFold][Dv], gated values
  float* cf_s = vh_s + kFold * Dv;           // [kFold], gates exp(G_end - G_j)
  const float g_end = g_s[n - 1];
  const float decay = expf(g_end);
  for (int64_t t0 = 0; t0 < n; t0 += kFold) {
    const int ft = static_cast<int>(n - t0 < kFold ? n - t0 : kFold);
    __syncthreads();  // the previous tile is used up
    for (int k = tid; k < ft * DK; k += NT) {
      const int j = k / DK, d = k % DK;
      kf_s[j * (DK + 1) + d] = to_f32<T>(window_key<T>(p, sh, b, h, L, t0 + j, DK)[d]);
    }
    for (int j = tid; j < ft; j += NT) cf_s[j] = expf(g_end - g_s[t0 + j]);
    for (int k = tid; k < ft * Dv; k += NT) {
      const int j = k / Dv, c = k % Dv;
      vh_s[k] = expf(g_end - g_s[t0 + j]) * to_f32<T>(window_value<T>(p, sh, b, h, L, t0 + j)[c]);
    }
    __syncthreads();
    const float m = t0 == 0 ? decay : 1.f;
    for (int row = R0 + rs; row < R1; row += RPP) {
      const int ab = row_pair<DK>(row), a = ab & 0xffff, bb = ab >> 16;
      const float kw = a < bb ? 2.f : 1.f;
      float4* sp = reinterpret_cast<float4*>(S_g + static_cast<int64_t>(row) * Dv);
      float4 x = *sp;
      x = make_float4(m * x.x, m * x.y, m * x.z, m * x.w);
      float sa = 0.f;
      for (int j = 0; j < ft; ++j) {
        const float f = kw * kf_s[j * (DK + 1) + a] * kf_s[j * (DK + 1) + bb];
        const float4 w = *reinterpret_cast<const float4*>(vh_s + j * Dv + 4 * cgi);
        x.x += f * w.x;
        x.y += f * w.y;
        x.z += f * w.z;
        x.w += f * w.w;
        sa += f * cf_s[j];
      }
      *sp = x;
      if (cgi == 0) s_g[row] = m * s_g[row] + sa;
    }
  }
#else
  __trap();  // launched only on compute capability 9.0 (decode_entry)
#endif
}

int split_override() {
  static const int v = [] {
    const char* e = getenv("PR_DECODE_SPLIT");
    const int x = e != nullptr ? atoi(e) : 0;
    return x == 1 || x == 2 || x == 4 || x == 8 ? x : 0;
  }();
  return v;
}

template <typename T, int DK, int QG>
cudaError_t launch_rows(const PrDecodeParams& p, const DecodeShape& sh, cudaStream_t stream, int P, int tpr_log2) {
  auto kernel = retention_decode_rows_kernel<T, DK, QG>;
  const size_t dyn =
      sizeof(float) * static_cast<size_t>(gate_floats(sh.C) + key_tile_floats(DK) + kFold * sh.Dv + kFold);
  // Raise the kernel's dynamic shared-memory limit (a per-device setting) only when a call needs more
  // than any before it on that device.
  constexpr int kDevices = 64;
  static std::atomic<size_t> allowed[kDevices];
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  size_t now = device < kDevices ? allowed[device].load() : 0;
  if (dyn > now) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dyn));
    if (e != cudaSuccess) return e;
    while (device < kDevices && dyn > now && !allowed[device].compare_exchange_weak(now, dyn)) {
    }
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(P), static_cast<unsigned>(sh.Hkv), static_cast<unsigned>(sh.B));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = dyn;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(P);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  e = cudaLaunchKernelEx(&cfg, kernel, p, sh, tpr_log2);
  if (e != cudaSuccess) return e;
  if (!PR_DECODE_NO_LENGTH) {
    e = launch_dependent(retention_decode_length_kernel, dim3(static_cast<unsigned>((sh.B + 255) / 256)), dim3(256),
                         0, stream, true, p, sh);
    if (e != cudaSuccess) return e;
  }
  return cudaGetLastError();
}

template <typename T, int DK>
cudaError_t dispatch_qg(const PrDecodeParams& p, const DecodeShape& sh, cudaStream_t stream, int P, int tpr_log2) {
  return sh.S * sh.r == 1 ? launch_rows<T, DK, 1>(p, sh, stream, P, tpr_log2)
                          : launch_rows<T, DK, 4>(p, sh, stream, P, tpr_log2);
}

template <typename T>
cudaError_t dispatch_rows(const PrDecodeParams& p, const DecodeShape& sh, cudaStream_t stream, int P, int tpr_log2) {
  switch (p.key_dim) {
    case 32: return dispatch_qg<T, 32>(p, sh, stream, P, tpr_log2);
    case 64: return dispatch_qg<T, 64>(p, sh, stream, P, tpr_log2);
    case 128: return dispatch_qg<T, 128>(p, sh, stream, P, tpr_log2);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool decode_sm90_supports(const PrDecodeParams& p) {
  const int tpr = p.value_dim / 4;
  const bool dk = p.key_dim == 32 || p.key_dim == 64 || p.key_dim == 128;
  return dk && p.value_dim % 4 == 0 && p.value_dim <= kMaxDv && tpr >= 1 && (tpr & (tpr - 1)) == 0;
}

cudaError_t decode_sm90(const PrDecodeParams& p, cudaStream_t stream) {
  const DecodeShape sh{p.batch, p.new_tokens, p.cache_capacity, p.q_heads, p.kv_heads, p.value_dim,
                       p.q_heads / p.kv_heads};
  int device = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) return e;
  // Split each (b, h) over up to 8 blocks until the grid has two blocks per SM.
  int P = split_override();
  if (P == 0) {
    const int64_t heads = sh.B * sh.Hkv;
    P = 1;
    while (P < kMaxSplit && heads * P < 2 * static_cast<int64_t>(sms)) P *= 2;
  }
  int tpr_log2 = 0;
  while ((1 << tpr_log2) < p.value_dim / 4) ++tpr_log2;
  switch (p.dtype) {
    case PR_DTYPE_F32: return dispatch_rows<float>(p, sh, stream, P, tpr_log2);
    case PR_DTYPE_F16: return dispatch_rows<__half>(p, sh, stream, P, tpr_log2);
    case PR_DTYPE_BF16: return dispatch_rows<__nv_bfloat16>(p, sh, stream, P, tpr_log2);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace pr
