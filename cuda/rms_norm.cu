// SPDX-License-Identifier: Apache-2.0
// RMSNorm and residual-add + RMSNorm on the GPU (tidal::gpu::rms_norm, fused_add_rms_norm): one
// kernel template each, over dtype, access width and how much of a row a thread keeps in registers,
// plus the launchers that pick the variant; and rms_norm's backward pass (rms_norm_backward). Built by nvcc, and by hipcc with -DTIDAL_USE_HIP.
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "cuda/common.cuh"
#include "ops/fp8.h"
#include "ops/kernels.h"

namespace tidal::gpu {
namespace {

// NOTE(tidal): napkin math for the recorded shape, [16384, 4096] bf16. rms_norm moves 134 MB in
// and 134 MB out: 89 us at the measured 3.0 TB/s copy ceiling (target <= 105 us, 85%);
// fused_add_rms_norm moves twice that, 179 us. Keeping ~3 TB/s busy at ~1 us of DRAM latency
// takes ~23 KB of loads in flight on each of the 132 SMs. Each thread keeps 16 elements of its
// row in registers (bf16: 2 x 16-byte vectors, fp32: 4) and issues every load before the first
// use; a 4096-wide bf16 row is one block of 256 threads; at 40 registers (fused: 50) 6 (5)
// blocks fit per SM: 48 KB (80 KB) in flight. x is read once. Measured on H100
// (bench/bench_rms_norm.py): 94 us (95%) and 184 us (97%); 32 elements per thread ran no faster
// and took fp32 from 60 to 100 registers. The register cache covers 512 x 16 = 8192 elements
// per row; wider rows take the kReread variant, whose second pass loads x (or residual_out)
// again, mostly from L2.
constexpr int kElemsPerThread = 16;
// Unaligned rows (odd hidden_size, odd strides) move one element per access; 8 per thread beat 16
// there on H100 ([4096, 4095] bf16: 54 vs 64 us, [4096, 5121] fp32: 78 vs 110 us), at about
// 1.2 TB/s for 16-bit types: this path is a correct fallback, not a fast one.
constexpr int kScalarsPerThread = 8;
constexpr int vecs_per_thread(int width) {
  return width == 1 ? kScalarsPerThread : kElemsPerThread / width;
}
constexpr int kMaxThreadsPerBlock = 512;
constexpr int kTargetThreadsPerBlock = 256;
// Blocks loop over row groups beyond this; keeps gridDim.x * blockDim.x < 2^32 (a HIP limit) for
// any num_tokens up to 2^31 - 1.
constexpr int64_t kMaxBlocks = 1 << 16;

// The second pass shared by both kernels: out = src * inv_rms * weight for this thread's
// accesses of one row, from the registers (`cache`, `w`) or, with kReread, loading src and weight
// again chunk by chunk. Same access layout as the kernels below; src may be out.
template <typename T, int kWidth, int kVecs, bool kReread>
__device__ __forceinline__ void scale_row(T* out_row, const T* src_row, const T* weight,
                                          Vec<T, kWidth> (&cache)[kVecs], Vec<T, kWidth> (&w)[kVecs],
                                          int num_vecs, float inv_rms) {
  const int chunk = kVecs * blockDim.x;
  const int num_chunks = kReread ? (num_vecs + chunk - 1) / chunk : 1;
  for (int c = 0; c < num_chunks; ++c) {
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int idx = c * chunk + i * blockDim.x + threadIdx.x;
      if (idx >= num_vecs) continue;
      if constexpr (kReread) {
        cache[i] = load_vec<T, kWidth>(src_row + idx * kWidth);
        w[i] = load_vec_readonly<T, kWidth>(weight + idx * kWidth);
      }
      Vec<T, kWidth> o;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const float v = element_to_float(cache[i], j) * inv_rms;
        o.v[j] = from_float<T>(v * element_to_float(w[i], j));
      }
      store_vec(out_row + idx * kWidth, o);
    }
  }
}

