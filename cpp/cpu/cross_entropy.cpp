// SPDX-License-Identifier: Apache-2.0
// CPU kernel of softmax_cross_entropy (tidal/ops_train.h): per row, the log-sum-exp in fp32 (the
// max first, then the sum of exponentials), the loss, and the gradient written over the logits.
// Rows split over OpenMP threads.
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/dispatch_float.h"
#include "ops/kernels.h"

namespace tidal::cpu {
namespace {

template <typename T>
void softmax_cross_entropy_impl(TensorView logits, TensorView loss, TensorView labels, TensorView scale,
                                int64_t ignore_index, bool write_grad) {
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const int64_t* y = labels.data_ptr<const int64_t>();
  float* out = loss.data_ptr<float>();
  const float s = *scale.data_ptr<const float>();
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (rows > 1 && rows * vocab >= (1 << 16))
#endif
  for (int64_t r = 0; r < rows; ++r) {
    T* x = logits.data_ptr<T>() + r * logits.stride(0);
    if (y[r] == ignore_index) {
      out[r] = 0.f;
      if (write_grad) {
        for (int64_t i = 0; i < vocab; ++i) x[i] = from_float<T>(0.f);
      }
      continue;
    }
    float max = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < vocab; ++i) max = std::fmax(max, to_float(x[i]));
    float sum = 0.f;
    for (int64_t i = 0; i < vocab; ++i) sum += std::exp(to_float(x[i]) - max);
    const float lse = max + std::log(sum);
    out[r] = lse - to_float(x[y[r]]);
    if (write_grad) {
      for (int64_t i = 0; i < vocab; ++i) {
        const float p = std::exp(to_float(x[i]) - lse);
        x[i] = from_float<T>((i == y[r] ? p - 1.f : p) * s);
      }
    }
  }
}

}  // namespace

void softmax_cross_entropy(TensorView logits, TensorView loss, TensorView labels, TensorView scale,
                           int64_t ignore_index, bool write_grad, Stream) {
  TIDAL_CPU_DISPATCH_FLOAT(logits.dtype, T,
                           softmax_cross_entropy_impl<T>(logits, loss, labels, scale, ignore_index, write_grad));
}

}  // namespace tidal::cpu
