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

// Element offset of 16-byte chunk `chunk` of row `row` in a [rows, kHeadDim] tile: chunks are
// XOR-swizzled by row % 8 so the 8 rows an ldmatrix phase reads hit 8 different bank groups.
template <int kHeadDim>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
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
