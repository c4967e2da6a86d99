// SPDX-License-Identifier: Apache-2.0
// Activations to FP8 E4M3 per token on the GPU (W8A8's dynamic scaling): for prefill-sized calls a
// warp per row finds the row's largest magnitude, then writes its scale and codes, 16-byte loads and
// 8-byte stores, the row held in registers between the two passes where it fits; fewer rows (and
// rows of other shapes) take a block per row, element by element. The conversion is the CPU kernel's (ops/fp8.h), bit for bit; FP8 hardware
// (sm_89+) converts a pair per instruction. silu_and_mul_quant_fp8 fuses silu_and_mul in front: a block
// per row computes the activation's row into registers, rounded as silu_and_mul rounds it, and writes
// only its codes and scale. CUDA and HIP alike.
#include <algorithm>
#include <cstdint>
#include <type_traits>

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

// NOTE(tidal): measured (bench/profile_step.py --s3 fp8, Llama-3-8B): the block-per-row kernel above
// took 16.6 ms of a 130 ms prefill step of 8192 tokens on H200, a quarter of its bytes over
// bandwidth (2-byte loads, a block barrier per row, a second pass through the caches); the
// warp-per-row kernel below 11.9 ms on H100, a slower card. At a decode step's 256 rows it is the
// other way round (1.9 ms against the block kernel's 0.95 ms a step): 32 blocks of serial warps
// leave most SMs idle. So rows of a prefill-sized call take a warp each, fewer rows a block each.
constexpr int64_t kWarpRowsFrom = 2048;
constexpr int kRowWarps = 8;   // rows per block
constexpr int kVec = 8;        // inputs per 16-byte load of a 16-bit type

// Two clamped floats as E4M3 codes, `lo` in the low byte.
__device__ __forceinline__ uint32_t fp8_pair(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890 && !defined(TIDAL_USE_HIP)
  uint16_t pair;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(pair) : "f"(hi), "f"(lo));  // first operand: high byte
  return pair;
#else
  return fp8::from_float(lo) | (static_cast<uint32_t>(fp8::from_float(hi)) << 8);
#endif
}

// kHeld: 16-byte vectors per lane kept in registers (rows of up to kHeld * 256 inputs are read once).
template <typename T, int kHeld>
__global__ void __launch_bounds__(kRowWarps* kWarpSize)
    quantize_fp8_rows_kernel(uint8_t* __restrict__ codes, float* __restrict__ scales, const T* __restrict__ x,
                             const float* static_scale, int64_t m, int64_t k, int64_t x_stride) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarpSize;
  if (t >= m) return;
  const T* row = x + t * x_stride;
  constexpr int kStep = kWarpSize * kVec;
  Vec<T, kVec> held[kHeld];
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < kHeld; ++j) {
    const int64_t i = static_cast<int64_t>(j) * kStep + lane * kVec;
    if (i < k) {
      held[j] = load_vec_readonly<T, kVec>(row + i);
#pragma unroll
      for (int e = 0; e < kVec; ++e) amax = fmaxf(amax, fabsf(element_to_float(held[j], e)));
    }
  }
  for (int64_t i = static_cast<int64_t>(kHeld) * kStep + lane * kVec; i < k; i += kStep) {
    const Vec<T, kVec> v = load_vec_readonly<T, kVec>(row + i);
#pragma unroll
    for (int e = 0; e < kVec; ++e) amax = fmaxf(amax, fabsf(element_to_float(v, e)));
  }
  float scale;
  if (static_scale != nullptr) {
    scale = *static_scale;
  } else {
    for (int mask = kWarpSize / 2; mask > 0; mask /= 2) amax = fmaxf(amax, TIDAL_SHFL_XOR(amax, mask));
    scale = fmaxf(amax / 448.f, 1e-12f);
  }
  if (lane == 0) scales[t] = scale;
  uint8_t* out = codes + t * k;
  auto store = [&](const Vec<T, kVec>& v, int64_t i) {
    uint32_t word[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float f[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) f[e] = fminf(fmaxf(element_to_float(v, 4 * h + e) / scale, -448.f), 448.f);
      word[h] = fp8_pair(f[0], f[1]) | (fp8_pair(f[2], f[3]) << 16);
    }
    *reinterpret_cast<uint2*>(out + i) = make_uint2(word[0], word[1]);
  };
#pragma unroll
  for (int j = 0; j < kHeld; ++j) {
    const int64_t i = static_cast<int64_t>(j) * kStep + lane * kVec;
    if (i < k) store(held[j], i);
  }
  for (int64_t i = static_cast<int64_t>(kHeld) * kStep + lane * kVec; i < k; i += kStep) {
    store(load_vec_readonly<T, kVec>(row + i), i);
  }
}

// NOTE(tidal): the input of a W8A8 down projection is silu_and_mul(gate_up): unfused, the activation
// kernel writes [m, d] in x's dtype and the quantizer reads it back, a launch and 4 bytes an element
// more (Llama-3-8B, d = 14336: 29 KB a row). A block of kActThreads per row holds its share of the
// row in registers between the two passes: kHeld 16-byte vectors a thread, rows of up to
// kHeld * kActThreads * kVec elements.
constexpr int kActThreads = 256;