// Access i of chunk c covers vector c * kVecs * blockDim.x + i * blockDim.x + threadIdx.x of the
// row (kWidth elements), so each access is coalesced across the warp.
//   out, x: [num_tokens, hidden_size], row strides out_stride / x_stride (elements), last dim
//           contiguous; out may be x.   weight: [hidden_size].
//   blockDim = (threads per row, rows per block); with kReread = false, blockDim.x * kVecs * kWidth
//   >= hidden_size, so a row is exactly one chunk and stays in `cache`.
template <typename T, int kWidth, int kVecs, bool kReread>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    rms_norm_kernel(T* out, const T* x, const T* weight, int64_t num_tokens, int hidden_size,
                    int64_t out_stride, int64_t x_stride, float eps) {
  wait_for_prior_grid();  // launched by launch_dependent
  allow_dependents();
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
    if (active) scale_row<T, kWidth, kVecs, kReread>(out_row, x_row, weight, cache, w, num_vecs, inv_rms);
  }
}

// The second pass of fused_add_rms_norm_kernel<kQuantize>: W8A8's per-row FP8 quantization of the
// normalised row instead of writing it. Each element is rounded to T exactly as scale_row writes
// it, the row's largest magnitude reduced over its threads, scale = max(amax / 448, 1e-12) and the
// codes e4m3(clamp(v / scale, +-448)): what quantize_fp8_per_token makes of fused_add_rms_norm's
// output, bit for bit. Every thread of the block calls it (the reduction synchronises the block).
//   codes: [num_tokens, hidden_size] contiguous; scales: [num_tokens].
template <typename T, int kWidth, int kVecs>
__device__ __forceinline__ void quantize_normed_row(uint8_t* codes, float* scales, int64_t row, bool active,
                                                    Vec<T, kWidth> (&cache)[kVecs], Vec<T, kWidth> (&w)[kVecs],
                                                    int num_vecs, int hidden_size, float inv_rms, float* scratch) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int idx = i * blockDim.x + threadIdx.x;
    if (active && idx < num_vecs) {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const float v = element_to_float(cache[i], j) * inv_rms;
        cache[i].v[j] = from_float<T>(v * element_to_float(w[i], j));
        amax = fmaxf(amax, fabsf(to_float(cache[i].v[j])));
      }
    }
  }
  const float scale = fmaxf(block_row_max(amax, scratch) / 448.f, 1e-12f);
  if (!active) return;
  if (threadIdx.x == 0) scales[row] = scale;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int idx = i * blockDim.x + threadIdx.x;
    if (idx < num_vecs) {
      Vec<uint8_t, kWidth> out;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        out.v[j] = fp8::from_float(fminf(fmaxf(to_float(cache[i].v[j]) / scale, -448.f), 448.f));
      }
      store_vec(codes + row * hidden_size + idx * kWidth, out);
    }
  }
}

// Same layout and launch shape as rms_norm_kernel. residual_out = round(x + residual) is written in
// the first pass and is what the norm sees (cached, or re-read by this same thread when kReread).
// With kQuantize (rows in registers only), the normalised row becomes FP8 codes and a scale
// (quantize_normed_row) and out is not written.
//   out, residual_out, x, residual: [num_tokens, hidden_size], each with its own row stride;
//   out may be x and residual_out may be residual: every element is read before the thread that
//   owns it writes it. weight: [hidden_size].
template <typename T, int kWidth, int kVecs, bool kReread, bool kQuantize = false>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    fused_add_rms_norm_kernel(T* out, T* residual_out, const T* x, const T* residual,
                              const T* weight, int64_t num_tokens, int hidden_size,
                              int64_t out_stride, int64_t residual_out_stride, int64_t x_stride,
                              int64_t residual_stride, float eps, uint8_t* codes, float* scales) {
  static_assert(!(kQuantize && kReread), "the quantizing kernel keeps its rows in registers");
  wait_for_prior_grid();  // launched by launch_dependent
  allow_dependents();
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
            const T sum =
                from_float<T>(element_to_float(xv[i], j) + element_to_float(cache[i], j));
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
    if constexpr (kQuantize) {
      quantize_normed_row<T, kWidth, kVecs>(codes, scales, row, active, cache, w, num_vecs, hidden_size, inv_rms,
                                            scratch);
    } else if (active) {
      scale_row<T, kWidth, kVecs, kReread>(out_row, residual_out_row, weight, cache, w, num_vecs, inv_rms);
    }
  }
}

