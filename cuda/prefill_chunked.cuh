// The two-kernel tensor-core prefill (prefill_chunked.cu): bf16, Dk = Dv = 64, with a workspace.
#pragma once

#include <cuda_runtime.h>

#include "retention.h"

namespace pr {

// Workspace bytes the chunked prefill needs for these parameters; 0 when it does not apply.
uint64_t prefill_chunked_workspace_bytes(const PrPrefillParams& p);
// Parameters validated by pr_prefill, prefill_chunked_workspace_bytes(p) > 0 and a workspace of
// at least that size.
cudaError_t prefill_chunked(const PrPrefillParams& p, cudaStream_t stream);

}  // namespace pr
