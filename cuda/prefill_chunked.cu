// PowerRetention prefill in three kernels over long chunks, on tensor cores (bf16, Dk = Dv = 64).
//
// The one-kernel prefill (prefill_tc.cu) walks 64-token chunks in order inside 128 blocks of 8
// value columns each: every block redoes the chunk's attention and reloads its operands, and the
// chunk loop is one long dependency chain. Here the sequence is cut into chunks of T tokens
// (T a multiple of 256 up to 2048: the chunk_size hint where it is one, else 512) and the work is
// split in three launches, none of which walks the sequence with tensor-core work in its chain:
//
// 1. deltas: grid (10 x chunks, Hkv, B), 8 warps. Every chunk's own contribution to the state at its
//    end, independently of the others:
//      Delta_n[(a, b), c] = w_ab sum_j (k_ja gamma_j) k_jb x_j[c],  gamma_j = e^{G_T - G_j},
//    with x_j = (v_j, 1, 0...): column Dv carries the sum of keys, w_ab the compact weights (2
//    above the diagonal, 1 on it, 0 below). Written to the chunk's workspace slot in bf16.
// 2. scan: P_0 = the past state, P_{n+1} = e^{G_T(n)} P_n + Delta_n, elementwise in f32, one thread
//    per 8 state elements; each slot's delta is replaced by the state before its chunk (bf16), the
//    last state goes to present_* in f32.
// 3. query: grid (S/256, Hq, B), 8 warps of 32 query rows. For its chunk it reads the state before
//    the chunk from the workspace (streamed through shared memory in stages of 64 rows) and computes
//      acc_i = scale^2 e^{G_i} sum_(a, b >= a) q_ia q_ib P[(a, b), :]
//    as mma's of the queries scaled per row by q_ia (bf16, held in registers) with the state rows
//    of a; then the attention to the chunk's keys j <= i with weights (|scale q.k| + eps)^2
//    e^{G_i - G_j} (f32, rounded to bf16 for the W x mma) is added into the same accumulators.
//    Column Dv of acc is the denominator, so y_i = acc_i[:Dv] / acc_i[Dv].
//
// Tensor cores: on sm_90a the deltas kernel and the query kernel issue wgmma (m64 n72 k16 and, for
// the query kernel's q.k, m64 n64 k16; A from registers, B from shared memory); on sm_80-89 (and
// with -DPR_NO_WGMMA) the same steps run as mma.sync m16n8k16.
//
// Workspace: P (B, Hkv, chunks of a segment, 160 tiles of 16 x 72) bf16, the padded state layout
// below with every 16-row tile in the core-matrix order of mma::core_offset (what wgmma reads from
// shared memory, so a stage is one contiguous copy), and the chunk decays e^{G_T} (B, Hkv, chunks)
// f32; long sequences run in segments so that P stays under kWorkspaceCap (256 MiB), see
// prefill_chunked.
// Padded rows: a-major; a has the 16-row b tiles m = floor(a/16) .. 3 (rows b < a are zero), so
// a state row tile is always 16 consecutive b values: 160 tiles = 2560 rows instead of D = 2080.
//
// Precision: keys, queries and values are bf16 inputs; q_ia q_ib, k_ja gamma_j, their products
// with v, the stored states and the weights W are rounded to bf16 where they enter an mma (relative
// 2^-9 per element, accumulated in f32), the package's own precision (it keeps state and phi in
// bf16). Each chunk's delta is rounded to bf16 once (relative 2^-9 of that chunk's own share; the
// errors of different chunks do not compound, as the scan that sums them is f32); present_state and
// the gates are f32 (gate sums f64).
//
// Race-freedom: every shared buffer written by one thread and read by another is separated by a
// barrier; cp.async stages are reused only after the barrier that follows their last read. In-place
// calls (present_* aliasing past_*): the scan thread that reads an element of the past state is the
// only one that writes it, after its last chunk.
#include <math.h>

#include <algorithm>

#include "common.cuh"
#include "mma.cuh"
#include "prefill_chunked.cuh"

