// SPDX-License-Identifier: Apache-2.0
// Warp-level tensor-core helpers (sm_80+): ldmatrix, mma.sync m16n8k16 with fp32 accumulators, the
// packing of fp32 pairs into 16-bit operands, and the XOR swizzle of [rows, head_dim] shared-memory
// tiles. Used by the paged prefill and decode kernels. NVIDIA-only inline PTX.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/common.cuh"

#if !defined(TIDAL_USE_HIP)

namespace tidal::gpu {

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// d += a (16x16, row) * b (16x8, col), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats as one register of two 16-bit values, `lo` in the low half (the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t word;
  if constexpr (std::is_same_v<T, bf16_t>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    memcpy(&word, &v, sizeof(word));
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    memcpy(&word, &v, sizeof(word));
  }
  return word;
}

// Four FP8 E4M3 codes (byte i of `codes` is code i) as four fp16 values, exactly (fp16 holds every
// finite code): codes 0-1 packed in `lo`, 2-3 in `hi`. FP8 hardware (sm_89+) converts a pair per
// instruction; before it, each code's sign and seven magnitude bits are laid into an fp16 whose
// exponent field is the code's four exponent bits, and one paired multiply by 2^8 rebiases it, the
// codes below 2^-6 (subnormal in both) included.
__device__ __forceinline__ void fp8x4_to_half(uint32_t codes, uint32_t& lo, uint32_t& hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("{\n .reg .b16 c01, c23;\n mov.b32 {c01, c23}, %2;\n cvt.rn.f16x2.e4m3x2 %0, c01;\n"
      " cvt.rn.f16x2.e4m3x2 %1, c23;\n}\n"
      : "=r"(lo), "=r"(hi)
      : "r"(codes));
#else
  // bytes [0, c0, 0, c1] and [0, c2, 0, c3]: each code's sign lands on a 16-bit sign bit
  const uint32_t a = __byte_perm(codes, 0u, 0x1404), b = __byte_perm(codes, 0u, 0x3424);
  const uint32_t x = (a & 0x80008000u) | ((a & 0x7f007f00u) >> 1), y = (b & 0x80008000u) | ((b & 0x7f007f00u) >> 1);
  // 2^8 in both halves; adding -0 keeps every product's sign, zero included
  asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(lo) : "r"(x), "r"(0x5c005c00u), "r"(0x80008000u));
  asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(hi) : "r"(y), "r"(0x5c005c00u), "r"(0x80008000u));
#endif
}

// The mma operand type of the attention kernels over a cache of C holding T-typed queries: T, except
// over FP8 codes, which fp16 holds exactly and Hopper converts into fp16 in one instruction a pair.
template <typename T, typename C>
using OperandType = std::conditional_t<std::is_same_v<C, uint8_t>, half_t, T>;

// A pair of T values (one 32-bit register) as a pair of M: the same bits when M is T; bf16 to fp16
// rounded to nearest and held within fp16's finite range (a query beyond +-65504 is clamped).
template <typename T, typename M>
__device__ __forceinline__ uint32_t as_operand(uint32_t pair) {
  if constexpr (std::is_same_v<T, M>) {
    return pair;
  } else {
    const float lo = __uint_as_float(pair << 16), hi = __uint_as_float(pair & 0xffff0000u);
    return pack2<M>(fminf(fmaxf(lo, -65504.f), 65504.f), fminf(fmaxf(hi, -65504.f), 65504.f));
  }
}

// Element offset of 16-byte chunk `chunk` of row `row` in a [rows, kHeadDim] tile: chunks are
// XOR-swizzled by row % 8 so the 8 rows an ldmatrix phase reads hit 8 different bank groups.
template <int kHeadDim>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
}

// A [kRows, kHeadDim] tile of FP8 codes (row-major, unswizzled, as cp.async landed it) converted
// into fp16 in the swizzled layout the ldmatrix loads read; all kThreads threads of the block take part.
template <int kHeadDim, int kRows, int kThreads = 128>
__device__ __forceinline__ void convert_fp8_tile(const uint8_t* src, half_t* dst, int tid) {
  constexpr int kCodeChunks = kHeadDim / 16;  // 16 codes become two 16-byte chunks of fp16
#pragma unroll
  for (int i = tid; i < kRows * kCodeChunks; i += kThreads) {
    const int row = i / kCodeChunks, c = i % kCodeChunks;
    const uint4 codes = *reinterpret_cast<const uint4*>(src + row * kHeadDim + c * 16);
    uint4 first, second;
    fp8x4_to_half(codes.x, first.x, first.y);
    fp8x4_to_half(codes.y, first.z, first.w);
    fp8x4_to_half(codes.z, second.x, second.y);
    fp8x4_to_half(codes.w, second.z, second.w);
    *reinterpret_cast<uint4*>(dst + swizzle<kHeadDim>(row, 2 * c)) = first;
    *reinterpret_cast<uint4*>(dst + swizzle<kHeadDim>(row, 2 * c + 1)) = second;
  }
}

// The online-softmax step of a FlashAttention-2 warp on m16n8 accumulator fragments: each lane
// holds rows lane / 4 and lane / 4 + 8 (elements 0-1 and 2-3 of every fragment). `s` (scores in
// base 2, -inf where masked) becomes the probabilities; the row max `m` moves up, and the row sum
// `l` (this lane's columns only: sum the quad at the end) and the output `o` are rescaled to it.
template <int kKeyTiles, int kOutTiles>
__device__ __forceinline__ void online_softmax_step(float (&s)[kKeyTiles][4], float (&m)[2], float (&l)[2],
                                                    float (&o)[kOutTiles][4]) {
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float mx = m[rr];
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * rr], s[nt][2 * rr + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float safe = mx == -INFINITY ? 0.0f : mx;
    const float alpha = exp2f(m[rr] - safe);
    m[rr] = mx;
    l[rr] *= alpha;
#pragma unroll
    for (int dt = 0; dt < kOutTiles; ++dt) {
      o[dt][2 * rr] *= alpha;
      o[dt][2 * rr + 1] *= alpha;
    }
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) {
      const float p0 = exp2f(s[nt][2 * rr] - safe), p1 = exp2f(s[nt][2 * rr + 1] - safe);
      s[nt][2 * rr] = p0;
      s[nt][2 * rr + 1] = p1;
      l[rr] += p0 + p1;
    }
  }
}

}  // namespace tidal::gpu

#endif  // !TIDAL_USE_HIP
