// SPDX-License-Identifier: Apache-2.0
// The quantized linear layer on the GPU for decode-sized batches: one warp per output row streams
// the row's codes as 16-byte chunks (16 int8 or FP8 codes, 32 int4 codes), widens them in registers,
// and dots them with up to 8 input rows; and dequantize_weight, which writes the widened weight out
// for the large-batch path (a dense matmul on it). CUDA and HIP alike.
#include <algorithm>
#include <climits>
#include <cstdint>

#include "cuda/common.cuh"
#include "ops/kernels.h"

namespace tidal::gpu {
namespace {

constexpr int kInt8 = 0, kInt4 = 1, kFp8 = 2;
constexpr int kWarps = 4;   // output rows per block
constexpr int kUnroll = 4;  // chunks in flight per lane
// NOTE(tidal): 4 rows x 32 lanes x 4 chunks x 16 B = 8 KB in flight per block, up to 16 blocks per
// SM: far past the ~40 KB per SM that the H200's 4.8 TB/s needs at ~1 us of memory latency.

struct Params {
  const void* x;
  const uint8_t* qweight;
  const float* scales;
  const uint8_t* zeros;
  const void* bias;
  void* out;
  int64_t x_stride, out_stride;
  int m, n, k, num_groups;
};

template <int kFormat>
constexpr int codes_per_chunk() { return kFormat == kInt4 ? 32 : 16; }

/// FP8 E4M3 (fn) bits to float: the magnitude bits under float's exponent field, rebiased by 2^120
/// (exact for normals and subnormals; the NaN pattern is never produced by a quantizer).
__device__ __forceinline__ float fp8_e4m3_to_float(uint32_t bits) {
  return __uint_as_float(((bits & 0x80u) << 24) | ((bits & 0x7fu) << 20)) * 0x1p120f;
}

/// The chunk's codes as floats, the zero point subtracted.
template <int kFormat>
__device__ __forceinline__ void decode_chunk(const uint4& raw, int zero, float* w) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int j = 0; j < codes_per_chunk<kFormat>(); ++j) {
    if constexpr (kFormat == kInt4) {
      w[j] = static_cast<float>(static_cast<int>((words[j / 8] >> (4 * (j % 8))) & 0xfu) - zero);
    } else if constexpr (kFormat == kFp8) {
      w[j] = fp8_e4m3_to_float(words[j / 4] >> (8 * (j % 4)));
    } else {
      w[j] = static_cast<float>(static_cast<int8_t>((words[j / 4] >> (8 * (j % 4))) & 0xffu));
    }
  }
}

template <typename T, int kFormat, int kMaxRows>
__global__ void __launch_bounds__(kWarps* kWarpSize) quant_linear_kernel(Params p) {
  constexpr int kCodes = codes_per_chunk<kFormat>();
  constexpr int kVec = 16 / sizeof(T);
  const int lane = threadIdx.x % kWarpSize;
  const int row = blockIdx.x * kWarps + threadIdx.x / kWarpSize;
  if (row >= p.n) return;  // the whole warp leaves together
  const int chunks = p.k / kCodes, chunks_per_group = p.k / p.num_groups / kCodes;
  const int row_bytes = kFormat == kInt4 ? p.k / 2 : p.k;
  const uint4* codes = reinterpret_cast<const uint4*>(p.qweight + static_cast<int64_t>(row) * row_bytes);
  const float* scales = p.scales + static_cast<int64_t>(row) * p.num_groups;
  const uint8_t* zeros = kFormat == kInt4 ? p.zeros + static_cast<int64_t>(row) * p.num_groups : nullptr;
  const T* x = static_cast<const T*>(p.x);
  float acc[kMaxRows] = {};
  for (int c0 = lane; c0 < chunks; c0 += kWarpSize * kUnroll) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * kWarpSize;
      if (c < chunks) raw[u] = TIDAL_LDG(codes + c);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * kWarpSize;
      if (c < chunks) {
        const int group = c / chunks_per_group;
        float w[kCodes];
        decode_chunk<kFormat>(raw[u], kFormat == kInt4 ? static_cast<int>(zeros[group]) : 0, w);
        const float scale = scales[group];
#pragma unroll
        for (int r = 0; r < kMaxRows; ++r) {
          if (r < p.m) {
            const T* xc = x + r * p.x_stride + static_cast<int64_t>(c) * kCodes;
            float dot = 0.f;
#pragma unroll
            for (int v = 0; v < kCodes / kVec; ++v) {
              const Vec<T, kVec> xv = load_vec_readonly<T, kVec>(xc + v * kVec);
#pragma unroll
              for (int j = 0; j < kVec; ++j) dot += w[v * kVec + j] * element_to_float(xv, j);
            }
            acc[r] += scale * dot;
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) acc[r] = warp_sum(acc[r]);
  if (lane != 0) return;
  const float add = p.bias == nullptr ? 0.f : to_float(static_cast<const T*>(p.bias)[row]);
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    if (r < p.m) out[r * p.out_stride + row] = from_float<T>(acc[r] + add);
  }
}

/// One thread per byte of codes: 2 weights for int4, 1 otherwise.
template <typename T, int kFormat>
__global__ void dequantize_weight_kernel(T* __restrict__ out, const uint8_t* __restrict__ qweight,
                                         const float* __restrict__ scales, const uint8_t* __restrict__ zeros,
                                         int64_t n, int64_t k, int64_t num_groups) {
  const int64_t row_bytes = kFormat == kInt4 ? k / 2 : k, group = k / num_groups;
  const int64_t total = n * row_bytes;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / row_bytes, byte = i % row_bytes;
    const uint32_t bits = qweight[i];
    if constexpr (kFormat == kInt4) {
      const int64_t g = row * num_groups + 2 * byte / group;  // a byte never straddles groups (even group)
      const float s = scales[g];
      const int z = zeros[g];
      out[row * k + 2 * byte] = from_float<T>(static_cast<float>(static_cast<int>(bits & 0xfu) - z) * s);
      out[row * k + 2 * byte + 1] = from_float<T>(static_cast<float>(static_cast<int>(bits >> 4) - z) * s);
    } else {
      const float s = scales[row * num_groups + byte / group];
      const float w = kFormat == kFp8 ? fp8_e4m3_to_float(bits) : static_cast<float>(static_cast<int8_t>(bits));
      out[i] = from_float<T>(w * s);
    }
  }
}

