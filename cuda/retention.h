/* The C ABI of the CUDA kernels of PowerRetention (prefill) and PowerRetentionStep (decode).
 *
 * Contract shared by both launchers:
 * - Every tensor is contiguous row-major on the current CUDA device; pointers are device pointers.
 *   query (B,S,Hq,Dk) T; key (B,S,Hkv,Dk) T; value (B,S,Hkv,Dv) T; log_gate (B,S,Hkv) f32 or NULL;
 *   state (B,Hkv,D,Dv) f32; sum_of_keys (B,Hkv,D) f32; output (B,S,Hq,Dv) T;
 *   key/value caches (B,C,Hkv,Dk|Dv) T; log-gate cache (B,C,Hkv) f32 or NULL; cache_length (B) i64.
 *   T is PR_DTYPE_F32, PR_DTYPE_F16 or PR_DTYPE_BF16; arithmetic is float32, except that pr_prefill
 *   with bf16 inputs and Dk 32/64 runs on tensor cores: bf16 products accumulated in float32, the
 *   state and the gated values rounded to bf16 where they enter a product (relative ~2e-3 on outputs
 *   and state, the bf16 tolerance being 2e-2); the state is still accumulated and stored in float32.
 * - deg must be 2. D = Dk(Dk+1)/2, compact upper-triangle layout: row(a,b) = a(2Dk-a+1)/2 + (b-a)
 *   for a <= b, feature x_a*x_b, key-side weight 2 when a < b, query-side weight 1.
 * - Supported: Dk in {32, 64, 128}; Dv a multiple of 4 (prefill) or 8 (decode); Hq a multiple of Hkv; Hq/Hkv <= 32;
 *   B <= 65535; decode: C <= 8192. Anything else returns cudaErrorInvalidValue
 *   (1) before launching anything.
 * - scale is the final factor (the host resolves "0 or absent" to 1/sqrt(Dk)).
 * - Launchers enqueue on `stream` (a cudaStream_t; NULL = legacy default stream) and return the
 *   cudaError_t of cudaGetLastError() after the launches (0 = cudaSuccess). They never synchronise,
 *   allocate, copy to/from the host, print or exit, so they can be captured in a CUDA graph.
 *
 * Weights: w_ij = (|scale q_i.k_j| + 1e-7)^2 exp(G_i - G_j) for tokens j <= i of the current chunk
 * (prefill) or window (decode); the state part is scale^2 exp(G_i) phi_q(q_i).S (numerator) and
 * .s (denominator); y_i = num_i / den_i. G is the inclusive cumulative sum of log gates restarted at
 * each chunk (prefill) or window (decode) start.
 */
#ifndef POWER_RETENTION_CUDA_RETENTION_H
#define POWER_RETENTION_CUDA_RETENTION_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a params struct changes; the Rust side asserts it with pr_abi_layout. */
#define PR_ABI_VERSION 1

enum { PR_DTYPE_F32 = 0, PR_DTYPE_F16 = 1, PR_DTYPE_BF16 = 2 };

/* PowerRetention over S tokens.
 * past_state/past_sum_of_keys: both NULL (start from a zero state) or both given.
 * present_state/present_sum_of_keys: each may be NULL (not wanted). present_* may alias past_*
 * (each block reads its slice of the past state before writing the same slice).
 * S = 0 is allowed (present = past, or zeros). Any S works; the last chunk may be short.
 * workspace: device scratch (16-byte aligned) of pr_prefill_workspace_bytes(params) bytes, or NULL.
 * With it, bf16 with Dk = Dv = 64 runs the chunked prefill (per-chunk states in the
 * workspace, bf16); without it, the one-kernel tensor-core path. Both give the same outputs within
 * the bf16 tolerance. A smaller workspace (at least one chunk of states per head) runs the sequence
 * in shorter segments with the same outputs; one below that falls back to the one-kernel path. */
typedef struct {
  int64_t batch;         /* B */
  int64_t seq_len;       /* S >= 0 */
  int32_t q_heads;       /* Hq */
  int32_t kv_heads;      /* Hkv */
  int32_t key_dim;       /* Dk */
  int32_t value_dim;     /* Dv */
  int32_t deg;           /* must be 2 */
  int32_t dtype;         /* PR_DTYPE_* of query/key/value/output */
  float scale;           /* resolved scale */
  int32_t chunk_size;    /* hint, 0 = kernel's choice; outputs do not depend on it */
  const void* query;
  const void* key;
  const void* value;
  const float* log_gate;          /* NULL = no gating */
  const float* past_state;        /* NULL or (B,Hkv,D,Dv) */
  const float* past_sum_of_keys;  /* NULL iff past_state is NULL */
  void* output;
  float* present_state;           /* NULL = not wanted */
  float* present_sum_of_keys;     /* NULL = not wanted */
  void* workspace;                /* pr_prefill_workspace_bytes(params) bytes, or NULL if 0 */
  uint64_t workspace_bytes;
} PrPrefillParams;

