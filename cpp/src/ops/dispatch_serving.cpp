// SPDX-License-Identifier: Apache-2.0
// The serving ops of tidal/ops_serving.h: validate shapes, dtypes and devices; on the CPU also the
// integer values the kernels index with (positions, slots, lengths, block ids), before anything is
// written; then run the CPU or the GPU kernel.
#include "tidal/ops_serving.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "ops/checks.h"
#include "ops/device_dispatch.h"
#include "ops/kernels.h"

namespace tidal::ops {
namespace {

void check_float(const TensorView& t, const char* name) {
  TIDAL_CHECK(t.dtype == DType::kFloat32 || t.dtype == DType::kFloat16 || t.dtype == DType::kBFloat16, name,
              ".dtype=", dtype_name(t.dtype), " is not supported; expected float32, float16 or bfloat16");
}

void check_dtype(const TensorView& t, const char* name, DType want, const char* want_from = nullptr) {
  TIDAL_CHECK(t.dtype == want, name, ".dtype=", dtype_name(t.dtype), " must be ", dtype_name(want),
              want_from ? " (the dtype of " : "", want_from ? want_from : "", want_from ? ")" : "");
}

void check_device(const TensorView& t, const char* name, const TensorView& ref, const char* ref_name) {
  TIDAL_CHECK(t.device == ref.device, name, " is on ", device_name(t.device), " but ", ref_name, " is on ",
              device_name(ref.device));
}

void check_last_dim_contiguous(const TensorView& t, const char* name) {
  TIDAL_CHECK(t.ndim == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name, ".stride(-1)=", t.stride(-1),
              " must be 1");
}

void check_vector(const TensorView& t, const char* name, int64_t size, const char* size_name) {
  TIDAL_CHECK(t.ndim == 1 && t.size(0) == size, name, ".shape=", t.shape_str(), " must be [", size_name,
              "] = [", size, "]");
}

// [num_tokens, heads, head_dim] from the 3-D form or the 2-D [num_tokens, heads * head_dim] form.
TensorView view_heads(const TensorView& t, const char* name, int64_t head_dim) {
  TIDAL_CHECK(t.ndim == 2 || t.ndim == 3, name, " must be [num_tokens, num_heads, head_dim] or [num_tokens, ",
              "num_heads * head_dim], got shape ", t.shape_str());
  check_last_dim_contiguous(t, name);
  if (t.ndim == 3) {
    TIDAL_CHECK(t.size(2) == head_dim, name, ".shape[2]=", t.size(2), " must equal head_dim=", head_dim);
    return t;
  }
  TIDAL_CHECK(t.size(1) % head_dim == 0, name, ".shape[1]=", t.size(1), " must be a multiple of head_dim=",
              head_dim);
  TensorView v = t;
  v.ndim = 3;
  v.shape[1] = t.size(1) / head_dim;
  v.shape[2] = head_dim;
  v.strides[1] = head_dim;
  v.strides[2] = 1;
  return v;
}

template <typename Int>
Int element(const TensorView& t, int64_t i) {
  return t.data_ptr<const Int>()[i * t.stride(0)];
}

void check_positions(const TensorView& positions, int64_t max_position) {
  for (int64_t t = 0; t < positions.size(0); ++t) {
    const int64_t p = element<int64_t>(positions, t);
    TIDAL_CHECK_INDEX(p >= 0 && p < max_position, "positions[", t, "]=", p,
                      " is out of range [0, max_position=", max_position, ") of cos_sin_cache");
  }
}

void check_slots(const TensorView& slot_mapping, int64_t num_slots) {
  for (int64_t t = 0; t < slot_mapping.size(0); ++t) {
    const int64_t slot = element<int64_t>(slot_mapping, t);
    TIDAL_CHECK_INDEX(slot < num_slots, "slot_mapping[", t, "]=", slot, " is out of range: the cache holds ",
                      "num_blocks * block_size = ", num_slots, " slots (a negative slot means padding)");
  }
}

// Each of 0 .. n - 1 once (n = order's length).
void check_permutation(const TensorView& order, const char* name) {
  const int64_t n = order.size(0);
  std::vector<bool> seen(static_cast<size_t>(n), false);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = element<int32_t>(order, i);
    TIDAL_CHECK(v >= 0 && v < n && !seen[static_cast<size_t>(v)], name, " must be a permutation of 0 .. ", n - 1,
                ", but ", name, "[", i, "]=", v, v >= 0 && v < n ? " repeats an earlier entry" : " is out of range");
    seen[static_cast<size_t>(v)] = true;
  }
}

// cu_seqlens_q, seq_lens and the block-table entries each sequence reads.
void check_paged_metadata(const TensorView& block_tables, const TensorView& seq_lens,
                          const TensorView& cu_seqlens_q, int64_t num_tokens, int64_t num_blocks,
                          int64_t block_size, int64_t sliding_window) {
  const int64_t num_seqs = seq_lens.size(0), max_num_blocks = block_tables.size(1);
  const int32_t* table = block_tables.data_ptr<const int32_t>();
  TIDAL_CHECK(element<int32_t>(cu_seqlens_q, 0) == 0, "cu_seqlens_q[0]=", element<int32_t>(cu_seqlens_q, 0),
              " must be 0");
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_begin = element<int32_t>(cu_seqlens_q, s), q_end = element<int32_t>(cu_seqlens_q, s + 1);
    TIDAL_CHECK(q_end >= q_begin, "cu_seqlens_q must be non-decreasing, but cu_seqlens_q[", s + 1, "]=", q_end,
                " < cu_seqlens_q[", s, "]=", q_begin);
    const int64_t q_len = q_end - q_begin, seq_len = element<int32_t>(seq_lens, s);
    TIDAL_CHECK(q_len <= seq_len, "sequence ", s, " has q_len=", q_len, " query tokens (cu_seqlens_q[", s + 1,
                "] - cu_seqlens_q[", s, "]) but seq_lens[", s, "]=", seq_len, "; need q_len <= seq_len");
    const int64_t blocks_needed = (seq_len + block_size - 1) / block_size;
    TIDAL_CHECK(blocks_needed <= max_num_blocks, "block_tables.shape[1]=", max_num_blocks,
                " is too narrow: seq_lens[", s, "]=", seq_len, " with block_size=", block_size, " needs ",
                blocks_needed, " blocks");
    if (q_len == 0) continue;
    int64_t first_key = 0;
    if (sliding_window > 0) first_key = std::max<int64_t>(0, seq_len - q_len - sliding_window + 1);
    for (int64_t b = first_key / block_size; b < blocks_needed; ++b) {
      const int64_t id = table[s * block_tables.stride(0) + b * block_tables.stride(1)];
      TIDAL_CHECK_INDEX(id >= 0 && id < num_blocks, "block_tables[", s, ", ", b, "]=", id,
                        " is out of range [0, num_blocks=", num_blocks, ") (sequence ", s, " reads it: seq_lens[",
                        s, "]=", seq_len, ")");
    }
  }
  const int64_t last = element<int32_t>(cu_seqlens_q, num_seqs);
  TIDAL_CHECK(last == num_tokens, "cu_seqlens_q[", num_seqs, "]=", last, " must equal num_tokens=query.shape[0]=",
              num_tokens);
}

}  // namespace

