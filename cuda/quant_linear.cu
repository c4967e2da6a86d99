// SPDX-License-Identifier: Apache-2.0
// The quantized linear layer on the GPU for decode-sized batches: one warp per output row streams
// the row's codes as 16-byte chunks (16 int8 or FP8 codes, 32 int4 codes), widens them in registers,
// and dots them with up to 8 input rows; and dequantize_weight, which writes the widened weight out
// for the large-batch path (a dense matmul on it). CUDA and HIP alike.
#include <algorithm>
#include <climits>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/quant_linear.cuh"
#include "ops/fp8.h"
#include "ops/kernels.h"

namespace tidal::gpu {
namespace {

using quant::codes_per_chunk, quant::kFp8, quant::kInt4, quant::kInt8, quant::Params;
constexpr int kWarps = 4;  // warps per block
// NOTE(tidal): each warp owns kRowsPerWarp output rows and every lane walks the k chunks of all of
// them at once, so one load and widening of x serves kRowsPerWarp rows. The codes are widened without
// integer-to-float conversions (a quarter-rate instruction): a code placed under the exponent of
// 2^23 is the float 2^23 + code, and one subtraction leaves code - zero exactly. Napkin math at m = 1
// (int4): ~3 instructions to widen a code plus 1 FMA, 7e9 codes / (132 SMs x 128 lanes x 1.7 GHz) ~
// 1.0 ms per Llama-3-8B token, next to the 0.73 ms its 3.5 GB take to read on an H200.
constexpr float kMagic = 8388608.f;  // 2^23

/// FP8 E4M3 (fn) bits of byte `j` of `word` as float / 2^120: the magnitude bits under float's
/// exponent field (the 2^120 that rebiases them is folded into the row's scale; exact for normals and
/// subnormals; the NaN pattern is never produced by a quantizer).
__device__ __forceinline__ float fp8_e4m3_unscaled(uint32_t word, int j) {
  const uint32_t b = word >> (8 * j);
  return __uint_as_float(((b & 0x80u) << 24) | ((b & 0x7fu) << 20));
}

/// Code j (0..7 for int4, 0..3 otherwise) of one 32-bit word, minus the zero point, as a float;
/// `offset` is 2^23 + zero (int4), 2^23 + 128 (int8, whose word arrives with its sign bits flipped).
template <int kFormat>
__device__ __forceinline__ float widen_code(uint32_t word, int j, float offset) {
  if constexpr (kFormat == kInt4) {
    return __uint_as_float(((word >> (4 * j)) & 0xfu) | 0x4b000000u) - offset;
  } else if constexpr (kFormat == kInt8) {
    return __uint_as_float(__byte_perm(word, 0x4b000000u, 0x7650 + j)) - offset;
  } else {
    return fp8_e4m3_unscaled(word, j);
  }
}

// kUnroll: chunks in flight per lane and output row.
template <typename T, int kFormat, int kMaxRows, int kRowsPerWarp, int kUnroll>
__global__ void __launch_bounds__(kWarps* kWarpSize) quant_linear_kernel(Params p) {
  wait_for_prior_grid();  // launched by launch_dependent
  allow_dependents();
  constexpr int kCodes = codes_per_chunk<kFormat>();  // per 16-byte chunk
  constexpr int kCodesPerWord = kCodes / 4;
  const int lane = threadIdx.x % kWarpSize;
  const int row0 = (blockIdx.x * kWarps + threadIdx.x / kWarpSize) * kRowsPerWarp;
  if (row0 >= p.n) return;  // the whole warp leaves together
  const int chunks = p.k / kCodes, chunks_per_group = p.k / p.num_groups / kCodes;
  const int64_t row_bytes = kFormat == kInt4 ? p.k / 2 : p.k;
  const T* x = static_cast<const T*>(p.x);
  const uint4* codes[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = min(row0 + r, p.n - 1);  // a missing last row re-reads the previous one, unwritten
    codes[r] = reinterpret_cast<const uint4*>(p.qweight + row * row_bytes);
  }
  float acc[kRowsPerWarp][kMaxRows] = {};
  for (int c0 = lane; c0 < chunks; c0 += kWarpSize * kUnroll) {
    // every load of these chunks first (codes, scales, zero points), then the math
    uint4 raw[kUnroll][kRowsPerWarp];
    float scales[kUnroll][kRowsPerWarp];
    int zeros[kUnroll][kRowsPerWarp];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int c = c0 + u * kWarpSize;
        if (c < chunks) {
          raw[u][r] = TIDAL_LDG(codes[r] + c);
          const int64_t g = static_cast<int64_t>(min(row0 + r, p.n - 1)) * p.num_groups + c / chunks_per_group;
          scales[u][r] = TIDAL_LDG(p.scales + g);
          if constexpr (kFormat == kInt4) zeros[u][r] = TIDAL_LDG(p.zeros + g);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * kWarpSize;
      if (c < chunks) {
        float scale[kRowsPerWarp], offset[kRowsPerWarp];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          scale[r] = scales[u][r] * (kFormat == kFp8 ? 0x1p120f : 1.f);
          offset[r] = kMagic + (kFormat == kInt4 ? static_cast<float>(zeros[u][r]) : kFormat == kInt8 ? 128.f : 0.f);
        }
        float dot[kRowsPerWarp][kMaxRows] = {};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          // x[:, this word's kCodesPerWord inputs], widened once for all rows of the warp
          float xs[kMaxRows][kCodesPerWord];
#pragma unroll
          for (int i = 0; i < kMaxRows; ++i) {
            if (i < p.m) {
              const T* xi = x + i * p.x_stride + static_cast<int64_t>(c) * kCodes + w * kCodesPerWord;
              constexpr int kVec = kCodesPerWord * sizeof(T) >= 16 ? 16 / sizeof(T) : kCodesPerWord;
#pragma unroll
              for (int v = 0; v < kCodesPerWord / kVec; ++v) {
                const Vec<T, kVec> xv = load_vec_readonly<T, kVec>(xi + v * kVec);
#pragma unroll
                for (int j = 0; j < kVec; ++j) xs[i][v * kVec + j] = element_to_float(xv, j);
              }
            }
          }
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            const uint32_t words[4] = {raw[u][r].x, raw[u][r].y, raw[u][r].z, raw[u][r].w};
            const uint32_t word = kFormat == kInt8 ? words[w] ^ 0x80808080u : words[w];
#pragma unroll
            for (int j = 0; j < kCodesPerWord; ++j) {
              const float wv = widen_code<kFormat>(word, j, offset[r]);
#pragma unroll
              for (int i = 0; i < kMaxRows; ++i) {
                if (i < p.m) dot[r][i] = fmaf(wv, xs[i][j], dot[r][i]);
              }
            }
          }
        }
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
          for (int i = 0; i < kMaxRows; ++i) acc[r][i] = fmaf(scale[r], dot[r][i], acc[r][i]);
        }
      }
    }
  }
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = row0 + r;
#pragma unroll
    for (int i = 0; i < kMaxRows; ++i) {
      const float sum = warp_sum(acc[r][i]);
      if (lane == 0 && i < p.m && row < p.n) {
        const float add = p.bias == nullptr ? 0.f : to_float(static_cast<const T*>(p.bias)[row]);
        out[i * p.out_stride + row] = from_float<T>(sum + add);
      }
    }
  }
}

