// SPDX-License-Identifier: Apache-2.0
// The one place that knows whether a cuda/*.cu file is built by nvcc or by hipcc. Kernel code
// uses the CUDA runtime names, the tidal::gpu element types (bf16_t, half_t) and the TIDAL_
// macros below; under TIDAL_USE_HIP, hip/vendor_hip.h maps every one of them to its HIP twin.
#pragma once

#if defined(TIDAL_USE_HIP)
#include "hip/vendor_hip.h"
#else

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace tidal::gpu {

using bf16_t = __nv_bfloat16;
using half_t = __half;

/// Threads that execute in lockstep and share a shuffle; sizes blocks on the host too.
inline constexpr int kWarpSize = 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(half_t v) { return __half2float(v); }
__device__ __forceinline__ float to_float(bf16_t v) { return __bfloat162float(v); }

/// Round-to-nearest-even conversion from fp32, the one rounding every kernel output gets.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ half_t from_float<half_t>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ bf16_t from_float<bf16_t>(float v) { return __float2bfloat16_rn(v); }

}  // namespace tidal::gpu

// Every lane of the warp must reach the shuffle (full mask).
#define TIDAL_SHFL_XOR(value, lane_mask) __shfl_xor_sync(0xffffffffu, (value), (lane_mask))
// The lanes whose `pred` holds, as bits of a 64-bit word (every lane of the warp must reach it).
#define TIDAL_BALLOT(pred) static_cast<uint64_t>(__ballot_sync(0xffffffffu, (pred)))
// Read-only (non-coherent) cached load: only for data no thread of the kernel writes.
#define TIDAL_LDG(ptr) __ldg(ptr)
// Orders the shared-memory accesses of the lanes of one warp (the lanes that reach it).
#define TIDAL_SYNCWARP() __syncwarp()

#endif  // TIDAL_USE_HIP
