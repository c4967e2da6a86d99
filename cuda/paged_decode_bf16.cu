// SPDX-License-Identifier: Apache-2.0
// The tensor-core decode kernel instantiated for bf16_t (head_dim 64, 128, 256), in a translation unit
// of its own. Under HIP it compiles to nothing: the SIMT kernel covers HIP.
#include "cuda/paged_decode.cuh"

namespace tidal::gpu::attn {

void launch_decode_bf16([[maybe_unused]] const PagedParams& p, [[maybe_unused]] const Plan& plan,
                      [[maybe_unused]] cudaStream_t stream) {
#if defined(TIDAL_USE_HIP)
  TIDAL_THROW_(Error, "paged_attention: the tensor-core kernel is CUDA-only");
#else
  launch_decode<bf16_t>(p, plan, stream);
#endif
}

}  // namespace tidal::gpu::attn
