// SPDX-License-Identifier: Apache-2.0
// The SIMT paged-attention kernel instantiated for one dtype (float), in a translation unit of its own
// so an edit to one instance recompiles one file.
#include "cuda/paged_attention_simt.cuh"

namespace tidal::gpu::attn {

void launch_simt_f32(const PagedParams& p, const Plan& plan, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(float);
  const bool vectorized = p.head_dim % kVec == 0 && is_aligned(p.key_cache, 16) && is_aligned(p.value_cache, 16);
  launch_simt<float>(p, plan, vectorized, stream);
}

}  // namespace tidal::gpu::attn
