// PowerRetentionStep: one decode step, in place on the present buffers (see retention.h).
//
// Two kernels on the caller's stream (fixed grids, no host decisions: CUDA-graph safe):
//
// retention_decode_step_kernel — grid (Dv/W, Hkv, B), 256 threads, W = 8 value columns (one 32-byte
//   sector of a state row), or 32 when S r = 1 and the grid still has >= 1024 blocks (fewer blocks
//   redoing the gate scan and the window). Block (t, h, b) owns value columns [Wt, Wt + W) of
//   sequence b, kv head h, for all r = Hq/Hkv query heads and all S new tokens. Each thread owns the
//   compact state rows p = tid + 256 k. Per group of QG queries (QG = 1 for S r = 1, else 4) it reads
//   its rows' W state columns and s[p] (the step is memory-bound: each state byte is read once per
//   group), adds the window attention for window tokens j = tid + 256 k, and one block reduction
//   gives num/den. Then, if the window reaches C tokens, the same thread folds the window into the
//   same rows and columns it read; otherwise block t = 0 appends the new keys/values/gates of head h
//   at cache slots [L, L+S), which no block of this step reads (window tokens j < L come from the
//   cache, j >= L from the inputs).
//   Latency (B = 1 is bound by it): the cache length, the first batch of state rows (all of a thread's
//   rows for one query when Dk <= 64), group 0's queries and the window gates are requested together,
//   and the first window token's key and value before the gate scan.
//   Race-freedom: blocks write disjoint (rows x column tile) slices of the state, disjoint output
//   columns and (t = 0 only) cache slots nobody reads in this step; a thread rewrites only state rows
//   it alone read. Each block signals allow_next_kernel after its last read of cache_length and of
//   the sum of keys.
// retention_decode_finish_kernel — grid (G, B), 512 threads, G = min(Hkv, 8) blocks per sequence in a
//   cluster on sm_90 (G = 1 elsewhere), launched as a programmatic dependent of the step kernel there
//   (elsewhere in plain stream order): it starts once every step block has signalled, writes
//   cache_length[b] (0 after a fold, else L + S) once every block of the sequence has read it, folds
//   the window into the sum of keys of each head when the window is full, and waits for the step
//   kernel before it exits.
//
// Both kernels read cache_length[b] and skip the sequence (the step kernel writes NaN outputs;
// nothing else is written) when it lies outside [0, C].
#include <cooperative_groups.h>
#include <math.h>

#include "common.cuh"

