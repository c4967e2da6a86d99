// SPDX-License-Identifier: Apache-2.0
// The per-step scalars of the fused Adam/AdamW step, shared by the CPU and GPU kernels: rounded to
// fp32 exactly where torch rounds them (a Python float meeting an fp32 tensor), each computed in
// double first, as torch computes it in Python. A plain struct: kernels take it by value.
#pragma once

#include <cmath>

#include "tidal/ops_train.h"

namespace tidal::ops::detail {

struct AdamCoefs {
  float inv_grad_scale;  // 1 / grad_scale
  float decay;           // AdamW: 1 - lr * wd
  float l2;              // Adam: wd
  bool has_decay, decoupled, has_unscale;
  float w1;              // lerp weight 1 - beta1
  bool w1_small;         // |w1| < 0.5: torch's lerp takes m + w1 * (g - m), else g + (w1 - 1) * (g - m)
  float beta2, one_minus_beta2;
  float bc2_sqrt;        // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size;   // -lr / (1 - beta1^step)
};

inline AdamCoefs make_adam_coefs(const AdamOptions& o) {
  AdamCoefs c{};
  const double step = static_cast<double>(o.step);
  c.inv_grad_scale = static_cast<float>(1.0 / o.grad_scale);
  c.has_unscale = o.grad_scale != 1.0;
  c.has_decay = o.weight_decay != 0.0;
  c.decoupled = o.decoupled;
  c.decay = static_cast<float>(1.0 - o.lr * o.weight_decay);
  c.l2 = static_cast<float>(o.weight_decay);
  c.w1 = static_cast<float>(1.0 - o.beta1);
  c.w1_small = std::fabs(c.w1) < 0.5f;
  c.beta2 = static_cast<float>(o.beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - o.beta2);
  c.bc2_sqrt = static_cast<float>(std::pow(1.0 - std::pow(o.beta2, step), 0.5));
  c.eps = static_cast<float>(o.eps);
  c.neg_step_size = static_cast<float>(-(o.lr / (1.0 - std::pow(o.beta1, step))));
  return c;
}

}  // namespace tidal::ops::detail
