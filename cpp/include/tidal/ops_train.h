// SPDX-License-Identifier: Apache-2.0
// The training ops of the core: the fused Adam/AdamW step over flat fp32 buffers (a ZeRO shard, or
// one parameter), and the backward passes of the fused forward ops (silu_and_mul, rms_norm). Each
// has a CPU kernel and a GPU kernel.
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
/// `stream`. `param_copy`, unless empty (data null): a contiguous float32 / float16 / bfloat16
/// buffer of param's numel and device, overlapping none of the others, that receives the updated
/// param rounded to its dtype in the same pass (the compute-dtype weights of mixed precision).
void adam_step(TensorView param, TensorView grad, TensorView exp_avg, TensorView exp_avg_sq,
               const AdamOptions& options, Stream stream, TensorView param_copy = {});

/// The gradient of silu_and_mul (tidal/ops_serving.h) with respect to its input, in fp32 with one
/// rounding: for x = [gate | up] and s = sigmoid(gate),
///   grad_x[:, :d] = grad * up * s * (1 + gate * (1 - s)),   grad_x[:, d:] = grad * gate * s.
/// grad_x, x: [num_tokens, 2 * d]; grad: [num_tokens, d]; one float dtype, one device, last dims
/// contiguous (row strides any); grad_x overlaps neither input.
/// out (optional: a view with null data skips it) receives silu_and_mul(x) itself, recomputed in the
/// same pass bit for bit as the forward kernel computes it: [num_tokens, d] in x's dtype, last dim
/// contiguous. A training step that does not keep the activation for the next GEMM's backward gets
/// it back here.
void silu_and_mul_backward(TensorView grad_x, TensorView grad, TensorView x, Stream stream,
                           TensorView out = TensorView{});

/// The gradients of rms_norm (tidal/ops.h), in fp32 from the saved input: with r = rsqrt(mean(x^2)
/// + eps), x_hat = x r and g_hat = grad * weight,
///   grad_x = r * (g_hat - x_hat * mean(g_hat * x_hat))   (rounded once to x's dtype)
///   grad_weight_partial[p, :] = sum over the rows of part p of grad * x_hat   (fp32)
/// The rows split into grad_weight_partial.shape[0] contiguous parts (part p: rows [p T / P,
/// (p + 1) T / P)); the caller sums the partials over p (one part per GPU block keeps the weight
/// gradient free of atomics and deterministic). grad_x, grad, x: [num_tokens, hidden] (row strides
/// any, last dim contiguous), one float dtype; weight: [hidden], same dtype;
/// grad_weight_partial: [P, hidden] float32, contiguous, 1 <= P.
void rms_norm_backward(TensorView grad_x, TensorView grad_weight_partial, TensorView grad, TensorView x,
                       TensorView weight, float eps, Stream stream);

/// Softmax cross-entropy of each row of `logits` against its label, and its gradient in place: for
/// a row with label y != ignore_index, in fp32 from the stored logits x,
///   loss[r] = logsumexp(x) - x[y]
///   logits[r, :] = (softmax(x) - onehot(y)) * scale[0]     (when write_grad; rounded once)
/// and for a row labelled ignore_index, loss[r] = 0 and (when write_grad) the row is zeroed. A
/// label outside [0, vocab) that is not ignore_index is an error on the CPU (values are read) and
/// a NaN loss on a GPU (no host synchronisation). The scale (e.g. 1 / valid rows) stays on the
/// device. logits: [rows, vocab] float (row stride any, last dim contiguous); loss: [rows] float32
/// contiguous; labels: [rows] int64 contiguous; scale: one float32 element; one device.
void softmax_cross_entropy(TensorView logits, TensorView loss, TensorView labels, TensorView scale,
                           int64_t ignore_index, bool write_grad, Stream stream);

}  // namespace tidal::ops
