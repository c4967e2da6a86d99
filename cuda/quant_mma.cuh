// SPDX-License-Identifier: Apache-2.0
// Quantized codes widened straight into mma.sync A fragments (int4, int8 and FP8, bf16 or fp16 operands)
// and multiplied with rows of x: the inner step of the tensor-core decode kernel (quant_linear_tc.cu)
// and of the streamed skinny_linear's quantized consumers. NVIDIA only (mma.sync).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/quant_linear.cuh"

#if !defined(TIDAL_USE_HIP)
namespace tidal::gpu::quant {

// NOTE(tidal): a k block is what 4 lanes' 16-byte loads of one row cover (int4: 128 inputs, int8: 64).
// Each lane takes the inputs of its own 16 bytes, so A and B fragments pair up inputs in the order the
// codes sit in the word (the mma's sum does not care which input goes to which fragment column) and
// every load is 16 bytes.
template <int kFormat>
constexpr int inputs_per_block() { return kFormat == kInt4 ? 128 : 64; }

template <typename T>
__device__ __forceinline__ uint32_t magic_pair();  // 16-bit words of the float 2^e whose unit is 1
template <>
__device__ __forceinline__ uint32_t magic_pair<bf16_t>() { return 0x43004300u; }  // 128
template <>
__device__ __forceinline__ uint32_t magic_pair<half_t>() { return 0x64006400u; }  // 1024

/// op over two 16-bit float pairs held as 32-bit words (T's packed type: __nv_bfloat162 or __half2).
template <typename T, typename Op>
__device__ __forceinline__ uint32_t packed2(uint32_t a, uint32_t b, Op op) {
  using Pair = std::conditional_t<std::is_same_v<T, bf16_t>, __nv_bfloat162, __half2>;
  Pair va, vb;
  memcpy(&va, &a, 4);
  memcpy(&vb, &b, 4);
  const Pair r = op(va, vb);
  uint32_t out;
  memcpy(&out, &r, 4);
  return out;
}

template <typename T>
__device__ __forceinline__ uint32_t sub2(uint32_t a, uint32_t b) {
  return packed2<T>(a, b, [](auto x, auto y) { return __hsub2(x, y); });
}

template <typename T>
__device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
  return packed2<T>(a, b, [](auto x, auto y) { return __hmul2(x, y); });
}

/// (a & mask) | bits in one instruction: with both constants as immediates the compiler emits two
/// LOP3s (an instruction holds one immediate), so they come in as registers.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t mask, uint32_t bits) {
  uint32_t out;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(out) : "r"(a), "r"(mask), "r"(bits));
  return out;
}

/// The pair (code j, code j + 4) of an int4 word (codes 0..7 at bits 4j) minus `offset` (the magic
/// number plus the zero point, in both halves), as two exact 16-bit floats.
template <typename T>
__device__ __forceinline__ uint32_t int4_pair(uint32_t word, int j, uint32_t offset) {
  return sub2<T>(and_or(word >> (4 * j), 0x000f000fu, magic_pair<T>()), offset);
}

/// Codes 2j and 2j + 1 of an int8 word as two exact 16-bit floats; `biased` is the word with its sign
/// bits flipped (each byte code + 128). fp16: each byte under the exponent of 1024 (one byte
/// permutation), less 1024 + 128; bf16 (too few mantissa bits for 8-bit codes): the same through
/// fp32's 2^23, then packed. No integer-to-float conversions (quarter-rate instructions).
template <typename T>
__device__ __forceinline__ uint32_t int8_pair(uint32_t biased, int j) {
  if constexpr (std::is_same_v<T, half_t>) {
    return sub2<T>(__byte_perm(biased, 0x64646464u, 0x4040 | ((2 * j + 1) << 8) | (2 * j)), 0x64806480u);
  } else {
    const float lo = __uint_as_float(__byte_perm(biased, 0x4b000000u, 0x7650 + 2 * j)) - 8388736.f;
    const float hi = __uint_as_float(__byte_perm(biased, 0x4b000000u, 0x7650 + 2 * j + 1)) - 8388736.f;
    return pack2<T>(lo, hi);
  }
}

/// Codes 2j and 2j + 1 of an FP8 E4M3 word as two exact 16-bit floats. Each byte, sign-extended to 16
/// bits (one byte permutation), lands its exponent and mantissa under the 16-bit float's low exponent
/// bits (one shift, one mask: value / 2^120 in bf16, value / 2^8 in fp16, subnormals included), and one
/// multiply by that power of two makes it exact: every E4M3 value is a 16-bit float of either kind.
template <typename T>
__device__ __forceinline__ uint32_t fp8_pair(uint32_t word, int j) {
  // bytes: code 2j, its sign replicated, code 2j + 1, its sign replicated (prmt's sign mode: the
  // byte selector's high bit)
  const uint32_t select = j == 0 ? 0x9180u : 0xB3A2u;
  uint32_t spread;
  asm("prmt.b32 %0, %1, 0, %2;" : "=r"(spread) : "r"(word), "r"(select));
  if constexpr (std::is_same_v<T, bf16_t>) {
    return mul2<T>((spread << 4) & 0x87f087f0u, 0x7b807b80u);  // 2^120
  } else {
    return mul2<T>((spread << 7) & 0xbf80bf80u, 0x5c005c00u);  // 2^8
  }
}

