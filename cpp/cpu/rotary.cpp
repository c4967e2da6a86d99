// SPDX-License-Identifier: Apache-2.0
// CPU kernels for rotary_embedding: rotates the first rotary_dim entries of every query and key head
// in place by the angles of the token's position, read from a float32 cos/sin cache; neox pairs
// (i, i + rotary_dim / 2) or GPT-J pairs (2i, 2i + 1); fp32 math, one rounding. And its fusion
// rotary_embedding_and_cache: optional per-head RMSNorm, rotary, and the KV-cache write in one pass.
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/dispatch_float.h"
#include "ops/kernels.h"

namespace tidal::cpu {
namespace {

template <typename T>
void rotate_neox(T* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
    x[i] = from_float<T>(x1 * cos[i] - x2 * sin[i]);
    x[i + half] = from_float<T>(x2 * cos[i] + x1 * sin[i]);
  }
}

template <typename T>
void rotate_gptj(T* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = to_float(x[2 * i]), x2 = to_float(x[2 * i + 1]);
    x[2 * i] = from_float<T>(x1 * cos[i] - x2 * sin[i]);
    x[2 * i + 1] = from_float<T>(x2 * cos[i] + x1 * sin[i]);
  }
}

// Rotates every head of x's token row t; x: [num_tokens, heads, head_dim].
template <typename T>
void rotate_heads(TensorView x, int64_t t, const float* cos, const float* sin, int64_t half, bool is_neox) {
  T* row = x.data_ptr<T>() + t * x.stride(0);
  for (int64_t h = 0; h < x.size(1); ++h) {
    T* head = row + h * x.stride(1);
    if (is_neox) {
      rotate_neox(head, cos, sin, half);
    } else {
      rotate_gptj(head, cos, sin, half);
    }
  }
}

template <typename T>
void rotary_embedding_impl(TensorView positions, TensorView query, TensorView key, TensorView cos_sin_cache,
                           bool is_neox) {
  const int64_t num_tokens = query.size(0), half = cos_sin_cache.size(1) / 2;
  const int64_t* pos = positions.data_ptr<const int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    const float* cos = cos_sin_cache.data_ptr<const float>() + pos[t * positions.stride(0)] * cos_sin_cache.stride(0);
    const float* sin = cos + half;
    rotate_heads<T>(query, t, cos, sin, half, is_neox);
    rotate_heads<T>(key, t, cos, sin, half, is_neox);
  }
}

// One head through (optional RMSNorm) -> (optional rotary) into dst (T, or the cache's element type
// C), staged in fp32 and rounded once.
template <typename T, typename C = T>
void norm_rotate_head(const T* src, C* dst, int64_t head_dim, const T* norm_weight, float eps, const float* cos,
                      const float* sin, int64_t rotary_dim, bool is_neox, float* row) {
  float sum_sq = 0.0f;
  for (int64_t e = 0; e < head_dim; ++e) {
    row[e] = to_float(src[e]);
    sum_sq += row[e] * row[e];
  }
  if (norm_weight != nullptr) {
    const float inv_rms = 1.0f / std::sqrt(sum_sq / static_cast<float>(head_dim) + eps);
    for (int64_t e = 0; e < head_dim; ++e) row[e] = row[e] * inv_rms * to_float(norm_weight[e]);
  }
  const int64_t half = rotary_dim / 2;
  for (int64_t e = 0; e < head_dim; ++e) {
    float out = row[e];
    if (cos != nullptr && e < rotary_dim) {
      if (is_neox) {
        const int64_t i = e < half ? e : e - half;
        out = e < half ? row[e] * cos[i] - row[e + half] * sin[i] : row[e] * cos[i] + row[e - half] * sin[i];
      } else {
        const int64_t i = e / 2;
        out = e % 2 == 0 ? row[e] * cos[i] - row[e + 1] * sin[i] : row[e] * cos[i] + row[e - 1] * sin[i];
      }
    }
    dst[e] = from_float<C>(out);
  }
}

