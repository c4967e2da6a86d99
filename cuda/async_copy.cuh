// SPDX-License-Identifier: Apache-2.0
// cp.async (sm_80+): 16-byte copies from global to shared memory that bypass the registers, in
// commit groups a kernel waits on. Used by the kernels that pipeline K/V tiles through shared
// memory (paged prefill, the pipelined decode kernel). Bulk copies on mbarriers (sm_90): the
// streamed weights of skinny_linear. NVIDIA-only inline PTX.
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

// ---- bulk copies completed on an mbarrier (sm_90) --------------------------------------------------
// One thread moves a contiguous run of global memory (16-byte aligned, a multiple of 16 bytes) into
// shared memory with one instruction, through the copy engine, and the transaction count of an
// mbarrier in shared memory says when the bytes have landed. A producer announces the bytes it will
// copy (mbarrier_arrive_expect_tx), issues the copies, and consumers wait on the barrier's phase.
// Compiled to traps below sm_90, where no kernel using them is launched.

__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#else
  (void)bar, (void)count;
  __trap();
#endif
}

/// Makes the barriers initialised by this thread visible to the copy engine (then synchronise).
__device__ __forceinline__ void mbarrier_init_fence() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

/// This thread's arrival, with `bytes` more to come from copies completing on the barrier.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#else
  (void)bar, (void)bytes;
  __trap();
#endif
}

__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#else
  (void)bar;
  __trap();
#endif
}

/// Waits until the barrier's phase of the given parity (0, 1, 0, ... for its 1st, 2nd, 3rd phase)
/// has completed.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (done == 0);
#else
  (void)bar, (void)parity;
  __trap();
#endif
}

/// `bytes` (a multiple of 16) from global `src` to shared `dst` (both 16-byte aligned), counted on
/// the transaction count of `bar`.
__device__ __forceinline__ void bulk_copy_to_shared(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
#else
  (void)dst, (void)src, (void)bytes, (void)bar;
  __trap();
#endif
}

/// Asks L2 to fetch `bytes` (a multiple of 16) of global memory from `src` (16-byte aligned); nothing
/// waits for it.
__device__ __forceinline__ void bulk_prefetch_l2(const void* src, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(src), "r"(bytes) : "memory");
#else
  (void)src, (void)bytes;
#endif
}

}  // namespace tidal::gpu

#endif  // !TIDAL_USE_HIP
