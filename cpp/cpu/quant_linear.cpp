// SPDX-License-Identifier: Apache-2.0
// CPU kernels of the quantized linear layer: each output row's codes are widened to fp32 weights
// ((code - zero) * scale) once and dotted with every input row, so the weight is read at its
// quantized size (a quarter of fp32 for int8 and FP8, an eighth for int4); and dequantize_weight,
// the same widening written out. Output rows split over OpenMP threads; the dot loop has an AVX2 twin.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/dispatch_float.h"
#include "cpu/vectorize.h"
#include "ops/fp8.h"
#include "ops/kernels.h"

namespace tidal::cpu {
namespace {

constexpr int kInt4 = 1, kFp8 = 2;

/// w[i] = (code(row, i) - zero) * scale for the k inputs of output row `row`, a group at a time (the
/// inner loops have no division and vectorise).
TIDAL_CPU_INLINE void widen_row(float* w, TensorView qweight, TensorView scales, TensorView zeros, int format,
                                int64_t row, int64_t k) {
  const int64_t num_groups = scales.size(1), group = k / num_groups;
  const float* s = scales.data_ptr<const float>() + row * num_groups;
  if (format == kInt4) {
    const uint8_t* q = qweight.data_ptr<const uint8_t>() + row * (k / 2);
    const uint8_t* z = zeros.data_ptr<const uint8_t>() + row * num_groups;
    for (int64_t g = 0; g < num_groups; ++g) {
      const float scale = s[g], zero = static_cast<float>(z[g]);
      const uint8_t* qg = q + g * group / 2;
      float* wg = w + g * group;
      for (int64_t i = 0; i < group / 2; ++i) {
        wg[2 * i] = (static_cast<float>(qg[i] & 0xf) - zero) * scale;
        wg[2 * i + 1] = (static_cast<float>(qg[i] >> 4) - zero) * scale;
      }
    }
    return;
  }
  for (int64_t g = 0; g < num_groups; ++g) {
    const float scale = s[g];
    float* wg = w + g * group;
    if (format == kFp8) {
      const uint8_t* qg = qweight.data_ptr<const uint8_t>() + row * k + g * group;
      for (int64_t i = 0; i < group; ++i) wg[i] = fp8::to_float(qg[i]) * scale;
    } else {
      const int8_t* qg = qweight.data_ptr<const int8_t>() + row * k + g * group;
      for (int64_t i = 0; i < group; ++i) wg[i] = static_cast<float>(qg[i]) * scale;
    }
  }
}

TIDAL_CPU_TARGET_AVX2 void widen_row_avx2(float* w, TensorView qweight, TensorView scales, TensorView zeros,
                                          int format, int64_t row, int64_t k) {
  widen_row(w, qweight, scales, zeros, format, row, k);
}
void widen_row_base(float* w, TensorView qweight, TensorView scales, TensorView zeros, int format, int64_t row,
                    int64_t k) {
  widen_row(w, qweight, scales, zeros, format, row, k);
}

TIDAL_CPU_INLINE float dot(const float* a, const float* b, int64_t k) {
  float acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < k; ++i) total += a[i] * b[i];
  return total;
}

TIDAL_CPU_TARGET_AVX2 float dot_avx2(const float* a, const float* b, int64_t k) { return dot(a, b, k); }
float dot_base(const float* a, const float* b, int64_t k) { return dot(a, b, k); }

template <typename T>
void quant_linear_impl(TensorView out, TensorView x, TensorView qweight, TensorView scales, TensorView zeros,
                       TensorView bias, int format) {
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  std::vector<float> xf(static_cast<size_t>(m * k));
  for (int64_t r = 0; r < m; ++r) {
    const T* row = x.data_ptr<const T>() + r * x.stride(0);
    for (int64_t i = 0; i < k; ++i) xf[r * k + i] = widen(row[i]);
  }
  const auto dot_fn = cpu_has_avx2() ? &dot_avx2 : &dot_base;
  const auto widen_fn = cpu_has_avx2() ? &widen_row_avx2 : &widen_row_base;
  const T* b = bias.data == nullptr ? nullptr : bias.data_ptr<const T>();
  T* o = out.data_ptr<T>();
  const int64_t out_stride = out.stride(0);
#if defined(_OPENMP)
#pragma omp parallel if (n * k >= (1 << 16))
#endif
  {
    std::vector<float> w(static_cast<size_t>(k));
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t j = 0; j < n; ++j) {
      widen_fn(w.data(), qweight, scales, zeros, format, j, k);
      const float add = b == nullptr ? 0.f : widen(b[j]);
      for (int64_t r = 0; r < m; ++r) o[r * out_stride + j] = from_float<T>(dot_fn(w.data(), xf.data() + r * k, k) + add);
    }
  }
}

