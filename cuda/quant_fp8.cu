// SPDX-License-Identifier: Apache-2.0
// Activations to FP8 E4M3 per token on the GPU (W8A8's dynamic scaling): one block per row finds the
// row's largest magnitude, then writes its scale and codes. The conversion (ops/fp8.h) is the CPU
// kernel's, bit for bit. CUDA and HIP alike.
#include <algorithm>
#include <cstdint>

#include "cuda/common.cuh"
#include "ops/fp8.h"
#include "ops/kernels.h"

namespace tidal::gpu {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_fp8_kernel(uint8_t* __restrict__ codes, float* __restrict__ scales,
                                                               const T* __restrict__ x, const float* static_scale,
                                                               int64_t m, int64_t k, int64_t x_stride) {
  __shared__ float scratch[kMaxWarpsPerBlock];
  for (int64_t t = blockIdx.x; t < m; t += gridDim.x) {
    const T* row = x + t * x_stride;
    float scale;
    if (static_scale != nullptr) {
      scale = *static_scale;
    } else {
      float amax = 0.f;
      for (int64_t i = threadIdx.x; i < k; i += kThreads) amax = fmaxf(amax, fabsf(to_float(row[i])));
      for (int mask = kWarpSize / 2; mask > 0; mask /= 2) amax = fmaxf(amax, TIDAL_SHFL_XOR(amax, mask));
      if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = amax;
      __syncthreads();
      amax = 0.f;
      for (int w = 0; w < kThreads / kWarpSize; ++w) amax = fmaxf(amax, scratch[w]);
      __syncthreads();  // scratch is reused by the next row
      scale = fmaxf(amax / 448.f, 1e-12f);
    }
    if (threadIdx.x == 0) scales[t] = scale;
    uint8_t* out = codes + t * k;
    for (int64_t i = threadIdx.x; i < k; i += kThreads) {
      out[i] = fp8::from_float(fminf(fmaxf(to_float(row[i]) / scale, -448.f), 448.f));
    }
  }
}

}  // namespace

void quantize_fp8_per_token(TensorView codes, TensorView scales, TensorView x, TensorView static_scale, Stream stream) {
  const int64_t m = x.size(0), k = x.size(1);
  DeviceGuard guard(x.device.index);
  const auto s = static_cast<cudaStream_t>(stream.handle);
  const int64_t grid = std::min<int64_t>(m, 65535);
  TIDAL_DISPATCH_FLOAT(x.dtype, T, {
    quantize_fp8_kernel<T><<<static_cast<unsigned>(grid), kThreads, 0, s>>>(
        static_cast<uint8_t*>(codes.data), static_cast<float*>(scales.data), static_cast<const T*>(x.data),
        static_cast<const float*>(static_scale.data), m, k, x.stride(0));
  });
  TIDAL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace tidal::gpu
