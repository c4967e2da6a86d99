// SPDX-License-Identifier: Apache-2.0
// RMSNorm and residual-add + RMSNorm on the GPU (tidal::gpu::rms_norm, fused_add_rms_norm): one
// kernel template each, over dtype, access width and how much of a row a thread keeps in registers,
// plus the launchers that pick the variant. Built by nvcc, and by hipcc with -DTIDAL_USE_HIP.
#include <climits>
#include <cstdint>
#include <initializer_list>

#include "cuda/common.cuh"
#include "ops/kernels.h"

namespace tidal::gpu {
namespace {

// NOTE(tidal): napkin math for the recorded shape, [16384, 4096] bf16. rms_norm moves 134 MB in and
// 134 MB out: 89 us at the measured 3.0 TB/s copy ceiling (target <= 105 us, 85%);
// fused_add_rms_norm moves twice that, 179 us. To keep ~3 TB/s busy at ~1 us of DRAM latency,
// each of the 132 SMs needs ~23 KB of loads in flight. A thread issues all kVecsPerThread
// 16-byte loads of its row before using any (64 B per thread), a 4096-wide bf16 row is 128
// threads, and blocks of ~256 threads (2 rows) at <= 64 registers leave >= 4 blocks per SM:
// >= 64 KB in flight. The row stays in registers (16 registers, + 16 for the weight) between the
// sum of squares and the scaling, so x is read once; this holds up to 1024 threads x 4 x 16 B =
// 32768 bf16/fp16 or 16384 fp32 elements. Wider rows take the re-read variant: the scaling pass
// loads x (or residual_out) again, mostly from L2, as the row was just read.
constexpr int kElemsPerThread = 16;  // of a row, cached in registers by each thread
constexpr int kMaxThreadsPerBlock = 512;
constexpr int kTargetThreadsPerBlock = 256;
// Blocks loop over row groups beyond this; keeps gridDim.x * blockDim.x < 2^32 (a HIP limit) for
// any num_tokens up to 2^31 - 1.
constexpr int64_t kMaxBlocks = 1 << 16;

// Vectors of kWidth elements at index threadIdx.x + i * blockDim.x of a row belong to one thread,
// so each of its kVecs accesses is coalesced across the warp.
//   out, x: [num_tokens, hidden_size], row strides out_stride / x_stride (elements), last dim
//           contiguous; out may be x.   weight: [hidden_size].
//   blockDim = (threads per row, rows per block); with kReread = false, blockDim.x * kVecs * kWidth
//   >= hidden_size, so a row is exactly one chunk and stays in `cache`.
template <typename T, int kWidth, int kVecs, bool kReread>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    rms_norm_kernel(T* out, const T* x, const T* weight, int64_t num_tokens, int hidden_size,
                    int64_t out_stride, int64_t x_stride, float eps) {
  using V = Vec<T, kWidth>;
  __shared__ float scratch[kMaxWarpsPerBlock];
  const int num_vecs = hidden_size / kWidth;
  const int chunk = kVecs * blockDim.x;
  const int num_chunks = kReread ? (num_vecs + chunk - 1) / chunk : 1;
  const int64_t num_groups = (num_tokens + blockDim.y - 1) / blockDim.y;

  for (int64_t group = blockIdx.x; group < num_groups; group += gridDim.x) {
    const int64_t row = group * blockDim.y + threadIdx.y;
    // Rows past the end still take part in the block's reductions; they load and store nothing.
    const bool active = row < num_tokens;
    const T* x_row = x + (active ? row : 0) * x_stride;
    T* out_row = out + (active ? row : 0) * out_stride;
    V cache[kVecs];
    V w[kVecs];
    float sum_sq = 0.0f;
    for (int c = 0; c < num_chunks; ++c) {
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int idx = c * chunk + i * blockDim.x + threadIdx.x;
        if (active && idx < num_vecs) {
          cache[i] = load_vec<T, kWidth>(x_row + idx * kWidth);
          if constexpr (!kReread) w[i] = load_vec_readonly<T, kWidth>(weight + idx * kWidth);
        }
      }
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int idx = c * chunk + i * blockDim.x + threadIdx.x;
        if (active && idx < num_vecs) {
#pragma unroll
          for (int j = 0; j < kWidth; ++j) {
            const float v = element_to_float(cache[i], j);
            sum_sq += v * v;
          }
        }
      }
    }
    const float inv_rms =
        rsqrtf(block_row_sum(sum_sq, scratch) / static_cast<float>(hidden_size) + eps);
    for (int c = 0; c < num_chunks; ++c) {
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int idx = c * chunk + i * blockDim.x + threadIdx.x;
        if (!active || idx >= num_vecs) continue;
        if constexpr (kReread) {
          cache[i] = load_vec<T, kWidth>(x_row + idx * kWidth);
          w[i] = load_vec_readonly<T, kWidth>(weight + idx * kWidth);
        }
        V o;
#pragma unroll
        for (int j = 0; j < kWidth; ++j) {
          o.v[j] = from_float<T>(element_to_float(cache[i], j) * inv_rms * element_to_float(w[i], j));
        }
        store_vec(out_row + idx * kWidth, o);
      }
    }
  }
}

