// SPDX-License-Identifier: Apache-2.0
// CPU kernel for seeded_exponential: Exp(1) noise for the exponential race of seeded sampling, each
// value a function of (seed, offset, vocabulary index) alone (Philox4x32-10), so a request's draws
// never depend on the batch around it, and the CPU and GPU kernels draw the same numbers.
#include <cmath>
#include <cstdint>

#include "ops/kernels.h"
#include "ops/philox.h"

namespace tidal::cpu {

void seeded_exponential(TensorView out, TensorView seeds, TensorView offsets, Stream) {
  const int64_t num_rows = out.size(0), vocab = out.size(1);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (num_rows * vocab >= (1 << 18))
#endif
  for (int64_t r = 0; r < num_rows; ++r) {
    const uint64_t seed = static_cast<uint64_t>(seeds.data_ptr<const int64_t>()[r * seeds.stride(0)]);
    const uint64_t offset = static_cast<uint64_t>(offsets.data_ptr<const int64_t>()[r * offsets.stride(0)]);
    float* row = out.data_ptr<float>() + r * out.stride(0);
    for (int64_t v0 = 0; v0 < vocab; v0 += 4) {
      const philox::Uint4 bits = philox::philox4x32_10(
          {static_cast<uint32_t>(v0 / 4), static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), 0u},
          seed);
      const uint32_t words[4] = {bits.x, bits.y, bits.z, bits.w};
      for (int64_t j = 0; j < 4 && v0 + j < vocab; ++j) row[v0 + j] = -std::log(philox::to_open_unit(words[j]));
    }
  }
}

}  // namespace tidal::cpu
