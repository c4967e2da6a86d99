// SPDX-License-Identifier: Apache-2.0
// float16 and bfloat16 storage types for the CPU kernels: 16-bit payloads with exact conversions
// to float and round-to-nearest-even conversions back (NaN stays NaN, overflow goes to infinity,
// float16 subnormals are kept), matching what torch's CPU kernels store.
#pragma once

#include <bit>
#include <cstdint>

#include "ops/fp8.h"

namespace tidal::cpu {

struct Half {
  uint16_t bits;
};

struct BFloat16 {
  uint16_t bits;
};

/// An FP8 E4M3 (fn) KV-cache element (tidal/ops_serving.h: a uint8 cache holds these, scale 1).
struct Fp8E4M3 {
  uint8_t bits;
};

inline float to_float(Fp8E4M3 v) { return fp8::to_float(v.bits); }

inline float to_float(float v) { return v; }

inline float to_float(BFloat16 v) { return std::bit_cast<float>(static_cast<uint32_t>(v.bits) << 16); }

inline float to_float(Half v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exponent = (v.bits >> 10) & 0x1fu;
  const uint32_t mantissa = v.bits & 0x3ffu;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in float.
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return std::bit_cast<float>(sign | std::bit_cast<uint32_t>(magnitude));
  }
  if (exponent == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  return std::bit_cast<float>(sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13));
}

template <typename T>
T from_float(float v);

template <>
inline float from_float<float>(float v) { return v; }

/// Rounded to nearest even, saturated to +-448 (the KV cache's conversion).
template <>
inline Fp8E4M3 from_float<Fp8E4M3>(float v) { return {fp8::from_float(v)}; }

template <>
inline BFloat16 from_float<BFloat16>(float v) {
  const uint32_t bits = std::bit_cast<uint32_t>(v);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((bits >> 16) | 0x40u)};  // quiet NaN
  const uint32_t round = 0x7fffu + ((bits >> 16) & 1u);  // ties to even
  return {static_cast<uint16_t>((bits + round) >> 16)};
}

template <>
inline Half from_float<Half>(float v) {
  const uint32_t bits = std::bit_cast<uint32_t>(v);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  // 65520 = 0x477ff000 is halfway between the largest half (65504) and 2^16: ties to even go up.
  if (magnitude >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};
  if (magnitude < 0x38800000u) {
    // Below 2^-14 the half is subnormal with a unit of 2^-24. Adding 0.5f puts that unit at the
    // last mantissa bit of the sum, so the FPU's own ties-to-even rounding does the work.
    const float shifted = std::bit_cast<float>(magnitude) + 0.5f;
    return {static_cast<uint16_t>(sign | (std::bit_cast<uint32_t>(shifted) - 0x3f000000u))};
  }
  const uint32_t odd = (magnitude >> 13) & 1u;
  const uint32_t rebiased = magnitude - ((127u - 15u) << 23) + 0xfffu + odd;
  return {static_cast<uint16_t>(sign | (rebiased >> 13))};
}

}  // namespace tidal::cpu