template <typename T>
void dequantize_impl(TensorView out, TensorView qweight, TensorView scales, TensorView zeros, int format) {
  const int64_t n = out.size(0), k = out.size(1);
  T* o = out.data_ptr<T>();
  const auto widen_fn = cpu_has_avx2() ? &widen_row_avx2 : &widen_row_base;
#if defined(_OPENMP)
#pragma omp parallel if (n * k >= (1 << 16))
#endif
  {
    std::vector<float> w(static_cast<size_t>(k));
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t j = 0; j < n; ++j) {
      widen_fn(w.data(), qweight, scales, zeros, format, j, k);
      for (int64_t i = 0; i < k; ++i) o[j * k + i] = from_float<T>(w[i]);
    }
  }
}

template <typename T>
void quantize_fp8_impl(TensorView codes, TensorView scales, TensorView x, TensorView static_scale) {
  const int64_t m = x.size(0), k = x.size(1);
  const float fixed = static_scale.data == nullptr ? 0.f : *static_scale.data_ptr<const float>();
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (m * k >= (1 << 16))
#endif
  for (int64_t t = 0; t < m; ++t) {
    const T* row = x.data_ptr<const T>() + t * x.stride(0);
    float scale = fixed;
    if (static_scale.data == nullptr) {
      float amax = 0.f;
      for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(widen(row[i])));
      scale = std::max(amax / 448.f, 1e-12f);
    }
    scales.data_ptr<float>()[t] = scale;
    uint8_t* out = codes.data_ptr<uint8_t>() + t * k;
    for (int64_t i = 0; i < k; ++i) out[i] = fp8::from_float(std::clamp(widen(row[i]) / scale, -448.f, 448.f));
  }
}

}  // namespace

void quantize_fp8_per_token(TensorView codes, TensorView scales, TensorView x, TensorView static_scale,
                            Stream /*stream*/) {
  TIDAL_CPU_DISPATCH_FLOAT(x.dtype, T, quantize_fp8_impl<T>(codes, scales, x, static_scale));
}

// NOTE(tidal): on the CPU the two kernels run one after the other (x holds the normalised rows in
// between): each is already one pass over its rows, so fusing saves no memory traffic worth the code.
void fused_add_rms_norm_quant_fp8(TensorView codes, TensorView scales, TensorView residual_out, TensorView x,
                                  TensorView residual, TensorView weight, float eps, Stream stream) {
  fused_add_rms_norm(x, residual_out, x, residual, weight, eps, stream);
  quantize_fp8_per_token(codes, scales, x, TensorView{}, stream);
}

// As above: the activation goes into x's gate half (each element read before it is written), then
// the quantizer reads it from there.
void silu_and_mul_quant_fp8(TensorView codes, TensorView scales, TensorView x, Stream stream) {
  TensorView act = x;
  act.shape[1] = x.size(1) / 2;
  silu_and_mul(act, x, stream);
  quantize_fp8_per_token(codes, scales, act, TensorView{}, stream);
}

void quant_linear(TensorView out, TensorView x, TensorView qweight, TensorView scales, TensorView zeros,
                  TensorView bias, int format, Stream /*stream*/) {
  TIDAL_CPU_DISPATCH_FLOAT(x.dtype, T, quant_linear_impl<T>(out, x, qweight, scales, zeros, bias, format));
}

void dequantize_weight(TensorView out, TensorView qweight, TensorView scales, TensorView zeros, int format,
                       Stream /*stream*/) {
  TIDAL_CPU_DISPATCH_FLOAT(out.dtype, T, dequantize_impl<T>(out, qweight, scales, zeros, format));
}

}  // namespace tidal::cpu
