// SPDX-License-Identifier: Apache-2.0
// The training ops of the core: the fused Adam/AdamW step over flat fp32 buffers (a ZeRO shard, or
// one parameter). CPU kernel only for now; a CUDA tensor is a tidal::Error.
#pragma once

#include <cstdint>

#include "tidal/stream.h"
#include "tidal/tensor_view.h"

namespace tidal::ops {

/// Hyper-parameters of one Adam step, in torch.optim's units.
struct AdamOptions {
  int64_t step = 1;            // the step being taken, counted from 1 (bias corrections use it)
  double lr = 1e-3;            // >= 0
  double beta1 = 0.9;          // in [0, 1)
  double beta2 = 0.999;        // in [0, 1)
  double eps = 1e-8;           // > 0
  double weight_decay = 0.0;   // >= 0
  bool decoupled = true;       // true: AdamW (param *= 1 - lr * wd); false: Adam (grad += wd * param)
  double grad_scale = 1.0;     // > 0 and finite; grad is multiplied by float(1 / grad_scale) first
};

/// One Adam (decoupled=false, torch.optim.Adam) or AdamW (decoupled=true, torch.optim.AdamW) step, in
/// place, with torch's single-tensor arithmetic order, so results equal torch's to fp32 rounding:
///   g = grad * (1 / grad_scale);  AdamW: p *= 1 - lr*wd;  Adam: g += wd * p
///   m = lerp(m, g, 1 - beta1);  v = v * beta2 + (1 - beta2) * g * g
///   p += (-lr / (1 - beta1^step)) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
/// param, exp_avg, exp_avg_sq are written; grad is only read. All four: float32, contiguous (any
/// shape), the same numel and device, and no two overlapping in memory. Bad values throw
/// std::invalid_argument naming them. On the CPU it blocks the caller; on a GPU it is one launch on
/// `stream`.
void adam_step(TensorView param, TensorView grad, TensorView exp_avg, TensorView exp_avg_sq,
               const AdamOptions& options, Stream stream);

}  // namespace tidal::ops
