// SPDX-License-Identifier: Apache-2.0
// HIP spellings of the names cuda/*.cu use, so the same kernel sources build with hipcc (no
// hipify step): runtime calls and types are #defined to their hip* twins, element types and
// conversions are provided in tidal::gpu. Included only through cuda/vendor.h under TIDAL_USE_HIP.
#pragma once

#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>

// NOTE(tidal): ROCm >= 5.7 ships <hip/hip_bf16.h> (__hip_bfloat16, CUDA-like intrinsics); older
// releases (Debian's 5.2, this repo's build check) only have <hip/hip_bfloat16.h>, whose
// hip_bfloat16 converts to float implicitly and from float with round-to-nearest-even.
#if __has_include(<hip/hip_bf16.h>)
#include <hip/hip_bf16.h>
#define TIDAL_HIP_HAS_BF16_H 1
#else
#include <hip/hip_bfloat16.h>
#define TIDAL_HIP_HAS_BF16_H 0
#endif

#define cudaError_t hipError_t
#define cudaSuccess hipSuccess
#define cudaStream_t hipStream_t
#define cudaGetDevice hipGetDevice
#define cudaSetDevice hipSetDevice
#define cudaGetLastError hipGetLastError
#define cudaGetErrorString hipGetErrorString
#define cudaDeviceGetAttribute hipDeviceGetAttribute
#define cudaDevAttrMultiProcessorCount hipDeviceAttributeMultiprocessorCount
#define cudaMemset hipMemset
#define cudaDeviceSynchronize hipDeviceSynchronize
#define cudaDevAttrClockRate hipDeviceAttributeClockRate
#define cudaMalloc hipMalloc
#define cudaFree hipFree
#define cudaMemcpyAsync hipMemcpyAsync
#define cudaMemcpyDeviceToHost hipMemcpyDeviceToHost
#define cudaStreamSynchronize hipStreamSynchronize

// NOTE(tidal): the wavefront size must be a constant in the host pass too (launchers size blocks
// with it), where __AMDGCN_WAVEFRONT_SIZE does not exist. It is fixed per build: 64 for CDNA
// (gfx90a, gfx942); a wave32 build (RDNA) passes -DTIDAL_HIP_WARP_SIZE=32. The device pass
// checks it.
#ifndef TIDAL_HIP_WARP_SIZE
#define TIDAL_HIP_WARP_SIZE 64
#endif
#if defined(__AMDGCN_WAVEFRONT_SIZE) && __AMDGCN_WAVEFRONT_SIZE != TIDAL_HIP_WARP_SIZE
#error "TIDAL_HIP_WARP_SIZE does not match the target's wavefront size"
#endif

namespace tidal::gpu {

#if TIDAL_HIP_HAS_BF16_H
using bf16_t = __hip_bfloat16;
#else
using bf16_t = hip_bfloat16;
#endif
using half_t = __half;

inline constexpr int kWarpSize = TIDAL_HIP_WARP_SIZE;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(half_t v) { return __half2float(v); }
#if TIDAL_HIP_HAS_BF16_H
__device__ __forceinline__ float to_float(bf16_t v) { return __bfloat162float(v); }
#else
__device__ __forceinline__ float to_float(bf16_t v) { return static_cast<float>(v); }
#endif

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ half_t from_float<half_t>(float v) { return __float2half(v); }
#if TIDAL_HIP_HAS_BF16_H
template <>
__device__ __forceinline__ bf16_t from_float<bf16_t>(float v) { return __float2bfloat16(v); }
#else
template <>
__device__ __forceinline__ bf16_t from_float<bf16_t>(float v) { return bf16_t(v); }
#endif

}  // namespace tidal::gpu

// HIP shuffles take no mask: the whole wavefront takes part, as with CUDA's full mask.
#define TIDAL_SHFL_XOR(value, lane_mask) __shfl_xor((value), (lane_mask))
// The lanes whose `pred` holds, one bit per lane of the wavefront.
#define TIDAL_BALLOT(pred) static_cast<uint64_t>(__ballot(pred))
// AMD has no separate read-only path; a plain load is what hip's own __ldg does.
#define TIDAL_LDG(ptr) (*(ptr))
// A wavefront runs in lockstep; the fence makes its LDS writes visible to its other lanes.
#define TIDAL_SYNCWARP() __builtin_amdgcn_fence(__ATOMIC_SEQ_CST, "wavefront")
