// SPDX-License-Identifier: Apache-2.0
// CPU kernel for fused_moe: softmax/top-k routing (renormalised or not, weights rounded to the model
// dtype or kept in fp32, as each family configures it), tokens grouped by expert so every expert's
// weights are read once, gate-up product, SiLU-and-mul and down product per assignment in fp32, and
// the weighted combine in ascending expert order (what transformers' index_add loop does).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/dispatch_float.h"
#include "ops/kernels.h"

namespace tidal::cpu {
namespace {

struct Assignment {
  int64_t token;
  int32_t slot;  // which of the token's top_k choices
};

template <typename T>
float dot(const T* a, const float* b, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += to_float(a[i]) * b[i];
  return acc;
}

// Top-k of one token's router logits -> (expert, weight) pairs sorted by expert.
template <typename L>
void route(const L* logits, int64_t num_experts, int64_t top_k, bool renormalize, bool round_weights,
           float (*round)(float), int32_t* experts, float* weights) {
  std::vector<float> p(static_cast<size_t>(num_experts));
  float mx = -INFINITY;
  for (int64_t e = 0; e < num_experts; ++e) mx = std::max(mx, to_float(logits[e]));
  float sum = 0.0f;
  for (int64_t e = 0; e < num_experts; ++e) {
    p[e] = std::exp(to_float(logits[e]) - mx);
    sum += p[e];
  }
  for (int64_t e = 0; e < num_experts; ++e) p[e] /= sum;
  std::vector<int32_t> order(static_cast<size_t>(num_experts));
  for (int64_t e = 0; e < num_experts; ++e) order[e] = static_cast<int32_t>(e);
  std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                    [&](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
  float picked = 0.0f;
  for (int64_t j = 0; j < top_k; ++j) picked += p[order[j]];
  std::sort(order.begin(), order.begin() + top_k);
  for (int64_t j = 0; j < top_k; ++j) {
    float w = p[order[j]];
    if (renormalize) w /= picked;
    experts[j] = order[j];
    weights[j] = round_weights ? round(w) : w;
  }
}

template <typename T>
float round_to(float v) {
  return to_float(from_float<T>(v));
}

template <typename T, typename L>
void fused_moe_impl(TensorView out, TensorView x, TensorView router_logits, TensorView w13, TensorView w2,
                    int64_t top_k, bool renormalize, bool fp32_weights) {
  const int64_t num_tokens = x.size(0), hidden = x.size(1), num_experts = w13.size(0), inter = w2.size(2);
  std::vector<int32_t> experts(static_cast<size_t>(num_tokens * top_k));
  std::vector<float> weights(static_cast<size_t>(num_tokens * top_k));
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (num_tokens >= 64)
#endif
  for (int64_t t = 0; t < num_tokens; ++t) {
    route(router_logits.data_ptr<const L>() + t * router_logits.stride(0), num_experts, top_k, renormalize,
          !fp32_weights, &round_to<T>, experts.data() + t * top_k, weights.data() + t * top_k);
  }
  // Group the assignments by expert (counting sort): each expert's weights are then read once.
  std::vector<int64_t> begin(static_cast<size_t>(num_experts + 1), 0);
  for (int32_t e : experts) ++begin[e + 1];
  for (int64_t e = 0; e < num_experts; ++e) begin[e + 1] += begin[e];
  std::vector<Assignment> by_expert(experts.size());
  std::vector<int64_t> fill(begin.begin(), begin.end() - 1);
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t j = 0; j < top_k; ++j) by_expert[fill[experts[t * top_k + j]]++] = {t, static_cast<int32_t>(j)};
  }
  // contributions[t, j, :] = w * W2[e] act(W13[e] x[t]), in fp32.
  std::vector<float> contributions(static_cast<size_t>(num_tokens * top_k * hidden));
  const T* w13_data = w13.data_ptr<const T>();
  const T* w2_data = w2.data_ptr<const T>();
#if defined(_OPENMP)
#pragma omp parallel
#endif
  {
    std::vector<float> xt(static_cast<size_t>(hidden)), act(static_cast<size_t>(inter));
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 4)
#endif
    for (int64_t i = 0; i < static_cast<int64_t>(by_expert.size()); ++i) {
      const Assignment a = by_expert[i];
      const int64_t e = experts[a.token * top_k + a.slot];
      const T* x_row = x.data_ptr<const T>() + a.token * x.stride(0);
      for (int64_t h = 0; h < hidden; ++h) xt[h] = to_float(x_row[h]);
      const T* gate = w13_data + e * 2 * inter * hidden;
      const T* up = gate + inter * hidden;
      for (int64_t r = 0; r < inter; ++r) {
        const float g = dot(gate + r * hidden, xt.data(), hidden);
        act[r] = g / (1.0f + std::exp(-g)) * dot(up + r * hidden, xt.data(), hidden);
      }
      const float w = weights[a.token * top_k + a.slot];
      float* dst = contributions.data() + (a.token * top_k + a.slot) * hidden;
      const T* down = w2_data + e * hidden * inter;
      for (int64_t h = 0; h < hidden; ++h) dst[h] = w * dot(down + h * inter, act.data(), inter);
    }
  }
  // Slots are in ascending expert order (route sorts them), so this sums as transformers does.
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (num_tokens >= 64)
#endif
  for (int64_t t = 0; t < num_tokens; ++t) {
    T* out_row = out.data_ptr<T>() + t * out.stride(0);
    for (int64_t h = 0; h < hidden; ++h) {
      float acc = 0.0f;
      for (int64_t j = 0; j < top_k; ++j) acc += contributions[(t * top_k + j) * hidden + h];
      out_row[h] = from_float<T>(acc);
    }
  }
}

}  // namespace

void fused_moe(TensorView out, TensorView x, TensorView router_logits, TensorView w13, TensorView w2, int64_t top_k,
               bool renormalize, bool fp32_weights, Stream) {
  TIDAL_CPU_DISPATCH_FLOAT(x.dtype, T, {
    if (router_logits.dtype == DType::kFloat32) {
      fused_moe_impl<T, float>(out, x, router_logits, w13, w2, top_k, renormalize, fp32_weights);
    } else {
      fused_moe_impl<T, T>(out, x, router_logits, w13, w2, top_k, renormalize, fp32_weights);
    }
  });
}

}  // namespace tidal::cpu
