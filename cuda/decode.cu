// PowerRetentionStep: one decode step, in place on the present buffers (see retention.h).
//
// pr_decode validates the parameters, then takes the sm_90 path (decode_sm90.cu: one cluster kernel)
// on a compute capability 9.0 device where it applies, else this file's portable path, which
// pr_decode_portable always takes. Portable path: three kernels on the caller's stream (fixed grids,
// no host decisions: CUDA-graph safe):
//
// retention_decode_step_kernel — grid (Dv/W, Hkv, B), 256 threads, W = 8 value columns (one 32-byte
//   sector of a state row), or 32 when S r = 1 and the grid still has >= 1024 blocks (fewer blocks
//   redoing the gate scan and the window). Block (t, h, b) owns value columns [Wt, Wt + W) of
//   sequence b, kv head h, for all r = Hq/Hkv query heads and all S new tokens. Each thread owns the
//   compact state rows p = tid + 256 k and keeps 4 (W = 8) or 2 (W = 32) rows in flight. Per group
//   of QG queries (QG = 1 for S r = 1, else 4) it reads its rows' W state columns and s[p] (the step
//   is memory-bound: each state byte is read once per group),
//   adds the window attention for window tokens j = tid + 256 k, and one block reduction gives
//   num/den. If the window reaches C tokens, the same thread then folds the window into the same
//   rows and columns it read. Shared memory: the window's cumulative gates (n floats), the group's
//   queries (f32), the reduction scratch, one tile of window keys (f32) and gated values.
//   Race-freedom: blocks write disjoint (rows x column tile) slices of the state and disjoint output
//   columns; a thread rewrites only state rows it alone read; caches, sum of keys and cache_length
//   are only read.
// retention_decode_keys_kernel — grid (Hkv, B), 256 threads, launched as a programmatic dependent
//   of the step kernel on sm_90 (it waits with griddepcontrol.wait before reading anything): folds the window into
//   sum_of_keys[b, h, :] (thread owns rows tid + 256 k; keys staged in shared memory per tile) or
//   appends the new keys/values/gates of head h at cache slots [L, L+S), which no block of this
//   launch reads. Reads cache_length only.
// retention_decode_length_kernel (decode_common.cuh) — one thread per sequence writes
//   cache_length[b] (0 after a fold, else L + S) once the keys kernel's blocks have exited.
//
// Every kernel reads cache_length[b] and skips the sequence (the step kernel writes NaN outputs;
// nothing else is written) when it lies outside [0, C].
#include <math.h>

#include "decode_common.cuh"

