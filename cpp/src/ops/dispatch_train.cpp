// SPDX-License-Identifier: Apache-2.0
// The training ops of tidal/ops_train.h: validate tensors and hyper-parameters (every message names
// the argument and its value), then run the kernel of the tensors' device.
#include "tidal/ops_train.h"

#include <cmath>
#include <string>
#include <utility>

#include "ops/checks.h"
#include "ops/device_dispatch.h"
#include "ops/kernels.h"

namespace tidal::ops {
namespace {

void check_flat_fp32(const TensorView& t, const char* name, const TensorView& ref) {
  TIDAL_CHECK(t.dtype == DType::kFloat32, name, ".dtype=", dtype_name(t.dtype), " must be float32");
  TIDAL_CHECK(t.is_contiguous(), name, " must be contiguous, got shape ", t.shape_str());
  TIDAL_CHECK(t.numel() == ref.numel(), name, ".numel()=", t.numel(), " must equal param.numel()=", ref.numel());
  TIDAL_CHECK(t.device == ref.device, name, " is on ", device_name(t.device), " but param is on ",
              device_name(ref.device));
}

void check_options(const AdamOptions& o) {
  TIDAL_CHECK(o.step >= 1, "step=", o.step, " must be >= 1 (steps count from 1)");
  TIDAL_CHECK(std::isfinite(o.lr) && o.lr >= 0.0, "lr=", o.lr, " must be finite and >= 0");
  TIDAL_CHECK(o.beta1 >= 0.0 && o.beta1 < 1.0, "beta1=", o.beta1, " must be in [0, 1)");
  TIDAL_CHECK(o.beta2 >= 0.0 && o.beta2 < 1.0, "beta2=", o.beta2, " must be in [0, 1)");
  TIDAL_CHECK(std::isfinite(o.eps) && o.eps > 0.0, "eps=", o.eps, " must be finite and > 0");
  TIDAL_CHECK(std::isfinite(o.weight_decay) && o.weight_decay >= 0.0, "weight_decay=", o.weight_decay,
              " must be finite and >= 0");
  TIDAL_CHECK(std::isfinite(o.grad_scale) && o.grad_scale > 0.0, "grad_scale=", o.grad_scale,
              " must be finite and > 0");
}

}  // namespace

void adam_step(TensorView param, TensorView grad, TensorView exp_avg, TensorView exp_avg_sq,
               const AdamOptions& options, Stream stream, TensorView param_copy) {
  check_flat_fp32(param, "param", param);
  // grad may also be 16-bit (the compute-dtype gradient buffer, read and widened in the pass)
  TIDAL_CHECK(grad.dtype == DType::kFloat32 || grad.dtype == DType::kFloat16 || grad.dtype == DType::kBFloat16,
              "grad.dtype=", dtype_name(grad.dtype), " must be float32, float16 or bfloat16");
  TIDAL_CHECK(grad.is_contiguous(), "grad must be contiguous, got shape ", grad.shape_str());
  TIDAL_CHECK(grad.numel() == param.numel(), "grad.numel()=", grad.numel(), " must equal param.numel()=",
              param.numel());
  TIDAL_CHECK(grad.device == param.device, "grad is on ", device_name(grad.device), " but param is on ",
              device_name(param.device));
  check_flat_fp32(exp_avg, "exp_avg", param);
  check_flat_fp32(exp_avg_sq, "exp_avg_sq", param);
  check_options(options);
  const TensorView* views[] = {&param, &grad, &exp_avg, &exp_avg_sq};
  const char* names[] = {"param", "grad", "exp_avg", "exp_avg_sq"};
  for (int a = 0; a < 4; ++a) {
    for (int b = a + 1; b < 4; ++b) {
      TIDAL_CHECK(!detail::overlaps(*views[a], *views[b]), names[a], " and ", names[b],
                  " overlap in memory; pass distinct buffers");
    }
  }
  if (param_copy.data != nullptr) {
    const TensorView& c = param_copy;
    TIDAL_CHECK(c.dtype == DType::kFloat32 || c.dtype == DType::kFloat16 || c.dtype == DType::kBFloat16,
                "param_copy.dtype=", dtype_name(c.dtype), " must be float32, float16 or bfloat16");
    TIDAL_CHECK(c.is_contiguous(), "param_copy must be contiguous, got shape ", c.shape_str());
    TIDAL_CHECK(c.numel() == param.numel(), "param_copy.numel()=", c.numel(), " must equal param.numel()=",
                param.numel());
    TIDAL_CHECK(c.device == param.device, "param_copy is on ", device_name(c.device), " but param is on ",
                device_name(param.device));
    for (int a = 0; a < 4; ++a) {
      TIDAL_CHECK(!detail::overlaps(c, *views[a]), "param_copy and ", names[a],
                  " overlap in memory; pass distinct buffers");
    }
  }
  if (param.numel() == 0) return;
  detail::dispatch(
      "adam_step", param.device,
      [&] { cpu::adam_step(param, grad, exp_avg, exp_avg_sq, options, stream, param_copy); },
      [&] { gpu::adam_step(param, grad, exp_avg, exp_avg_sq, options, stream, param_copy); });
}

void silu_and_mul_backward(TensorView grad_x, TensorView grad, TensorView x, Stream stream, TensorView out) {
  detail::check_rows(grad_x, "grad_x");
  detail::check_rows(grad, "grad");
  detail::check_rows(x, "x");
  TIDAL_CHECK(x.dtype == DType::kFloat32 || x.dtype == DType::kFloat16 || x.dtype == DType::kBFloat16, "x.dtype=",
              dtype_name(x.dtype), " is not supported; expected float32, float16 or bfloat16");
  TIDAL_CHECK(x.size(1) % 2 == 0, "x.shape[1]=", x.size(1), " must be even: x is [num_tokens, 2 * d]");
  detail::check_like(grad_x, "grad_x", x, "x");
  TIDAL_CHECK(grad.size(0) == x.size(0) && 2 * grad.size(1) == x.size(1), "grad.shape=", grad.shape_str(),
              " must be [num_tokens, d] = [", x.size(0), ", ", x.size(1) / 2, "]");
  TIDAL_CHECK(grad.dtype == x.dtype, "grad.dtype=", dtype_name(grad.dtype), " must equal x.dtype=",
              dtype_name(x.dtype));
  TIDAL_CHECK(grad.device == x.device, "grad is on ", device_name(grad.device), " but x is on ",
              device_name(x.device));
  TIDAL_CHECK(!detail::overlaps(grad_x, x) && !detail::overlaps(grad_x, grad),
              "grad_x overlaps an input in memory; pass a distinct grad_x");
  if (out.data != nullptr) {
    detail::check_rows(out, "out");
    detail::check_like(out, "out", grad, "grad");
    TIDAL_CHECK(!detail::overlaps(out, x) && !detail::overlaps(out, grad) && !detail::overlaps(out, grad_x),
                "out overlaps another argument in memory; pass a distinct out");
  }
  if (grad.numel() == 0) return;
  detail::dispatch(
      "silu_and_mul_backward", x.device, [&] { cpu::silu_and_mul_backward(grad_x, grad, x, out, stream); },
      [&] { gpu::silu_and_mul_backward(grad_x, grad, x, out, stream); });
}

void rms_norm_backward(TensorView grad_x, TensorView grad_weight_partial, TensorView grad, TensorView x,
                       TensorView weight, float eps, Stream stream) {
  detail::check_rows(x, "x");
  detail::check_rows(grad, "grad");
  detail::check_rows(grad_x, "grad_x");
  TIDAL_CHECK(x.dtype == DType::kFloat32 || x.dtype == DType::kFloat16 || x.dtype == DType::kBFloat16, "x.dtype=",
              dtype_name(x.dtype), " is not supported; expected float32, float16 or bfloat16");
  detail::check_like(grad, "grad", x, "x");
  detail::check_like(grad_x, "grad_x", x, "x");
  detail::check_norm_weight(weight, x);
  detail::check_eps(eps);
  const TensorView& partial = grad_weight_partial;
  TIDAL_CHECK(partial.ndim == 2 && partial.size(0) >= 1 && partial.size(1) == x.size(1),
              "grad_weight_partial.shape=", partial.shape_str(), " must be [num_parts >= 1, hidden_size=", x.size(1),
              "]");
  TIDAL_CHECK(partial.dtype == DType::kFloat32, "grad_weight_partial.dtype=", dtype_name(partial.dtype),
              " must be float32");
  TIDAL_CHECK(partial.is_contiguous(), "grad_weight_partial must be contiguous, got strides of shape ",
              partial.shape_str());
  TIDAL_CHECK(partial.device == x.device, "grad_weight_partial is on ", device_name(partial.device),
              " but x is on ", device_name(x.device));
  TIDAL_CHECK(!detail::overlaps(grad_x, x) && !detail::overlaps(grad_x, grad) && !detail::overlaps(grad_x, partial),
              "grad_x overlaps another argument in memory; pass a distinct grad_x");
  if (x.size(1) == 0) return;
  detail::dispatch(
      "rms_norm_backward", x.device,
      [&] { cpu::rms_norm_backward(grad_x, grad_weight_partial, grad, x, weight, eps, stream); },
      [&] { gpu::rms_norm_backward(grad_x, grad_weight_partial, grad, x, weight, eps, stream); });
}

void softmax_cross_entropy(TensorView logits, TensorView loss, TensorView labels, TensorView scale,
                           int64_t ignore_index, bool write_grad, Stream stream) {
  detail::check_rows(logits, "logits");
  TIDAL_CHECK(logits.dtype == DType::kFloat32 || logits.dtype == DType::kFloat16 || logits.dtype == DType::kBFloat16,
              "logits.dtype=", dtype_name(logits.dtype), " is not supported; expected float32, float16 or bfloat16");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TIDAL_CHECK(vocab >= 1, "logits.shape=", logits.shape_str(), " must have a vocabulary of at least 1");
  TIDAL_CHECK(loss.ndim == 1 && loss.size(0) == rows && loss.is_contiguous() && loss.dtype == DType::kFloat32,
              "loss (shape ", loss.shape_str(), ", dtype ", dtype_name(loss.dtype), ") must be float32 [rows=", rows,
              "], contiguous");
  TIDAL_CHECK(labels.ndim == 1 && labels.size(0) == rows && labels.is_contiguous() && labels.dtype == DType::kInt64,
              "labels (shape ", labels.shape_str(), ", dtype ", dtype_name(labels.dtype), ") must be int64 [rows=", rows,
              "], contiguous");
  TIDAL_CHECK(scale.numel() == 1 && scale.dtype == DType::kFloat32, "scale (shape ", scale.shape_str(), ", dtype ",
              dtype_name(scale.dtype), ") must be one float32 element");
  for (const auto& [t, name] : {std::pair<const TensorView*, const char*>{&loss, "loss"}, {&labels, "labels"},
                                {&scale, "scale"}}) {
    TIDAL_CHECK(t->device == logits.device, name, " is on ", device_name(t->device), " but logits is on ",
                device_name(logits.device));
  }
  TIDAL_CHECK(!detail::overlaps(logits, loss), "loss overlaps logits in memory; pass a distinct loss");
  if (rows == 0) return;
  if (logits.device.type == DeviceType::kCPU) {
    const int64_t* y = labels.data_ptr<const int64_t>();
    for (int64_t r = 0; r < rows; ++r) {
      TIDAL_CHECK(y[r] == ignore_index || (y[r] >= 0 && y[r] < vocab), "labels[", r, "]=", y[r], " must be in [0, ",
                  vocab, ") or ignore_index=", ignore_index);
    }
  }
  detail::dispatch(
      "softmax_cross_entropy", logits.device,
      [&] { cpu::softmax_cross_entropy(logits, loss, labels, scale, ignore_index, write_grad, stream); },
      [&] { gpu::softmax_cross_entropy(logits, loss, labels, scale, ignore_index, write_grad, stream); });
}

}  // namespace tidal::ops