// Same layout and launch shape as rms_norm_kernel. residual_out = round(x + residual) is written in
// the first pass and is what the norm sees (cached, or re-read by this same thread when kReread).
//   out, residual_out, x, residual: [num_tokens, hidden_size], each with its own row stride;
//   out may be x and residual_out may be residual: every element is read before the thread that
//   owns it writes it. weight: [hidden_size].
template <typename T, int kWidth, int kVecs, bool kReread>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    fused_add_rms_norm_kernel(T* out, T* residual_out, const T* x, const T* residual,
                              const T* weight, int64_t num_tokens, int hidden_size,
                              int64_t out_stride, int64_t residual_out_stride, int64_t x_stride,
                              int64_t residual_stride, float eps) {
  using V = Vec<T, kWidth>;
  __shared__ float scratch[kMaxWarpsPerBlock];
  const int num_vecs = hidden_size / kWidth;
  const int chunk = kVecs * blockDim.x;
  const int num_chunks = kReread ? (num_vecs + chunk - 1) / chunk : 1;
  const int64_t num_groups = (num_tokens + blockDim.y - 1) / blockDim.y;

  for (int64_t group = blockIdx.x; group < num_groups; group += gridDim.x) {
    const int64_t row = group * blockDim.y + threadIdx.y;
    const bool active = row < num_tokens;
    const int64_t r = active ? row : 0;
    const T* x_row = x + r * x_stride;
    const T* residual_row = residual + r * residual_stride;
    T* out_row = out + r * out_stride;
    T* residual_out_row = residual_out + r * residual_out_stride;
    V cache[kVecs];
    V w[kVecs];
    float sum_sq = 0.0f;
    for (int c = 0; c < num_chunks; ++c) {
      V xv[kVecs];
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int idx = c * chunk + i * blockDim.x + threadIdx.x;
        if (active && idx < num_vecs) {
          xv[i] = load_vec<T, kWidth>(x_row + idx * kWidth);
          cache[i] = load_vec<T, kWidth>(residual_row + idx * kWidth);
          if constexpr (!kReread) w[i] = load_vec_readonly<T, kWidth>(weight + idx * kWidth);
        }
      }
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int idx = c * chunk + i * blockDim.x + threadIdx.x;
        if (active && idx < num_vecs) {
#pragma unroll
          for (int j = 0; j < kWidth; ++j) {
            const T sum = from_float<T>(element_to_float(xv[i], j) + element_to_float(cache[i], j));
            cache[i].v[j] = sum;
            const float v = to_float(sum);
            sum_sq += v * v;
          }
          store_vec(residual_out_row + idx * kWidth, cache[i]);
        }
      }
    }
    const float inv_rms =
        rsqrtf(block_row_sum(sum_sq, scratch) / static_cast<float>(hidden_size) + eps);
    for (int c = 0; c < num_chunks; ++c) {
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int idx = c * chunk + i * blockDim.x + threadIdx.x;
        if (!active || idx >= num_vecs) continue;
        if constexpr (kReread) {
          cache[i] = load_vec<T, kWidth>(residual_out_row + idx * kWidth);
          w[i] = load_vec_readonly<T, kWidth>(weight + idx * kWidth);
        }
        V o;
#pragma unroll
        for (int j = 0; j < kWidth; ++j) {
          o.v[j] = from_float<T>(element_to_float(cache[i], j) * inv_rms * element_to_float(w[i], j));
        }
        store_vec(out_row + idx * kWidth, o);
      }
    }
  }
}