// Threads per row: enough for accesses_per_thread each, rounded to a power of two below a warp
// (so a warp holds whole rows) or to whole warps above it; rows per block fill ~256 threads.
// Rows that need more than kMaxThreadsPerBlock threads take the kReread kernel. Throws on launch
// failure.
// std::type_identity (C++20) for this C++17 build: the kernel alone fixes the parameter types.
template <typename T>
struct NonDeduced {
  using type = T;
};

template <typename... Params>
void launch(void (*cached)(Params...), void (*reread)(Params...), int64_t num_tokens,
            int num_accesses, int accesses_per_thread, cudaStream_t stream,
            typename NonDeduced<Params>::type... args) {
  int threads = (num_accesses + accesses_per_thread - 1) / accesses_per_thread;
  const bool is_reread = threads > kMaxThreadsPerBlock;
  if (is_reread) {
    threads = kMaxThreadsPerBlock;
  } else if (threads <= kWarpSize) {
    int pow2 = 1;
    while (pow2 < threads) pow2 *= 2;
    threads = pow2;
  } else {
    threads = (threads + kWarpSize - 1) / kWarpSize * kWarpSize;
  }
  const int rows_per_block =
      threads >= kTargetThreadsPerBlock ? 1 : kTargetThreadsPerBlock / threads;
  const int64_t num_groups = (num_tokens + rows_per_block - 1) / rows_per_block;
  const dim3 grid(static_cast<unsigned>(num_groups < kMaxBlocks ? num_groups : kMaxBlocks));
  const dim3 block(threads, rows_per_block);
  launch_dependent(is_reread ? reread : cached, grid, block, 0, stream, current_device(), args...);
}

template <int kWidth>
using Width = std::integral_constant<int, kWidth>;

// NOTE(tidal): napkin math, Llama-3.2-1B training (micro-batch 4 x 2048, hidden 2048, bf16): x and
// grad are 33.5 MB each and grad_x as much, 100 MB: 24 us at 4.2 TB/s; the weight gradient's
// partials (one fp32 row per block) add a few MB. Block p owns a contiguous run of rows and, for
// each row, reduces sum(x^2) and sum(grad * w * x) in one pass, then writes grad_x in a second pass
// that reads the row again (from L1/L2). Each thread owns the same columns in every row, so its
// weight-gradient sums live in shared memory no other thread touches until the final store.
constexpr int kBackwardThreads = 256;

template <typename T, int kWidth>
__global__ void __launch_bounds__(kBackwardThreads)
    rms_norm_backward_kernel(T* __restrict__ grad_x, float* __restrict__ partial, const T* __restrict__ grad,
                             const T* __restrict__ x, const T* __restrict__ weight, int64_t num_tokens,
                             int hidden_size, int64_t grad_x_stride, int64_t grad_stride, int64_t x_stride,
                             float eps) {
  extern __shared__ float acc[];  // [hidden_size]: column c belongs to the thread of its access
  __shared__ float scratch[kMaxWarpsPerBlock];
  const int num_vecs = hidden_size / kWidth;
  for (int idx = threadIdx.x; idx < num_vecs; idx += blockDim.x) {
#pragma unroll
    for (int j = 0; j < kWidth; ++j) acc[idx * kWidth + j] = 0.0f;
  }
  const int64_t first = blockIdx.x * num_tokens / gridDim.x, last = (blockIdx.x + 1) * num_tokens / gridDim.x;
  for (int64_t t = first; t < last; ++t) {
    const T* x_row = x + t * x_stride;
    const T* g_row = grad + t * grad_stride;
    float sum_sq = 0.0f, dot = 0.0f;
    for (int idx = threadIdx.x; idx < num_vecs; idx += blockDim.x) {
      const Vec<T, kWidth> xv = load_vec_readonly<T, kWidth>(x_row + idx * kWidth);
      const Vec<T, kWidth> gv = load_vec_readonly<T, kWidth>(g_row + idx * kWidth);
      const Vec<T, kWidth> wv = load_vec_readonly<T, kWidth>(weight + idx * kWidth);
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const float xj = element_to_float(xv, j);
        sum_sq += xj * xj;
        dot += element_to_float(gv, j) * element_to_float(wv, j) * xj;
      }
    }
    sum_sq = block_row_sum(sum_sq, scratch);
    dot = block_row_sum(dot, scratch);
    const float inv_rms = rsqrtf(sum_sq / static_cast<float>(hidden_size) + eps);
    const float mean_dot = dot * inv_rms / static_cast<float>(hidden_size);  // mean of g_hat * x_hat
    T* gx_row = grad_x + t * grad_x_stride;
    for (int idx = threadIdx.x; idx < num_vecs; idx += blockDim.x) {
      const Vec<T, kWidth> xv = load_vec_readonly<T, kWidth>(x_row + idx * kWidth);
      const Vec<T, kWidth> gv = load_vec_readonly<T, kWidth>(g_row + idx * kWidth);
      const Vec<T, kWidth> wv = load_vec_readonly<T, kWidth>(weight + idx * kWidth);
      Vec<T, kWidth> out;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const float x_hat = element_to_float(xv, j) * inv_rms, g = element_to_float(gv, j);
        out.v[j] = from_float<T>(inv_rms * (g * element_to_float(wv, j) - x_hat * mean_dot));
        acc[idx * kWidth + j] += g * x_hat;
      }
      store_vec(gx_row + idx * kWidth, out);
    }
  }
  float* row = partial + static_cast<int64_t>(blockIdx.x) * hidden_size;
  for (int idx = threadIdx.x; idx < num_vecs; idx += blockDim.x) {
#pragma unroll
    for (int j = 0; j < kWidth; ++j) row[idx * kWidth + j] = acc[idx * kWidth + j];
  }
}

}  // namespace

