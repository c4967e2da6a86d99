// SPDX-License-Identifier: Apache-2.0
// FP8 E4M3 (the "fn" variant: no infinities, 0x7f/0xff NaN, largest finite 448) conversions shared by
// the CPU and GPU kernels, bit for bit: float to E4M3 rounds to nearest even and saturates at +-448,
// as the activation quantizer needs; E4M3 to float is exact.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TIDAL_FP8_HD __host__ __device__ __forceinline__
#else
#define TIDAL_FP8_HD inline
#endif

namespace tidal::fp8 {

TIDAL_FP8_HD uint32_t float_bits(float v) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof(bits));
  return bits;
}

TIDAL_FP8_HD float bits_float(uint32_t bits) {
  float v;
  memcpy(&v, &bits, sizeof(v));
  return v;
}

/// E4M3 bits of `v`, rounded to nearest even, saturated to +-448; NaN stays NaN (0x7f).
TIDAL_FP8_HD uint8_t from_float(float v) {
  const uint32_t bits = float_bits(v);
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return 0x7f;             // NaN
  if (magnitude >= 0x43e00000u) return sign | 0x7e;      // >= 448 (and infinity): the largest finite
  if (magnitude < 0x3c800000u) {                        // below 2^-6: subnormal, a unit of 2^-9
    // 2^14 has a unit in the last place of 2^-9: the float sum rounds the magnitude to a multiple of
    // 2^-9 (ties to even) and leaves the count of units in the low mantissa bits (8: the smallest normal).
    const float units = bits_float(magnitude) + 16384.f;
    return sign | static_cast<uint8_t>(float_bits(units) - float_bits(16384.f));
  }
  // normal: keep 3 mantissa bits, rounding the 20 dropped ones to nearest even
  const uint32_t rounded = magnitude + 0x7ffffu + ((magnitude >> 20) & 1u);
  const uint32_t code = ((rounded >> 20) - ((127u - 7u) << 3)) & 0xffu;
  return sign | static_cast<uint8_t>(code > 0x7eu ? 0x7eu : code);
}

/// The value of E4M3 bits (exact; 0x7f/0xff read as 480, never produced by from_float from finite input).
TIDAL_FP8_HD float to_float(uint32_t bits) {
  return bits_float(((bits & 0x80u) << 24) | ((bits & 0x7fu) << 20)) * 0x1p120f;
}

}  // namespace tidal::fp8
