// One m64 x n72 x k16 wgmma through cuda/mma.cuh's helpers (A from registers, B an MN-major core
// tile in shared memory): the layout assumptions of the chunked prefill's wgmma path, checked in
// isolation by tests/gpu/test_wgmma_probe.py. Built by scripts/build-gpu-test.sh (sm_90a).
#include <cuda_bf16.h>

#include "mma.cuh"

namespace {
__global__ void probe_kernel(const __nv_bfloat16* A, const __nv_bfloat16* B, float* D, int* done) {
#ifdef PR_WGMMA
  using namespace pr::mma;
  __shared__ __align__(128) __nv_bfloat16 Bs[kCoreTileElems];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  for (int e = tid; e < kCoreTileElems; e += 128) Bs[core_offset(e / 72, e % 72)] = B[e];  // B row-major 16 x 72
  fence_proxy_async();
  __syncthreads();
  auto pair = [&](int r, int c) {
    __nv_bfloat162 v;
    v.x = A[r * 16 + c];
    v.y = A[r * 16 + c + 1];
    return *reinterpret_cast<uint32_t*>(&v);
  };
  const int r = 16 * warp + g;  // A row-major 64 x 16
  const uint32_t a[4] = {pair(r, 2 * t), pair(r + 8, 2 * t), pair(r, 2 * t + 8), pair(r + 8, 2 * t + 8)};
  float d[9][4];
  for (int i = 0; i < 9; ++i)
    for (int e = 0; e < 4; ++e) d[i][e] = 0.f;
  fence_acc(d);
  wg_fence();
  wgmma_n72(d, a, desc_core_tile(Bs));
  wgmma_n72(d, a, desc_core_tile(Bs));  // accumulates: D = 2 A B
  wg_commit();
  wg_wait<0>();
  fence_acc(d);
  for (int i = 0; i < 9; ++i)
    for (int e = 0; e < 4; ++e) D[(r + 8 * (e >> 1)) * 72 + 8 * i + 2 * t + (e & 1)] = d[i][e];
  if (tid == 0) *done = 1;
#endif
}
}  // namespace

// D (64 x 72, f32) = 2 A (64 x 16) B (16 x 72), all row-major on the device; *done = 1 when the
// wgmma path was compiled in. Returns the launch's cudaError_t.
extern "C" int pr_wgmma_probe(const void* A, const void* B, float* D, int* done) {
  probe_kernel<<<1, 128>>>(static_cast<const __nv_bfloat16*>(A), static_cast<const __nv_bfloat16*>(B), D, done);
  return static_cast<int>(cudaGetLastError());
}
