// SPDX-License-Identifier: Apache-2.0
// The quantized linear layer on tensor cores for decode batches (bf16 or fp16 activations, up to 32
// rows): each block owns 16 output rows, its warps split k; codes are widened straight into mma.sync
// A fragments (int4: two codes per instruction pair, exactly, as code - zero), the rows of x are the
// B fragments, fp32 accumulators take each group's scale after its k-steps. NVIDIA only (mma.sync);
// the HIP build and other shapes keep the SIMT kernel of quant_linear.cu.
#include <climits>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/quant_linear.cuh"
#include "ops/kernels.h"

namespace tidal::gpu {

#if !defined(TIDAL_USE_HIP)
namespace {

using quant::kInt4, quant::kInt8, quant::Params;
constexpr int kWarps = 8;       // warps per block, each a share of k
constexpr int kUnroll = 4;      // k blocks whose codes a lane loads before using any
constexpr int kMaxTiles = 4;    // 8 rows of x per B tile: up to 32 rows
// NOTE(tidal): a k block is what 4 lanes' 16-byte loads of one row cover (int4: 128 inputs, int8: 64).
// Each lane takes the inputs of its own 16 bytes, so A and B fragments pair up inputs in the order the
// codes sit in the word (the mma's sum does not care which input goes to which fragment column) and
// every load is 16 bytes. Napkin math, int4 at m = 1: 2 instructions widen 2 codes, ~1 per weight, a
// third of the SIMT kernel's; 16 rows x 4096 inputs per block, 256 blocks at n = 4096 keep ~64 KB of
// codes in flight per SM.

template <int kFormat>
constexpr int inputs_per_block() { return kFormat == kInt4 ? 128 : 64; }

template <typename T>
__device__ __forceinline__ uint32_t magic_pair();  // 16-bit words of the float 2^e whose unit is 1
template <>
__device__ __forceinline__ uint32_t magic_pair<bf16_t>() { return 0x43004300u; }  // 128
template <>
__device__ __forceinline__ uint32_t magic_pair<half_t>() { return 0x64006400u; }  // 1024

template <typename T>
__device__ __forceinline__ uint32_t sub2(uint32_t a, uint32_t b) {
  uint32_t out;
  if constexpr (std::is_same_v<T, bf16_t>) {
    __nv_bfloat162 va, vb;
    memcpy(&va, &a, 4);
    memcpy(&vb, &b, 4);
    const __nv_bfloat162 r = __hsub2(va, vb);
    memcpy(&out, &r, 4);
  } else {
    __half2 va, vb;
    memcpy(&va, &a, 4);
    memcpy(&vb, &b, 4);
    const __half2 r = __hsub2(va, vb);
    memcpy(&out, &r, 4);
  }
  return out;
}

/// The pair (code j, code j + 4) of an int4 word (codes 0..7 at bits 4j) minus `offset` (the magic
/// number plus the zero point, in both halves), as two exact 16-bit floats.
template <typename T>
__device__ __forceinline__ uint32_t int4_pair(uint32_t word, int j, uint32_t offset) {
  return sub2<T>(((word >> (4 * j)) & 0x000f000fu) | magic_pair<T>(), offset);
}

/// Codes 2j and 2j + 1 of an int8 word as two exact 16-bit floats.
template <typename T>
__device__ __forceinline__ uint32_t int8_pair(uint32_t word, int j) {
  const float lo = static_cast<float>(static_cast<int8_t>((word >> (16 * j)) & 0xffu));
  const float hi = static_cast<float>(static_cast<int8_t>((word >> (16 * j + 8)) & 0xffu));
  return pack2<T>(lo, hi);
}

template <typename T>
__device__ __forceinline__ uint32_t offset_pair(int zero) {
  const float v = (std::is_same_v<T, bf16_t> ? 128.f : 1024.f) + static_cast<float>(zero);
  return pack2<T>(v, v);
}

template <typename T, int kFormat, int kTiles>
__global__ void __launch_bounds__(kWarps* kWarpSize) quant_linear_tc_kernel(Params p) {
  constexpr int kBlockInputs = inputs_per_block<kFormat>();
  constexpr int kSteps = kFormat == kInt4 ? 8 : 4;  // mma k-steps (16 inputs) per k block
  __shared__ float partial[kWarps][kTiles * 4][kWarpSize];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int group_id = lane / 4, tid = lane % 4;
  const int row0 = blockIdx.x * 16 + group_id, row1 = row0 + 8;
  const int64_t row_bytes = kFormat == kInt4 ? p.k / 2 : p.k;
  const uint4* codes0 = reinterpret_cast<const uint4*>(p.qweight + min(row0, p.n - 1) * row_bytes) + tid;
  const uint4* codes1 = reinterpret_cast<const uint4*>(p.qweight + min(row1, p.n - 1) * row_bytes) + tid;
  const int num_blocks = p.k / kBlockInputs, blocks_per_group = p.k / p.num_groups / kBlockInputs;
  const T* x = static_cast<const T*>(p.x);
  float acc[kTiles][4] = {};
  for (int b0 = warp; b0 < num_blocks; b0 += kWarps * kUnroll) {
    // every load of the k blocks first (codes, scales, zero points), then the math
    uint4 raw0[kUnroll], raw1[kUnroll];
    float scale0[kUnroll], scale1[kUnroll];
    int zero0[kUnroll], zero1[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int b = b0 + u * kWarps;
      if (b < num_blocks) {
        raw0[u] = TIDAL_LDG(codes0 + 4 * b);
        raw1[u] = TIDAL_LDG(codes1 + 4 * b);
        const int64_t g0 = static_cast<int64_t>(min(row0, p.n - 1)) * p.num_groups + b / blocks_per_group;
        const int64_t g1 = static_cast<int64_t>(min(row1, p.n - 1)) * p.num_groups + b / blocks_per_group;
        scale0[u] = TIDAL_LDG(p.scales + g0);
        scale1[u] = TIDAL_LDG(p.scales + g1);
        if constexpr (kFormat == kInt4) {
          zero0[u] = TIDAL_LDG(p.zeros + g0);
          zero1[u] = TIDAL_LDG(p.zeros + g1);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int b = b0 + u * kWarps;
      if (b < num_blocks) {
        uint32_t off0 = 0, off1 = 0;
        if constexpr (kFormat == kInt4) {
          off0 = offset_pair<T>(zero0[u]);
          off1 = offset_pair<T>(zero1[u]);
        }
        const uint32_t w0[4] = {raw0[u].x, raw0[u].y, raw0[u].z, raw0[u].w};
        const uint32_t w1[4] = {raw1[u].x, raw1[u].y, raw1[u].z, raw1[u].w};
        float blk[kTiles][4] = {};
        // this lane's inputs of the block: kBlockInputs / 4 consecutive ones from here
        const int64_t first = static_cast<int64_t>(b) * kBlockInputs + tid * (kBlockInputs / 4);
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          // A fragments of the word's k-steps: int4, 2 steps (pairs (j, j+4) for j = 0,1 then 2,3);
          // int8, 1 step (pairs (0,1) and (2,3))
          uint32_t a[kSteps / 4][4];
#pragma unroll
          for (int h = 0; h < kSteps / 4; ++h) {
            if constexpr (kFormat == kInt4) {
              a[h][0] = int4_pair<T>(w0[w], 2 * h, off0);
              a[h][1] = int4_pair<T>(w1[w], 2 * h, off1);
              a[h][2] = int4_pair<T>(w0[w], 2 * h + 1, off0);
              a[h][3] = int4_pair<T>(w1[w], 2 * h + 1, off1);
            } else {
              a[h][0] = int8_pair<T>(w0[w], 0);
              a[h][1] = int8_pair<T>(w1[w], 0);
              a[h][2] = int8_pair<T>(w0[w], 1);
              a[h][3] = int8_pair<T>(w1[w], 1);
            }
          }
#pragma unroll
          for (int t = 0; t < kTiles; ++t) {
            const int token = t * 8 + group_id;
            if constexpr (kFormat == kInt4) {
              // x[token, the word's 8 inputs]: pairs (j, j + 4) as the codes pair up
              uint4 xv = make_uint4(0, 0, 0, 0);
              if (token < p.m) xv = TIDAL_LDG(reinterpret_cast<const uint4*>(x + token * p.x_stride + first + 8 * w));
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const uint32_t lo = h == 0 ? xv.x : xv.y, hi = h == 0 ? xv.z : xv.w;
                mma_16816<T>(blk[t], a[h], __byte_perm(lo, hi, 0x5410), __byte_perm(lo, hi, 0x7632));
              }
            } else {
              uint2 xv = make_uint2(0, 0);
              if (token < p.m) xv = TIDAL_LDG(reinterpret_cast<const uint2*>(x + token * p.x_stride + first + 4 * w));
              mma_16816<T>(blk[t], a[0], xv.x, xv.y);
            }
          }
        }
        const float s0 = scale0[u], s1 = scale1[u];
#pragma unroll
        for (int t = 0; t < kTiles; ++t) {
          acc[t][0] = fmaf(s0, blk[t][0], acc[t][0]);
          acc[t][1] = fmaf(s0, blk[t][1], acc[t][1]);
          acc[t][2] = fmaf(s1, blk[t][2], acc[t][2]);
          acc[t][3] = fmaf(s1, blk[t][3], acc[t][3]);
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][t * 4 + i][lane] = acc[t][i];
  }
  __syncthreads();
  if (warp != 0) return;
  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += partial[w][t * 4 + i][lane];
      const int row = i < 2 ? row0 : row1, token = t * 8 + 2 * tid + (i & 1);
      if (row < p.n && token < p.m) {
        out[token * p.out_stride + row] = from_float<T>(sum + (bias == nullptr ? 0.f : to_float(bias[row])));
      }
    }
  }
}

template <typename T, int kFormat>
void launch_tiles(const Params& p, cudaStream_t stream) {
  const dim3 grid((p.n + 15) / 16), block(kWarps * kWarpSize);
  const int tiles = (p.m + 7) / 8;
  if (tiles <= 1) {
    quant_linear_tc_kernel<T, kFormat, 1><<<grid, block, 0, stream>>>(p);
  } else if (tiles <= 2) {
    quant_linear_tc_kernel<T, kFormat, 2><<<grid, block, 0, stream>>>(p);
  } else {
    quant_linear_tc_kernel<T, kFormat, 4><<<grid, block, 0, stream>>>(p);
  }
  TIDAL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

bool quant_linear_tc_supported(TensorView x, TensorView qweight, TensorView scales, int format) {
  if (x.dtype != DType::kBFloat16 && x.dtype != DType::kFloat16) return false;
  if (format != kInt4 && format != kInt8) return false;
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  const int64_t block = format == kInt4 ? 128 : 64, group = k / scales.size(1);
  if (m < 1 || m > kMaxTiles * 8 || group % block != 0 || n > INT_MAX || k > INT_MAX / 2) return false;
  // NOTE(tidal): int8 codes widen through integer-to-float conversions; at one row the SIMT kernel's
  // magic-number widening was faster (H100, Llama-3-8B projections: 16.6-54.5 us against 16.8-62.1 us)
  if (format == kInt8 && m == 1) return false;
  int device = x.device.index, major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major < 8) return false;
  return is_aligned(x.data, 16) && is_aligned(qweight.data, 16) && x.stride(0) % 8 == 0;
}

void quant_linear_tc(TensorView out, TensorView x, TensorView qweight, TensorView scales, TensorView zeros,
                     TensorView bias, int format, Stream stream) {
  const Params p = quant::make_params(out, x, qweight, scales, zeros, bias);
  DeviceGuard guard(x.device.index);
  const auto s = static_cast<cudaStream_t>(stream.handle);
  if (x.dtype == DType::kBFloat16) {
    format == kInt4 ? launch_tiles<bf16_t, kInt4>(p, s) : launch_tiles<bf16_t, kInt8>(p, s);
  } else {
    format == kInt4 ? launch_tiles<half_t, kInt4>(p, s) : launch_tiles<half_t, kInt8>(p, s);
  }
}

#else  // TIDAL_USE_HIP: no mma.sync; the SIMT kernel serves every shape

bool quant_linear_tc_supported(TensorView, TensorView, TensorView, int) { return false; }
void quant_linear_tc(TensorView, TensorView, TensorView, TensorView, TensorView, TensorView, int, Stream) {}

#endif

}  // namespace tidal::gpu
