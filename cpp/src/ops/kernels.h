// SPDX-License-Identifier: Apache-2.0
// The kernel table behind tidal::ops: each op has a CPU kernel (plain C++, the reference) and a GPU
// kernel (cuda/*.cu, also compiled as HIP) with identical signatures. Arguments arrive validated by
// cpp/src/ops (shapes, dtypes, devices, last dim contiguous), so kernels check nothing but launches.
#pragma once

#include "tidal/stream.h"
#include "tidal/tensor_view.h"

namespace tidal::cpu {

// out, x: [num_tokens, hidden_size] (row stride any, last dim contiguous); weight: [hidden_size]
void rms_norm(TensorView out, TensorView x, TensorView weight, float eps, Stream stream);
// out, residual_out, x, residual: [num_tokens, hidden_size]; out may alias x, residual_out residual
void fused_add_rms_norm(TensorView out, TensorView residual_out, TensorView x, TensorView residual,
                        TensorView weight, float eps, Stream stream);

}  // namespace tidal::cpu

namespace tidal::gpu {

// Same contracts as tidal::cpu; launched on `stream`, on the device of `x`.
void rms_norm(TensorView out, TensorView x, TensorView weight, float eps, Stream stream);
void fused_add_rms_norm(TensorView out, TensorView residual_out, TensorView x, TensorView residual,
                        TensorView weight, float eps, Stream stream);

}  // namespace tidal::gpu
