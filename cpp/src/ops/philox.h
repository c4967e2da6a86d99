// SPDX-License-Identifier: Apache-2.0
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a
// counter-based generator, so the random numbers of (seed, offset, index) are the same on every
// device and whatever else runs beside them. Shared by the CPU and GPU seeded-sampling kernels.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TIDAL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TIDAL_HOST_DEVICE inline
#endif

namespace tidal::philox {

struct Uint4 {
  uint32_t x, y, z, w;
};

/// Four 32-bit random words for counter (c0, c1, c2, c3) under the 64-bit key.
TIDAL_HOST_DEVICE Uint4 philox4x32_10(Uint4 c, uint64_t key) {
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c.x;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c.z;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c = Uint4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

/// A uniform float in the open interval (0, 1) from 23 random bits: (k + 0.5) / 2^23 is exact in
/// float32 and at most 1 - 2^-24. NOTE(tidal): 24 bits would round the largest words up to 1.0,
/// whose noise -log(1) = -0 breaks the exponential race.
TIDAL_HOST_DEVICE float to_open_unit(uint32_t bits) {
  return (static_cast<float>(bits >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

}  // namespace tidal::philox
