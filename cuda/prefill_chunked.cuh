// The chunked tensor-core prefill (prefill_chunked.cu): bf16, Dk = Dv = 64, with a workspace.
#pragma once

#include <cuda_runtime.h>

#include "retention.h"

namespace pr {

// Workspace bytes the chunked prefill asks for (at most 256 MiB unless one chunk of every head takes
// more); 0 when it does not apply.
uint64_t prefill_chunked_workspace_bytes(const PrPrefillParams& p);
// Whether it applies and p.workspace (16-byte aligned) holds at least one chunk per segment; a
// smaller workspace than asked for means shorter segments, not other outputs.
bool prefill_chunked_fits(const PrPrefillParams& p);
// Chunks per segment the chunked prefill runs with p.workspace_bytes; 0 when it would not run.
int prefill_chunked_segment_chunks(const PrPrefillParams& p);
// Parameters validated by pr_prefill and prefill_chunked_fits(p).
cudaError_t prefill_chunked(const PrPrefillParams& p, cudaStream_t stream);

}  // namespace pr