void rms_norm_backward(TensorView grad_x, TensorView grad_weight_partial, TensorView grad, TensorView x,
                       TensorView weight, float eps, Stream stream) {
  const int64_t num_tokens = x.size(0), hidden_size = x.size(1), parts = grad_weight_partial.size(0);
  if (hidden_size == 0) return;
  // NOTE(tidal): the weight-gradient sums take hidden_size floats of shared memory per block; the
  // opt-in limit (227 KB on H100/H200, 64 KB on AMD GPUs) bounds hidden_size at ~58K (16K on HIP).
#if defined(TIDAL_USE_HIP)
  constexpr int64_t kMaxSmem = 64 * 1024;
#else
  constexpr int64_t kMaxSmem = 227 * 1024;
#endif
  const int64_t smem = hidden_size * static_cast<int64_t>(sizeof(float));
  TIDAL_CHECK(smem <= kMaxSmem, "x.shape[1]=", hidden_size, " is too wide for rms_norm_backward on this GPU (at most ",
              kMaxSmem / sizeof(float), ")");
  TIDAL_CHECK(parts <= INT_MAX, "grad_weight_partial.shape[0]=", parts, " must be <= ", INT_MAX);
  DeviceGuard guard(x.device.index);
  TIDAL_DISPATCH_FLOAT(x.dtype, T, {
    const auto s = static_cast<cudaStream_t>(stream.handle);
    const auto run = [&](auto kernel) {
#if !defined(TIDAL_USE_HIP)
      if (smem > 48 * 1024) {
        TIDAL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      }
#endif
      kernel<<<static_cast<unsigned>(parts), kBackwardThreads, static_cast<size_t>(smem), s>>>(
          grad_x.data_ptr<T>(), grad_weight_partial.data_ptr<float>(), grad.data_ptr<T>(), x.data_ptr<T>(),
          weight.data_ptr<T>(), num_tokens, static_cast<int>(hidden_size), grad_x.stride(0), grad.stride(0),
          x.stride(0), eps);
      TIDAL_CUDA_CHECK(cudaGetLastError());
    };
    if (can_vectorize(hidden_size, 16 / sizeof(T), {&grad_x, &grad, &x, &weight})) {
      run(rms_norm_backward_kernel<T, 16 / sizeof(T)>);
    } else {
      run(rms_norm_backward_kernel<T, 1>);
    }
  });
}