void silu_and_mul(TensorView out, TensorView x, Stream stream) {
  detail::check_rows(x, "x");
  detail::check_rows(out, "out");
  check_float(x, "x");
  TIDAL_CHECK(x.size(1) % 2 == 0, "x.shape[1]=", x.size(1), " must be even: x is [num_tokens, 2 * d]");
  TIDAL_CHECK(out.size(0) == x.size(0) && 2 * out.size(1) == x.size(1), "out.shape=", out.shape_str(),
              " must be [num_tokens, d] = [", x.size(0), ", ", x.size(1) / 2, "]");
  check_dtype(out, "out", x.dtype, "x");
  check_device(out, "out", x, "x");
  TIDAL_CHECK(!detail::overlaps(out, x), "out overlaps x in memory; pass a distinct out");
  if (out.numel() == 0) return;
  detail::dispatch(
      "silu_and_mul", x.device, [&] { cpu::silu_and_mul(out, x, stream); },
      [&] { gpu::silu_and_mul(out, x, stream); });
}

bool skinny_linear(TensorView out, TensorView residual, TensorView x, TensorView weight, TensorView bias,
                   TensorView norm_weight, SkinnyPrologue prologue, float eps, TensorView prefetch, Stream stream,
                   const QuantizedWeight* quant) {
  detail::check_rows(x, "x");
  detail::check_rows(weight, "weight");
  check_float(x, "x");
  int64_t k = weight.size(1);
  if (quant != nullptr) {
    k = detail::check_quant_weight(weight, quant->scales, quant->zeros, quant->format);
    TIDAL_CHECK(x.dtype != DType::kFloat32, "x.dtype=float32 is not supported with a quantized weight; expected "
                "float16 or bfloat16");
    TIDAL_CHECK(out.data == nullptr || out.dtype == x.dtype, "out.dtype=", dtype_name(out.dtype),
                " must equal x.dtype=", dtype_name(x.dtype), " with a quantized weight");
  } else {
    check_dtype(weight, "weight", x.dtype, "x");
  }
  check_device(weight, "weight", x, "x");
  const int64_t m = x.size(0), n = weight.size(0);
  const int64_t x_width = prologue == SkinnyPrologue::kSiluMul ? 2 * k : k;
  TIDAL_CHECK(x.size(1) == x_width, "x.shape=", x.shape_str(), " must be [m, ", x_width, "] for weight.shape=",
              weight.shape_str(), prologue == SkinnyPrologue::kSiluMul ? " (silu_and_mul halves x)" : "");
  TIDAL_CHECK((out.data == nullptr) != (residual.data == nullptr), "pass exactly one of out and residual");
  TensorView& dst = out.data != nullptr ? out : residual;
  const char* dst_name = out.data != nullptr ? "out" : "residual";
  detail::check_rows(dst, dst_name);
  TIDAL_CHECK(dst.size(0) == m && dst.size(1) == n, dst_name, ".shape=", dst.shape_str(), " must be [m, n] = [", m,
              ", ", n, "]");
  check_device(dst, dst_name, x, "x");
  if (out.data != nullptr) {
    TIDAL_CHECK(out.dtype == x.dtype || out.dtype == DType::kFloat32, "out.dtype=", dtype_name(out.dtype),
                " must be x.dtype=", dtype_name(x.dtype), " or float32");
  } else {
    check_dtype(residual, "residual", x.dtype, "x");
  }
  TIDAL_CHECK(!detail::overlaps(dst, x) && !detail::overlaps(dst, weight), dst_name,
              " overlaps x or weight in memory");
  if (bias.data != nullptr) {
    check_vector(bias, "bias", n, "n");
    check_dtype(bias, "bias", x.dtype, "x");
    check_device(bias, "bias", x, "x");
  }
  if (prologue == SkinnyPrologue::kRmsNorm) {
    TIDAL_CHECK(norm_weight.data != nullptr, "norm_weight is required for the rms_norm prologue");
    check_vector(norm_weight, "norm_weight", k, "k");
    check_dtype(norm_weight, "norm_weight", x.dtype, "x");
    check_device(norm_weight, "norm_weight", x, "x");
    TIDAL_CHECK(eps >= 0.0f && std::isfinite(eps), "eps=", eps, " must be finite and >= 0");
  }
  if (prefetch.data != nullptr) {
    detail::check_rows(prefetch, "prefetch");
    check_device(prefetch, "prefetch", x, "x");
    const int64_t row_bytes = prefetch.stride(0) * static_cast<int64_t>(dtype_size(prefetch.dtype));
    TIDAL_CHECK(reinterpret_cast<std::uintptr_t>(prefetch.data) % 16 == 0 && row_bytes % 16 == 0,
                "prefetch: rows must start at 16-byte boundaries (data and row stride), got a row stride of ",
                row_bytes, " bytes");
  }
  TIDAL_CHECK(x.device.type != DeviceType::kCPU, "skinny_linear has no CPU kernel (the tensors are on ",
              device_name(x.device), "); run the unfused ops there");
  if (m == 0 || n == 0) return true;
#if TIDAL_WITH_CUDA
  const int format = quant == nullptr ? -1 : static_cast<int>(quant->format);
  const TensorView scales = quant == nullptr ? TensorView{} : quant->scales;
  const TensorView zeros = quant == nullptr ? TensorView{} : quant->zeros;
  if (x.device.type != DeviceType::kCUDA || !gpu::skinny_linear_supported(x, weight, format, scales, zeros)) return false;
  gpu::skinny_linear(out, residual, x, weight, bias, norm_weight, static_cast<int>(prologue), eps, format, scales, zeros,
                     prefetch, stream);
  return true;
#else
  (void)stream;
  return false;
#endif
}