namespace pr {
namespace chunked {
namespace {

using bf16 = __nv_bfloat16;
constexpr int DK = 64, DV = 64;
constexpr int NX = DV + 8;    // extended columns: DV values, the sum of keys, 7 zeros
constexpr int kRows = 2560;   // padded state rows
constexpr int D = DK * (DK + 1) / 2;
constexpr int KP = DK + 8;    // row pitch (bf16) of query/key tiles: conflict-free ldmatrix
constexpr int kTok = 64;      // tokens per key/value tile
constexpr int kQRows = 256;   // query rows per query block
constexpr int kDefaultT = 512;  // fastest of 256..2048 at 2k-128k on H100 (benches/RESULTS.md)

// b tiles of the values a' < a in the padded layout
__host__ __device__ constexpr int tiles_before(int a) {
  return 16 * (4 * (a >> 4) - (a >> 4) * ((a >> 4) - 1) / 2) + (a & 15) * (4 - (a >> 4));
}
static_assert(tiles_before(DK) * 16 == kRows, "padded rows");

__device__ __forceinline__ int padded_row(int a, int b) { return 16 * tiles_before(a) + b - 16 * (a >> 4); }

// cp.async of the rows [t0, t0 + ROWS) of head h of a (B, S, H, W) bf16 tensor, columns
// [c0, c0 + 8 NSEG), into dst (row pitch `pitch`); rows at or past S are zero-filled.
template <int NT, int ROWS, int NSEG>
__device__ __forceinline__ void copy_rows(bf16* dst, int pitch, const bf16* src, int64_t bb, int64_t S, int H, int h,
                                          int W, int c0, int64_t t0) {
  for (int e = threadIdx.x; e < ROWS * NSEG; e += NT) {
    const int j = e / NSEG, s8 = e % NSEG;
    const bool ok = t0 + j < S;
    const bf16* from = ok ? src + ((bb * S + t0 + j) * H + h) * W + c0 + 8 * s8 : src;
    mma::cp_async16(dst + j * pitch + 8 * s8, from, ok ? 16 : 0);
  }
}

// Inclusive f64 scan of the log gates of tokens c0 .. c0 + L - 1 (L a multiple of NT; tokens past S
// count 0). Each thread takes L/NT consecutive tokens; local[i] receives the thread's own running
// sums, to which the returned offset is to be added. *total gets the sum over all L tokens.
template <int NT, int MAXPER>
__device__ __forceinline__ double gate_scan(const PrPrefillParams& p, const PrefillShape& sh, int64_t bb, int hk,
                                            int64_t c0, int L, double (&local)[MAXPER], double* wtot, double* total) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, per = L / NT;
  double run = 0.0;
#pragma unroll
  for (int i = 0; i < MAXPER; ++i) {
    if (i < per) {
      const int64_t tok = c0 + static_cast<int64_t>(tid) * per + i;
      if (p.log_gate != nullptr && tok < sh.S) run += p.log_gate[(bb * sh.S + tok) * sh.Hkv + hk];
    }
    local[i] = run;
  }
  double incl = run;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double u = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += u;
  }
  if (lane == 31) wtot[warp] = incl;
  __syncthreads();
  double off = incl - run, tot = 0.0;
#pragma unroll
  for (int w = 0; w < NT / 32; ++w) {
    const double x = wtot[w];
    if (w < warp) off += x;
    tot += x;
  }
  *total = tot;
  __syncthreads();  // wtot is reused by the next call
  return off;
}

// ---------------------------------------------------------------------------------------------
// State and value tiles of 16 rows x 72 extended columns are kept (in the workspace and in shared
// memory) in the core-matrix layout of mma::core_offset, which wgmma reads directly; ldmatrix
// reads it just as well (a matrix's 8 rows are one 128-byte core).
constexpr int kTileE = mma::kCoreTileElems;
static_assert(kTileE == 16 * NX, "a core tile is 16 rows of the extended columns");

#ifndef PR_WGMMA
// B fragments (mma.m16n8k16) of a 16 x 72 core tile.
__device__ __forceinline__ void load_b_core(uint32_t (&B)[9][2], const bf16* tile) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int pp = 0; pp < 4; ++pp) {
    uint32_t x[4];
    mma::ldsm_x4_t(x, tile + mma::core_offset(lane & 15, 16 * pp + (lane >> 4) * 8));
    B[2 * pp][0] = x[0];
    B[2 * pp][1] = x[1];
    B[2 * pp + 1][0] = x[2];
    B[2 * pp + 1][1] = x[3];
  }
  mma::ldsm_x2_t(B[8], tile + mma::core_offset(lane & 15, DV));
}
#endif

// cp.async of the rows [t0, t0 + kTok) of head h of a (B, S, H, 64) bf16 tensor, 16 bytes (8
// columns) at a time, element (row j, column c) to dst + place(j, c); rows at or past S are
// zero-filled.
template <int NT, class Place>
__device__ __forceinline__ void copy_rows_placed(bf16* dst, const bf16* src, int64_t bb, int64_t S, int H, int h,
                                                 int64_t t0, Place place) {
  static_assert(DK == DV, "keys and values share the row width");
  for (int e = threadIdx.x; e < kTok * (DV / 8); e += NT) {
    const int j = e / (DV / 8), s8 = e % (DV / 8);
    const bool ok = t0 + j < S;
    const bf16* from = ok ? src + ((bb * S + t0 + j) * H + h) * DV + 8 * s8 : src;
    mma::cp_async16(dst + place(j, 8 * s8), from, ok ? 16 : 0);
  }
}

// Value rows into kTok / 16 consecutive core tiles (columns 0 .. DV - 1).
template <int NT>
__device__ __forceinline__ void copy_values_core(bf16* dst, const bf16* src, int64_t bb, int64_t S, int H, int h,
                                                 int64_t t0) {
  copy_rows_placed<NT>(dst, src, bb, S, H, h, t0,
                       [](int j, int c) { return (j >> 4) * kTileE + mma::core_offset(j & 15, c); });
}

// Key rows into the K-major core layout of mma::core_k_offset (keys as n, key dimensions as k).
template <int NT>
__device__ __forceinline__ void copy_keys_core(bf16* dst, const bf16* src, int64_t bb, int64_t S, int H, int h,
                                               int64_t t0) {
  copy_rows_placed<NT>(dst, src, bb, S, H, h, t0, [](int j, int c) { return mma::core_k_offset(j, c); });
}