template <typename T, int kHeld>
__global__ void __launch_bounds__(kActThreads)
    silu_and_mul_quant_fp8_kernel(uint8_t* __restrict__ codes, float* __restrict__ scales, const T* __restrict__ x,
                                  int d, int64_t x_stride) {
  wait_for_prior_grid();  // launched by launch_dependent
  allow_dependents();
  __shared__ float scratch[kMaxWarpsPerBlock];
  const int64_t t = blockIdx.x;
  const T* row = x + t * x_stride;
  Vec<T, kVec> held[kHeld];
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < kHeld; ++j) {
    const int i = (j * kActThreads + static_cast<int>(threadIdx.x)) * kVec;
    if (i < d) {
      const Vec<T, kVec> gate = load_vec_readonly<T, kVec>(row + i);
      const Vec<T, kVec> up = load_vec_readonly<T, kVec>(row + d + i);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        held[j].v[e] = from_float<T>(silu_mul(element_to_float(gate, e), element_to_float(up, e)));
        amax = fmaxf(amax, fabsf(element_to_float(held[j], e)));
      }
    }
  }
  const float scale = fmaxf(block_row_max(amax, scratch) / 448.f, 1e-12f);
  if (threadIdx.x == 0) scales[t] = scale;
  uint8_t* out = codes + t * d;
#pragma unroll
  for (int j = 0; j < kHeld; ++j) {
    const int i = (j * kActThreads + static_cast<int>(threadIdx.x)) * kVec;
    if (i < d) {
      uint32_t word[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float f[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) f[e] = fminf(fmaxf(element_to_float(held[j], 4 * h + e) / scale, -448.f), 448.f);
        word[h] = fp8_pair(f[0], f[1]) | (fp8_pair(f[2], f[3]) << 16);
      }
      *reinterpret_cast<uint2*>(out + i) = make_uint2(word[0], word[1]);
    }
  }
}

}  // namespace

void silu_and_mul_quant_fp8(TensorView codes, TensorView scales, TensorView x, Stream stream) {
  const int64_t m = x.size(0), d = x.size(1) / 2;
  if (m == 0 || d == 0) return;
  DeviceGuard guard(x.device.index);
  const auto s = static_cast<cudaStream_t>(stream.handle);
  const int64_t per_pass = static_cast<int64_t>(kActThreads) * kVec;
  const int64_t passes = (d + per_pass - 1) / per_pass;
  if (x.dtype != DType::kFloat32 && d % kVec == 0 && x.stride(0) % kVec == 0 && is_aligned(x.data, 16) &&
      is_aligned(codes.data, 8) && passes <= 8) {
    auto run = [&](auto tag) {
      using T = decltype(tag);
      const auto go = [&](auto held) {
        launch_dependent(silu_and_mul_quant_fp8_kernel<T, decltype(held)::value>, dim3(static_cast<unsigned>(m)),
                         dim3(kActThreads), 0, s, x.device.index, static_cast<uint8_t*>(codes.data),
                         static_cast<float*>(scales.data), static_cast<const T*>(x.data), static_cast<int>(d),
                         x.stride(0));
      };
      if (passes <= 1) go(std::integral_constant<int, 1>{});
      else if (passes <= 2) go(std::integral_constant<int, 2>{});
      else if (passes <= 4) go(std::integral_constant<int, 4>{});
      else go(std::integral_constant<int, 8>{});
    };
    x.dtype == DType::kBFloat16 ? run(bf16_t{}) : run(half_t{});
    TIDAL_CUDA_CHECK(cudaGetLastError());
    return;
  }
  // Elsewhere the activation goes into x's gate half (each element read before it is written) and
  // the quantizer reads it from there: x is consumed either way.
  TensorView act = x;
  act.shape[1] = d;
  silu_and_mul(act, x, stream);
  quantize_fp8_per_token(codes, scales, act, TensorView{}, stream);
}

void quantize_fp8_per_token(TensorView codes, TensorView scales, TensorView x, TensorView static_scale, Stream stream) {
  const int64_t m = x.size(0), k = x.size(1);
  DeviceGuard guard(x.device.index);
  const auto s = static_cast<cudaStream_t>(stream.handle);
  if (m >= kWarpRowsFrom && x.dtype != DType::kFloat32 && k % kVec == 0 && x.stride(0) % kVec == 0 &&
      is_aligned(x.data, 16) && is_aligned(codes.data, 8)) {
    const auto blocks = static_cast<unsigned>((m + kRowWarps - 1) / kRowWarps);
    auto run = [&](auto tag) {
      using T = decltype(tag);
      quantize_fp8_rows_kernel<T, 8><<<blocks, kRowWarps * kWarpSize, 0, s>>>(
          static_cast<uint8_t*>(codes.data), static_cast<float*>(scales.data), static_cast<const T*>(x.data),
          static_cast<const float*>(static_scale.data), m, k, x.stride(0));
    };
    x.dtype == DType::kBFloat16 ? run(bf16_t{}) : run(half_t{});
    TIDAL_CUDA_CHECK(cudaGetLastError());
    return;
  }
  const int64_t grid = std::min<int64_t>(m, 65535);
  TIDAL_DISPATCH_FLOAT(x.dtype, T, {
    quantize_fp8_kernel<T><<<static_cast<unsigned>(grid), kThreads, 0, s>>>(
        static_cast<uint8_t*>(codes.data), static_cast<float*>(scales.data), static_cast<const T*>(x.data),
        static_cast<const float*>(static_scale.data), m, k, x.stride(0));
  });
  TIDAL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace tidal::gpu