namespace pr {
namespace {

constexpr int kStepThreads = 256;
constexpr int kFinishThreads = 512;
constexpr int kMinCols = 8;  // value columns per step block: >= 32 bytes of a state row, one sector
constexpr int kFoldTile = 64;
constexpr int kMaxFinishCluster = 8;  // the portable cluster size

struct DecodeShape {
  int64_t B, S, C;
  int Hq, Hkv, Dv, r;
};

// Cumulative window gates G[0..n) into g (shared, n floats), by the whole block.
template <int NT>
__device__ void window_gate_cumsum(const PrDecodeParams& p, const DecodeShape& sh, int b, int h,
                                   int64_t L, int64_t n, float* g, float* scratch) {
  float carry = 0.f;
  for (int64_t base = 0; base < n; base += NT) {
    const int64_t j = base + threadIdx.x;
    float x = 0.f;
    if (p.log_gate != nullptr && j < n) {
      x = j < L ? p.log_gate_cache[(b * sh.C + j) * sh.Hkv + h]
                : p.log_gate[(b * sh.S + (j - L)) * sh.Hkv + h];
    }
    float total;
    const float incl = block_inclusive_scan<NT>(x, scratch, &total);
    if (j < n) g[j] = carry + incl;
    carry += total;
  }
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ const T* window_key(const PrDecodeParams& p, const DecodeShape& sh, int b,
                                               int h, int64_t L, int64_t j, int dk) {
  return j < L ? static_cast<const T*>(p.key_cache) + ((b * sh.C + j) * sh.Hkv + h) * dk
               : static_cast<const T*>(p.key) + ((b * sh.S + (j - L)) * sh.Hkv + h) * dk;
}

template <typename T>
__device__ __forceinline__ const T* window_value(const PrDecodeParams& p, const DecodeShape& sh, int b,
                                                 int h, int64_t L, int64_t j) {
  return j < L ? static_cast<const T*>(p.value_cache) + ((b * sh.C + j) * sh.Hkv + h) * sh.Dv
               : static_cast<const T*>(p.value) + ((b * sh.S + (j - L)) * sh.Hkv + h) * sh.Dv;
}

// Programmatic dependent launch (sm_90+): the next kernel of the step may start its prologue while
// the previous one drains; it waits (griddepcontrol.wait) before touching what that one writes.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel on the stream (launched as a programmatic dependent) start once every block
// of this grid has passed this point or exited.
__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The queries of group [q0, q0 + QG) (zero past the last) into q_s, as f32.
template <typename T, int DK, int QG>
__device__ __forceinline__ void load_queries(const PrDecodeParams& p, const DecodeShape& sh, int b, int h, int64_t q0,
                                             float (&q_s)[QG][DK]) {
  const T* q_g = static_cast<const T*>(p.query);
  const int64_t nq = sh.S * sh.r;
  for (int k = threadIdx.x; k < QG * DK; k += kStepThreads) {
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

template <typename T, int DK, int QG, int W>
// Registers: the one-query 8-column kernel (small grids, one block per SM anyway) may use them all to
// keep a thread's rows in flight; the others keep two blocks per SM.
__global__ void __launch_bounds__(kStepThreads, W == 8 && QG == 1 ? 1 : 2)
    retention_decode_step_kernel(const PrDecodeParams p, DecodeShape sh) {
  constexpr int D = DK * (DK + 1) / 2;
  constexpr int NT = kStepThreads;
  constexpr int NV = QG * (W + 1);
  constexpr int V4 = W / 4;  // float4 words of one state row slice
  // State rows in flight per thread: with one query and 8 columns (small grids, latency-bound) all of
  // a thread's rows at once where that is at most 9 (Dk <= 64), else 4; 2 for 32 columns.
  constexpr int kUnroll = W >= 32 ? 2 : (QG == 1 ? ((D + NT - 1) / NT < 9 ? (D + NT - 1) / NT : 9) : 4);
  // Window token prefetch (small grids): the key as 16-byte words, when they fit 8 words.
  constexpr int kKeyWords = DK * static_cast<int>(sizeof(T)) / 16;
  constexpr int kValWords = W * static_cast<int>(sizeof(T)) / 16;
  constexpr bool kPrefetch = W == 8 && QG == 1 && kKeyWords <= 8;
  extern __shared__ float g_s[];  // window cumulative gates, n floats
  __shared__ float q_s[QG][DK];
  __shared__ float gnew_s[NT];  // new tokens' log gates, for the one-pass gate scan
  __shared__ float red_s[NT / 32][NV];
  __shared__ float tot_s[NV];
  __shared__ float scan_s[NT / 32 + 1];
  __shared__ float kf_s[kFoldTile][DK + 1];
  __shared__ __align__(16) float vh_s[kFoldTile][W];

  const int c0 = blockIdx.x * W, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float* S_g = p.state + ((static_cast<int64_t>(b) * sh.Hkv + h) * D) * sh.Dv + c0;
  const float* s_g = p.sum_of_keys + (static_cast<int64_t>(b) * sh.Hkv + h) * D;
  const int64_t nq = sh.S * sh.r;
  T* out = static_cast<T*>(p.output);

  // State rows of one batch: this thread's kUnroll rows, 32 bytes (one sector) each, in flight together.
  float4 sv[kUnroll][V4];
  float ss[kUnroll];
  int ra[kUnroll], rb[kUnroll];
  int a = 0, off = 0;  // (a, b - a) of the next row to load
  advance_row<DK>(a, off, tid);
  auto load_batch = [&](int row0) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int row = row0 + u * NT;
      ra[u] = a;
      rb[u] = a + off;
      if (row < D) {
        const float4* sp = reinterpret_cast<const float4*>(S_g + static_cast<int64_t>(row) * sh.Dv);
#pragma unroll
        for (int v = 0; v < V4; ++v) sv[u][v] = sp[v];
        ss[u] = __ldg(s_g + row);
      } else {
#pragma unroll
        for (int v = 0; v < V4; ++v) sv[u][v] = make_float4(0.f, 0.f, 0.f, 0.f);
        ss[u] = 0.f;
        ra[u] = rb[u] = 0;
      }
      advance_row<DK>(a, off, NT);
    }
  };

  // Latency: every request that does not need the cache length goes out together with it (group 0's
  // queries; when the window fits one pass of the scan, the gate of cache slot tid and of new token
  // tid, between which the length then chooses; for small grids, the first batch of state rows).
  const int64_t L = p.cache_length[b];
  if (kPrefetch) load_batch(tid);  // small grids only: its registers stay live through the gate scan
  load_queries<T, DK, QG>(p, sh, b, h, 0, q_s);
  const bool one_pass = sh.C + sh.S <= NT;  // n <= C + S
  float gate_cached = 0.f;
  if (one_pass && p.log_gate != nullptr) {
    if (tid < sh.C) gate_cached = p.log_gate_cache[(b * sh.C + tid) * sh.Hkv + h];
    if (tid < sh.S) gnew_s[tid] = p.log_gate[(b * sh.S + tid) * sh.Hkv + h];
  }
  __syncthreads();

  if (L < 0 || L > sh.C) {
    for (int64_t k = tid; k < nq * W; k += NT) {
      const int64_t qi = k / W, i = qi / sh.r;
      const int rr = static_cast<int>(qi % sh.r);
      out[((b * sh.S + i) * sh.Hq + h * sh.r + rr) * sh.Dv + c0 + k % W] = from_f32<T>(nanf(""));
    }
    return;
  }
  const int64_t n = L + sh.S;

  // Window token j = tid of group 0, requested before the gate scan and the state products.
  const int64_t jmax0 = L + (QG - 1 < nq - 1 ? QG - 1 : nq - 1) / sh.r;
  const bool pre = kPrefetch && tid <= jmax0;
  uint4 kpre[kPrefetch ? kKeyWords : 1], vpre[kPrefetch ? kValWords : 1];
  if (pre) {
    const uint4* kp = reinterpret_cast<const uint4*>(window_key<T>(p, sh, b, h, L, tid, DK));
    const uint4* vp = reinterpret_cast<const uint4*>(window_value<T>(p, sh, b, h, L, tid) + c0);
#pragma unroll
    for (int w = 0; w < (kPrefetch ? kKeyWords : 1); ++w) kpre[w] = __ldg(kp + w);
#pragma unroll
    for (int w = 0; w < (kPrefetch ? kValWords : 1); ++w) vpre[w] = __ldg(vp + w);
  }

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

  bool preloaded = kPrefetch;  // group 0's first batch
  for (int64_t q0 = 0; q0 < nq; q0 += QG) {
    if (q0 > 0) {
      load_queries<T, DK, QG>(p, sh, b, h, q0, q_s);
      __syncthreads();
      a = 0;
      off = 0;
      advance_row<DK>(a, off, tid);
    }

    float acc[QG][W + 1];
#pragma unroll
    for (int qq = 0; qq < QG; ++qq)
#pragma unroll
      for (int w = 0; w <= W; ++w) acc[qq][w] = 0.f;

    // State part: phi_q(q) . S[:, tile] and phi_q(q) . s over this thread's rows, one batch of
    // kUnroll rows at a time.
    for (int row0 = tid; row0 < D; row0 += NT * kUnroll) {
      if (!preloaded) load_batch(row0);
      preloaded = false;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int qq = 0; qq < QG; ++qq) {
          const float f = q_s[qq][ra[u]] * q_s[qq][rb[u]];
#pragma unroll
          for (int v = 0; v < V4; ++v) {
            acc[qq][4 * v + 0] += f * sv[u][v].x;
            acc[qq][4 * v + 1] += f * sv[u][v].y;
            acc[qq][4 * v + 2] += f * sv[u][v].z;
            acc[qq][4 * v + 3] += f * sv[u][v].w;
          }
          acc[qq][W] += f * ss[u];
        }
      }
    }
    // The state is decayed by every window gate up to the query's own position.
#pragma unroll
    for (int qq = 0; qq < QG; ++qq) {
      const int64_t qi = q0 + qq;
      const float fac = qi < nq ? sc2 * expf(g_s[L + qi / sh.r]) : 0.f;
#pragma unroll
      for (int w = 0; w <= W; ++w) acc[qq][w] *= fac;
    }

    // Window part: token j attends to the queries at window positions >= j.
    const int64_t last_q = q0 + QG - 1 < nq ? q0 + QG - 1 : nq - 1;
    const int64_t jmax = L + last_q / sh.r;
    for (int64_t j = tid; j <= jmax; j += NT) {
      float dot[QG];
#pragma unroll
      for (int qq = 0; qq < QG; ++qq) dot[qq] = 0.f;
      float vv[W];
      if (pre && q0 == 0 && j == tid) {  // prefetched
        constexpr int kPer = 16 / sizeof(T);
#pragma unroll
        for (int w = 0; w < (kPrefetch ? kKeyWords : 1); ++w) {
          const T* e = reinterpret_cast<const T*>(&kpre[w]);
#pragma unroll
          for (int i = 0; i < kPer; ++i)
#pragma unroll
            for (int qq = 0; qq < QG; ++qq) dot[qq] += q_s[qq][w * kPer + i] * to_f32<T>(e[i]);
        }
#pragma unroll
        for (int w = 0; w < (kPrefetch ? kValWords : 1); ++w) {
          const T* e = reinterpret_cast<const T*>(&vpre[w]);
#pragma unroll
          for (int i = 0; i < kPer; ++i)
            if (w * kPer + i < W) vv[w * kPer + i] = to_f32<T>(e[i]);
        }
      } else {
        const T* kp = window_key<T>(p, sh, b, h, L, j, DK);
        constexpr int kChunk = 16 / sizeof(T) > 8 ? 16 / sizeof(T) : 8;
#pragma unroll
        for (int d0 = 0; d0 < DK; d0 += kChunk) {
          float kv[kChunk];
          load_f32<T, kChunk>(kp + d0, kv);
#pragma unroll
          for (int e = 0; e < kChunk; ++e)
#pragma unroll
            for (int qq = 0; qq < QG; ++qq) dot[qq] += q_s[qq][d0 + e] * kv[e];
        }
        load_f32<T, W>(window_value<T>(p, sh, b, h, L, j) + c0, vv);
      }
      const float gj = g_s[j];
#pragma unroll
      for (int qq = 0; qq < QG; ++qq) {
        const int64_t qi = q0 + qq;
        if (qi >= nq) continue;
        const int64_t pos = L + qi / sh.r;
        if (j > pos) continue;
        const float wt = attn_weight(dot[qq], p.scale, g_s[pos] - gj);
#pragma unroll
        for (int w = 0; w < W; ++w) acc[qq][w] += wt * vv[w];
        acc[qq][W] += wt;
      }
    }

    // Block reduction of the QG x (W + 1) partial sums.
#pragma unroll
    for (int qq = 0; qq < QG; ++qq)
#pragma unroll
      for (int w = 0; w <= W; ++w) {
        const float v = warp_sum(acc[qq][w]);
        if (lane == 0) red_s[warp][qq * (W + 1) + w] = v;
      }
    __syncthreads();
    if (tid < NV) {
      float v = 0.f;
#pragma unroll
      for (int k = 0; k < NT / 32; ++k) v += red_s[k][tid];
      tot_s[tid] = v;
    }
    __syncthreads();
    if (tid < QG * W) {
      const int qq = tid / W, w = tid % W;
      const int64_t qi = q0 + qq;
      if (qi < nq) {
        const int64_t i = qi / sh.r;
        const int rr = static_cast<int>(qi % sh.r);
        const float y = tot_s[qq * (W + 1) + w] / tot_s[qq * (W + 1) + W];
        out[((b * sh.S + i) * sh.Hq + h * sh.r + rr) * sh.Dv + c0 + w] = from_f32<T>(y);
      }
    }
    __syncthreads();  // q_s and tot_s are rewritten by the next group
  }

