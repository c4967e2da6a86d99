// SPDX-License-Identifier: Apache-2.0
// CPU kernels for silu_and_mul, the gated activation of Llama-family MLPs: out = silu(gate) * up
// over the two halves of each row, in fp32 with one rounding, and for its backward pass. The row loop has an AVX2+FMA twin and
// splits over OpenMP threads for large inputs.
#include <cstdint>

#include "cpu/dispatch_float.h"
#include "cpu/vectorize.h"
#include "ops/kernels.h"

namespace tidal::cpu {
namespace {

// NOTE(tidal): below ~64K elements (~30 us on one core) the fork/join of a parallel region costs
// more than it saves.
constexpr int64_t kParallelMinElements = 1 << 16;

template <typename T>
TIDAL_CPU_INLINE void silu_and_mul_row(T* out, const T* x, int64_t d) {
  const T* up = x + d;
  for (int64_t i = 0; i < d; ++i) {
    const float g = widen(x[i]);
    out[i] = from_float<T>(g / (1.f + exp_approx(-g)) * widen(up[i]));
  }
}

template <typename T>
TIDAL_CPU_TARGET_AVX2 void silu_and_mul_row_avx2(T* out, const T* x, int64_t d) {
  silu_and_mul_row(out, x, d);
}

template <typename T>
void silu_and_mul_row_base(T* out, const T* x, int64_t d) {
  silu_and_mul_row(out, x, d);
}

template <typename T>
void silu_and_mul_impl(TensorView out, TensorView x) {
  const int64_t num_tokens = out.size(0), d = out.size(1);
  const auto row_fn = cpu_has_avx2() ? &silu_and_mul_row_avx2<T> : &silu_and_mul_row_base<T>;
  T* out_data = out.data_ptr<T>();
  const T* x_data = x.data_ptr<const T>();
  const int64_t out_stride = out.stride(0), x_stride = x.stride(0);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (num_tokens > 1 && num_tokens * d >= kParallelMinElements)
#endif
  for (int64_t t = 0; t < num_tokens; ++t) row_fn(out_data + t * out_stride, x_data + t * x_stride, d);
}

// d/dgate silu(gate) * up = up * s * (1 + gate * (1 - s)) and d/dup = silu(gate) = gate * s; out
// (when not null) gets the forward's value by the forward's expression.
template <typename T>
TIDAL_CPU_INLINE void silu_and_mul_backward_row(T* grad_x, T* out, const T* grad, const T* x, int64_t d) {
  const T* up = x + d;
  for (int64_t i = 0; i < d; ++i) {
    const float g = widen(x[i]), u = widen(up[i]), dy = widen(grad[i]);
    const float e = exp_approx(-g);
    const float s = 1.f / (1.f + e);
    grad_x[i] = from_float<T>(dy * u * s * (1.f + g * (1.f - s)));
    grad_x[d + i] = from_float<T>(dy * g * s);
    if (out != nullptr) out[i] = from_float<T>(g / (1.f + e) * u);
  }
}

template <typename T>
TIDAL_CPU_TARGET_AVX2 void silu_and_mul_backward_row_avx2(T* grad_x, T* out, const T* grad, const T* x, int64_t d) {
  silu_and_mul_backward_row(grad_x, out, grad, x, d);
}

template <typename T>
void silu_and_mul_backward_row_base(T* grad_x, T* out, const T* grad, const T* x, int64_t d) {
  silu_and_mul_backward_row(grad_x, out, grad, x, d);
}

template <typename T>
void silu_and_mul_backward_impl(TensorView grad_x, TensorView grad, TensorView x, TensorView out) {
  const int64_t num_tokens = grad.size(0), d = grad.size(1);
  const auto row_fn = cpu_has_avx2() ? &silu_and_mul_backward_row_avx2<T> : &silu_and_mul_backward_row_base<T>;
  T* gx = grad_x.data_ptr<T>();
  T* o = out.data == nullptr ? nullptr : out.data_ptr<T>();
  const T* g = grad.data_ptr<const T>();
  const T* xd = x.data_ptr<const T>();
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (num_tokens > 1 && num_tokens * d >= kParallelMinElements)
#endif
  for (int64_t t = 0; t < num_tokens; ++t) {
    row_fn(gx + t * grad_x.stride(0), o == nullptr ? nullptr : o + t * out.stride(0), g + t * grad.stride(0),
           xd + t * x.stride(0), d);
  }
}

}  // namespace

void silu_and_mul(TensorView out, TensorView x, Stream) {
  TIDAL_CPU_DISPATCH_FLOAT(x.dtype, T, silu_and_mul_impl<T>(out, x));
}

void silu_and_mul_backward(TensorView grad_x, TensorView grad, TensorView x, TensorView out, Stream) {
  TIDAL_CPU_DISPATCH_FLOAT(x.dtype, T, silu_and_mul_backward_impl<T>(grad_x, grad, x, out));
}

}  // namespace tidal::cpu