namespace {

// The checks rotary_embedding and rotary_embedding_and_cache share; query and key are 3-D.
void check_rotary(const TensorView& positions, const TensorView& query, const TensorView& key, int64_t head_dim,
                  const TensorView& cos_sin_cache) {
  check_float(query, "query");
  check_dtype(key, "key", query.dtype, "query");
  check_device(key, "key", query, "query");
  check_dtype(positions, "positions", DType::kInt64);
  check_vector(positions, "positions", query.size(0), "num_tokens");
  check_device(positions, "positions", query, "query");
  TIDAL_CHECK(key.size(0) == query.size(0), "key.shape[0]=", key.size(0), " must equal num_tokens=query.shape[0]=",
              query.size(0));
  TIDAL_CHECK(cos_sin_cache.ndim == 2, "cos_sin_cache must be 2-D [max_position, rotary_dim], got shape ",
              cos_sin_cache.shape_str());
  check_dtype(cos_sin_cache, "cos_sin_cache", DType::kFloat32);
  check_last_dim_contiguous(cos_sin_cache, "cos_sin_cache");
  check_device(cos_sin_cache, "cos_sin_cache", query, "query");
  const int64_t rotary_dim = cos_sin_cache.size(1);
  TIDAL_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim, "rotary_dim=cos_sin_cache.shape[1]=",
              rotary_dim, " must be even, positive and <= head_dim=", head_dim);
  if (positions.device.is_cpu()) check_positions(positions, cos_sin_cache.size(0));
}