// Value-tile columns DV.. of nbuf buffers of kTok rows: 1 (the sum of keys / the denominator), then
// zeros; the copies never overwrite them.
template <int NT>
__device__ __forceinline__ void init_value_ext(bf16* Vs, int nbuf) {
  for (int e = threadIdx.x; e < nbuf * kTok * 8; e += NT) {
    const int j = e >> 3, c = e & 7;
    Vs[(j >> 4) * kTileE + mma::core_offset(j & 15, DV + c)] = __float2bfloat16(c == 0 ? 1.f : 0.f);
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel 1: chunk deltas. Block (kDBlocks n + tg) computes, for chunk n of the segment and the 8 warp
// tasks 8 tg .. 8 tg + 7 of the kTasks, the chunk's own contribution to the state at its end,
//   Delta_n[(a, b), c] = w_ab sum_j gamma_j k_ja k_jb x_j[c],  gamma_j = e^{G_T - G_j},
// into P slot n (bf16, padded layout). Warp task (m, a0) owns the row tiles (a, b tile m) of the
// kDA values a = a0 .. a0 + kDA - 1 (all a <= 16 m + 15) and all 72 columns: the A operand is the key
// tile's columns 16m.. transposed (one ldmatrix per 16 tokens, shared by the task's values), scaled per
// token by k_ja gamma_j; the B operand is the extended value tile, shared by every task.
// Values a per warp task: two (72 accumulators, 128 registers, two blocks an SM) ran 4 % faster than
// four (144 accumulators, one block an SM) on H100 (benches/RESULTS.md, eighth session).
constexpr int kDA = 2;
constexpr int kDThreads = 256, kTasks = 160 / kDA, kDBlocks = kTasks / (kDThreads / 32);
constexpr int kDMinBlocks = kDA <= 2 ? 2 : 1;
constexpr int KGP = kTok + 8;  // pitch of a warp's k_ja gamma_j rows
constexpr int kMaxT = 2048;
constexpr int kMaxPerD = kMaxT / kDThreads;
// Three tile buffers, one tile ahead: the buffer a copy overwrites was last read two tiles earlier,
// so neither the ldmatrix reads nor the asynchronous wgmma reads of it can still be pending.
constexpr int kDBuf = 3;
struct DCfg {
  static constexpr int oK = 0;                             // bf16 [kDBuf][kTok][KP]
  static constexpr int oV = oK + kDBuf * kTok * KP * 2;    // bf16 [kDBuf][kTok / 16 core tiles]
  static constexpr int oKG = oV + kDBuf * kTok * NX * 2;   // bf16 [8 warps][kDA][KGP]
  static constexpr int oW = oKG + 8 * kDA * KGP * 2;  // f64 [8] warp totals
  static constexpr int oGam = oW + 8 * 8;             // f32 [T] gamma_j of the chunk
  // After the last tile, everything above is reused as the warps' output tiles, bf16 [8][kDA][16][NX]:
  // the delta leaves in 16-byte stores of whole rows rather than 72 scattered 4-byte ones a thread.
  static constexpr int kOut = kDA * 16 * NX * 2;
  static size_t bytes(int T) { return std::max<size_t>(oGam + static_cast<size_t>(T) * 4, 8 * kOut); }
};

// Warp task -> (b tile m, first value a0): tile m has 16 (m + 1) / kDA tasks of kDA values each.
__device__ __forceinline__ void task_tile(int task, int& m, int& a0) {
  m = 0;
  while (m < 3 && task >= 8 * (m + 1) * (m + 2) / kDA) ++m;
  a0 = kDA * (task - 8 * m * (m + 1) / kDA);
}

__global__ void __launch_bounds__(kDThreads, kDMinBlocks) retention_prefill_deltas_kernel(const PrPrefillParams p, const PrefillShape sh,
                                                                               int64_t tok0, int T, int nchunks,
                                                                               bf16* __restrict__ P, float* __restrict__ decays) {
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* Ks = reinterpret_cast<bf16*>(smem + DCfg::oK);
  bf16* Vs = reinterpret_cast<bf16*>(smem + DCfg::oV);
  double* wtot = reinterpret_cast<double*>(smem + DCfg::oW);
  float* gam = reinterpret_cast<float*>(smem + DCfg::oGam);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int n = blockIdx.x / kDBlocks, tg = blockIdx.x % kDBlocks, hk = blockIdx.y;
  const int64_t bb = blockIdx.z, bh = bb * sh.Hkv + hk, S = sh.S;
  const int64_t c0 = tok0 + static_cast<int64_t>(n) * T;
  int m, a0;
  task_tile(kTasks / kDBlocks * tg + warp, m, a0);
  bf16* KG = reinterpret_cast<bf16*>(smem + DCfg::oKG) + warp * kDA * KGP;
  const bf16* kptr = static_cast<const bf16*>(p.key);
  const bf16* vptr = static_cast<const bf16*>(p.value);
  const int krow = (lane & 7) + (lane >> 4) * 8, kcol = ((lane >> 3) & 1) * 8;

  init_value_ext<kDThreads>(Vs, kDBuf);

  const int ntiles = static_cast<int>((min(S - c0, static_cast<int64_t>(T)) + kTok - 1) / kTok);  // c0 < S
  auto issue_tile = [&](int kt, int buf) {
    const int64_t j0 = c0 + static_cast<int64_t>(kt) * kTok;
    copy_rows<kDThreads, kTok, DK / 8>(Ks + buf * kTok * KP, KP, kptr, bb, S, sh.Hkv, hk, DK, 0, j0);
    copy_values_core<kDThreads>(Vs + buf * kTok * NX, vptr, bb, S, sh.Hkv, hk, j0);
  };
  issue_tile(0, 0);
  mma::cp_async_commit();

  {  // gamma_j = e^{G_T - G_j} and the chunk decay e^{G_T}
    double local[kMaxPerD], total;
    const double off = gate_scan<kDThreads, kMaxPerD>(p, sh, bb, hk, c0, T, local, wtot, &total);
    const int per = T / kDThreads;
#pragma unroll
    for (int i = 0; i < kMaxPerD; ++i)
      if (i < per) gam[tid * per + i] = expf(static_cast<float>(total - (local[i] + off)));
    if (tg == 0 && tid == 0) decays[bh * nchunks + n] = expf(static_cast<float>(total));
  }

  float acc[kDA][9][4];
#pragma unroll
  for (int i = 0; i < kDA; ++i)
#pragma unroll
    for (int nt = 0; nt < 9; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][nt][e] = 0.f;
#ifdef PR_WGMMA
#pragma unroll
  for (int i = 0; i < kDA; ++i) mma::fence_acc(acc[i]);
#endif

  for (int kt = 0; kt < ntiles; ++kt) {
    const int buf = kt % kDBuf;
    mma::cp_async_wait_all();
#ifdef PR_WGMMA
    mma::fence_proxy_async();  // this thread's copies (and value columns) before the wgmma reads
#endif
    __syncthreads();  // tile kt and gam landed
    if (kt + 1 < ntiles) {
      issue_tile(kt + 1, (kt + 1) % kDBuf);
      mma::cp_async_commit();
    }
    const bf16* Kc = Ks + buf * kTok * KP;
    const bf16* Vc = Vs + buf * kTok * NX;
    // this warp's k_ja gamma_j, as bf16 pairs of consecutive tokens
#pragma unroll
    for (int e = lane; e < kDA * kTok / 2; e += 32) {
      const int ai = e % kDA, j = 2 * (e / kDA), jg = kt * kTok + j;
      *reinterpret_cast<uint32_t*>(KG + ai * KGP + j) =
          mma::pack_bf16(bf(Kc[j * KP + a0 + ai]) * gam[jg], bf(Kc[(j + 1) * KP + a0 + ai]) * gam[jg + 1]);
    }
    __syncwarp();
#pragma unroll
    for (int s = 0; s < kTok / 16; ++s) {
      uint32_t A[4];  // K^T[b tile m][tokens 16s..]
      mma::ldsm_x4_t(A, Kc + (16 * s + krow) * KP + 16 * m + kcol);
      uint32_t As[kDA][4];
#pragma unroll
      for (int ai = 0; ai < kDA; ++ai) {
        const bf16* kg = KG + ai * KGP + 16 * s + 2 * t;
        const uint32_t s0 = *reinterpret_cast<const uint32_t*>(kg), s1 = *reinterpret_cast<const uint32_t*>(kg + 8);
        As[ai][0] = mma::mul_bf16x2(A[0], s0);
        As[ai][1] = mma::mul_bf16x2(A[1], s0);
        As[ai][2] = mma::mul_bf16x2(A[2], s1);
        As[ai][3] = mma::mul_bf16x2(A[3], s1);
      }
#ifdef PR_WGMMA
      // The warpgroup's 4 warps (4 tasks) share the value tile: one m64 x n72 wgmma per value a.
      // One group stays in flight while the next A fragments are formed.
      const uint64_t db = mma::desc_core_tile(Vc + s * kTileE);
      mma::wg_fence();
#pragma unroll
      for (int ai = 0; ai < kDA; ++ai) mma::wgmma_n72(acc[ai], As[ai], db);
      mma::wg_commit();
      mma::wg_wait<1>();
#else
      uint32_t B[9][2];
      load_b_core(B, Vc + s * kTileE);
#pragma unroll
      for (int ai = 0; ai < kDA; ++ai)
#pragma unroll
        for (int nt = 0; nt < 9; ++nt) mma::mma_bf16(acc[ai][nt], As[ai], B[nt][0], B[nt][1]);
#endif
    }
    __syncwarp();  // KG is rewritten for the next tile
  }
#ifdef PR_WGMMA
  mma::wg_wait_all(acc);
#endif

  __syncthreads();  // every warp is done with the tiles, KG and gam: the output tiles reuse them
  bf16* O = reinterpret_cast<bf16*>(smem) + warp * (DCfg::kOut / 2);
#pragma unroll
  for (int ai = 0; ai < kDA; ++ai)
#pragma unroll
    for (int h8 = 0; h8 < 2; ++h8) {
      const int r = g + 8 * h8;
      const float wt = key_weight(a0 + ai, 16 * m + r);
      bf16* row = O + (16 * ai + r) * NX + 2 * t;  // banks 4g + t + 4nt: conflict-free
#pragma unroll
      for (int nt = 0; nt < 9; ++nt)
        *reinterpret_cast<__nv_bfloat162*>(row + 8 * nt) =
            __floats2bfloat162_rn(wt * acc[ai][nt][2 * h8], wt * acc[ai][nt][2 * h8 + 1]);
    }
  __syncwarp();
  bf16* Pn = P + ((bh * nchunks + n) * kRows) * NX;
  constexpr int kVecs = kTileE / 8;  // the 16 rows of one a are one core tile of the padded rows
#pragma unroll
  for (int ai = 0; ai < kDA; ++ai) {
    uint4* dst = reinterpret_cast<uint4*>(Pn + static_cast<int64_t>(padded_row(a0 + ai, 16 * m)) * NX);
    for (int e = lane; e < kVecs; e += 32) {  // e: 8 consecutive columns of one row of one core
      const int core = e >> 3, r16 = 8 * (core / 9) + (e & 7), c = 8 * (core % 9);
      dst[e] = *reinterpret_cast<const uint4*>(O + (16 * ai + r16) * NX + c);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel 2: scan. P_0 = the past state, P_{n+1} = e^{G_T(n)} P_n + Delta_n, in f32, one thread per 8
// consecutive elements of the padded state of a head. Slot n holds Delta_n on entry and P_n (bf16) on
// exit; P_N goes to present_* (or the carry). The padding rows b < a stay zero.
constexpr int kScanThreads = 256, kScanVec = 8, kScanAhead = 4;
constexpr int kScanPerHead = kRows * NX / kScanVec;

__global__ void __launch_bounds__(kScanThreads) retention_prefill_scan_kernel(const PrPrefillParams p, int nchunks,
                                                                             bf16* __restrict__ P,
                                                                             const float* __restrict__ decays) {
  const int v = blockIdx.x * kScanThreads + threadIdx.x;
  if (v >= kScanPerHead) return;
  const int64_t bh = static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y;
  // v: 8 consecutive columns of one row of one core of a 16-row tile (mma::core_offset)
  const int tile = v / (kTileE / kScanVec), e = v % (kTileE / kScanVec), core = e >> 3;
  const int r = 16 * tile + 8 * (core / 9) + (e & 7), col0 = 8 * (core % 9);
  int a = 0;
  while (a + 1 < DK && 16 * tiles_before(a + 1) <= r) ++a;
  const int b = r - 16 * tiles_before(a) + 16 * (a >> 4);
  const bool real = b >= a;
  const int64_t crw = real ? (bh * D + crow<DK>(a, b)) : 0;

  float st[kScanVec];
#pragma unroll
  for (int i = 0; i < kScanVec; ++i) {
    const int col = col0 + i;
    float x = 0.f;
    if (real && p.past_state != nullptr && col < DV) x = p.past_state[crw * DV + col];
    if (real && p.past_sum_of_keys != nullptr && col == DV) x = p.past_sum_of_keys[crw];
    st[i] = x;
  }

  uint4* base = reinterpret_cast<uint4*>(P + bh * nchunks * static_cast<int64_t>(kRows) * NX) + v;
  constexpr int64_t kSlot = static_cast<int64_t>(kRows) * NX / kScanVec;  // uint4 per slot
  const float* dec = decays + bh * nchunks;
  for (int n0 = 0; n0 < nchunks; n0 += kScanAhead) {
    uint4 d[kScanAhead];  // the next deltas, loaded before any store so the loads overlap
#pragma unroll
    for (int u = 0; u < kScanAhead; ++u)
      if (n0 + u < nchunks) d[u] = base[(n0 + u) * kSlot];
#pragma unroll
    for (int u = 0; u < kScanAhead; ++u) {
      if (n0 + u >= nchunks) break;
      uint4 out;
      uint32_t* o = reinterpret_cast<uint32_t*>(&out);
      const __nv_bfloat162* dd = reinterpret_cast<const __nv_bfloat162*>(&d[u]);
      const float f = dec[n0 + u];
#pragma unroll
      for (int i = 0; i < kScanVec / 2; ++i) {
        o[i] = mma::pack_bf16(st[2 * i], st[2 * i + 1]);
        const float2 x = __bfloat1622float2(dd[i]);
        st[2 * i] = fmaf(f, st[2 * i], x.x);
        st[2 * i + 1] = fmaf(f, st[2 * i + 1], x.y);
      }
      base[(n0 + u) * kSlot] = out;
    }
  }

  if (!real) return;
#pragma unroll
  for (int i = 0; i < kScanVec; ++i) {
    const int col = col0 + i;
    if (col < DV && p.present_state != nullptr) p.present_state[crw * DV + col] = st[i];
    if (col == DV && p.present_sum_of_keys != nullptr) p.present_sum_of_keys[crw] = st[i];
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel 3: query
// State stages of 64 rows (128 ran 1 % faster on H100 but has passed the tests only with the
// mma.sync attention part: benches/RESULTS.md, ninth session) in 4 buffers, 2 stages ahead: the
// buffer a copy overwrites was last read two stages earlier, so neither ldmatrix nor wgmma reads of
// it are pending at that stage's barrier (with wgmma one group stays in flight across it).
constexpr int kQThreads = 256, kNst = 4, kAhead = 2, kStRows = 64, kKsPerStage = kStRows / 16;
static_assert(kRows % kStRows == 0 && kStRows % 16 == 0, "whole k-steps per stage, whole stages");
static_assert(kKsPerStage >= 2 && kNst - kAhead >= 2, "the overwritten buffer's wgmma groups are done");
constexpr int kMaxPerQ = kMaxT / kQThreads;
struct QCfg {
  static constexpr int oQ = 0;                             // bf16 [kQRows][KP]
  static constexpr int oSt = oQ + kQRows * KP * 2;         // bf16 [kNst][kStRows / 16 core tiles]
  static constexpr int oK = oSt + kNst * kStRows * NX * 2;  // bf16 [2][kTok][KP]
  static constexpr int oV = oK + 2 * kTok * KP * 2;        // bf16 [2][kTok / 16 core tiles]
  static constexpr int oW = oV + 2 * kTok * NX * 2;        // f64 [8] warp totals
  static constexpr int oGd = oW + 8 * 8;                   // f64 [<= T] cumulative gates from the chunk start
  static size_t bytes(int T) { return oGd + static_cast<size_t>(T) * 8; }
};

__global__ void __launch_bounds__(kQThreads, 1) retention_prefill_query_kernel(const PrPrefillParams p, const PrefillShape sh,
                                                                              int64_t tok0, int T, int nchunks,
                                                                              const bf16* __restrict__ P) {
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* Qs = reinterpret_cast<bf16*>(smem + QCfg::oQ);
  bf16* St = reinterpret_cast<bf16*>(smem + QCfg::oSt);
  bf16* Ks = reinterpret_cast<bf16*>(smem + QCfg::oK);
  bf16* Vs = reinterpret_cast<bf16*>(smem + QCfg::oV);
  double* wtot = reinterpret_cast<double*>(smem + QCfg::oW);
  double* Gd = reinterpret_cast<double*>(smem + QCfg::oGd);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int hq = blockIdx.y, hk = hq / sh.r;
  const int64_t bb = blockIdx.z, bh = bb * sh.Hkv + hk, S = sh.S;
  const int64_t r0 = tok0 + static_cast<int64_t>(blockIdx.x) * kQRows;
  const int n = static_cast<int>(blockIdx.x) * kQRows / T;
  const int64_t c0 = tok0 + static_cast<int64_t>(n) * T;
  const int L = static_cast<int>(r0 - c0) + kQRows;  // gates needed: chunk start .. last row
  const bf16* qptr = static_cast<const bf16*>(p.query);
  const bf16* kptr = static_cast<const bf16*>(p.key);
  const bf16* vptr = static_cast<const bf16*>(p.value);
  bf16* out = static_cast<bf16*>(p.output);
  const bf16* Pn = P + ((bh * nchunks + n) * kRows) * NX;
  const int arow = (lane & 7) + ((lane >> 3) & 1) * 8, acol = (lane >> 4) * 8;
#ifndef PR_WGMMA
  const int krow = (lane & 7) + (lane >> 4) * 8, kcol = ((lane >> 3) & 1) * 8;
#endif
  const int wr = 32 * warp;  // this warp's first row in the block

  init_value_ext<kQThreads>(Vs, 2);

  copy_rows<kQThreads, kQRows, DK / 8>(Qs, KP, qptr, bb, S, sh.Hq, hq, DK, 0, r0);
  constexpr int nstages = kRows / kStRows;
  auto issue_stage = [&](int st) {
    if (st >= nstages) return;
    const bf16* src = Pn + static_cast<int64_t>(st) * kStRows * NX;
    bf16* dst = St + (st % kNst) * kStRows * NX;
    for (int e = tid; e < kStRows * NX / 8; e += kQThreads) mma::cp_async16(dst + 8 * e, src + 8 * e, 16);
  };
#pragma unroll
  for (int st = 0; st < kAhead; ++st) {
    issue_stage(st);
    mma::cp_async_commit();
  }

  {
    double local[kMaxPerQ], total;
    const double off = gate_scan<kQThreads, kMaxPerQ>(p, sh, bb, hk, c0, L, local, wtot, &total);
    const int per = L / kQThreads;
#pragma unroll
    for (int i = 0; i < kMaxPerQ; ++i)
      if (i < per) Gd[tid * per + i] = local[i] + off;
  }

  auto begin_stage = [&](int st) {
    mma::cp_async_wait_group<kAhead - 1>();
#ifdef PR_WGMMA
    mma::fence_proxy_async();  // this thread's copies before the wgmma reads of the stage
#endif
    __syncthreads();
    issue_stage(st + kAhead);
    mma::cp_async_commit();
  };
  begin_stage(0);  // also the queries and the gates

  uint32_t Qf[2][4][4];  // A fragments: rows wr + 16 qt .., Dk columns 16 kt ..
#pragma unroll
  for (int qt = 0; qt < 2; ++qt)
#pragma unroll
    for (int kt = 0; kt < 4; ++kt) mma::ldsm_x4(Qf[qt][kt], Qs + (wr + 16 * qt + arow) * KP + 16 * kt + acol);

  float acc[2][9][4];
#pragma unroll
  for (int qt = 0; qt < 2; ++qt)
#pragma unroll
    for (int nt = 0; nt < 9; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[qt][nt][e] = 0.f;
#ifdef PR_WGMMA
  mma::fence_acc(acc[0]);
  mma::fence_acc(acc[1]);
#endif

  // State part: k-step ks = (a, b tile m) in padded-row order. With wgmma, the block's two
  // warpgroups each issue two m64 x n72 wgmma's a k-step (query tiles qt of their 4 warps) with the
  // stage's state tile as B; one group stays in flight while the next A fragments are formed. The
  // a loop is unrolled twice so that the A registers of the group in flight are never rewritten.
#pragma unroll
  for (int qa = 0; qa < 4; ++qa) {
#pragma unroll 2
    for (int ar = 0; ar < 16; ++ar) {
      const int a = 16 * qa + ar;
      uint32_t sc[2][2];  // q_ia for rows g, g + 8 of each query tile
#pragma unroll
      for (int qt = 0; qt < 2; ++qt)
#pragma unroll
        for (int h8 = 0; h8 < 2; ++h8) sc[qt][h8] = mma::splat_bf16(Qs[(wr + 16 * qt + g + 8 * h8) * KP + a]);
#pragma unroll
      for (int m = qa; m < 4; ++m) {
        const int ks = tiles_before(a) + m - qa;
        if (ks > 0 && ks % kKsPerStage == 0) begin_stage(ks / kKsPerStage);
        const bf16* tile = St + ((ks / kKsPerStage) % kNst) * kStRows * NX + (ks % kKsPerStage) * kTileE;
        uint32_t Ap[2][4];
#pragma unroll
        for (int qt = 0; qt < 2; ++qt) {
          Ap[qt][0] = mma::mul_bf16x2(Qf[qt][m][0], sc[qt][0]);
          Ap[qt][1] = mma::mul_bf16x2(Qf[qt][m][1], sc[qt][1]);
          Ap[qt][2] = mma::mul_bf16x2(Qf[qt][m][2], sc[qt][0]);
          Ap[qt][3] = mma::mul_bf16x2(Qf[qt][m][3], sc[qt][1]);
        }
#ifdef PR_WGMMA
        const uint64_t db = mma::desc_core_tile(tile);
        mma::wg_fence();
        mma::wgmma_n72(acc[0], Ap[0], db);
        mma::wgmma_n72(acc[1], Ap[1], db);
        mma::wg_commit();
        mma::wg_wait<1>();
#else
        uint32_t B[9][2];
        load_b_core(B, tile);
#pragma unroll
        for (int qt = 0; qt < 2; ++qt)
#pragma unroll
          for (int nt = 0; nt < 9; ++nt) mma::mma_bf16(acc[qt][nt], Ap[qt], B[nt][0], B[nt][1]);
#endif
      }
    }
  }
#ifdef PR_WGMMA
  mma::wg_wait_all(acc);
#endif
  const float sc2 = p.scale * p.scale;
#pragma unroll
  for (int qt = 0; qt < 2; ++qt)
#pragma unroll
    for (int h8 = 0; h8 < 2; ++h8) {
      const float f = sc2 * expf(static_cast<float>(Gd[r0 - c0 + wr + 16 * qt + g + 8 * h8]));
#pragma unroll
      for (int nt = 0; nt < 9; ++nt) {
        acc[qt][nt][2 * h8] *= f;
        acc[qt][nt][2 * h8 + 1] *= f;
      }
    }

  // Attention to the chunk's keys up to this block's last row.
  const int ntk = static_cast<int>(min(static_cast<int64_t>(L), S - c0 + kTok - 1) / kTok);
  auto issue_kv = [&](int kt, int buf) {
    const int64_t j0 = c0 + static_cast<int64_t>(kt) * kTok;
    copy_keys_core<kQThreads>(Ks + buf * kTok * KP, kptr, bb, S, sh.Hkv, hk, j0);
    copy_values_core<kQThreads>(Vs + buf * kTok * NX, vptr, bb, S, sh.Hkv, hk, j0);
  };
  mma::cp_async_wait_all();
  __syncthreads();
  if (ntk > 0) {
    issue_kv(0, 0);
    mma::cp_async_commit();
  }
  const int64_t ib = r0 + wr;  // this warp's first row (global position)
  // W[i][j] = attention weight of row i (warp row 16 qt + g + 8 (e >> 1)) to key j, 0 past the row
  auto weigh = [&](float dot, int qt, int e, int64_t j) {
    const int64_t i = ib + 16 * qt + g + 8 * (e >> 1);
    return j <= i ? attn_weight(dot, p.scale, static_cast<float>(Gd[i - c0] - Gd[j - c0])) : 0.f;
  };
  for (int kt = 0; kt < ntk; ++kt) {
    const int buf = kt & 1;
    mma::cp_async_wait_all();
#ifdef PR_WGMMA
    mma::wg_wait<0>();  // the previous tile's W x V read the buffer the next copy overwrites
    mma::fence_proxy_async();
#endif
    __syncthreads();
    if (kt + 1 < ntk) {
      issue_kv(kt + 1, buf ^ 1);
      mma::cp_async_commit();
    }
    const bf16* Kc = Ks + buf * kTok * KP;
    const bf16* Vc = Vs + buf * kTok * NX;
#ifdef PR_WGMMA
    // Per warpgroup (its 4 warps' 128 rows): S = Q K^T over the tile's 64 keys (two m64 n64 k16
    // wgmma's per k16 step, query tiles qt), the weights in registers, then acc += W V (m64 n72).
    const int64_t j0 = c0 + static_cast<int64_t>(kt) * kTok;
    if (j0 <= r0 + 128 * (warp >> 2) + 127) {  // uniform over the warpgroup
      float sc[2][8][4];
#pragma unroll
      for (int qt = 0; qt < 2; ++qt) {
#pragma unroll
        for (int nn = 0; nn < 8; ++nn) sc[qt][nn][0] = sc[qt][nn][1] = sc[qt][nn][2] = sc[qt][nn][3] = 0.f;
        mma::fence_acc(sc[qt]);
      }
      mma::wg_fence();
#pragma unroll
      for (int kd = 0; kd < 4; ++kd) {
        const uint64_t dk = mma::desc_k64_tile(Kc + 128 * kd);
        mma::wgmma_n64_kmajor(sc[0], Qf[0][kd], dk);
        mma::wgmma_n64_kmajor(sc[1], Qf[1][kd], dk);
      }
      mma::wg_commit();
      mma::wg_wait<0>();
      uint32_t Aw[2][4][4];
#pragma unroll
      for (int qt = 0; qt < 2; ++qt) {
        mma::fence_acc(sc[qt]);
#pragma unroll
        for (int nn = 0; nn < 8; ++nn)
#pragma unroll
          for (int e = 0; e < 4; ++e) sc[qt][nn][e] = weigh(sc[qt][nn][e], qt, e, j0 + 8 * nn + 2 * t + (e & 1));
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          Aw[qt][kk][0] = mma::pack_bf16(sc[qt][2 * kk][0], sc[qt][2 * kk][1]);
          Aw[qt][kk][1] = mma::pack_bf16(sc[qt][2 * kk][2], sc[qt][2 * kk][3]);
          Aw[qt][kk][2] = mma::pack_bf16(sc[qt][2 * kk + 1][0], sc[qt][2 * kk + 1][1]);
          Aw[qt][kk][3] = mma::pack_bf16(sc[qt][2 * kk + 1][2], sc[qt][2 * kk + 1][3]);
        }
      }
      mma::wg_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint64_t dv = mma::desc_core_tile(Vc + kk * kTileE);
        mma::wgmma_n72(acc[0], Aw[0][kk], dv);
        mma::wgmma_n72(acc[1], Aw[1][kk], dv);
      }
      mma::wg_commit();
    }
#else
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int64_t j0 = c0 + static_cast<int64_t>(kt) * kTok + 32 * hh;
      if (j0 > ib + 31) continue;  // every key after every row of this warp
      float s[2][4][4];
#pragma unroll
      for (int qt = 0; qt < 2; ++qt)
#pragma unroll
        for (int nn = 0; nn < 4; ++nn) s[qt][nn][0] = s[qt][nn][1] = s[qt][nn][2] = s[qt][nn][3] = 0.f;
#pragma unroll
      for (int kd = 0; kd < 4; ++kd)
#pragma unroll
        for (int pq = 0; pq < 2; ++pq) {
          uint32_t Bk[4];
          mma::ldsm_x4(Bk, Kc + mma::core_k_offset(32 * hh + 16 * pq + krow, 16 * kd + kcol));
#pragma unroll
          for (int qt = 0; qt < 2; ++qt) {
            mma::mma_bf16(s[qt][2 * pq], Qf[qt][kd], Bk[0], Bk[1]);
            mma::mma_bf16(s[qt][2 * pq + 1], Qf[qt][kd], Bk[2], Bk[3]);
          }
        }
#pragma unroll
      for (int qt = 0; qt < 2; ++qt)
#pragma unroll
        for (int nn = 0; nn < 4; ++nn)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[qt][nn][e] = weigh(s[qt][nn][e], qt, e, j0 + 8 * nn + 2 * t + (e & 1));
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        uint32_t B[9][2];
        load_b_core(B, Vc + (2 * hh + kk) * kTileE);
#pragma unroll
        for (int qt = 0; qt < 2; ++qt) {
          const uint32_t Aw[4] = {mma::pack_bf16(s[qt][2 * kk][0], s[qt][2 * kk][1]),
                                  mma::pack_bf16(s[qt][2 * kk][2], s[qt][2 * kk][3]),
                                  mma::pack_bf16(s[qt][2 * kk + 1][0], s[qt][2 * kk + 1][1]),
                                  mma::pack_bf16(s[qt][2 * kk + 1][2], s[qt][2 * kk + 1][3])};
#pragma unroll
          for (int nt = 0; nt < 9; ++nt) mma::mma_bf16(acc[qt][nt], Aw, B[nt][0], B[nt][1]);
        }
      }
    }
#endif
  }
#ifdef PR_WGMMA
  mma::wg_wait_all(acc);
#endif

#pragma unroll
  for (int qt = 0; qt < 2; ++qt)
#pragma unroll
    for (int h8 = 0; h8 < 2; ++h8) {
      // Approximate reciprocal (2 ulp, far below the bf16 output's rounding): the IEEE division
      // is a subroutine call in relocatable device code (the plugin's build), and any call makes
      // ptxas serialize the kernel's wgmma's.
      const float inv = __fdividef(1.f, __shfl_sync(0xffffffffu, acc[qt][8][2 * h8], lane & ~3));
      const int64_t i = ib + 16 * qt + g + 8 * h8;
      if (i < S) {
        bf16* o = out + ((bb * S + i) * sh.Hq + hq) * DV + 2 * t;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
          *reinterpret_cast<__nv_bfloat162*>(o + 8 * nt) =
              __floats2bfloat162_rn(acc[qt][nt][2 * h8] * inv, acc[qt][nt][2 * h8 + 1] * inv);
      }
    }
}

int chunk_tokens(const PrPrefillParams& p) {
  const int h = p.chunk_size;
  return (h >= kQRows && h <= kMaxT && h % kQRows == 0) ? h : kDefaultT;
}

// The per-chunk states of a long sequence would take B Hkv ceil(S/T) 360 KiB (5.6 GiB at B 8,
// Hkv 16, 128k): the sequence runs in segments of as many chunks as the workspace holds, the state
// carried from one segment to the next in f32 (present_state, or the workspace's carry region when
// that output is not asked for). The carried state is the f32 one the scan keeps between
// chunks, so the outputs do not depend on the segmenting. pr_prefill_workspace_bytes asks for at
// most kWorkspaceCap (or one chunk per segment where even that is more).
constexpr uint64_t kWorkspaceCap = 256ull << 20;
constexpr uint64_t kChunkBytes = static_cast<uint64_t>(kRows) * NX * sizeof(bf16);

uint64_t align256(uint64_t x) { return (x + 255) & ~uint64_t{255}; }

struct Plan {
  int T = 0, nchunks = 0, per_segment = 0;  // per_segment 0: the workspace is too small
  uint64_t decays_off = 0, carry_state_off = 0, carry_sum_off = 0, bytes = 0;
};

// The layout for segments of k chunks (1 <= k <= the number of chunks).
Plan layout(const PrPrefillParams& p, int k) {
  Plan pl;
  pl.T = chunk_tokens(p);
  pl.nchunks = static_cast<int>((p.seq_len + pl.T - 1) / pl.T);
  pl.per_segment = k;
  const int nchunks = pl.nchunks;
  const uint64_t heads = static_cast<uint64_t>(p.batch) * p.kv_heads;
  pl.decays_off = align256(heads * k * kChunkBytes);
  pl.bytes = pl.carry_state_off = pl.decays_off + align256(heads * k * sizeof(float));
  if (k < nchunks) {
    if (p.present_state == nullptr) pl.bytes += align256(heads * D * DV * sizeof(float));
    pl.carry_sum_off = pl.bytes;
    if (p.present_sum_of_keys == nullptr) pl.bytes += align256(heads * D * sizeof(float));
  }
  return pl;
}

// The longest segments a workspace of `budget` bytes holds.
Plan plan(const PrPrefillParams& p, uint64_t budget) {
  const Plan one = layout(p, 1), whole = layout(p, one.nchunks);
  if (whole.bytes <= budget) return whole;
  const uint64_t heads = static_cast<uint64_t>(p.batch) * p.kv_heads;
  int k = static_cast<int>(std::min<uint64_t>(budget / (heads * (kChunkBytes + sizeof(float))), one.nchunks - 1));
  while (k > 0 && layout(p, k).bytes > budget) --k;
  return k > 0 ? layout(p, k) : Plan{};
}

bool applies(const PrPrefillParams& p) {
  return p.dtype == PR_DTYPE_BF16 && p.key_dim == DK && p.value_dim == DV && p.seq_len > 0 && p.batch > 0 &&
         aligned(p.query, 16) && aligned(p.key, 16) && aligned(p.value, 16) && aligned(p.output, 4) &&
         aligned(p.past_state, 8) && aligned(p.present_state, 8);
}

}  // namespace
}  // namespace chunked

uint64_t prefill_chunked_workspace_bytes(const PrPrefillParams& p) {
  using namespace chunked;
  if (!applies(p)) return 0;
  const Plan capped = plan(p, kWorkspaceCap);
  return capped.per_segment > 0 ? capped.bytes : layout(p, 1).bytes;
}

bool prefill_chunked_fits(const PrPrefillParams& p) {
  using namespace chunked;
  return applies(p) && p.workspace != nullptr && aligned(p.workspace, 16) &&
         plan(p, p.workspace_bytes).per_segment > 0;
}

int prefill_chunked_segment_chunks(const PrPrefillParams& p) {
  return prefill_chunked_fits(p) ? chunked::plan(p, p.workspace_bytes).per_segment : 0;
}

cudaError_t prefill_chunked(const PrPrefillParams& p, cudaStream_t stream) {
  using namespace chunked;
  const Plan pl = plan(p, p.workspace_bytes);
  if (pl.per_segment == 0) return cudaErrorInvalidValue;
  const PrefillShape sh = prefill_shape(p);
  unsigned char* ws = static_cast<unsigned char*>(p.workspace);
  bf16* P = reinterpret_cast<bf16*>(ws);
  float* carry_state = p.present_state != nullptr ? p.present_state : reinterpret_cast<float*>(ws + pl.carry_state_off);
  float* carry_sum =
      p.present_sum_of_keys != nullptr ? p.present_sum_of_keys : reinterpret_cast<float*>(ws + pl.carry_sum_off);
  float* decays = reinterpret_cast<float*>(ws + pl.decays_off);
  const size_t db = DCfg::bytes(pl.T), qb = QCfg::bytes(pl.T);
  cudaError_t e = cudaFuncSetAttribute(retention_prefill_deltas_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(db));
  if (e != cudaSuccess) return e;
  e = cudaFuncSetAttribute(retention_prefill_query_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(qb));
  if (e != cudaSuccess) return e;
  for (int c = 0; c < pl.nchunks; c += pl.per_segment) {
    const int nch = std::min(pl.per_segment, pl.nchunks - c);
    const int64_t tok0 = static_cast<int64_t>(c) * pl.T;
    const bool first = c == 0, last = c + nch == pl.nchunks;
    PrPrefillParams q = p;  // segment k > 0 starts from the state segment k - 1 left in the carry
    if (!first) {
      q.past_state = carry_state;
      q.past_sum_of_keys = carry_sum;
    }
    if (!last) {
      q.present_state = carry_state;
      q.present_sum_of_keys = carry_sum;
    }
    const unsigned hkv = static_cast<unsigned>(p.kv_heads), nb = static_cast<unsigned>(p.batch);
    retention_prefill_deltas_kernel<<<dim3(kDBlocks * nch, hkv, nb), kDThreads, db, stream>>>(q, sh, tok0, pl.T, nch, P,
                                                                                             decays);
    const unsigned scan_blocks = (kScanPerHead + kScanThreads - 1) / kScanThreads;
    retention_prefill_scan_kernel<<<dim3(scan_blocks, hkv, nb), kScanThreads, 0, stream>>>(q, nch, P, decays);
    const int64_t rows = std::min<int64_t>(p.seq_len - tok0, static_cast<int64_t>(nch) * pl.T);
    const dim3 qgrid(static_cast<unsigned>((rows + kQRows - 1) / kQRows), static_cast<unsigned>(p.q_heads),
                     static_cast<unsigned>(p.batch));
    retention_prefill_query_kernel<<<qgrid, kQThreads, qb, stream>>>(q, sh, tok0, pl.T, nch, P);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace pr
