// SPDX-License-Identifier: Apache-2.0
// The 64-bit mixing hash behind full-block prefix-cache keys: a splitmix64 finalizer folded over
// the values one at a time. Not cryptographic; a collision only costs a failed verification.
#pragma once

#include <cstdint>

namespace tidal::kv::detail {

inline constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ULL;

/// splitmix64's finalizer: a bijection on 64 bits with full avalanche.
constexpr uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

/// Folds `value` into `seed`; order-dependent, so (a, b) and (b, a) hash differently.
constexpr uint64_t hash_combine(uint64_t seed, uint64_t value) {
  return mix64(seed + kGolden + mix64(value ^ (seed >> 17)));
}

}  // namespace tidal::kv::detail
