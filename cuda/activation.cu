// SPDX-License-Identifier: Apache-2.0
// silu_and_mul on the GPU: out[t, i] = silu(x[t, i]) * x[t, d + i], fp32 math, one rounding; and
// its backward pass (the gradients of both halves of x from the gradient of out).
// One grid-stride kernel over (row, access) pairs with 16-byte accesses when the row width, the
// strides and the bases allow, one element per access otherwise. Built by nvcc and by hipcc.
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "cuda/common.cuh"
#include "ops/kernels.h"

namespace tidal::gpu {
namespace {

// NOTE(tidal): napkin math, Llama-3-8B prefill of 8192 tokens: x is 8192 x 28672 bf16 (470 MB) and
// out half that, 705 MB in all: 168 us at 4.2 TB/s. The kernel is a pure stream; every thread
// moves one 16-byte access of gate, one of up and one of out per iteration.
constexpr int kThreads = 256;

// Calls fn(t, c) for every access of kWidth elements of a [num_tokens, d] row half (token t, first
// column c), grid-stride over the whole launch.
template <int kWidth, typename Fn>
__device__ __forceinline__ void for_each_access(int64_t num_tokens, int64_t d, Fn fn) {
  const int64_t vecs_per_row = d / kWidth;
  const int64_t total = num_tokens * vecs_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    fn(i / vecs_per_row, (i % vecs_per_row) * kWidth);
  }
}

template <typename T, int kWidth>
__global__ void __launch_bounds__(kThreads)
    silu_and_mul_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t num_tokens, int64_t d,
                        int64_t out_stride, int64_t x_stride) {
  wait_for_prior_grid();  // launched by launch_dependent
  allow_dependents();
  for_each_access<kWidth>(num_tokens, d, [&](int64_t t, int64_t c) {
    const T* row = x + t * x_stride;
    const Vec<T, kWidth> gate = load_vec_readonly<T, kWidth>(row + c);
    const Vec<T, kWidth> up = load_vec_readonly<T, kWidth>(row + d + c);
    Vec<T, kWidth> o;
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      o.v[j] = from_float<T>(silu_mul(element_to_float(gate, j), element_to_float(up, j)));
    }
    store_vec(out + t * out_stride + c, o);
  });
}

// NOTE(tidal): Llama-3.2-1B training, micro-batch 4 x 2048: x is 8192 x 16384 bf16 (268 MB), grad
// half that and grad_x as x: 671 MB, 160 us at 4.2 TB/s; recomputing out adds 134 MB (32 us), where
// keeping it from the forward would cost those 134 MB of memory per layer. Same stream shape as the
// forward. out may be null (kHasOut false).
template <typename T, int kWidth, bool kHasOut>
__global__ void __launch_bounds__(kThreads)
    silu_and_mul_backward_kernel(T* __restrict__ grad_x, T* __restrict__ out, const T* __restrict__ grad,
                                 const T* __restrict__ x, int64_t num_tokens, int64_t d, int64_t grad_x_stride,
                                 int64_t out_stride, int64_t grad_stride, int64_t x_stride) {
  for_each_access<kWidth>(num_tokens, d, [&](int64_t t, int64_t c) {
    const T* row = x + t * x_stride;
    const Vec<T, kWidth> gate = load_vec_readonly<T, kWidth>(row + c);
    const Vec<T, kWidth> up = load_vec_readonly<T, kWidth>(row + d + c);
    const Vec<T, kWidth> dy = load_vec_readonly<T, kWidth>(grad + t * grad_stride + c);
    Vec<T, kWidth> d_gate, d_up, o;
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      const float g = element_to_float(gate, j), u = element_to_float(up, j), dj = element_to_float(dy, j);
      const float e = __expf(-g);
      const float s = 1.0f / (1.0f + e);
      d_gate.v[j] = from_float<T>(dj * u * s * (1.0f + g * (1.0f - s)));
      d_up.v[j] = from_float<T>(dj * g * s);
      if constexpr (kHasOut) o.v[j] = from_float<T>(g / (1.0f + e) * u);  // the forward's expression
    }
    T* grad_row = grad_x + t * grad_x_stride;
    store_vec(grad_row + c, d_gate);
    store_vec(grad_row + d + c, d_up);
    if constexpr (kHasOut) store_vec(out + t * out_stride + c, o);
  });
}

// Launches kernel<T, 16-byte width> over the accesses of a [num_tokens, d] half when every view
// allows 16-byte accesses, kernel<T, 1> otherwise: enough blocks for ~16 per SM on the largest
// GPUs; the grid-stride loop covers the rest.
template <typename T, typename Launch>
void launch_rows(int64_t num_tokens, int64_t d, std::initializer_list<const TensorView*> views, Launch launch) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorize = can_vectorize(d, kVec, views);
  const int64_t total = num_tokens * (d / (vectorize ? kVec : 1));
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 132 * 16));
  if (vectorize) {
    launch(std::integral_constant<int, kVec>{}, blocks);
  } else {
    launch(std::integral_constant<int, 1>{}, blocks);
  }
  TIDAL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void silu_and_mul_backward(TensorView grad_x, TensorView grad, TensorView x, TensorView out, Stream stream) {
  const int64_t num_tokens = grad.size(0), d = grad.size(1);
  if (num_tokens == 0 || d == 0) return;
  DeviceGuard guard(x.device.index);
  const auto s = static_cast<cudaStream_t>(stream.handle);
  const bool has_out = out.data != nullptr;
  TIDAL_DISPATCH_FLOAT(x.dtype, T, {
    T* out_data = has_out ? out.data_ptr<T>() : nullptr;
    const int64_t out_stride = has_out ? out.stride(0) : 0;
    // without out, x stands in for it in the alignment check
    launch_rows<T>(num_tokens, d, {&grad_x, &grad, &x, has_out ? &out : &x}, [&](auto width, unsigned blocks) {
      constexpr int kWidth = decltype(width)::value;
      const auto kernel = has_out ? silu_and_mul_backward_kernel<T, kWidth, true>
                                  : silu_and_mul_backward_kernel<T, kWidth, false>;
      kernel<<<blocks, kThreads, 0, s>>>(grad_x.data_ptr<T>(), out_data, grad.data_ptr<const T>(),
                                         x.data_ptr<const T>(), num_tokens, d, grad_x.stride(0), out_stride,
                                         grad.stride(0), x.stride(0));
    });
  });
}

void silu_and_mul(TensorView out, TensorView x, Stream stream) {
  const int64_t num_tokens = out.size(0), d = out.size(1);
  if (num_tokens == 0 || d == 0) return;
  DeviceGuard guard(x.device.index);
  const auto s = static_cast<cudaStream_t>(stream.handle);
  TIDAL_DISPATCH_FLOAT(x.dtype, T, {
    launch_rows<T>(num_tokens, d, {&out, &x}, [&](auto width, unsigned blocks) {
      launch_dependent(silu_and_mul_kernel<T, decltype(width)::value>, dim3(blocks), dim3(kThreads), 0, s,
                       x.device.index, out.data_ptr<T>(), x.data_ptr<const T>(), num_tokens, d, out.stride(0),
                       x.stride(0));
    });
  });
}

}  // namespace tidal::gpu