  // Every read of cache_length and of the sum of keys is done: the finish kernel may start.
  allow_next_kernel();

  if (n < sh.C) {  // append: cache slots [L, n) are read by no block of this step
    if (blockIdx.x == 0) {
      T* kc = static_cast<T*>(p.key_cache);
      T* vc = static_cast<T*>(p.value_cache);
      const T* kn = static_cast<const T*>(p.key);
      const T* vn = static_cast<const T*>(p.value);
      for (int64_t k = tid; k < sh.S * DK; k += NT) {
        const int64_t i = k / DK, e = k % DK;
        kc[((b * sh.C + L + i) * sh.Hkv + h) * DK + e] = kn[((b * sh.S + i) * sh.Hkv + h) * DK + e];
      }
      for (int64_t k = tid; k < sh.S * sh.Dv; k += NT) {
        const int64_t i = k / sh.Dv, e = k % sh.Dv;
        vc[((b * sh.C + L + i) * sh.Hkv + h) * sh.Dv + e] = vn[((b * sh.S + i) * sh.Hkv + h) * sh.Dv + e];
      }
      if (p.log_gate != nullptr) {
        for (int64_t i = tid; i < sh.S; i += NT)
          p.log_gate_cache[(b * sh.C + L + i) * sh.Hkv + h] = p.log_gate[(b * sh.S + i) * sh.Hkv + h];
      }
    }
    return;
  }

