// SPDX-License-Identifier: Apache-2.0
// CPU kernel of the fused Adam/AdamW step over flat fp32 buffers: one pass reads grad, param and both
// moments and writes the three, in torch.optim's single-tensor arithmetic order (see ops_train.h).
// AVX-512 (16 floats a step) and AVX2+FMA (8) twins next to the portable scalar loop, the same
// operations in the same order (equal results bit for bit); OpenMP over 64 KiB chunks.
#include <cmath>
#include <cstdint>

#include "cpu/dispatch_float.h"
#include "cpu/vectorize.h"
#include "ops/adam_coefs.h"
#include "ops/kernels.h"

#if TIDAL_CPU_HAS_AVX2_TWIN
#include <immintrin.h>
#endif

namespace tidal::cpu {
namespace {

using Coefs = ops::detail::AdamCoefs;

// NOTE(tidal): the FMAs below are where torch's CPU kernels fuse (lerp, add with alpha, and addcmul,
// whose mul + add the compiler contracts); everything else rounds after each operation. Do not
// "simplify" the order: it is what makes the result equal torch's bit for bit.
TIDAL_CPU_INLINE void adam_element(float& p, float grad, float& m, float& v, const Coefs& c) {
  float g = c.has_unscale ? grad * c.inv_grad_scale : grad;
  if (c.has_decay) {
    if (c.decoupled) p = p * c.decay;
    else g = std::fma(p, c.l2, g);
  }
  const float diff = g - m;
  m = c.w1_small ? std::fma(c.w1, diff, m) : std::fma(c.w1 - 1.f, diff, g);
  v = std::fma(c.one_minus_beta2 * g, g, v * c.beta2);
  const float denom = std::sqrt(v) / c.bc2_sqrt + c.eps;
  p = p + (c.neg_step_size * m) / denom;
}

TIDAL_CPU_INLINE void adam_range(float* p, const float* g, float* m, float* v, int64_t n, const Coefs& c) {
  for (int64_t i = 0; i < n; ++i) adam_element(p[i], g[i], m[i], v[i], c);
}

void adam_range_base(float* p, const float* g, float* m, float* v, int64_t n, const Coefs& c) {
  adam_range(p, g, m, v, n, c);
}

#if TIDAL_CPU_HAS_AVX2_TWIN
// One body for both vector widths: P is the intrinsics' prefix (_mm256 or _mm512), V their vector
// type. A macro because each instantiation needs its own target attribute.
#define TIDAL_ADAM_RANGE_SIMD(NAME, TARGET, V, P)                                                   \
  TARGET void NAME(float* p, const float* g, float* m, float* v, int64_t n, const Coefs& c) {       \
    constexpr int kWidth = sizeof(V) / sizeof(float);                                               \
    const V inv_scale = P##_set1_ps(c.inv_grad_scale), decay = P##_set1_ps(c.decay);                \
    const V l2 = P##_set1_ps(c.l2), w = P##_set1_ps(c.w1_small ? c.w1 : c.w1 - 1.f);                \
    const V beta2 = P##_set1_ps(c.beta2), one_minus_beta2 = P##_set1_ps(c.one_minus_beta2);         \
    const V bc2_sqrt = P##_set1_ps(c.bc2_sqrt), eps = P##_set1_ps(c.eps);                           \
    const V neg_step = P##_set1_ps(c.neg_step_size);                                                \
    int64_t i = 0;                                                                                  \
    for (; i + kWidth <= n; i += kWidth) {                                                          \
      V pv = P##_loadu_ps(p + i), gv = P##_loadu_ps(g + i);                                         \
      V mv = P##_loadu_ps(m + i), vv = P##_loadu_ps(v + i);                                         \
      if (c.has_unscale) gv = P##_mul_ps(gv, inv_scale);                                            \
      if (c.has_decay) {                                                                            \
        if (c.decoupled) pv = P##_mul_ps(pv, decay);                                                \
        else gv = P##_fmadd_ps(pv, l2, gv);                                                         \
      }                                                                                             \
      const V diff = P##_sub_ps(gv, mv);                                                            \
      mv = P##_fmadd_ps(w, diff, c.w1_small ? mv : gv);                                             \
      vv = P##_fmadd_ps(P##_mul_ps(one_minus_beta2, gv), gv, P##_mul_ps(vv, beta2));                \
      const V denom = P##_add_ps(P##_div_ps(P##_sqrt_ps(vv), bc2_sqrt), eps);                       \
      pv = P##_add_ps(pv, P##_div_ps(P##_mul_ps(neg_step, mv), denom));                             \
      P##_storeu_ps(p + i, pv);                                                                     \
      P##_storeu_ps(m + i, mv);                                                                     \
      P##_storeu_ps(v + i, vv);                                                                     \
    }                                                                                               \
    adam_range(p + i, g + i, m + i, v + i, n - i, c);                                               \
  }

TIDAL_ADAM_RANGE_SIMD(adam_range_avx2, TIDAL_CPU_TARGET_AVX2, __m256, _mm256)
TIDAL_ADAM_RANGE_SIMD(adam_range_avx512, TIDAL_CPU_TARGET_AVX512, __m512, _mm512)
#undef TIDAL_ADAM_RANGE_SIMD
#endif

// NOTE(tidal): 16 Ki floats per chunk = 64 KiB of each of the 4 streams (256 KiB, about L2); the
// step is memory bound at ~28 bytes per element, so threads only pay off on large shards.
constexpr int64_t kChunk = 16384;

}  // namespace

void adam_step(TensorView param, TensorView grad, TensorView exp_avg, TensorView exp_avg_sq,
               const ops::AdamOptions& options, Stream, TensorView param_copy) {
  const Coefs c = ops::detail::make_adam_coefs(options);
  const int64_t n = param.numel();
  float* p = param.data_ptr<float>();
  const bool wide_grad = grad.dtype == DType::kFloat32;
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
#if TIDAL_CPU_HAS_AVX2_TWIN
  const auto range_fn = cpu_has_avx512() ? &adam_range_avx512 : cpu_has_avx2() ? &adam_range_avx2 : &adam_range_base;
#else
  const auto range_fn = &adam_range_base;
#endif
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (num_chunks > 4)
#endif
  for (int64_t k = 0; k < num_chunks; ++k) {
    const int64_t lo = k * kChunk, len = (lo + kChunk < n ? kChunk : n - lo);
    if (wide_grad) {
      range_fn(p + lo, grad.data_ptr<const float>() + lo, m + lo, v + lo, len, c);
    } else {  // a 16-bit gradient, widened exactly into a chunk-sized buffer first
      float widened[kChunk];
      TIDAL_CPU_DISPATCH_FLOAT(grad.dtype, G, {
        const G* g = grad.data_ptr<const G>() + lo;
        for (int64_t i = 0; i < len; ++i) widened[i] = to_float(g[i]);
      });
      range_fn(p + lo, widened, m + lo, v + lo, len, c);
    }
    // the chunk is still in cache: its rounded copy costs no second pass over memory
    if (param_copy.data != nullptr) {
      TIDAL_CPU_DISPATCH_FLOAT(param_copy.dtype, T, {
        T* out = param_copy.data_ptr<T>() + lo;
        for (int64_t i = 0; i < len; ++i) out[i] = from_float<T>(p[lo + i]);
      });
    }
  }
}

}  // namespace tidal::cpu
