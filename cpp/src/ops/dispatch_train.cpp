// SPDX-License-Identifier: Apache-2.0
// The training ops of tidal/ops_train.h: validate tensors and hyper-parameters (every message names
// the argument and its value), then run the kernel of the tensors' device.
#include "tidal/ops_train.h"

#include <cmath>
#include <string>

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
               const AdamOptions& options, Stream stream) {
  check_flat_fp32(param, "param", param);
  check_flat_fp32(grad, "grad", param);
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
  if (param.numel() == 0) return;
  detail::dispatch(
      "adam_step", param.device, [&] { cpu::adam_step(param, grad, exp_avg, exp_avg_sq, options, stream); },
      [&] { gpu::adam_step(param, grad, exp_avg, exp_avg_sq, options, stream); });
}

}  // namespace tidal::ops
