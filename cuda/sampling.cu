// SPDX-License-Identifier: Apache-2.0
// seeded_exponential on the GPU: Exp(1) noise for the exponential race of seeded sampling, each value
// a function of (seed, offset, vocabulary index) alone (Philox4x32-10, the same words as the CPU
// kernel), so one launch serves every seeded row of a step and no row depends on the others.
#include <cstdint>

#include "cuda/common.cuh"
#include "ops/kernels.h"
#include "ops/philox.h"

namespace tidal::gpu {
namespace {

constexpr int kThreads = 256;

// Each thread draws one Philox block: four consecutive vocabulary entries of one row.
__global__ void __launch_bounds__(kThreads)
    seeded_exponential_kernel(float* __restrict__ out, const int64_t* __restrict__ seeds,
                              const int64_t* __restrict__ offsets, int64_t vocab, int64_t out_stride,
                              int64_t seed_stride, int64_t offset_stride) {
  const int64_t r = blockIdx.y;
  const int64_t v0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * 4;
  if (v0 >= vocab) return;
  const uint64_t seed = static_cast<uint64_t>(seeds[r * seed_stride]);
  const uint64_t offset = static_cast<uint64_t>(offsets[r * offset_stride]);
  const philox::Uint4 bits = philox::philox4x32_10(
      {static_cast<uint32_t>(v0 / 4), static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), 0u}, seed);
  const uint32_t words[4] = {bits.x, bits.y, bits.z, bits.w};
  float* row = out + r * out_stride;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (v0 + j < vocab) row[v0 + j] = -logf(philox::to_open_unit(words[j]));
  }
}

}  // namespace

void seeded_exponential(TensorView out, TensorView seeds, TensorView offsets, Stream stream) {
  const int64_t num_rows = out.size(0), vocab = out.size(1);
  if (num_rows == 0 || vocab == 0) return;
  DeviceGuard guard(out.device.index);
  const dim3 grid(static_cast<unsigned>((vocab + 4 * kThreads - 1) / (4 * kThreads)), static_cast<unsigned>(num_rows));
  seeded_exponential_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream.handle)>>>(
      out.data_ptr<float>(), seeds.data_ptr<const int64_t>(), offsets.data_ptr<const int64_t>(), vocab, out.stride(0),
      seeds.stride(0), offsets.stride(0));
  TIDAL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace tidal::gpu
