// SPDX-License-Identifier: Apache-2.0
// cp.async (sm_80+): 16-byte copies from global to shared memory that bypass the registers, in
// commit groups a kernel waits on. Used by the kernels that pipeline K/V tiles through shared
// memory (paged prefill, the pipelined decode kernel). NVIDIA-only inline PTX.
#pragma once

#include <cstdint>

#if !defined(TIDAL_USE_HIP)

namespace tidal::gpu {

__device__ __forceinline__ uint32_t shared_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16 bytes global -> shared, bypassing L1; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

}  // namespace tidal::gpu

#endif  // !TIDAL_USE_HIP