// The caches hold `x`'s dtype, or FP8 E4M3 codes (uint8, scale 1).
void check_cache_dtype(const TensorView& key_cache, const TensorView& value_cache, const TensorView& x,
                       const char* x_name) {
  if (key_cache.dtype == DType::kUInt8) {
    check_dtype(value_cache, "value_cache", DType::kUInt8, "key_cache");
    return;
  }
  check_dtype(key_cache, "key_cache", x.dtype, x_name);
  check_dtype(value_cache, "value_cache", x.dtype, x_name);
}

// The checks reshape_and_cache and rotary_embedding_and_cache share: key and value 3-D.
void check_cache_write(const TensorView& key, const TensorView& value, const TensorView& key_cache,
                       const TensorView& value_cache, const TensorView& slot_mapping) {
  TIDAL_CHECK(key.ndim == 3, "key must be 3-D [num_tokens, num_kv_heads, head_dim], got shape ", key.shape_str());
  check_last_dim_contiguous(key, "key");
  check_last_dim_contiguous(value, "value");
  check_float(key, "key");
  TIDAL_CHECK(value.ndim == 3 && value.size(0) == key.size(0) && value.size(1) == key.size(1) &&
                  value.size(2) == key.size(2),
              "value.shape=", value.shape_str(), " must equal key.shape=", key.shape_str());
  check_dtype(value, "value", key.dtype, "key");
  check_device(value, "value", key, "key");
  TIDAL_CHECK(key_cache.ndim == 4 && key_cache.size(2) == key.size(1) && key_cache.size(3) == key.size(2),
              "key_cache.shape=", key_cache.shape_str(), " must be [num_blocks, block_size, num_kv_heads, head_dim] ",
              "with num_kv_heads, head_dim = ", key.size(1), ", ", key.size(2), " (from key)");
  TIDAL_CHECK(key_cache.is_contiguous(), "key_cache must be contiguous");
  TIDAL_CHECK(value_cache.ndim == 4 && value_cache.size(0) == key_cache.size(0) &&
                  value_cache.size(1) == key_cache.size(1) && value_cache.size(2) == key_cache.size(2) &&
                  value_cache.size(3) == key_cache.size(3),
              "value_cache.shape=", value_cache.shape_str(), " must equal key_cache.shape=", key_cache.shape_str());
  TIDAL_CHECK(value_cache.is_contiguous(), "value_cache must be contiguous");
  check_cache_dtype(key_cache, value_cache, key, "key");
  check_device(key_cache, "key_cache", key, "key");
  check_device(value_cache, "value_cache", key, "key");
  check_dtype(slot_mapping, "slot_mapping", DType::kInt64);
  check_vector(slot_mapping, "slot_mapping", key.size(0), "num_tokens");
  check_device(slot_mapping, "slot_mapping", key, "key");
  TIDAL_CHECK(!detail::overlaps(key_cache, value_cache), "key_cache and value_cache overlap in memory");
  TIDAL_CHECK(!detail::overlaps(key_cache, key) && !detail::overlaps(key_cache, value) &&
                  !detail::overlaps(value_cache, key) && !detail::overlaps(value_cache, value),
              "key or value overlaps a cache in memory");
  if (key.numel() > 0 && slot_mapping.device.is_cpu()) {
    check_slots(slot_mapping, key_cache.size(0) * key_cache.size(1));
  }
}