/// One thread per 16-byte chunk of codes (16 or 32 weights, written as 16-byte stores) when the rows
/// are whole chunks and groups whole chunks (kVector); otherwise one thread per byte.
template <typename T, int kFormat, bool kVector>
__global__ void dequantize_weight_kernel(T* __restrict__ out, const uint8_t* __restrict__ qweight,
                                         const float* __restrict__ scales, const uint8_t* __restrict__ zeros,
                                         int64_t n, int64_t k, int64_t num_groups) {
  constexpr int kCodes = kVector ? codes_per_chunk<kFormat>() : (kFormat == kInt4 ? 2 : 1);
  constexpr int kBytes = kVector ? 16 : 1;
  const int64_t row_bytes = kFormat == kInt4 ? k / 2 : k, group = k / num_groups;
  const int64_t total = n * row_bytes / kBytes;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i * kBytes / row_bytes, col = i * kBytes % row_bytes * kCodes / kBytes;  // first input
    const int64_t g = row * num_groups + col / group;  // a chunk (or an int4 byte) never straddles groups
    const float scale = scales[g] * (kFormat == kFp8 ? 0x1p120f : 1.f);
    const float offset = kMagic + (kFormat == kInt4 ? static_cast<float>(zeros[g]) : kFormat == kInt8 ? 128.f : 0.f);
    uint32_t words[4] = {};
    if constexpr (kVector) {
      const uint4 raw = TIDAL_LDG(reinterpret_cast<const uint4*>(qweight) + i);
      words[0] = raw.x, words[1] = raw.y, words[2] = raw.z, words[3] = raw.w;
    } else {
      words[0] = qweight[i];
    }
    T* dst = out + row * k + col;
#pragma unroll
    for (int v = 0; v < kCodes / (kVector ? 8 : kCodes); ++v) {  // 8 outputs (16 bytes of bf16) per store
      constexpr int kPer = kVector ? 8 : kCodes;
      Vec<T, kPer> values;
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int c = v * kPer + j, per_word = kFormat == kInt4 ? 8 : 4;
        const uint32_t word = kFormat == kInt8 ? words[c / per_word] ^ 0x80808080u : words[c / per_word];
        values.v[j] = from_float<T>(widen_code<kFormat>(word, c % per_word, offset) * scale);
      }
      if constexpr (kVector && sizeof(T) * kPer == 16) {
        store_vec<T, kPer>(dst + v * kPer, values);
      } else {
#pragma unroll
        for (int j = 0; j < kPer; ++j) dst[v * kPer + j] = values.v[j];
      }
    }
  }
}