  // Fold all n window tokens into this block's state slice:
  // S <- exp(G_end) S + sum_j exp(G_end - G_j) phi_k(k_j) v_j^T.
  const float g_end = g_s[n - 1];
  const float decay = expf(g_end);
  for (int64_t t0 = 0; t0 < n; t0 += kFoldTile) {
    const int ft = static_cast<int>(n - t0 < kFoldTile ? n - t0 : kFoldTile);
    for (int k = tid; k < ft * DK; k += NT) {
      const int j = k / DK, d = k % DK;
      kf_s[j][d] = to_f32<T>(window_key<T>(p, sh, b, h, L, t0 + j, DK)[d]);
    }
    for (int k = tid; k < ft * W; k += NT) {
      const int j = k / W, w = k % W;
      vh_s[j][w] = expf(g_end - g_s[t0 + j]) * to_f32<T>(window_value<T>(p, sh, b, h, L, t0 + j)[c0 + w]);
    }
    __syncthreads();
    int a = 0, off = 0;
    advance_row<DK>(a, off, tid);
    for (int row = tid; row < D; row += NT) {
      const int bb = a + off;
      float4* sp = reinterpret_cast<float4*>(S_g + static_cast<int64_t>(row) * sh.Dv);
      const float m = t0 == 0 ? decay : 1.f;
      float4 acc[V4];
#pragma unroll
      for (int v = 0; v < V4; ++v) {
        const float4 x = sp[v];
        acc[v] = make_float4(m * x.x, m * x.y, m * x.z, m * x.w);
      }
      const float kw = a < bb ? 2.f : 1.f;
      for (int j = 0; j < ft; ++j) {
        const float f = kw * kf_s[j][a] * kf_s[j][bb];
#pragma unroll
        for (int v = 0; v < V4; ++v) {
          const float4 x = *reinterpret_cast<const float4*>(&vh_s[j][4 * v]);
          acc[v].x += f * x.x;
          acc[v].y += f * x.y;
          acc[v].z += f * x.z;
          acc[v].w += f * x.w;
        }
      }
#pragma unroll
      for (int v = 0; v < V4; ++v) sp[v] = acc[v];
      advance_row<DK>(a, off, NT);
    }
    __syncthreads();
  }
}

// Grid (G, B): G blocks per sequence (a cluster of G <= 8 on sm_90, else G = 1), launched as a
// programmatic dependent of the step kernel. It starts once every step block has read cache_length and
// the sum of keys (allow_next_kernel). Each block reads the length, the cluster barrier then lets
// block 0 write the new one (0 after a fold, else L + S) with every reader done, and when the window
// is full block g folds it into the sum of keys of heads g, g + G, ... (thread owns rows tid + NT k;
// keys staged in shared memory per tile). Last it waits for the step kernel, so that later work on the
// stream follows the whole step.
template <typename T, int DK>
__global__ void __launch_bounds__(kFinishThreads) retention_decode_finish_kernel(const PrDecodeParams p, DecodeShape sh) {
  constexpr int D = DK * (DK + 1) / 2;
  constexpr int NT = kFinishThreads;
  extern __shared__ float g_s[];  // window cumulative gates, n floats
  __shared__ float scan_s[NT / 32 + 1];
  __shared__ float kf_s[kFoldTile][DK + 1];
  __shared__ float coef_s[kFoldTile];
  __shared__ int64_t len_s;

  const int G = gridDim.x, gi = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  if (tid == 0) len_s = p.cache_length[b];
  __syncthreads();
  const int64_t L = len_s;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (G > 1) cooperative_groups::this_cluster().sync();  // every block of the sequence has read it
#endif
  if (L >= 0 && L <= sh.C) {
    const int64_t n = L + sh.S;
    if (gi == 0 && tid == 0) p.cache_length[b] = n >= sh.C ? 0 : n;
    if (n >= sh.C) {
      for (int h = gi; h < sh.Hkv; h += G) {
        window_gate_cumsum<NT>(p, sh, b, h, L, n, g_s, scan_s);
        const float g_end = g_s[n - 1];
        const float decay = expf(g_end);
        float* s_g = p.sum_of_keys + (static_cast<int64_t>(b) * sh.Hkv + h) * D;
        for (int64_t t0 = 0; t0 < n; t0 += kFoldTile) {
          const int ft = static_cast<int>(n - t0 < kFoldTile ? n - t0 : kFoldTile);
          for (int k = tid; k < ft * DK; k += NT) {
            const int j = k / DK, d = k % DK;
            kf_s[j][d] = to_f32<T>(window_key<T>(p, sh, b, h, L, t0 + j, DK)[d]);
          }
          for (int j = tid; j < ft; j += NT) coef_s[j] = expf(g_end - g_s[t0 + j]);
          __syncthreads();
          int a = 0, off = 0;
          advance_row<DK>(a, off, tid);
          for (int row = tid; row < D; row += NT) {
            const int bb = a + off;
            float acc = s_g[row];
            if (t0 == 0) acc *= decay;
            float add = 0.f;
            for (int j = 0; j < ft; ++j) add += coef_s[j] * kf_s[j][a] * kf_s[j][bb];
            s_g[row] = acc + (a < bb ? 2.f : 1.f) * add;
            advance_row<DK>(a, off, NT);
          }
          __syncthreads();
        }
      }
    }
  }
  wait_for_previous_kernel();
}

template <typename T, int DK, int QG, int W>
cudaError_t launch_decode(const PrDecodeParams& p, const DecodeShape& sh, cudaStream_t stream, bool pdl) {
  const size_t gate_bytes = static_cast<size_t>(2 * sh.C) * sizeof(float);
  auto step = retention_decode_step_kernel<T, DK, QG, W>;
  auto finish = retention_decode_finish_kernel<T, DK>;
  constexpr size_t kDefaultSmem = 48 * 1024;
  constexpr size_t step_static =
      sizeof(float) * (QG * DK + kStepThreads + (kStepThreads / 32 + 1) * QG * (W + 1) + kStepThreads / 32 + 1 +
                       kFoldTile * (DK + 1) + kFoldTile * W);
  constexpr size_t finish_static =
      sizeof(float) * (kFinishThreads / 32 + 1 + kFoldTile * (DK + 1) + kFoldTile) + sizeof(int64_t);
  if (gate_bytes + (step_static > finish_static ? step_static : finish_static) > kDefaultSmem) {
    cudaError_t e = cudaFuncSetAttribute(step, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(gate_bytes));
    if (e != cudaSuccess) return e;
    e = cudaFuncSetAttribute(finish, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(gate_bytes));
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(static_cast<unsigned>(sh.Dv / W), static_cast<unsigned>(sh.Hkv), static_cast<unsigned>(sh.B));
  step<<<grid, kStepThreads, gate_bytes, stream>>>(p, sh);
  // sm_90: up to 8 blocks per sequence in a cluster share the sum-of-keys fold, as many as it takes
  // to give the finish grid about two blocks per SM; elsewhere one.
  int G = 1;
  if (pdl) {
    int device = 0, sms = 0;
    cudaError_t e = cudaGetDevice(&device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (e != cudaSuccess) return e;
    const int64_t want = (2 * static_cast<int64_t>(sms) + sh.B - 1) / sh.B;
    G = static_cast<int>(want < sh.Hkv ? want : sh.Hkv);
    G = G < kMaxFinishCluster ? G : kMaxFinishCluster;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(G), static_cast<unsigned>(sh.B));
  cfg.blockDim = dim3(kFinishThreads);
  cfg.dynamicSmemBytes = gate_bytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  int na = 0;
  if (pdl) {
    attr[na].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[na].val.programmaticStreamSerializationAllowed = 1;
    ++na;
  }
  if (G > 1) {
    attr[na].id = cudaLaunchAttributeClusterDimension;
    attr[na].val.clusterDim.x = static_cast<unsigned>(G);
    attr[na].val.clusterDim.y = 1;
    attr[na].val.clusterDim.z = 1;
    ++na;
  }
  cfg.attrs = attr;
  cfg.numAttrs = na;
  cudaError_t e = cudaLaunchKernelEx(&cfg, finish, p, sh);
  if (e != cudaSuccess) return e;
  return cudaGetLastError();
}

template <typename T, int DK>
cudaError_t dispatch_w(const PrDecodeParams& p, const DecodeShape& sh, cudaStream_t stream, bool pdl) {
  // One query per block pass and enough blocks to fill the GPU several times: 32 columns per block
  // (fewer blocks redoing the window and the gate scan); otherwise 8 (one 32-byte sector per row).
  const bool one = sh.S * sh.r == 1;
  const bool wide = one && sh.Dv % 32 == 0 && sh.B * sh.Hkv * (sh.Dv / 32) >= 1024;
  if (wide) return launch_decode<T, DK, 1, 32>(p, sh, stream, pdl);
  return one ? launch_decode<T, DK, 1, 8>(p, sh, stream, pdl) : launch_decode<T, DK, 4, 8>(p, sh, stream, pdl);
}

template <typename T>
cudaError_t dispatch_dk(const PrDecodeParams& p, const DecodeShape& sh, cudaStream_t stream, bool pdl) {
  switch (p.key_dim) {
    case 32: return dispatch_w<T, 32>(p, sh, stream, pdl);
    case 64: return dispatch_w<T, 64>(p, sh, stream, pdl);
    case 128: return dispatch_w<T, 128>(p, sh, stream, pdl);
    default: return cudaErrorInvalidValue;
  }
}

// Validation, then the launches.
int decode_entry(const PrDecodeParams* params, void* stream) {
  if (params == nullptr) return cudaErrorInvalidValue;
  const PrDecodeParams& p = *params;
  if (p.deg != 2 || p.batch < 0 || p.batch > 65535 || p.new_tokens < 1 || p.cache_capacity < 1 ||
      p.new_tokens > p.cache_capacity || p.cache_capacity > 8192 || p.q_heads < 1 || p.kv_heads < 1 ||
      p.kv_heads > 65535 || p.q_heads % p.kv_heads != 0 || p.q_heads / p.kv_heads > 32 || p.value_dim < kMinCols ||
      p.value_dim % kMinCols != 0 || (p.log_gate == nullptr) != (p.log_gate_cache == nullptr) ||
      !isfinite(p.scale))
    return cudaErrorInvalidValue;
  if (p.query == nullptr || p.key == nullptr || p.value == nullptr || p.output == nullptr || p.state == nullptr ||
      p.sum_of_keys == nullptr || p.key_cache == nullptr || p.value_cache == nullptr || p.cache_length == nullptr)
    return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  int device = 0, major = 0, minor = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (e != cudaSuccess) return e;
  // griddepcontrol is compiled only into the sm_90a code: a device that runs the compute_80 PTX
  // instead must not get programmatic launches, whose waits would be missing there.
  const bool sm90 = major == 9 && minor == 0;
  const DecodeShape sh{p.batch, p.new_tokens, p.cache_capacity, p.q_heads, p.kv_heads, p.value_dim,
                       p.q_heads / p.kv_heads};
  switch (p.dtype) {
    case PR_DTYPE_F32: return dispatch_dk<float>(p, sh, s, sm90);
    case PR_DTYPE_F16: return dispatch_dk<__half>(p, sh, s, sm90);
    case PR_DTYPE_BF16: return dispatch_dk<__nv_bfloat16>(p, sh, s, sm90);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace pr

extern "C" int pr_decode(const PrDecodeParams* params, void* stream) { return pr::decode_entry(params, stream); }
