// SPDX-License-Identifier: Apache-2.0
// The fused Adam/AdamW step on the GPU: one grid-stride launch over the flat fp32 buffers reads
// grad, param and both moments and writes the three, in the arithmetic order of the CPU kernel
// (cpp/cpu/adam.cpp, torch's single-tensor order), 16-byte accesses when the buffers allow. Built by
// nvcc and by hipcc.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"
#include "ops/adam_coefs.h"
#include "ops/kernels.h"

namespace tidal::gpu {
namespace {

using Coefs = ops::detail::AdamCoefs;

// NOTE(tidal): napkin math, Llama-3.2-1B on one GPU: 1.24 G fp32 elements x 28 bytes (read p, g, m,
// v; write p, m, v) = 35 GB per step, ~8 ms at 4.2 TB/s. torch's unfused arithmetic over the same
// buffers (mul_, lerp_, mul_, addcmul_, sqrt, div, add_, addcdiv_) moves ~3x that.
constexpr int kThreads = 256;

__device__ __forceinline__ void adam_element(float& p, float grad, float& m, float& v, const Coefs& c) {
  float g = c.has_unscale ? grad * c.inv_grad_scale : grad;
  if (c.has_decay) {
    if (c.decoupled) {
      p = p * c.decay;
    } else {
      g = fmaf(p, c.l2, g);
    }
  }
  const float diff = g - m;
  m = c.w1_small ? fmaf(c.w1, diff, m) : fmaf(c.w1 - 1.f, diff, g);
  v = fmaf(c.one_minus_beta2 * g, g, v * c.beta2);
  const float denom = sqrtf(v) / c.bc2_sqrt + c.eps;
  p = p + (c.neg_step_size * m) / denom;
}

// G: the gradient's dtype (fp32, or the 16-bit compute dtype, widened on load). TCopy: the dtype of
// the rounded copy of the updated param (void: none).
template <int kWidth, typename G, typename TCopy>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(float* __restrict__ p, const G* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                int64_t n, Coefs c, TCopy* __restrict__ copy) {
  constexpr bool kCopy = !std::is_void_v<TCopy>;
  using CopyT = std::conditional_t<kCopy, TCopy, float>;
  const int64_t vecs = n / kWidth;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < vecs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t at = i * kWidth;
    Vec<float, kWidth> pv = load_vec<float, kWidth>(p + at), mv = load_vec<float, kWidth>(m + at),
                       vv = load_vec<float, kWidth>(v + at);
    const Vec<G, kWidth> gv = load_vec_readonly<G, kWidth>(g + at);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) adam_element(pv.v[j], element_to_float(gv, j), mv.v[j], vv.v[j], c);
    store_vec(p + at, pv);
    store_vec(m + at, mv);
    store_vec(v + at, vv);
    if constexpr (kCopy) {
      Vec<CopyT, kWidth> out;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) out.v[j] = from_float<CopyT>(pv.v[j]);
      store_vec(reinterpret_cast<CopyT*>(copy) + at, out);
    }
  }
  // the tail past the last whole access (kWidth > 1 only)
  const int64_t tail = vecs * kWidth + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (kWidth > 1 && tail < n) {
    adam_element(p[tail], to_float(g[tail]), m[tail], v[tail], c);
    if constexpr (kCopy) reinterpret_cast<CopyT*>(copy)[tail] = from_float<CopyT>(p[tail]);
  }
}

}  // namespace

void adam_step(TensorView param, TensorView grad, TensorView exp_avg, TensorView exp_avg_sq,
               const ops::AdamOptions& options, Stream stream, TensorView param_copy) {
  const int64_t n = param.numel();
  if (n == 0) return;
  DeviceGuard guard(param.device.index);
  const Coefs c = ops::detail::make_adam_coefs(options);
  float* p = param.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  const bool has_copy = param_copy.data != nullptr;
  // the copy's 4-element accesses are 8 bytes (16-bit) or 16 bytes (fp32)
  // 4-element accesses: 16 bytes of fp32, 8 bytes of a 16-bit gradient or copy
  const auto aligned4 = [](const TensorView& t) { return is_aligned(t.data, t.dtype == DType::kFloat32 ? 16 : 8); };
  const bool vectorize = is_aligned(p, 16) && aligned4(grad) && is_aligned(m, 16) && is_aligned(v, 16) &&
                         (!has_copy || aligned4(param_copy));
  const int64_t width = vectorize ? 4 : 1;
  // Enough blocks for ~8 per SM on the largest GPUs; the grid-stride loop covers the rest.
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((n / width + kThreads - 1) / kThreads, 132 * 8));
  const auto s = static_cast<cudaStream_t>(stream.handle);
  const auto launch = [&](const auto* g, auto* copy) {
    using G = std::remove_const_t<std::remove_pointer_t<decltype(g)>>;
    using TCopy = std::remove_pointer_t<decltype(copy)>;
    if (vectorize) {
      adam_kernel<4, G, TCopy><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(p, g, m, v, n, c, copy);
    } else {
      adam_kernel<1, G, TCopy><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(p, g, m, v, n, c, copy);
    }
  };
  TIDAL_DISPATCH_FLOAT(grad.dtype, G, {
    const G* g = grad.data_ptr<const G>();
    if (!has_copy) {
      launch(g, static_cast<void*>(nullptr));
    } else {
      TIDAL_DISPATCH_FLOAT(param_copy.dtype, T, launch(g, param_copy.data_ptr<T>()));
    }
  });
  TIDAL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace tidal::gpu