/// The magic number plus a zero point (0..15) in both 16-bit halves: the zero lands in the low
/// mantissa bits of 2^e, exactly (one integer instruction, no conversion).
template <typename T>
__device__ __forceinline__ uint32_t offset_pair(uint32_t zero) {
  return magic_pair<T>() | (zero * 0x00010001u);
}

/// This lane's k block of codes, widened to A fragments and multiplied with x's rows (the B tiles):
/// `blk` gets the block's unscaled dot products. x: m rows of x_stride elements, in global memory
/// (read through the non-coherent path) or, kSharedX, in shared memory. `raw0`/`raw1`: the lane's
/// 16 bytes of rows row0 and row1; `first`: the first of the lane's inputs; `off0`/`off1`: int4's
/// magic number plus zero point.
template <typename T, int kFormat, int kTiles, bool kSharedX = false>
__device__ __forceinline__ void block_dot(int m, int64_t x_stride, const T* x, int group_id, int first, uint4 raw0,
                                          uint4 raw1, uint32_t off0, uint32_t off1, float (&blk)[kTiles][4]) {
  constexpr int kSteps = kFormat == quant::kInt4 ? 8 : 4;  // mma k-steps (16 inputs) per k block
  // int8 words arrive with their sign bits flipped (see int8_pair)
  constexpr uint32_t kFlip = kFormat == quant::kInt8 ? 0x80808080u : 0u;
  const uint32_t w0[4] = {raw0.x ^ kFlip, raw0.y ^ kFlip, raw0.z ^ kFlip, raw0.w ^ kFlip};
  const uint32_t w1[4] = {raw1.x ^ kFlip, raw1.y ^ kFlip, raw1.z ^ kFlip, raw1.w ^ kFlip};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    // A fragments of the word's k-steps: int4, 2 steps (pairs (j, j+4) for j = 0,1 then 2,3);
    // int8 and FP8, 1 step (pairs (0,1) and (2,3))
    uint32_t a[kSteps / 4][4];
#pragma unroll
    for (int h = 0; h < kSteps / 4; ++h) {
      if constexpr (kFormat == quant::kInt4) {
        a[h][0] = int4_pair<T>(w0[w], 2 * h, off0);
        a[h][1] = int4_pair<T>(w1[w], 2 * h, off1);
        a[h][2] = int4_pair<T>(w0[w], 2 * h + 1, off0);
        a[h][3] = int4_pair<T>(w1[w], 2 * h + 1, off1);
      } else if constexpr (kFormat == quant::kInt8) {
        a[h][0] = int8_pair<T>(w0[w], 0);
        a[h][1] = int8_pair<T>(w1[w], 0);
        a[h][2] = int8_pair<T>(w0[w], 1);
        a[h][3] = int8_pair<T>(w1[w], 1);
      } else {
        a[h][0] = fp8_pair<T>(w0[w], 0);
        a[h][1] = fp8_pair<T>(w1[w], 0);
        a[h][2] = fp8_pair<T>(w0[w], 1);
        a[h][3] = fp8_pair<T>(w1[w], 1);
      }
    }
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      // a token past m reads row m - 1 instead (its products are never written): no predicate, no zeroing
      const int token = min(t * 8 + group_id, m - 1);
      if constexpr (kFormat == quant::kInt4) {
        // x[token, the word's 8 inputs]: pairs (j, j + 4) as the codes pair up
        const uint4* xp = reinterpret_cast<const uint4*>(x + token * x_stride + first + 8 * w);
        const uint4 xv = kSharedX ? *xp : TIDAL_LDG(xp);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t lo = h == 0 ? xv.x : xv.y, hi = h == 0 ? xv.z : xv.w;
          mma_16816<T>(blk[t], a[h], __byte_perm(lo, hi, 0x5410), __byte_perm(lo, hi, 0x7632));
        }
      } else {
        const uint2* xp = reinterpret_cast<const uint2*>(x + token * x_stride + first + 4 * w);
        const uint2 xv = kSharedX ? *xp : TIDAL_LDG(xp);
        mma_16816<T>(blk[t], a[0], xv.x, xv.y);
      }
    }
  }
}

}  // namespace tidal::gpu::quant
#endif  // !TIDAL_USE_HIP
