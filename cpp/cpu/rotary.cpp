// SPDX-License-Identifier: Apache-2.0
// CPU kernel for rotary_embedding: rotates the first rotary_dim entries of every query and key head
// in place by the angles of the token's position, read from a float32 cos/sin cache; neox pairs
// (i, i + rotary_dim / 2) or GPT-J pairs (2i, 2i + 1); fp32 math, one rounding.
#include <cstdint>

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

}  // namespace

void rotary_embedding(TensorView positions, TensorView query, TensorView key, TensorView cos_sin_cache,
                      bool is_neox, Stream) {
  TIDAL_CPU_DISPATCH_FLOAT(query.dtype, T, rotary_embedding_impl<T>(positions, query, key, cos_sin_cache, is_neox));
}

}  // namespace tidal::cpu
