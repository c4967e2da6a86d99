// SPDX-License-Identifier: Apache-2.0
// CPU kernels for rms_norm and fused_add_rms_norm: the reference implementations. One pass per row
// accumulates the sum of squares in fp32, a second pass scales and rounds once to the dtype. And
// rms_norm's backward pass: the input gradient per row, the weight gradient summed per part of the
// rows (the parts run on OpenMP threads).
#include <cmath>
#include <cstdint>

#include "cpu/dispatch_float.h"
#include "ops/kernels.h"

namespace tidal::cpu {
namespace {

// NOTE(tidal): 8 partial sums let the compiler vectorise the reduction without -ffast-math;
// the order differs from a serial sum by far less than the tests' tolerance.
constexpr int kLanes = 8;

template <typename T>
float sum_of_squares(const T* row, int64_t n) {
  float partial[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = to_float(row[i + l]);
      partial[l] += v * v;
    }
  }
  float total = 0.f;
  for (int l = 0; l < kLanes; ++l) total += partial[l];
  for (; i < n; ++i) {
    const float v = to_float(row[i]);
    total += v * v;
  }
  return total;
}

template <typename T>
void scale_row(T* out, const T* in, const T* weight, int64_t n, float inv_rms) {
  for (int64_t i = 0; i < n; ++i) out[i] = from_float<T>(to_float(in[i]) * inv_rms * to_float(weight[i]));
}

template <typename T>
void rms_norm_impl(TensorView out, TensorView x, TensorView weight, float eps) {
  const int64_t num_tokens = x.size(0), hidden = x.size(1);
  const T* w = weight.data_ptr<T>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    const T* x_row = x.data_ptr<T>() + t * x.stride(0);
    T* out_row = out.data_ptr<T>() + t * out.stride(0);
    const float inv_rms = 1.f / std::sqrt(sum_of_squares(x_row, hidden) / static_cast<float>(hidden) + eps);
    scale_row(out_row, x_row, w, hidden, inv_rms);
  }
}

template <typename T>
void fused_add_rms_norm_impl(TensorView out, TensorView residual_out, TensorView x, TensorView residual,
                             TensorView weight, float eps) {
  const int64_t num_tokens = x.size(0), hidden = x.size(1);
  const T* w = weight.data_ptr<T>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    const T* x_row = x.data_ptr<T>() + t * x.stride(0);
    const T* res_row = residual.data_ptr<T>() + t * residual.stride(0);
    T* res_out_row = residual_out.data_ptr<T>() + t * residual_out.stride(0);
    T* out_row = out.data_ptr<T>() + t * out.stride(0);
    // Each element is read before it is written, so residual_out may be residual.
    for (int64_t i = 0; i < hidden; ++i) res_out_row[i] = from_float<T>(to_float(x_row[i]) + to_float(res_row[i]));
    const float inv_rms =
        1.f / std::sqrt(sum_of_squares(res_out_row, hidden) / static_cast<float>(hidden) + eps);
    scale_row(out_row, res_out_row, w, hidden, inv_rms);
  }
}

// Rows [first, last) of the backward pass; adds their weight gradient into partial[hidden].
template <typename T>
void rms_norm_backward_rows(TensorView grad_x, float* partial, TensorView grad, TensorView x, const T* w,
                            float eps, int64_t first, int64_t last) {
  const int64_t hidden = x.size(1);
  for (int64_t t = first; t < last; ++t) {
    const T* x_row = x.data_ptr<T>() + t * x.stride(0);
    const T* g_row = grad.data_ptr<T>() + t * grad.stride(0);
    T* gx_row = grad_x.data_ptr<T>() + t * grad_x.stride(0);
    const float inv_rms = 1.f / std::sqrt(sum_of_squares(x_row, hidden) / static_cast<float>(hidden) + eps);
    float dot = 0.f;  // sum of g_hat * x_hat
    for (int64_t i = 0; i < hidden; ++i) dot += to_float(g_row[i]) * to_float(w[i]) * to_float(x_row[i]) * inv_rms;
    const float mean_dot = dot / static_cast<float>(hidden);
    for (int64_t i = 0; i < hidden; ++i) {
      const float x_hat = to_float(x_row[i]) * inv_rms, g = to_float(g_row[i]);
      gx_row[i] = from_float<T>(inv_rms * (g * to_float(w[i]) - x_hat * mean_dot));
      partial[i] += g * x_hat;
    }
  }
}

template <typename T>
void rms_norm_backward_impl(TensorView grad_x, TensorView partial, TensorView grad, TensorView x, TensorView weight,
                            float eps) {
  const int64_t num_tokens = x.size(0), hidden = x.size(1), parts = partial.size(0);
  const T* w = weight.data_ptr<T>();
  float* partial_data = partial.data_ptr<float>();
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (parts > 1 && num_tokens * hidden >= (1 << 16))
#endif
  for (int64_t p = 0; p < parts; ++p) {
    float* row = partial_data + p * hidden;
    for (int64_t i = 0; i < hidden; ++i) row[i] = 0.f;
    rms_norm_backward_rows<T>(grad_x, row, grad, x, w, eps, p * num_tokens / parts, (p + 1) * num_tokens / parts);
  }
}

}  // namespace

void rms_norm_backward(TensorView grad_x, TensorView grad_weight_partial, TensorView grad, TensorView x,
                       TensorView weight, float eps, Stream) {
  TIDAL_CPU_DISPATCH_FLOAT(x.dtype, T, rms_norm_backward_impl<T>(grad_x, grad_weight_partial, grad, x, weight, eps));
}

void rms_norm(TensorView out, TensorView x, TensorView weight, float eps, Stream) {
  TIDAL_CPU_DISPATCH_FLOAT(x.dtype, T, rms_norm_impl<T>(out, x, weight, eps));
}

void fused_add_rms_norm(TensorView out, TensorView residual_out, TensorView x, TensorView residual,
                        TensorView weight, float eps, Stream) {
  TIDAL_CPU_DISPATCH_FLOAT(x.dtype, T, fused_add_rms_norm_impl<T>(out, residual_out, x, residual, weight, eps));
}

}  // namespace tidal::cpu
