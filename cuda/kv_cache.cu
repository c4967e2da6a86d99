// SPDX-License-Identifier: Apache-2.0
// reshape_and_cache on the GPU: copies each new token's key and value heads into its slot of the
// paged KV cache ([num_blocks, block_size, num_kv_heads, head_dim]). A block per token, 16-byte
// accesses when head_dim, the strides and the bases allow. A byte copy: dtype-agnostic. Into an FP8
// cache (uint8 E4M3 codes, scale 1) each element is rounded to nearest even and saturated at +-448,
// bit for bit as the CPU twin does.
#include <cstdint>

#include "cuda/common.cuh"
#include "ops/fp8.h"
#include "ops/kernels.h"

namespace tidal::gpu {
namespace {

constexpr int kThreads = 128;

// Units of kBytes: head_units = head_dim * element_size / kBytes per head. A negative slot or one
// past the cache (checked on the CPU only) is never written.
template <int kBytes>
__global__ void __launch_bounds__(kThreads)
    reshape_and_cache_kernel(const char* __restrict__ key, const char* __restrict__ value, char* __restrict__ key_cache,
                             char* __restrict__ value_cache, const int64_t* __restrict__ slot_mapping,
                             int64_t slot_stride, int64_t num_slots, int num_kv_heads, int head_units,
                             int64_t k_token_stride, int64_t k_head_stride, int64_t v_token_stride,
                             int64_t v_head_stride) {
  using Unit = typename std::conditional<kBytes == 16, uint4, typename std::conditional<kBytes == 4, uint32_t, uint16_t>::type>::type;
  wait_for_prior_grid();  // launched by launch_dependent
  allow_dependents();
  const int64_t t = blockIdx.x;
  const int64_t slot = slot_mapping[t * slot_stride];
  if (slot < 0 || slot >= num_slots) return;
  const int units = num_kv_heads * head_units;
  Unit* k_dst = reinterpret_cast<Unit*>(key_cache) + slot * units;
  Unit* v_dst = reinterpret_cast<Unit*>(value_cache) + slot * units;
  for (int i = threadIdx.x; i < units; i += blockDim.x) {
    const int h = i / head_units, u = i % head_units;
    k_dst[i] = reinterpret_cast<const Unit*>(key + t * k_token_stride + h * k_head_stride)[u];
    v_dst[i] = reinterpret_cast<const Unit*>(value + t * v_token_stride + h * v_head_stride)[u];
  }
}

// Strides in elements of T; a thread per (head, element) of the token's key and value.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    reshape_and_cache_fp8_kernel(const T* __restrict__ key, const T* __restrict__ value, uint8_t* __restrict__ key_cache,
                                 uint8_t* __restrict__ value_cache, const int64_t* __restrict__ slot_mapping,
                                 int64_t slot_stride, int64_t num_slots, int num_kv_heads, int head_dim,
                                 int64_t k_token_stride, int64_t k_head_stride, int64_t v_token_stride,
                                 int64_t v_head_stride) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slot_mapping[t * slot_stride];
  if (slot < 0 || slot >= num_slots) return;
  const int elems = num_kv_heads * head_dim;
  for (int i = threadIdx.x; i < elems; i += blockDim.x) {
    const int h = i / head_dim, e = i % head_dim;
    key_cache[slot * elems + i] = fp8::from_float(to_float(key[t * k_token_stride + h * k_head_stride + e]));
    value_cache[slot * elems + i] = fp8::from_float(to_float(value[t * v_token_stride + h * v_head_stride + e]));
  }
}

}  // namespace

void reshape_and_cache(TensorView key, TensorView value, TensorView key_cache, TensorView value_cache,
                       TensorView slot_mapping, Stream stream) {
  const int64_t num_tokens = key.size(0);
  if (num_tokens == 0) return;
  DeviceGuard guard(key.device.index);
  const auto s = static_cast<cudaStream_t>(stream.handle);
  const int num_kv_heads = static_cast<int>(key.size(1));
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  if (key_cache.dtype == DType::kUInt8) {
    TIDAL_DISPATCH_FLOAT(key.dtype, T, {
      reshape_and_cache_fp8_kernel<T><<<static_cast<unsigned>(num_tokens), kThreads, 0, s>>>(
          key.data_ptr<const T>(), value.data_ptr<const T>(), key_cache.data_ptr<uint8_t>(),
          value_cache.data_ptr<uint8_t>(), slot_mapping.data_ptr<const int64_t>(), slot_mapping.stride(0), num_slots,
          num_kv_heads, static_cast<int>(key.size(2)), key.stride(0), key.stride(1), value.stride(0), value.stride(1));
    });
    TIDAL_CUDA_CHECK(cudaGetLastError());
    return;
  }
  const int64_t es = key.element_size(), head_bytes = key.size(2) * es;
  // Strides in bytes; the widest unit that divides every offset and base.
  const int64_t strides[] = {key.stride(0) * es, key.stride(1) * es, value.stride(0) * es, value.stride(1) * es};
  auto fits = [&](int64_t bytes) {
    if (head_bytes % bytes != 0 || !is_aligned(key.data, bytes) || !is_aligned(value.data, bytes) ||
        !is_aligned(key_cache.data, bytes) || !is_aligned(value_cache.data, bytes)) {
      return false;
    }
    for (int64_t s : strides) {
      if (s % bytes != 0) return false;
    }
    return true;
  };
  auto run = [&](auto bytes_tag) {
    constexpr int kBytes = decltype(bytes_tag)::value;
    launch_dependent(reshape_and_cache_kernel<kBytes>, dim3(static_cast<unsigned>(num_tokens)), dim3(kThreads), 0, s,
                     key.device.index, static_cast<const char*>(key.data), static_cast<const char*>(value.data),
                     static_cast<char*>(key_cache.data), static_cast<char*>(value_cache.data),
                     slot_mapping.data_ptr<const int64_t>(), slot_mapping.stride(0), num_slots, num_kv_heads,
                     static_cast<int>(head_bytes / kBytes), strides[0], strides[1], strides[2], strides[3]);
  };
  if (fits(16)) {
    run(std::integral_constant<int, 16>{});
  } else if (fits(4)) {
    run(std::integral_constant<int, 4>{});
  } else {
    TIDAL_CHECK(fits(2), "reshape_and_cache: key and value must be at least 2-byte aligned");
    run(std::integral_constant<int, 2>{});
  }
  TIDAL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace tidal::gpu