void rms_norm(TensorView out, TensorView x, TensorView weight, float eps, Stream stream) {
  const int64_t num_tokens = x.size(0);
  const int64_t hidden_size = x.size(1);
  if (num_tokens == 0 || hidden_size == 0) return;
  TIDAL_CHECK(hidden_size <= INT_MAX, "x.shape[1]=", hidden_size, " must be <= ", INT_MAX);
  DeviceGuard guard(x.device.index);
  TIDAL_DISPATCH_FLOAT(x.dtype, T, {
    auto run = [&](auto width) {
      constexpr int kWidth = decltype(width)::value, kVecs = vecs_per_thread(kWidth);
      launch(rms_norm_kernel<T, kWidth, kVecs, false>, rms_norm_kernel<T, kWidth, kVecs, true>,
             num_tokens, static_cast<int>(hidden_size / kWidth), kVecs,
             static_cast<cudaStream_t>(stream.handle), out.data_ptr<T>(), x.data_ptr<T>(),
             weight.data_ptr<T>(), num_tokens, static_cast<int>(hidden_size), out.stride(0),
             x.stride(0), eps);
    };
    if (can_vectorize(hidden_size, 16 / sizeof(T), {&out, &x, &weight})) {
      run(Width<16 / sizeof(T)>{});
    } else {
      run(Width<1>{});
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
  TIDAL_DISPATCH_FLOAT(x.dtype, T, {
    auto run = [&](auto width) {
      constexpr int kWidth = decltype(width)::value, kVecs = vecs_per_thread(kWidth);
      launch(fused_add_rms_norm_kernel<T, kWidth, kVecs, false>,
             fused_add_rms_norm_kernel<T, kWidth, kVecs, true>, num_tokens,
             static_cast<int>(hidden_size / kWidth), kVecs,
             static_cast<cudaStream_t>(stream.handle), out.data_ptr<T>(),
             residual_out.data_ptr<T>(), x.data_ptr<T>(), residual.data_ptr<T>(),
             weight.data_ptr<T>(), num_tokens, static_cast<int>(hidden_size), out.stride(0),
             residual_out.stride(0), x.stride(0), residual.stride(0), eps, nullptr, nullptr);
    };
    if (can_vectorize(hidden_size, 16 / sizeof(T),
                      {&out, &residual_out, &x, &residual, &weight})) {
      run(Width<16 / sizeof(T)>{});
    } else {
      run(Width<1>{});
    }
  });
}

// NOTE(tidal): W8A8 serving's qkv and gate_up inputs: one kernel where fused_add_rms_norm and
// quantize_fp8_per_token were two (at a decode step of 256 rows of Llama-3-8B the quantizer alone
// took ~7 us a call on H200, 64 calls a step). Rows that do not fit the register cache, or do not
// vectorise, run the two kernels (x holds the normalised rows in between).
void fused_add_rms_norm_quant_fp8(TensorView codes, TensorView scales, TensorView residual_out, TensorView x,
                                  TensorView residual, TensorView weight, float eps, Stream stream) {
  const int64_t num_tokens = x.size(0);
  const int64_t hidden_size = x.size(1);
  if (num_tokens == 0 || hidden_size == 0) return;
  TIDAL_CHECK(hidden_size <= INT_MAX, "x.shape[1]=", hidden_size, " must be <= ", INT_MAX);
  DeviceGuard guard(x.device.index);
  bool fused = false;
  TIDAL_DISPATCH_FLOAT(x.dtype, T, {
    constexpr int kWidth = 16 / sizeof(T), kVecs = vecs_per_thread(kWidth);
    const int64_t num_vecs = hidden_size / kWidth;
    if (can_vectorize(hidden_size, kWidth, {&residual_out, &x, &residual, &weight}) &&
        num_vecs <= static_cast<int64_t>(kVecs) * kMaxThreadsPerBlock && is_aligned(codes.data, kWidth)) {
      auto kernel = fused_add_rms_norm_kernel<T, kWidth, kVecs, false, true>;  // x stands in for the unwritten out
      launch(kernel, kernel, num_tokens, static_cast<int>(num_vecs), kVecs, static_cast<cudaStream_t>(stream.handle),
             x.data_ptr<T>(), residual_out.data_ptr<T>(), x.data_ptr<T>(), residual.data_ptr<T>(), weight.data_ptr<T>(),
             num_tokens, static_cast<int>(hidden_size), x.stride(0), residual_out.stride(0), x.stride(0),
             residual.stride(0), eps, static_cast<uint8_t*>(codes.data), static_cast<float*>(scales.data));
      fused = true;
    }
  });
  if (fused) return;
  fused_add_rms_norm(x, residual_out, x, residual, weight, eps, stream);
  quantize_fp8_per_token(codes, scales, x, TensorView{}, stream);
}

}  // namespace tidal::gpu