struct LaunchShape {
  dim3 grid;
  dim3 block;  // (threads per row, rows per block)
  bool reread = false;
};

// Threads per row: enough for kVecs accesses each, rounded to a power of two below a warp (so
// a warp holds whole rows) or to whole warps above it; rows per block fill ~256 threads.
LaunchShape launch_shape(int64_t num_tokens, int num_accesses, int vecs_per_thread) {
  LaunchShape shape;
  int threads = (num_accesses + vecs_per_thread - 1) / vecs_per_thread;
  if (threads > kMaxThreadsPerBlock) {
    threads = kMaxThreadsPerBlock;
    shape.reread = true;
  }
  if (threads <= kWarpSize) {
    int pow2 = 1;
    while (pow2 < threads) pow2 *= 2;
    threads = pow2;
  } else {
    threads = (threads + kWarpSize - 1) / kWarpSize * kWarpSize;
  }
  const int rows_per_block = threads >= kTargetThreadsPerBlock ? 1 : kTargetThreadsPerBlock / threads;
  const int64_t num_groups = (num_tokens + rows_per_block - 1) / rows_per_block;
  shape.grid = dim3(static_cast<unsigned>(num_groups < kMaxBlocks ? num_groups : kMaxBlocks));
  shape.block = dim3(threads, rows_per_block);
  return shape;
}

template <typename T, int kWidth, int kVecs>
void launch_rms_norm(T* out, const T* x, const T* weight, int64_t num_tokens, int hidden_size,
                     int64_t out_stride, int64_t x_stride, float eps, cudaStream_t stream) {
  const LaunchShape s = launch_shape(num_tokens, hidden_size / kWidth, kVecs);
  if (s.reread) {
    rms_norm_kernel<T, kWidth, kVecs, true><<<s.grid, s.block, 0, stream>>>(
        out, x, weight, num_tokens, hidden_size, out_stride, x_stride, eps);
  } else {
    rms_norm_kernel<T, kWidth, kVecs, false><<<s.grid, s.block, 0, stream>>>(
        out, x, weight, num_tokens, hidden_size, out_stride, x_stride, eps);
  }
  TIDAL_CUDA_CHECK(cudaGetLastError());
}

template <typename T, int kWidth, int kVecs>
void launch_fused_add_rms_norm(T* out, T* residual_out, const T* x, const T* residual,
                               const T* weight, int64_t num_tokens, int hidden_size,
                               int64_t out_stride, int64_t residual_out_stride, int64_t x_stride,
                               int64_t residual_stride, float eps, cudaStream_t stream) {
  const LaunchShape s = launch_shape(num_tokens, hidden_size / kWidth, kVecs);
  if (s.reread) {
    fused_add_rms_norm_kernel<T, kWidth, kVecs, true><<<s.grid, s.block, 0, stream>>>(
        out, residual_out, x, residual, weight, num_tokens, hidden_size, out_stride,
        residual_out_stride, x_stride, residual_stride, eps);
  } else {
    fused_add_rms_norm_kernel<T, kWidth, kVecs, false><<<s.grid, s.block, 0, stream>>>(
        out, residual_out, x, residual, weight, num_tokens, hidden_size, out_stride,
        residual_out_stride, x_stride, residual_stride, eps);
  }
  TIDAL_CUDA_CHECK(cudaGetLastError());
}

