// The tensor-core prefill (prefill_tc.cu), chosen by pr_prefill when it supports the parameters.
#pragma once

#include <cuda_runtime.h>

#include "retention.h"

namespace pr {

// bf16 inputs, Dk 32 or 64, Dv a multiple of 8, 16-byte aligned query/key/value.
bool prefill_tc_supports(const PrPrefillParams& p);
// Parameters already validated by pr_prefill, batch >= 1.
cudaError_t prefill_tc(const PrPrefillParams& p, cudaStream_t stream);

}  // namespace pr