/* PowerRetentionStep, in place on the present buffers (the host first copies past -> present with
 * cudaMemcpyAsync on the same stream when they are different buffers).
 * Per sequence b with L = cache_length[b] and n = L + S (1 <= S <= C):
 *   the window is cache[0:L] ++ new[0:S]; new token i (window position L+i) attends to window
 *   tokens 0..L+i and to the state decayed by exp(G_{L+i});
 *   if n >= C: all n window tokens are folded into state/sum_of_keys, cache_length[b] = 0;
 *   else: the new keys/values/log gates are written to cache slots [L, L+S), cache_length[b] = n.
 * Invalid length: if cache_length[b] is outside [0, C], that sequence's outputs are set to NaN and
 * its state, sum of keys, caches and length are left untouched (nothing is read out of bounds).
 * log_gate and log_gate_cache are both NULL (no gating) or both given.
 * Two kernels are enqueued (query, state fold or cache append; length and sum-of-keys fold). */
typedef struct {
  int64_t batch;           /* B */
  int64_t new_tokens;      /* S, 1 <= S <= C */
  int64_t cache_capacity;  /* C >= 1 */
  int32_t q_heads;
  int32_t kv_heads;
  int32_t key_dim;
  int32_t value_dim;
  int32_t deg;             /* must be 2 */
  int32_t dtype;           /* PR_DTYPE_* of query/key/value/output/caches */
  float scale;
  int32_t reserved;        /* 0 */
  const void* query;       /* (B,S,Hq,Dk) */
  const void* key;         /* (B,S,Hkv,Dk) */
  const void* value;       /* (B,S,Hkv,Dv) */
  const float* log_gate;   /* (B,S,Hkv) or NULL */
  void* output;            /* (B,S,Hq,Dv) */
  float* state;            /* (B,Hkv,D,Dv), read and updated in place */
  float* sum_of_keys;      /* (B,Hkv,D), read and updated in place */
  void* key_cache;         /* (B,C,Hkv,Dk), in place */
  void* value_cache;       /* (B,C,Hkv,Dv), in place */
  float* log_gate_cache;   /* (B,C,Hkv) or NULL, in place */
  int64_t* cache_length;   /* (B), in place */
} PrDecodeParams;

/* Scratch bytes the fastest pr_prefill path asks for: for bf16 Dk = Dv = 64, B*Hkv*ceil(S/T)*2560*72*2
 * (rounded up to 256) with T the chunk (chunk_size when it is a multiple of 256 up to 2048, else
 * 512), capped at 256 MiB by running the sequence in segments (plus a f32 carried state where
 * present_* are NULL), but at least one chunk per head; 0 when no path needs one. */
uint64_t pr_prefill_workspace_bytes(const PrPrefillParams* params);

/* Chunks per segment pr_prefill's chunked path runs with params->workspace_bytes (the sequence in
 * ceil(chunks / that) segments); 0 when pr_prefill would take another path. For tests and tuning. */
int32_t pr_prefill_segment_chunks(const PrPrefillParams* params);

/* Returns a cudaError_t: 0 on success, cudaErrorInvalidValue (1) for unsupported parameters. */
int pr_prefill(const PrPrefillParams* params, void* stream);
int pr_decode(const PrDecodeParams* params, void* stream);

/* pr_prefill always on the general float32 SIMT kernel (every dtype and Dk), never the tensor-core
 * one that pr_prefill picks for bf16 with Dk 32/64: for tests and side-by-side benchmarks. */
int pr_prefill_simt(const PrPrefillParams* params, void* stream);

/* Layout check for foreign callers. Writes, in order:
 *   PR_ABI_VERSION, sizeof(PrPrefillParams), the offsetof of each PrPrefillParams field in
 *   declaration order, sizeof(PrDecodeParams), the offsetof of each PrDecodeParams field in
 *   declaration order,
 * into out[0..capacity) and returns how many values the full list has (call with capacity 0 to
 * size it). Rust asserts these against size_of / offset_of! of its #[repr(C)] mirrors. */
int32_t pr_abi_layout(uint64_t* out, int32_t capacity);

#ifdef __cplusplus
}
#endif

#endif
