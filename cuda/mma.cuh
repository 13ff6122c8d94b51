// Warp-level tensor-core building blocks (sm_80+): ldmatrix, mma.m16n8k16 (bf16 in, f32 accumulate),
// movmatrix, cp.async. Fragment layouts, with g = lane / 4 and t = lane % 4 (PTX ISA, "Matrix
// fragments for mma.m16n8k16"):
//   A 16x16 (4 regs): {A[g][2t..], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]}
//   B 16x8  (2 regs): {B[2t..][g], B[2t+8..][g]}
//   C 16x8  (4 f32):  {C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]}
// A 32-bit register holding two bf16 keeps the lower-index element in its low half.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

namespace pr {
namespace mma {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lane l gives the row address of matrix l / 8, row l % 8.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

// Same, each matrix transposed on delivery.
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

// Two transposed 8x8 matrices; lanes 0-15 give the row addresses.
__device__ __forceinline__ void ldsm_x2_t(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row)));
}

// Elementwise product of two bf16 pairs, rounded to bf16.
__device__ __forceinline__ uint32_t mul_bf16x2(uint32_t x, uint32_t y) {
  const __nv_bfloat162 p = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&x), *reinterpret_cast<const __nv_bfloat162*>(&y));
  return *reinterpret_cast<const uint32_t*>(&p);
}

// d += a * b
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Transpose of an 8x8 b16 matrix held one row pair per thread (C-fragment order).
__device__ __forceinline__ uint32_t movmatrix_t(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// A 16x8 f32 accumulator tile C[k][n] as the B operand (k16 x n8) of a following mma.
__device__ __forceinline__ void c_to_b(const float (&c)[4], uint32_t& b0, uint32_t& b1) {
  b0 = movmatrix_t(pack_bf16(c[0], c[1]));
  b1 = movmatrix_t(pack_bf16(c[2], c[3]));
}

// 16-byte global -> shared copy; src_bytes = 0 writes zeros (src must still be a valid address).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Waits until at most N of this thread's most recent cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Both halves of a bf16x2 register set to the same bf16 value.
__device__ __forceinline__ uint32_t splat_bf16(__nv_bfloat16 x) {
  const uint32_t u = *reinterpret_cast<const unsigned short*>(&x);
  return u | (u << 16);
}

// ---------------------------------------------------------------------------------------------
// Warpgroup mma (sm_90a only: guard uses with PR_WGMMA; -DPR_NO_WGMMA builds the mma.sync paths
// for sm_90a too, to test them on an H100). A 16x16 A fragment per warp in the registers (the
// mma.m16n8k16 A layout above), B from shared memory through a descriptor, f32 accumulators
// d[nt][e] in the C-fragment layout above for the warp's 16 rows of the m64 tile.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && !defined(PR_NO_WGMMA)
#define PR_WGMMA 1
#endif

// One 16 x 72 bf16 B tile (k rows x n columns) in the no-swizzle ("interleave") core-matrix
// layout wgmma reads: 8 k rows x 8 n columns per 128-byte core, 16 bytes per k row; the two k halves
// of the tile 9 cores (1152 bytes) apart, the nine n groups 128 bytes apart.
constexpr int kCoreTileElems = 16 * 72;
__host__ __device__ constexpr int core_offset(int r16, int c) {
  return ((r16 >> 3) * 9 + (c >> 3)) * 64 + (r16 & 7) * 8 + (c & 7);
}

// A 64-column K-major B operand (n rows of 8 k-contiguous bf16 per 16 bytes): core (n / 8, k / 8) at
// 128 (8 (n / 8) + k / 8) bytes, so the k halves of a k16 step are 128 bytes apart (leading byte
// offset) and the n groups 1024 (stride byte offset); a k16 step starts 256 bytes further on.
__host__ __device__ constexpr int core_k_offset(int n, int k) { return ((n >> 3) * 8 + (k >> 3)) * 64 + (n & 7) * 8 + (k & 7); }

#ifdef PR_WGMMA
// Shared-memory matrix descriptor, no swizzle: start address, leading (k) and stride (m/n) byte
// offsets between cores, each in 16-byte units.
__device__ __forceinline__ uint64_t smem_desc(const void* tile, uint32_t lead_bytes, uint32_t stride_bytes) {
  return static_cast<uint64_t>((smem_addr(tile) & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lead_bytes >> 4) << 16) |
         (static_cast<uint64_t>(stride_bytes >> 4) << 32);
}
// A core_offset tile at `tile` (16-byte aligned).
__device__ __forceinline__ uint64_t desc_core_tile(const void* tile) { return smem_desc(tile, 1152, 128); }
// A core_k_offset operand at `tile` (the k16 step's first core).
__device__ __forceinline__ uint64_t desc_k64_tile(const void* tile) { return smem_desc(tile, 128, 1024); }

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Orders this thread's generic-proxy shared-memory writes (st.shared, cp.async) before later
// wgmma reads of them (async proxy); a barrier must follow for other threads' writes.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Keeps the compiler from moving accumulator accesses across a wgmma wait or fence.
template <int N>
__device__ __forceinline__ void fence_acc(float (&d)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
}

// Waits for every wgmma group of this thread and fences its N accumulator tiles, before other
// instructions read or write them.
template <int N>
__device__ __forceinline__ void wg_wait_all(float (&d)[N][9][4]) {
  wg_wait<0>();
#pragma unroll
  for (int i = 0; i < N; ++i) fence_acc(d[i]);
}

// d (m64 x n72, this warp's 16 rows) += a (registers) * B (k16 x n72, MN-major core tile)
__device__ __forceinline__ void wgmma_n72(float (&d)[9][4], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %41, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n72k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "
      "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35}, "
      "{%36, %37, %38, %39}, %40, p, 1, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),
        "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]),
        "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]),
        "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]),
        "+f"(d[8][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1)
      : "memory");
}

// d (m64 x n64, this warp's 16 rows) += a (registers) * B (k16 x n64, K-major, desc_k64_tile)
__device__ __forceinline__ void wgmma_n64_kmajor(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),
        "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]),
        "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]),
        "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1)
      : "memory");
}
#endif

}  // namespace mma
}  // namespace pr