void check_norm_weight(const TensorView& w, const char* name, const TensorView& query) {
  if (w.data == nullptr) return;
  TIDAL_CHECK(w.ndim == 1 && w.size(0) == query.size(2), name, ".shape=", w.shape_str(), " must be [head_dim] = [",
              query.size(2), "]");
  TIDAL_CHECK(w.size(0) <= 1 || w.stride(0) == 1, name, " must be contiguous, got stride ", w.stride(0));
  check_dtype(w, name, query.dtype, "query");
  check_device(w, name, query, "query");
}

}  // namespace

void rotary_embedding(TensorView positions, TensorView query, TensorView key, int64_t head_dim,
                      TensorView cos_sin_cache, bool is_neox, Stream stream) {
  TIDAL_CHECK(head_dim > 0, "head_dim=", head_dim, " must be positive");
  query = view_heads(query, "query", head_dim);
  key = view_heads(key, "key", head_dim);
  check_rotary(positions, query, key, head_dim, cos_sin_cache);
  if (query.size(0) == 0) return;
  detail::dispatch(
      "rotary_embedding", query.device,
      [&] { cpu::rotary_embedding(positions, query, key, cos_sin_cache, is_neox, stream); },
      [&] { gpu::rotary_embedding(positions, query, key, cos_sin_cache, is_neox, stream); });
}

void rotary_embedding_and_cache(TensorView positions, TensorView query, TensorView key, TensorView value,
                                TensorView key_cache, TensorView value_cache, TensorView slot_mapping,
                                TensorView cos_sin_cache, bool is_neox, TensorView q_norm_weight,
                                TensorView k_norm_weight, float eps, Stream stream) {
  TIDAL_CHECK(query.ndim == 3, "query must be 3-D [num_tokens, num_heads, head_dim], got shape ", query.shape_str());
  const int64_t head_dim = query.size(2);
  TIDAL_CHECK(head_dim > 0 && head_dim <= 512, "head_dim=query.shape[2]=", head_dim, " must be in [1, 512]");
  TIDAL_CHECK(key.ndim == 3 && key.size(2) == head_dim, "key.shape=", key.shape_str(),
              " must be [num_tokens, num_kv_heads, head_dim=", head_dim, "]");
  check_rotary(positions, query, key, head_dim, cos_sin_cache);
  check_cache_write(key, value, key_cache, value_cache, slot_mapping);
  check_norm_weight(q_norm_weight, "q_norm_weight", query);
  check_norm_weight(k_norm_weight, "k_norm_weight", query);
  TIDAL_CHECK(std::isfinite(eps) && eps >= 0.f, "eps=", eps, " must be finite and >= 0");
  // NOTE(tidal): query, key and value are usually interleaved views of one qkv output, so their byte
  // ranges overlap while their elements do not; only the caches must stay clear of query.
  TIDAL_CHECK(!detail::overlaps(query, key_cache) && !detail::overlaps(query, value_cache),
              "query overlaps a cache in memory");
  if (query.size(0) == 0) return;
  detail::dispatch(
      "rotary_embedding_and_cache", query.device,
      [&] {
        cpu::rotary_embedding_and_cache(positions, query, key, value, key_cache, value_cache, slot_mapping,
                                        cos_sin_cache, is_neox, q_norm_weight, k_norm_weight, eps, stream);
      },
      [&] {
        gpu::rotary_embedding_and_cache(positions, query, key, value, key_cache, value_cache, slot_mapping,
                                        cos_sin_cache, is_neox, q_norm_weight, k_norm_weight, eps, stream);
      });
}