template <typename T, int kFormat, int kMaxRows, int kRowsPerWarp, int kUnroll>
void launch(const Params& p, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
  const dim3 grid((p.n + kRowsPerBlock - 1) / kRowsPerBlock), block(kWarps * kWarpSize);
  launch_dependent(quant_linear_kernel<T, kFormat, kMaxRows, kRowsPerWarp, kUnroll>, grid, block, 0, stream,
                   current_device(), p);
}

template <typename T, int kFormat>
void launch_rows(const Params& p, cudaStream_t stream) {
  // NOTE(tidal): at m = 1 (H100, Llama-3-8B shapes) 4 rows a warp left 4096-row layers with ~8 warps
  // per SM and 33-43% of the copy ceiling: 2 rows a warp, each lane keeping 4 chunks per row in flight.
  if (p.m <= 1) return launch<T, kFormat, 1, 2, 4>(p, stream);
  if (p.m <= 4) return launch<T, kFormat, 4, 2, 2>(p, stream);
  launch<T, kFormat, 8, 2, 2>(p, stream);
}

template <typename T>
void launch_format(const Params& p, int format, cudaStream_t stream) {
  if (format == kInt4) return launch_rows<T, kInt4>(p, stream);
  if (format == kFp8) return launch_rows<T, kFp8>(p, stream);
  launch_rows<T, kInt8>(p, stream);
}

}  // namespace

bool quant_linear_supported(TensorView x, TensorView qweight, TensorView scales, int format) {
  if (quant_linear_tc_supported(x, qweight, scales, format)) return true;
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  const int64_t codes = format == kInt4 ? 32 : 16, group = k / scales.size(1);
  const int64_t vec = 16 / dtype_size(x.dtype);
  if (m < 1 || m > 8 || group % codes != 0 || n > INT_MAX || k > INT_MAX / 2) return false;
  return is_aligned(x.data, 16) && is_aligned(qweight.data, 16) && x.stride(0) % vec == 0;
}

void quant_linear(TensorView out, TensorView x, TensorView qweight, TensorView scales, TensorView zeros,
                  TensorView bias, int format, Stream stream) {
  if (quant_linear_tc_supported(x, qweight, scales, format)) {
    return quant_linear_tc(out, x, qweight, scales, zeros, bias, format, stream);
  }
  const Params p = quant::make_params(out, x, qweight, scales, zeros, bias);
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
  const auto* q = static_cast<const uint8_t*>(qweight.data);
  const auto* sc = static_cast<const float*>(scales.data);
  const auto* z = static_cast<const uint8_t*>(zeros.data);
  const int64_t codes = format == kInt4 ? 32 : 16;
  const bool vector = k % codes == 0 && (k / num_groups) % codes == 0 && is_aligned(out.data, 16) &&
                      is_aligned(qweight.data, 16);
  TIDAL_DISPATCH_FLOAT(out.dtype, T, {
    T* o = static_cast<T*>(out.data);
    const auto run = [&](auto kernel, int64_t threads) {
      const int64_t blocks = std::min<int64_t>((threads + kThreads - 1) / kThreads,
                                               int64_t{multiprocessor_count(out.device.index, s)} * 32);
      kernel<<<blocks, kThreads, 0, s>>>(o, q, sc, z, n, k, num_groups);
    };
    if (format == kInt4) {
      vector ? run(dequantize_weight_kernel<T, kInt4, true>, total / 16) : run(dequantize_weight_kernel<T, kInt4, false>, total);
    } else if (format == kFp8) {
      vector ? run(dequantize_weight_kernel<T, kFp8, true>, total / 16) : run(dequantize_weight_kernel<T, kFp8, false>, total);
    } else {
      vector ? run(dequantize_weight_kernel<T, kInt8, true>, total / 16) : run(dequantize_weight_kernel<T, kInt8, false>, total);
    }
  });
  TIDAL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace tidal::gpu