namespace pr {
namespace {

constexpr int kStepThreads = 256;
constexpr int kFinishThreads = 256;
constexpr int kMinCols = 8;  // value columns per step block: >= 32 bytes of a state row, one sector
constexpr int kFoldTile = 64;

template <typename T, int DK, int QG, int W>
__global__ void __launch_bounds__(kStepThreads) retention_decode_step_kernel(const PrDecodeParams p, DecodeShape sh) {
  constexpr int D = DK * (DK + 1) / 2;
  constexpr int NT = kStepThreads;
  constexpr int NV = QG * (W + 1);
  constexpr int V4 = W / 4;                   // float4 words of one state row slice
  constexpr int kUnroll = W >= 32 ? 2 : 4;    // state rows in flight per thread
  extern __shared__ float g_s[];  // window cumulative gates, n floats
  __shared__ float q_s[QG][DK];
  __shared__ float red_s[NT / 32][NV];
  __shared__ float tot_s[NV];
  __shared__ float scan_s[NT / 32 + 1];
  __shared__ float kf_s[kFoldTile][DK + 1];
  __shared__ __align__(16) float vh_s[kFoldTile][W];

  const int c0 = blockIdx.x * W, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float* S_g = p.state + ((static_cast<int64_t>(b) * sh.Hkv + h) * D) * sh.Dv + c0;
  const float* s_g = p.sum_of_keys + (static_cast<int64_t>(b) * sh.Hkv + h) * D;
  const int64_t L = p.cache_length[b];
  const int64_t nq = sh.S * sh.r;
  T* out = static_cast<T*>(p.output);

  if (L < 0 || L > sh.C) {
    for (int64_t k = tid; k < nq * W; k += NT) {
      const int64_t qi = k / W, i = qi / sh.r;
      const int rr = static_cast<int>(qi % sh.r);
      out[((b * sh.S + i) * sh.Hq + h * sh.r + rr) * sh.Dv + c0 + k % W] = from_f32<T>(nanf(""));
    }
    return;
  }
  const int64_t n = L + sh.S;
  window_gate_cumsum<NT>(p, sh, b, h, L, n, g_s, scan_s);

  const T* q_g = static_cast<const T*>(p.query);
  const float sc2 = p.scale * p.scale;

  for (int64_t q0 = 0; q0 < nq; q0 += QG) {
    for (int k = tid; k < QG * DK; k += NT) {
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
    __syncthreads();

    float acc[QG][W + 1];
#pragma unroll
    for (int qq = 0; qq < QG; ++qq)
#pragma unroll
      for (int w = 0; w <= W; ++w) acc[qq][w] = 0.f;

    // State part: phi_q(q) . S[:, tile] and phi_q(q) . s over this thread's rows, kUnroll rows of
    // 32 bytes (one sector) each in flight.
    int a = 0, off = 0;
    advance_row<DK>(a, off, tid);
    for (int row0 = tid; row0 < D; row0 += NT * kUnroll) {
      float4 sv[kUnroll][V4];
      float ss[kUnroll];
      int ra[kUnroll], rb[kUnroll];
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
      const T* kp = window_key<T>(p, sh, b, h, L, j, DK);
      float dot[QG];
#pragma unroll
      for (int qq = 0; qq < QG; ++qq) dot[qq] = 0.f;
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
      float vv[W];
      load_f32<T, W>(window_value<T>(p, sh, b, h, L, j) + c0, vv);
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

  if (n < sh.C) return;

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

template <typename T, int DK>
__global__ void __launch_bounds__(kFinishThreads) retention_decode_keys_kernel(const PrDecodeParams p, DecodeShape sh) {
  constexpr int D = DK * (DK + 1) / 2;
  constexpr int NT = kFinishThreads;
  extern __shared__ float g_s[];  // window cumulative gates, n floats
  __shared__ float scan_s[NT / 32 + 1];
  __shared__ float kf_s[kFoldTile][DK + 1];
  __shared__ float coef_s[kFoldTile];

  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  wait_for_previous_kernel();
  const int64_t L = p.cache_length[b];
  if (L < 0 || L > sh.C) return;
  const int64_t n = L + sh.S;

  if (n < sh.C) {
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
    return;
  }
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

template <typename T, int DK, int QG, int W>
cudaError_t launch_decode(const PrDecodeParams& p, const DecodeShape& sh, cudaStream_t stream, bool pdl) {
  const size_t gate_bytes = static_cast<size_t>(2 * sh.C) * sizeof(float);
  auto step = retention_decode_step_kernel<T, DK, QG, W>;
  auto keys = retention_decode_keys_kernel<T, DK>;
  constexpr size_t kDefaultSmem = 48 * 1024;
  constexpr size_t step_static = sizeof(float) * (QG * DK + (kStepThreads / 32 + 1) * QG * (W + 1) + kStepThreads / 32 + 1 +
                                                  kFoldTile * (DK + 1) + kFoldTile * W);
  constexpr size_t keys_static = sizeof(float) * (kFinishThreads / 32 + 1 + kFoldTile * (DK + 1) + kFoldTile);
  if (gate_bytes + (step_static > keys_static ? step_static : keys_static) > kDefaultSmem) {
    cudaError_t e = cudaFuncSetAttribute(step, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(gate_bytes));
    if (e != cudaSuccess) return e;
    e = cudaFuncSetAttribute(keys, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(gate_bytes));
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(static_cast<unsigned>(sh.Dv / W), static_cast<unsigned>(sh.Hkv), static_cast<unsigned>(sh.B));
  step<<<grid, kStepThreads, gate_bytes, stream>>>(p, sh);
  cudaError_t e = launch_dependent(keys, dim3(static_cast<unsigned>(sh.Hkv), static_cast<unsigned>(sh.B)),
                                   dim3(kFinishThreads), gate_bytes, stream, pdl, p, sh);
  if (e != cudaSuccess) return e;
  e = launch_dependent(retention_decode_length_kernel, dim3(static_cast<unsigned>((sh.B + 255) / 256)), dim3(256), 0,
                       stream, pdl, p, sh);
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

}  // namespace
}  // namespace pr

namespace pr {
namespace {

// Shared by pr_decode and pr_decode_portable: validation, then the sm_90 cluster kernel where it
// applies (and is allowed), else the portable three-kernel path.
int decode_entry(const PrDecodeParams* params, void* stream, bool allow_sm90) {
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
  // griddepcontrol (and clusters) are compiled only into the sm_90a code: a device that runs the
  // compute_80 PTX instead must not get programmatic launches, whose waits would be missing there.
  const bool sm90 = major == 9 && minor == 0;
  if (allow_sm90 && sm90 && decode_sm90_supports(p)) return decode_sm90(p, s);
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

extern "C" int pr_decode(const PrDecodeParams* params, void* stream) { return pr::decode_entry(params, stream, true); }

extern "C" int pr_decode_portable(const PrDecodeParams* params, void* stream) {
  return pr::decode_entry(params, stream, false);
}