// C: the caches' element type, T or Fp8E4M3.
template <typename T, typename C>
void rotary_embedding_and_cache_impl(TensorView positions, TensorView query, TensorView key, TensorView value,
                                     TensorView key_cache, TensorView value_cache, TensorView slot_mapping,
                                     TensorView cos_sin_cache, bool is_neox, TensorView q_norm_weight,
                                     TensorView k_norm_weight, float eps) {
  const int64_t num_tokens = query.size(0), head_dim = query.size(2), num_kv_heads = key.size(1);
  const int64_t rotary_dim = cos_sin_cache.size(1), half = rotary_dim / 2;
  const T* q_weight = q_norm_weight.data_ptr<const T>();
  const T* k_weight = k_norm_weight.data_ptr<const T>();
  std::vector<float> row(static_cast<size_t>(head_dim));
  for (int64_t t = 0; t < num_tokens; ++t) {
    const float* cos =
        cos_sin_cache.data_ptr<const float>() + positions.data_ptr<const int64_t>()[t * positions.stride(0)] *
                                                    cos_sin_cache.stride(0);
    const float* sin = cos + half;
    T* q_row = query.data_ptr<T>() + t * query.stride(0);
    for (int64_t h = 0; h < query.size(1); ++h) {
      T* head = q_row + h * query.stride(1);
      norm_rotate_head(head, head, head_dim, q_weight, eps, cos, sin, rotary_dim, is_neox, row.data());
    }
    const int64_t slot = slot_mapping.data_ptr<const int64_t>()[t * slot_mapping.stride(0)];
    if (slot < 0) continue;  // padding
    C* k_dst = static_cast<C*>(key_cache.data) + slot * num_kv_heads * head_dim;
    C* v_dst = static_cast<C*>(value_cache.data) + slot * num_kv_heads * head_dim;
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      const T* k = key.data_ptr<const T>() + t * key.stride(0) + h * key.stride(1);
      norm_rotate_head<T, C>(k, k_dst + h * head_dim, head_dim, k_weight, eps, cos, sin, rotary_dim, is_neox,
                             row.data());
      const T* v = value.data_ptr<const T>() + t * value.stride(0) + h * value.stride(1);
      for (int64_t e = 0; e < head_dim; ++e) {
        if constexpr (std::is_same_v<C, T>) {
          v_dst[h * head_dim + e] = v[e];
        } else {
          v_dst[h * head_dim + e] = from_float<C>(to_float(v[e]));
        }
      }
    }
  }
}

}  // namespace

void rotary_embedding_and_cache(TensorView positions, TensorView query, TensorView key, TensorView value,
                                TensorView key_cache, TensorView value_cache, TensorView slot_mapping,
                                TensorView cos_sin_cache, bool is_neox, TensorView q_norm_weight,
                                TensorView k_norm_weight, float eps, Stream) {
  const bool fp8_cache = key_cache.dtype == DType::kUInt8;
  TIDAL_CPU_DISPATCH_FLOAT(query.dtype, T, {
    if (fp8_cache) {
      rotary_embedding_and_cache_impl<T, Fp8E4M3>(positions, query, key, value, key_cache, value_cache, slot_mapping,
                                                  cos_sin_cache, is_neox, q_norm_weight, k_norm_weight, eps);
    } else {
      rotary_embedding_and_cache_impl<T, T>(positions, query, key, value, key_cache, value_cache, slot_mapping,
                                            cos_sin_cache, is_neox, q_norm_weight, k_norm_weight, eps);
    }
  });
}

void rotary_embedding(TensorView positions, TensorView query, TensorView key, TensorView cos_sin_cache,
                      bool is_neox, Stream) {
  TIDAL_CPU_DISPATCH_FLOAT(query.dtype, T, rotary_embedding_impl<T>(positions, query, key, cos_sin_cache, is_neox));
}

}  // namespace tidal::cpu
