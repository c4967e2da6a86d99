// SPDX-License-Identifier: Apache-2.0
// What lets the serving kernels' inner loops vectorise in a build with no -march or -ffast-math:
// branch-free exp, select and fp16 widening that loops over them vectorise; an 8-float vector type
// (GCC/Clang vector extension) for the shapes auto-vectorisation misses; and an AVX2+FMA twin of a
// hot function, picked once at run time (TIDAL_CPU_TARGET_AVX2 + cpu_has_avx2), next to the
// baseline (SSE2 on x86-64) version; an AVX-512 twin where a kernel has one (TIDAL_CPU_TARGET_AVX512
// + cpu_has_avx512).
#pragma once

#include <bit>
#include <cstdint>
#include <cstdlib>

#include "cpu/float16.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define TIDAL_CPU_HAS_AVX2_TWIN 1
// The hot loop's body is a TIDAL_CPU_INLINE template; a TIDAL_CPU_TARGET_AVX2 wrapper and a plain one
// each inline it, so the same source is compiled for both instruction sets.
#define TIDAL_CPU_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TIDAL_CPU_TARGET_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define TIDAL_CPU_INLINE __attribute__((always_inline)) inline
#else
#define TIDAL_CPU_HAS_AVX2_TWIN 0
#define TIDAL_CPU_TARGET_AVX2
#define TIDAL_CPU_TARGET_AVX512
#define TIDAL_CPU_INLINE inline
#endif

