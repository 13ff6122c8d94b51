// What both decode paths share (decode.cu: portable, three kernels; decode_sm90.cu: one cluster
// kernel): the shape, the window's gates/keys/values, programmatic-dependent-launch helpers and the
// kernel that writes cache_length.
#pragma once

#include "common.cuh"

namespace pr {

// The sm_90 path (decode_sm90.cu), for validated params on a compute capability 9.0 device.
bool decode_sm90_supports(const PrDecodeParams& p);
cudaError_t decode_sm90(const PrDecodeParams& p, cudaStream_t stream);

namespace {

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

// One thread per sequence writes cache_length[b] (0 after a fold, else L + S). It is launched as a
// programmatic dependent of the last kernel of the step that reads the old length, which lets it start
// only when every block of that kernel has read it (the portable path: when that kernel has exited; the
// sm_90 path: at allow_next_kernel, right after the read). It then waits for that kernel before it
// exits, so work after the step on the stream still follows the whole step.
__global__ void retention_decode_length_kernel(const PrDecodeParams p, DecodeShape sh) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < sh.B) {
    const int64_t L = p.cache_length[b];
    if (L >= 0 && L <= sh.C) p.cache_length[b] = L + sh.S >= sh.C ? 0 : L + sh.S;
  }
  wait_for_previous_kernel();
}

template <typename Kernel>
cudaError_t launch_dependent(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
                             const PrDecodeParams& p, const DecodeShape& sh) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, p, sh);
}

}  // namespace
}  // namespace pr
