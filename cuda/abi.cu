// pr_abi_layout: sizes and field offsets of the params structs, for the Rust side's layout asserts.
#include <stddef.h>

#include "retention.h"

#define PR_PREFILL_FIELDS(X)                                                                         \
  X(batch) X(seq_len) X(q_heads) X(kv_heads) X(key_dim) X(value_dim) X(deg) X(dtype) X(scale)        \
  X(chunk_size) X(query) X(key) X(value) X(log_gate) X(past_state) X(past_sum_of_keys) X(output)     \
  X(present_state) X(present_sum_of_keys) X(workspace) X(workspace_bytes)

#define PR_DECODE_FIELDS(X)                                                                          \
  X(batch) X(new_tokens) X(cache_capacity) X(q_heads) X(kv_heads) X(key_dim) X(value_dim) X(deg)     \
  X(dtype) X(scale) X(reserved) X(query) X(key) X(value) X(log_gate) X(output) X(state)              \
  X(sum_of_keys) X(key_cache) X(value_cache) X(log_gate_cache) X(cache_length)

extern "C" int32_t pr_abi_layout(uint64_t* out, int32_t capacity) {
  const uint64_t values[] = {
      PR_ABI_VERSION,
      sizeof(PrPrefillParams),
#define PR_OFFSET(f) offsetof(PrPrefillParams, f),
      PR_PREFILL_FIELDS(PR_OFFSET)
#undef PR_OFFSET
      sizeof(PrDecodeParams),
#define PR_OFFSET(f) offsetof(PrDecodeParams, f),
      PR_DECODE_FIELDS(PR_OFFSET)
#undef PR_OFFSET
  };
  const int32_t n = static_cast<int32_t>(sizeof(values) / sizeof(values[0]));
  for (int32_t i = 0; i < n && i < capacity; ++i) out[i] = values[i];
  return n;
}