void reshape_and_cache(TensorView key, TensorView value, TensorView key_cache, TensorView value_cache,
                       TensorView slot_mapping, Stream stream) {
  check_cache_write(key, value, key_cache, value_cache, slot_mapping);
  if (key.numel() == 0) return;
  detail::dispatch(
      "reshape_and_cache", key.device,
      [&] { cpu::reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, stream); },
      [&] { gpu::reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, stream); });
}

void paged_attention(TensorView out, TensorView query, TensorView key_cache, TensorView value_cache,
                     TensorView block_tables, TensorView seq_lens, TensorView cu_seqlens_q, float scale,
                     int64_t sliding_window, int64_t max_seqlen_q, int64_t max_seqlen_k, TensorView workspace,
                     Stream stream, TensorView split_counters, TensorView seq_order) {
  TIDAL_CHECK(query.ndim == 3, "query must be 3-D [num_tokens, num_heads, head_dim], got shape ",
              query.shape_str());
  check_last_dim_contiguous(query, "query");
  check_float(query, "query");
  const int64_t num_tokens = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  TIDAL_CHECK(head_dim >= 1 && head_dim <= cpu::kPagedAttentionMaxHeadDim, "head_dim=query.shape[2]=", head_dim,
              " must be in [1, ", cpu::kPagedAttentionMaxHeadDim, "]");
  TIDAL_CHECK(out.ndim == 3 && out.size(0) == num_tokens && out.size(1) == num_heads && out.size(2) == head_dim,
              "out.shape=", out.shape_str(), " must equal query.shape=", query.shape_str());
  check_last_dim_contiguous(out, "out");
  check_dtype(out, "out", query.dtype, "query");
  check_device(out, "out", query, "query");
  TIDAL_CHECK(key_cache.ndim == 4, "key_cache must be 4-D [num_blocks, block_size, num_kv_heads, head_dim], got ",
              "shape ", key_cache.shape_str());
  TIDAL_CHECK(key_cache.is_contiguous(), "key_cache must be contiguous");
  const int64_t num_blocks = key_cache.size(0), block_size = key_cache.size(1), num_kv_heads = key_cache.size(2);
  TIDAL_CHECK(block_size >= 1, "block_size=key_cache.shape[1]=", block_size, " must be positive");
  TIDAL_CHECK(key_cache.size(3) == head_dim, "key_cache.shape[3]=", key_cache.size(3),
              " must equal head_dim=query.shape[2]=", head_dim);
  TIDAL_CHECK(num_kv_heads >= 1 && num_heads % num_kv_heads == 0, "num_heads=query.shape[1]=", num_heads,
              " must be a multiple of num_kv_heads=key_cache.shape[2]=", num_kv_heads);
  TIDAL_CHECK(value_cache.ndim == 4 && value_cache.size(0) == num_blocks && value_cache.size(1) == block_size &&
                  value_cache.size(2) == num_kv_heads && value_cache.size(3) == head_dim,
              "value_cache.shape=", value_cache.shape_str(), " must equal key_cache.shape=", key_cache.shape_str());
  TIDAL_CHECK(value_cache.is_contiguous(), "value_cache must be contiguous");
  check_cache_dtype(key_cache, value_cache, query, "query");
  check_device(key_cache, "key_cache", query, "query");
  check_device(value_cache, "value_cache", query, "query");
  TIDAL_CHECK(block_tables.ndim == 2, "block_tables must be 2-D [num_seqs, max_num_blocks], got shape ",
              block_tables.shape_str());
  const int64_t num_seqs = block_tables.size(0);
  check_dtype(block_tables, "block_tables", DType::kInt32);
  check_vector(seq_lens, "seq_lens", num_seqs, "num_seqs");
  check_dtype(seq_lens, "seq_lens", DType::kInt32);
  check_vector(cu_seqlens_q, "cu_seqlens_q", num_seqs + 1, "num_seqs + 1");
  check_dtype(cu_seqlens_q, "cu_seqlens_q", DType::kInt32);
  check_device(block_tables, "block_tables", query, "query");
  check_device(seq_lens, "seq_lens", query, "query");
  check_device(cu_seqlens_q, "cu_seqlens_q", query, "query");
  TIDAL_CHECK(std::isfinite(scale), "scale=", scale, " must be finite");
  TIDAL_CHECK(!detail::overlaps(out, query) && !detail::overlaps(out, key_cache) &&
                  !detail::overlaps(out, value_cache),
              "out overlaps query or a cache in memory; pass a distinct out");
  if (seq_order.data != nullptr) {
    check_vector(seq_order, "seq_order", num_seqs, "num_seqs");
    check_dtype(seq_order, "seq_order", DType::kInt32);
    check_device(seq_order, "seq_order", query, "query");
  }
  if (query.device.is_cpu()) {
    check_paged_metadata(block_tables, seq_lens, cu_seqlens_q, num_tokens, num_blocks, block_size, sliding_window);
    if (seq_order.data != nullptr) check_permutation(seq_order, "seq_order");
  }
  if (num_tokens == 0 || num_heads == 0) return;
  if (!query.device.is_cpu()) {
    TIDAL_CHECK(max_seqlen_q >= 1 && max_seqlen_q <= num_tokens, "max_seqlen_q=", max_seqlen_q,
                " must be in [1, num_tokens=", num_tokens, "] on the GPU");
    TIDAL_CHECK(max_seqlen_k >= max_seqlen_q, "max_seqlen_k=", max_seqlen_k, " must be >= max_seqlen_q=",
                max_seqlen_q);
    TIDAL_CHECK(workspace.data == nullptr || workspace.device == query.device, "workspace is on ",
                device_name(workspace.device), " but query is on ", device_name(query.device));
    TIDAL_CHECK(num_seqs <= 65535, "num_seqs=", num_seqs, " must be <= 65535 on the GPU");
    if (split_counters.data != nullptr) {
      check_dtype(split_counters, "split_counters", DType::kInt32);
      check_device(split_counters, "split_counters", query, "query");
      TIDAL_CHECK(split_counters.is_contiguous(), "split_counters must be contiguous");
    }
  }
  detail::dispatch(
      "paged_attention", query.device,
      [&] {
        cpu::paged_attention(out, query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale,
                             sliding_window, stream);
      },
      [&] {
        gpu::paged_attention(out, query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale,
                             sliding_window, max_seqlen_q, max_seqlen_k, workspace, split_counters, seq_order,
                             stream);
      });
}

