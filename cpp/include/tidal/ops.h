// SPDX-License-Identifier: Apache-2.0
// The public ops of the core: one entry point per op, dispatched by the tensors' device to the CPU
// kernel (the reference) or the GPU kernel. Destination-passing: the caller allocates every output.
#pragma once

#include "tidal/stream.h"
#include "tidal/tensor_view.h"

namespace tidal::ops {

/// RMSNorm over the last dimension:
///   out[t, :] = x[t, :] * rsqrt(mean(x[t, :]^2) + eps) * weight
/// computed in fp32 and rounded once to the output dtype.
/// x, out:  [num_tokens, hidden_size], last dim contiguous, any row stride; same dtype
///          (float32, float16 or bfloat16) and device.
/// weight:  [hidden_size], contiguous, same dtype and device as x.
/// eps:     finite and >= 0. Runs on `stream` for GPU tensors; blocks the caller for CPU tensors.
void rms_norm(TensorView out, TensorView x, TensorView weight, float eps, Stream stream);

/// Residual add fused with RMSNorm, writing both outputs:
///   residual_out = round(x + residual)            (rounded to the dtype, as an unfused add would)
///   out          = rms_norm(residual_out, weight, eps)
/// All of out, residual_out, x, residual: [num_tokens, hidden_size], last dim contiguous.
/// out may be x and residual_out may be residual (the in-place form); out must not overlap
/// residual_out.
void fused_add_rms_norm(TensorView out, TensorView residual_out, TensorView x, TensorView residual,
                        TensorView weight, float eps, Stream stream);

}  // namespace tidal::ops
