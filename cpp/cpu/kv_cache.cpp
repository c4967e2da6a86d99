// SPDX-License-Identifier: Apache-2.0
// CPU kernel for reshape_and_cache: copies each new token's key and value heads into its slot of
// the paged KV cache ([num_blocks, block_size, num_kv_heads, head_dim], so slot s starts at element
// s * num_kv_heads * head_dim). A plain byte copy for a cache of the keys' own type; an FP8 (uint8)
// cache gets each element rounded to E4M3.
#include <cstdint>
#include <cstring>

#include "cpu/dispatch_float.h"
#include "ops/kernels.h"

namespace tidal::cpu {
namespace {

// Copies x[t] ([num_kv_heads, head_dim], head stride any) to the cache slot at `dst`.
void copy_token(char* dst, const TensorView& x, int64_t t, int64_t element_size) {
  const int64_t num_kv_heads = x.size(1), head_bytes = x.size(2) * element_size;
  const char* row = static_cast<const char*>(x.data) + t * x.stride(0) * element_size;
  if (x.stride(1) == x.size(2)) {  // heads packed: one copy
    std::memcpy(dst, row, static_cast<size_t>(num_kv_heads * head_bytes));
    return;
  }
  for (int64_t h = 0; h < num_kv_heads; ++h) {
    std::memcpy(dst + h * head_bytes, row + h * x.stride(1) * element_size, static_cast<size_t>(head_bytes));
  }
}

// x[t] converted element by element into an FP8 cache slot at `dst`.
template <typename T>
void convert_token(Fp8E4M3* dst, const TensorView& x, int64_t t) {
  const int64_t num_kv_heads = x.size(1), head_dim = x.size(2);
  for (int64_t h = 0; h < num_kv_heads; ++h) {
    const T* src = x.data_ptr<const T>() + t * x.stride(0) + h * x.stride(1);
    for (int64_t e = 0; e < head_dim; ++e) dst[h * head_dim + e] = from_float<Fp8E4M3>(to_float(src[e]));
  }
}

}  // namespace

void reshape_and_cache(TensorView key, TensorView value, TensorView key_cache, TensorView value_cache,
                       TensorView slot_mapping, Stream) {
  if (key_cache.dtype == DType::kUInt8) {  // an FP8 cache: converted, not copied
    const int64_t slot_elements = key.size(1) * key.size(2);
    auto* k_cache = static_cast<Fp8E4M3*>(key_cache.data);
    auto* v_cache = static_cast<Fp8E4M3*>(value_cache.data);
    for (int64_t t = 0; t < key.size(0); ++t) {
      const int64_t slot = slot_mapping.data_ptr<const int64_t>()[t * slot_mapping.stride(0)];
      if (slot < 0) continue;
      TIDAL_CPU_DISPATCH_FLOAT(key.dtype, T, {
        convert_token<T>(k_cache + slot * slot_elements, key, t);
        convert_token<T>(v_cache + slot * slot_elements, value, t);
      });
    }
    return;
  }
  const int64_t num_tokens = key.size(0), element_size = key.element_size();
  const int64_t slot_bytes = key.size(1) * key.size(2) * element_size;
  const int64_t* slots = slot_mapping.data_ptr<const int64_t>();
  char* k_cache = static_cast<char*>(key_cache.data);
  char* v_cache = static_cast<char*>(value_cache.data);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t slot = slots[t * slot_mapping.stride(0)];
    if (slot < 0) continue;  // padding
    copy_token(k_cache + slot * slot_bytes, key, t, element_size);
    copy_token(v_cache + slot * slot_bytes, value, t, element_size);
  }
}

}  // namespace tidal::cpu
