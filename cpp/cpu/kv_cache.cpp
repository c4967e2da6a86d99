// SPDX-License-Identifier: Apache-2.0
// CPU kernel for reshape_and_cache: copies each new token's key and value heads into its slot of
// the paged KV cache ([num_blocks, block_size, num_kv_heads, head_dim], so slot s starts at element
// s * num_kv_heads * head_dim). A plain byte copy: it works for any element type of the cache.
#include <cstdint>
#include <cstring>

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

}  // namespace

void reshape_and_cache(TensorView key, TensorView value, TensorView key_cache, TensorView value_cache,
                       TensorView slot_mapping, Stream) {
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
