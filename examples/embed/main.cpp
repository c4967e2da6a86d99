// SPDX-License-Identifier: Apache-2.0
// Embedding libtidal_core from plain C++ (no Python, no torch): admit two requests that share a
// prompt prefix through the KV cache manager, show the prefix-cache hit, free them, and run the
// CPU rms_norm on a buffer of our own through a DLPack tensor.
#include <cmath>
#include <cstdio>
#include <numeric>
#include <vector>

#include "tidal/build_info.h"
#include "tidal/kv/kv_cache_manager.h"
#include "tidal/ops.h"

namespace {

int fail(const char* what) {
  std::fprintf(stderr, "embed_example: FAILED: %s\n", what);
  return 1;
}

// A float32 [rows, cols] CPU tensor over caller-owned memory.
tidal::TensorView cpu_matrix(float* data, int64_t* shape) {
  DLTensor t{};
  t.data = data;
  t.device = {kDLCPU, 0};
  t.ndim = 2;
  t.dtype = {kDLFloat, 32, 1};
  t.shape = shape;
  return tidal::TensorView::from_dlpack(t, "matrix");
}

}  // namespace

int main() {
  const tidal::BuildInfo info = tidal::build_info();
  std::printf("libtidal_core %s (cuda=%d)\n", info.version.c_str(), info.cuda ? 1 : 0);

  constexpr int32_t kBlockSize = 4;
  tidal::kv::KVCacheManager kv(/*num_blocks=*/16, kBlockSize);
  std::vector<int32_t> prompt(10);
  std::iota(prompt.begin(), prompt.end(), 100);

  // Request 1 computes its prompt and registers its two full blocks.
  if (!kv.allocate(1, static_cast<int32_t>(prompt.size()))) return fail("allocate request 1");
  kv.cache_full_blocks(1, prompt, static_cast<int32_t>(prompt.size()));

  // Request 2 shares the first 8 tokens: both full blocks come from the cache.
  std::vector<int32_t> prompt2(prompt.begin(), prompt.begin() + 8);
  prompt2.push_back(7);
  const tidal::kv::ComputedBlocks hit = kv.lookup(prompt2);
  if (hit.num_tokens != 8) return fail("prefix hit of 8 tokens");
  if (!kv.allocate(2, static_cast<int32_t>(prompt2.size()), &hit)) return fail("allocate request 2");
  if (kv.block_table(2)[0] != kv.block_table(1)[0]) return fail("shared first block");
  std::printf("prefix cache: %d of %zu tokens hit, %d blocks used\n", hit.num_tokens, prompt2.size(),
              kv.num_blocks_used());

  kv.free(2);
  kv.free(1);
  if (kv.num_blocks_free() != kv.num_blocks_total()) return fail("all blocks back in the pool");

  float x[2 * 4] = {1, 2, 3, 4, -1, 0, 1, 0};
  float w[4] = {1, 1, 1, 1};
  float out[2 * 4] = {};
  int64_t shape[2] = {2, 4};
  int64_t w_shape[1] = {4};
  DLTensor w_t{w, {kDLCPU, 0}, 1, {kDLFloat, 32, 1}, w_shape, nullptr, 0};
  tidal::ops::rms_norm(cpu_matrix(out, shape), cpu_matrix(x, shape), tidal::TensorView::from_dlpack(w_t, "w"),
                       1e-6f, tidal::Stream{});
  const float expected = 1.f / std::sqrt(7.5f);  // row 0: 1 / rms(1, 2, 3, 4)
  if (std::fabs(out[0] - expected) > 1e-6f) return fail("rms_norm value");
  std::printf("rms_norm: out[0] = %.6f\nok\n", out[0]);
  return 0;
}