// 16-byte accesses need the width to divide hidden_size and every row stride, and aligned bases.
bool can_vectorize(int64_t hidden_size, int64_t width, std::initializer_list<const TensorView*> views) {
  if (hidden_size % width != 0) return false;
  for (const TensorView* v : views) {
    if (!is_aligned(v->data, 16)) return false;
    if (v->ndim == 2 && v->stride(0) % width != 0) return false;
  }
  return true;
}

}  // namespace

void rms_norm(TensorView out, TensorView x, TensorView weight, float eps, Stream stream) {
  const int64_t num_tokens = x.size(0);
  const int64_t hidden_size = x.size(1);
  if (num_tokens == 0 || hidden_size == 0) return;
  TIDAL_CHECK(hidden_size <= INT_MAX, "x.shape[1]=", hidden_size, " must be <= ", INT_MAX);
  DeviceGuard guard(x.device.index);
  const auto cuda_stream = static_cast<cudaStream_t>(stream.handle);
  TIDAL_DISPATCH_FLOAT(x.dtype, T, {
    constexpr int kWidth = 16 / sizeof(T);
    auto* o = out.data_ptr<T>();
    const auto* xp = x.data_ptr<T>();
    const auto* w = weight.data_ptr<T>();
    const int h = static_cast<int>(hidden_size);
    if (can_vectorize(hidden_size, kWidth, {&out, &x, &weight})) {
      launch_rms_norm<T, kWidth, kElemsPerThread / kWidth>(o, xp, w, num_tokens, h, out.stride(0),
                                                 x.stride(0), eps, cuda_stream);
    } else {
      launch_rms_norm<T, 1, kElemsPerThread>(o, xp, w, num_tokens, h, out.stride(0),
                                               x.stride(0), eps, cuda_stream);
    }
  });
}

void fused_add_rms_norm(TensorView out, TensorView residual_out, TensorView x, TensorView residual,
                        TensorView weight, float eps, Stream stream) {
  const int64_t num_tokens = x.size(0);
  const int64_t hidden_size = x.size(1);
  if (num_tokens == 0 || hidden_size == 0) return;
  TIDAL_CHECK(hidden_size <= INT_MAX, "x.shape[1]=", hidden_size, " must be <= ", INT_MAX);
  DeviceGuard guard(x.device.index);
  const auto cuda_stream = static_cast<cudaStream_t>(stream.handle);
  TIDAL_DISPATCH_FLOAT(x.dtype, T, {
    constexpr int kWidth = 16 / sizeof(T);
    auto* o = out.data_ptr<T>();
    auto* ro = residual_out.data_ptr<T>();
    const auto* xp = x.data_ptr<T>();
    const auto* r = residual.data_ptr<T>();
    const auto* w = weight.data_ptr<T>();
    const int h = static_cast<int>(hidden_size);
    if (can_vectorize(hidden_size, kWidth, {&out, &residual_out, &x, &residual, &weight})) {
      launch_fused_add_rms_norm<T, kWidth, kElemsPerThread / kWidth>(
          o, ro, xp, r, w, num_tokens, h, out.stride(0), residual_out.stride(0), x.stride(0),
          residual.stride(0), eps, cuda_stream);
    } else {
      launch_fused_add_rms_norm<T, 1, kElemsPerThread>(
          o, ro, xp, r, w, num_tokens, h, out.stride(0), residual_out.stride(0), x.stride(0),
          residual.stride(0), eps, cuda_stream);
    }
  });
}

}  // namespace tidal::gpu