namespace tidal::cpu {

/// True where the AVX2+FMA twins may run (x86-64 with AVX2, FMA and F16C), unless the environment
/// sets TIDAL_CPU_BASELINE=1, which pins the baseline versions (to test them on an AVX2 machine).
inline bool cpu_has_avx2() {
#if TIDAL_CPU_HAS_AVX2_TWIN
  static const bool has = [] {
    const char* baseline = std::getenv("TIDAL_CPU_BASELINE");
    if (baseline != nullptr && baseline[0] != '\0' && baseline[0] != '0') return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return has;
#else
  return false;
#endif
}

/// True where the AVX-512 twins may run (cpu_has_avx2() and AVX-512F), unless the environment sets
/// TIDAL_CPU_NO_AVX512=1, which pins the AVX2 versions (to test them on an AVX-512 machine).
inline bool cpu_has_avx512() {
#if TIDAL_CPU_HAS_AVX2_TWIN
  static const bool has = [] {
    const char* off = std::getenv("TIDAL_CPU_NO_AVX512");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f");
  }();
  return has;
#else
  return false;
#endif
}

/// `cond ? a : b` done on the bits. NOTE(tidal): GCC does not if-convert a float `?:` feeding
/// arithmetic under the default -ftrapping-math, which leaves the whole loop scalar; this form
/// becomes a compare and a blend.
TIDAL_CPU_INLINE float select(bool cond, float a, float b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return std::bit_cast<float>((std::bit_cast<uint32_t>(a) & mask) | (std::bit_cast<uint32_t>(b) & ~mask));
}

/// to_float (float16.h) for hot loops: the same values, computed without branches so that a loop
/// over it vectorises (float16.h's Half version branches on the exponent and stays scalar).
TIDAL_CPU_INLINE float widen(float v) { return v; }
TIDAL_CPU_INLINE float widen(BFloat16 v) { return to_float(v); }
TIDAL_CPU_INLINE float widen(Fp8E4M3 v) { return to_float(v); }
TIDAL_CPU_INLINE float widen(Half v) {
  const uint32_t bits = v.bits, exponent = (bits >> 10) & 0x1fu;
  const uint32_t sign = (bits & 0x8000u) << 16, magnitude = (bits & 0x7fffu) << 13;
  const float normal = std::bit_cast<float>(magnitude + ((127u - 15u) << 23));  // rebias the exponent
  const float subnormal = static_cast<float>(static_cast<int32_t>(bits & 0x3ffu)) * 0x1p-24f;  // exact
  const float special = std::bit_cast<float>(magnitude | 0x7f800000u);  // inf, NaN with its payload
  const float value = select(exponent == 0, subnormal, select(exponent == 0x1f, special, normal));
  return std::bit_cast<float>(std::bit_cast<uint32_t>(value) | sign);
}

/// exp(x) over the whole float range within 2 ulp (NaN -> NaN, -inf -> 0, overflow -> inf), written
/// without branches or libm calls so that a loop over it vectorises.
// NOTE(tidal): x = n ln2 + r with |r| <= ln2/2 (ln2 split in two, Cody-Waite, so n ln2 is exact);
// e^r by its degree-7 Taylor polynomial (truncation < 1e-8 relative at |r| = 0.35); 2^n applied as
// two factors 2^(n/2) 2^(n - n/2), each a normal float for n in [-150, 128], so the product rounds
// to subnormals and overflows to inf exactly as IEEE multiplication does.
TIDAL_CPU_INLINE float exp_approx(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // 9 significant bits: n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRoundMagic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  // Below -104 the result rounds to 0, above 89 to inf. NaN fails both comparisons and flows through.
  float xc = select(x < -104.f, -104.f, x);
  xc = select(xc > 89.f, 89.f, xc);
  const float shifted = xc * kLog2e + kRoundMagic;  // kRoundMagic + n, exactly
  const float n = shifted - kRoundMagic;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  // n as an integer from the bits of `shifted` (same exponent as kRoundMagic): no float-to-int
  // conversion, so NaN is no undefined behaviour; unsigned arithmetic wraps harmlessly for it.
  const uint32_t n_bits = std::bit_cast<uint32_t>(shifted) - std::bit_cast<uint32_t>(kRoundMagic);
  const uint32_t half = static_cast<uint32_t>(static_cast<int32_t>(n_bits) >> 1);
  const float scale_a = std::bit_cast<float>((half + 127u) << 23);
  const float scale_b = std::bit_cast<float>((n_bits - half + 127u) << 23);
  return p * scale_a * scale_b;
}

#if defined(__GNUC__)
#define TIDAL_CPU_HAS_VEC8 1
// NOTE(tidal): GCC warns that passing a 32-byte vector without AVX changes the ABI; these helpers
// are always inlined, so no call ever passes one.
#pragma GCC diagnostic ignored "-Wpsabi"
/// Eight floats as one value (GCC/Clang vector extension): an AVX register in the AVX2 twins, two
/// SSE registers in the baseline. Used where auto-vectorisation cannot find the shape, e.g. the
/// transposed reduction of sum8.
typedef float Vec8 __attribute__((vector_size(32)));
typedef int32_t Vec8i __attribute__((vector_size(32)));

TIDAL_CPU_INLINE Vec8 load8(const float* p) {
  Vec8 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

TIDAL_CPU_INLINE void store8(float* p, const Vec8& v) { __builtin_memcpy(p, &v, sizeof v); }

#if defined(__clang__)
#define TIDAL_CPU_SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define TIDAL_CPU_SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, Vec8i{__VA_ARGS__})
#endif

// Pairwise sums within each half (AVX's hadd): (a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7).
// NOTE(tidal): every shuffle here stays within a 128-bit half but the last two, so each is one
// instruction on AVX; an even/odd split across the halves costs several permutes each.
TIDAL_CPU_INLINE Vec8 pair_sums(const Vec8& a, const Vec8& b) {
  return TIDAL_CPU_SHUFFLE8(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + TIDAL_CPU_SHUFFLE8(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

/// (sum of a[0]'s lanes, ..., sum of a[7]'s lanes): eight horizontal sums in about 21 instructions,
/// in a fixed tree order.
TIDAL_CPU_INLINE Vec8 sum8(const Vec8* a) {
  // quads_lo = (sum a0[0:4], sum a1[0:4], sum a2[0:4], sum a3[0:4] | the same over [4:8]); quads_hi: a4..a7.
  const Vec8 quads_lo = pair_sums(pair_sums(a[0], a[1]), pair_sums(a[2], a[3]));
  const Vec8 quads_hi = pair_sums(pair_sums(a[4], a[5]), pair_sums(a[6], a[7]));
  return TIDAL_CPU_SHUFFLE8(quads_lo, quads_hi, 0, 1, 2, 3, 8, 9, 10, 11) +
         TIDAL_CPU_SHUFFLE8(quads_lo, quads_hi, 4, 5, 6, 7, 12, 13, 14, 15);
}
#else
#define TIDAL_CPU_HAS_VEC8 0
#endif

}  // namespace tidal::cpu
