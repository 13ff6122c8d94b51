// Shared device helpers of prefill.cu and decode.cu: dtype conversion, the compact deg-2 row map,
// the weight formula, block-wide scans. Everything here is float32 arithmetic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "retention.h"

namespace pr {

constexpr float kEps = 1e-7f;  // the retention package's epsilon inside |scale q.k|

// The sizes every prefill kernel reads, taken once from validated PrPrefillParams (r = Hq / Hkv).
struct PrefillShape {
  int64_t B, S;
  int Hq, Hkv, Dv, r;
};

inline PrefillShape prefill_shape(const PrPrefillParams& p) {
  return {p.batch, p.seq_len, p.q_heads, p.kv_heads, p.value_dim, p.q_heads / p.kv_heads};
}

template <typename T>
__device__ __forceinline__ float to_f32(T x);
template <>
__device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Loads N consecutive elements (N * sizeof(T) a multiple of 16 bytes, p 16-byte aligned) as f32.
template <typename T, int N>
__device__ __forceinline__ void load_f32(const T* __restrict__ p, float* out) {
  static_assert((N * sizeof(T)) % 16 == 0, "vector load of whole 16-byte words");
  constexpr int kPer = 16 / sizeof(T);
#pragma unroll
  for (int v = 0; v < N / kPer; ++v) {
    uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + v);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kPer; ++i) out[v * kPer + i] = to_f32<T>(e[i]);
  }
}

// Compact deg-2 layout: rows (a, b) with a <= b, row(a, b) = a(2Dk - a + 1)/2 + (b - a).
// A thread walks its rows as (a, off = b - a); advance moves the pair forward by `step` rows.
template <int DK>
__device__ __forceinline__ void advance_row(int& a, int& off, int step) {
  off += step;
  while (a < DK && off >= DK - a) {
    off -= DK - a;
    ++a;
  }
}

// Compact row of the feature x_a x_b (a <= b) for key dim DK.
template <int DK>
__device__ __forceinline__ int64_t crow(int a, int b) {
  return static_cast<int64_t>(a) * (2 * DK - a + 1) / 2 + (b - a);
}

// Key-side weight of compact row (a, b): 2 above the diagonal, 1 on it; 0 for the padding rows b < a.
__device__ __forceinline__ float key_weight(int a, int b) { return b > a ? 2.f : (b == a ? 1.f : 0.f); }

__device__ __forceinline__ float bf(__nv_bfloat16 x) { return __bfloat162float(x); }

inline bool aligned(const void* ptr, uintptr_t n) { return (reinterpret_cast<uintptr_t>(ptr) % n) == 0; }

// Attention weight of one (query, key) pair: (|scale q.k| + eps)^2 exp(dG), dG = G_i - G_j <= 0.
__device__ __forceinline__ float attn_weight(float dot, float scale, float dG) {
  const float x = fabsf(scale * dot) + kEps;
  return x * x * expf(dG);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_inclusive_scan(float v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float u = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += u;
  }
  return v;
}

// Inclusive scan over the block (NT threads, NT/32 <= 32 warps). `scratch` holds NT/32 + 1 floats.
// Returns the thread's inclusive prefix; *total receives the block total. Contains barriers: every
// thread of the block must call it.
template <int NT>
__device__ __forceinline__ float block_inclusive_scan(float v, float* scratch, float* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float x = warp_inclusive_scan(v);
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    float w = lane < NT / 32 ? scratch[lane] : 0.f;
    w = warp_inclusive_scan(w);
    if (lane < NT / 32) scratch[lane] = w;  // inclusive warp totals
    if (lane == NT / 32 - 1) scratch[NT / 32] = w;
  }
  __syncthreads();
  if (warp > 0) x += scratch[warp - 1];
  *total = scratch[NT / 32];
  __syncthreads();  // scratch is reused by the next call
  return x;
}

}  // namespace pr
