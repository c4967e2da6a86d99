// SPDX-License-Identifier: Apache-2.0
// The tensor-core prefill kernel (prefill, chunked prefill, mixed batches) over an FP8 E4M3 KV
// cache, for fp16 and bf16 queries (head_dim 64, 128, 256), in a translation unit of its own. Under
// HIP it compiles to nothing: an FP8 cache is CUDA-only on the GPU.
#include "cuda/paged_prefill.cuh"

namespace tidal::gpu::attn {

void launch_prefill_fp8([[maybe_unused]] const PagedParams& p, [[maybe_unused]] const Plan& plan,
                       [[maybe_unused]] DType dtype, [[maybe_unused]] cudaStream_t stream) {
#if defined(TIDAL_USE_HIP)
  TIDAL_THROW_(Error, "paged_attention: an FP8 KV cache needs the CUDA tensor-core kernels");
#else
  if (dtype == DType::kBFloat16) {
    launch_prefill<bf16_t, uint8_t>(p, plan, stream);
  } else {
    launch_prefill<half_t, uint8_t>(p, plan, stream);
  }
#endif
}

}  // namespace tidal::gpu::attn
