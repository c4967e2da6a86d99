// SPDX-License-Identifier: Apache-2.0
// softmax_cross_entropy on the GPU (tidal/ops_train.h): one block per row; a first pass keeps a
// running (max, sum of exponentials) per thread and merges them across the block into the row's
// log-sum-exp, a second pass writes the gradient over the logits. Built by nvcc and by hipcc.
#include <cfloat>
#include <cstdint>

#include "cuda/common.cuh"
#include "ops/kernels.h"

namespace tidal::gpu {
namespace {

// NOTE(tidal): napkin math, the LM head of Llama-3.2-1B in training: a chunk of 2048 rows x 128256
// bf16 logits is 525 MB; the kernel reads it twice (the second read partly from L2) and writes it
// once: ~1.6 GB, ~0.4 ms at 4.2 TB/s per chunk, against ~11 GB for the unfused fp32 chain (cast,
// logsumexp with its temporaries, subtract-exp, scale, cast back). 512 threads keep ~16 KB of
// loads in flight per block; a row of 128256 is ~31 16-byte accesses per thread.
constexpr int kThreads = 512;
constexpr float kLog2e = 1.4426950408889634f;

// Merges the running state (m, s), s = sum of exp(x - m), with (m2, s2).
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;  // both empty
  s = s * exp2f((m - mx) * kLog2e) + s2 * exp2f((m2 - mx) * kLog2e);
  m = mx;
}

template <typename T, int kWidth>
__global__ void __launch_bounds__(kThreads)
    softmax_cross_entropy_kernel(T* __restrict__ logits, float* __restrict__ loss, const int64_t* __restrict__ labels,
                                 const float* __restrict__ scale, int64_t vocab, int64_t stride, int64_t ignore_index,
                                 bool write_grad) {
  __shared__ float shared_m[kMaxWarpsPerBlock], shared_s[kMaxWarpsPerBlock];
  __shared__ float picked;
  const int64_t row = blockIdx.x;
  T* x = logits + row * stride;
  const int64_t y = labels[row];
  const int64_t num_vecs = vocab / kWidth;
  if (y == ignore_index) {
    if (threadIdx.x == 0) loss[row] = 0.0f;
    if (write_grad) {
      Vec<T, kWidth> zero;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) zero.v[j] = from_float<T>(0.0f);
      for (int64_t i = threadIdx.x; i < num_vecs; i += blockDim.x) store_vec(x + i * kWidth, zero);
    }
    return;
  }
  const bool valid = y >= 0 && y < vocab;
  if (threadIdx.x == 0) picked = valid ? to_float(x[y]) : NAN;  // read before the second pass writes
  float m = -INFINITY, s = 0.0f;
  for (int64_t i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    const Vec<T, kWidth> v = load_vec<T, kWidth>(x + i * kWidth);
    float vmax = element_to_float(v, 0);
#pragma unroll
    for (int j = 1; j < kWidth; ++j) vmax = fmaxf(vmax, element_to_float(v, j));
    const float mx = fmaxf(m, vmax);
    float part = 0.0f;
#pragma unroll
    for (int j = 0; j < kWidth; ++j) part += exp2f((element_to_float(v, j) - mx) * kLog2e);
    s = s * exp2f((m - mx) * kLog2e) + part;
    m = mx;
  }
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) {
    merge(m, s, TIDAL_SHFL_XOR(m, mask), TIDAL_SHFL_XOR(s, mask));
  }
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  if (lane == 0) {
    shared_m[warp] = m;
    shared_s[warp] = s;
  }
  __syncthreads();
  m = lane < num_warps ? shared_m[lane] : -INFINITY;
  s = lane < num_warps ? shared_s[lane] : 0.0f;
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) {
    merge(m, s, TIDAL_SHFL_XOR(m, mask), TIDAL_SHFL_XOR(s, mask));
  }
  const float lse = m + logf(s);
  if (threadIdx.x == 0) loss[row] = lse - picked;
  if (!write_grad) return;
  const float sc = *scale;
  for (int64_t i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    const Vec<T, kWidth> v = load_vec<T, kWidth>(x + i * kWidth);
    Vec<T, kWidth> d;
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      const float p = exp2f((element_to_float(v, j) - lse) * kLog2e);
      d.v[j] = from_float<T>((i * kWidth + j == y ? p - 1.0f : p) * sc);
    }
    store_vec(x + i * kWidth, d);
  }
}

}  // namespace

void softmax_cross_entropy(TensorView logits, TensorView loss, TensorView labels, TensorView scale,
                           int64_t ignore_index, bool write_grad, Stream stream) {
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  if (rows == 0) return;
  TIDAL_CHECK(rows <= 0x7fffffff, "logits.shape[0]=", rows, " must be < 2^31");
  DeviceGuard guard(logits.device.index);
  TIDAL_DISPATCH_FLOAT(logits.dtype, T, {
    constexpr int kVec = 16 / sizeof(T);
    const auto s = static_cast<cudaStream_t>(stream.handle);
    const auto run = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(rows), kThreads, 0, s>>>(logits.data_ptr<T>(), loss.data_ptr<float>(),
                                                               labels.data_ptr<const int64_t>(),
                                                               scale.data_ptr<const float>(), vocab, logits.stride(0),
                                                               ignore_index, write_grad);
      TIDAL_CUDA_CHECK(cudaGetLastError());
    };
    if (vocab % kVec == 0 && logits.stride(0) % kVec == 0 && is_aligned(logits.data, 16)) {
      run(softmax_cross_entropy_kernel<T, kVec>);
    } else {
      run(softmax_cross_entropy_kernel<T, 1>);
    }
  });
}

}  // namespace tidal::gpu
