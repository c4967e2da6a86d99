// SPDX-License-Identifier: Apache-2.0
// The public ops: validate the arguments once, then dispatch by device to the CPU kernel or the GPU
// kernel. A GPU tensor in a build without GPU kernels is an error that says so; there is no silent
// fallback to the CPU.
#include "tidal/ops.h"

#include "ops/checks.h"
#include "ops/device_dispatch.h"
#include "ops/kernels.h"

namespace tidal::ops {
void rms_norm(TensorView out, TensorView x, TensorView weight, float eps, Stream stream) {
  detail::check_rows(x, "x");
  detail::check_rows(out, "out");
  detail::check_like(out, "out", x, "x");
  detail::check_norm_weight(weight, x);
  detail::check_eps(eps);
  if (x.size(0) == 0) return;
  detail::dispatch(
      "rms_norm", x.device, [&] { cpu::rms_norm(out, x, weight, eps, stream); },
      [&] { gpu::rms_norm(out, x, weight, eps, stream); });
}

void fused_add_rms_norm(TensorView out, TensorView residual_out, TensorView x, TensorView residual,
                        TensorView weight, float eps, Stream stream) {
  detail::check_rows(x, "x");
  detail::check_rows(residual, "residual");
  detail::check_rows(out, "out");
  detail::check_rows(residual_out, "residual_out");
  detail::check_like(residual, "residual", x, "x");
  detail::check_like(out, "out", x, "x");
  detail::check_like(residual_out, "residual_out", x, "x");
  detail::check_norm_weight(weight, x);
  detail::check_eps(eps);
  TIDAL_CHECK(!detail::overlaps(out, residual_out), "out and residual_out overlap in memory; pass distinct "
              "tensors (in place, x and residual must be distinct)");
  if (x.size(0) == 0) return;
  detail::dispatch(
      "fused_add_rms_norm", x.device,
      [&] { cpu::fused_add_rms_norm(out, residual_out, x, residual, weight, eps, stream); },
      [&] { gpu::fused_add_rms_norm(out, residual_out, x, residual, weight, eps, stream); });
}

}  // namespace tidal::ops