template <typename T, int kFormat>
void launch_rows(const Params& p, cudaStream_t stream) {
  const dim3 grid((p.n + kWarps - 1) / kWarps), block(kWarps * kWarpSize);
  if (p.m <= 1) {
    quant_linear_kernel<T, kFormat, 1><<<grid, block, 0, stream>>>(p);
  } else if (p.m <= 4) {
    quant_linear_kernel<T, kFormat, 4><<<grid, block, 0, stream>>>(p);
  } else {
    quant_linear_kernel<T, kFormat, 8><<<grid, block, 0, stream>>>(p);
  }
  TIDAL_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void launch_format(const Params& p, int format, cudaStream_t stream) {
  if (format == kInt4) return launch_rows<T, kInt4>(p, stream);
  if (format == kFp8) return launch_rows<T, kFp8>(p, stream);
  launch_rows<T, kInt8>(p, stream);
}

}  // namespace

bool quant_linear_supported(TensorView x, TensorView qweight, TensorView scales, int format) {
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  const int64_t codes = format == kInt4 ? 32 : 16, group = k / scales.size(1);
  const int64_t vec = 16 / dtype_size(x.dtype);
  if (m < 1 || m > 8 || group % codes != 0 || n > INT_MAX || k > INT_MAX / 2) return false;
  return is_aligned(x.data, 16) && is_aligned(qweight.data, 16) && x.stride(0) % vec == 0;
}

void quant_linear(TensorView out, TensorView x, TensorView qweight, TensorView scales, TensorView zeros,
                  TensorView bias, int format, Stream stream) {
  Params p{};
  p.x = x.data;
  p.qweight = static_cast<const uint8_t*>(qweight.data);
  p.scales = static_cast<const float*>(scales.data);
  p.zeros = static_cast<const uint8_t*>(zeros.data);
  p.bias = bias.data;
  p.out = out.data;
  p.x_stride = x.stride(0);
  p.out_stride = out.stride(0);
  p.m = static_cast<int>(x.size(0));
  p.n = static_cast<int>(qweight.size(0));
  p.k = static_cast<int>(x.size(1));
  p.num_groups = static_cast<int>(scales.size(1));
  DeviceGuard guard(x.device.index);
  const auto s = static_cast<cudaStream_t>(stream.handle);
  TIDAL_DISPATCH_FLOAT(x.dtype, T, launch_format<T>(p, format, s));
}

void dequantize_weight(TensorView out, TensorView qweight, TensorView scales, TensorView zeros, int format,
                       Stream stream) {
  const int64_t n = out.size(0), k = out.size(1), num_groups = scales.size(1);
  const int64_t total = n * qweight.size(1);
  if (total == 0) return;
  DeviceGuard guard(out.device.index);
  const auto s = static_cast<cudaStream_t>(stream.handle);
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads,
                                           int64_t{multiprocessor_count(out.device.index)} * 32);
  const auto* q = static_cast<const uint8_t*>(qweight.data);
  const auto* sc = static_cast<const float*>(scales.data);
  const auto* z = static_cast<const uint8_t*>(zeros.data);
  TIDAL_DISPATCH_FLOAT(out.dtype, T, {
    T* o = static_cast<T*>(out.data);
    if (format == kInt4) {
      dequantize_weight_kernel<T, kInt4><<<blocks, kThreads, 0, s>>>(o, q, sc, z, n, k, num_groups);
    } else if (format == kFp8) {
      dequantize_weight_kernel<T, kFp8><<<blocks, kThreads, 0, s>>>(o, q, sc, z, n, k, num_groups);
    } else {
      dequantize_weight_kernel<T, kInt8><<<blocks, kThreads, 0, s>>>(o, q, sc, z, n, k, num_groups);
    }
  });
  TIDAL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace tidal::gpu