int64_t paged_attention_workspace_size([[maybe_unused]] Device device, [[maybe_unused]] DType dtype,
                                       [[maybe_unused]] int64_t num_tokens, [[maybe_unused]] int64_t num_seqs,
                                       [[maybe_unused]] int64_t num_heads, [[maybe_unused]] int64_t num_kv_heads,
                                       [[maybe_unused]] int64_t head_dim, [[maybe_unused]] int64_t max_seqlen_q,
                                       [[maybe_unused]] int64_t max_seqlen_k) {
  if (device.type != DeviceType::kCUDA) return 0;
  TIDAL_CHECK(num_kv_heads >= 1 && num_heads % num_kv_heads == 0, "num_heads=", num_heads,
              " must be a multiple of num_kv_heads=", num_kv_heads);
#if TIDAL_WITH_CUDA
  return gpu::paged_attention_workspace_size(dtype, num_tokens, num_seqs, num_heads, num_kv_heads, head_dim,
                                             max_seqlen_q, max_seqlen_k, device.index);
#else
  return 0;
#endif
}

void seeded_exponential(TensorView out, TensorView seeds, TensorView offsets, Stream stream) {
  detail::check_rows(out, "out");
  check_dtype(out, "out", DType::kFloat32);
  check_dtype(seeds, "seeds", DType::kInt64);
  check_dtype(offsets, "offsets", DType::kInt64);
  check_vector(seeds, "seeds", out.size(0), "num_rows");
  check_vector(offsets, "offsets", out.size(0), "num_rows");
  check_device(seeds, "seeds", out, "out");
  check_device(offsets, "offsets", out, "out");
  TIDAL_CHECK(out.size(0) <= 65535, "out.shape[0]=", out.size(0), " rows must be <= 65535");
  if (out.numel() == 0) return;
  detail::dispatch(
      "seeded_exponential", out.device, [&] { cpu::seeded_exponential(out, seeds, offsets, stream); },
      [&] { gpu::seeded_exponential(out, seeds, offsets, stream); });
}

}  // namespace tidal::ops
