// SPDX-License-Identifier: Apache-2.0
// paged_attention on the GPU: the plan (tensor-core kernel for prefill and mixed batches in 16-bit
// types, the SIMT kernel for decode and everything else; how many key splits), the split-K
// reduction, and the entry point tidal::gpu::paged_attention. Built by nvcc and by hipcc.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/paged_attention.cuh"
#include "ops/kernels.h"

namespace tidal::gpu {
namespace attn {
namespace {

// NOTE(tidal): a split of fewer keys than this costs more in the reduction than it saves.
constexpr int64_t kMinKeysPerSplit = 128;
constexpr int64_t kBlocksPerSmTarget = 8;

template <typename T>
__global__ void __launch_bounds__(128) paged_attention_reduce_kernel(PagedParams p) {
  wait_for_prior_grid();  // launched by launch_dependent
  allow_dependents();
  const int64_t row = blockIdx.x;  // token * num_heads + head
  const int num_splits = p.num_splits, head_dim = p.head_dim;
  const float* ml = p.split_ml + row * num_splits * 2;
  float mx = -INFINITY;
  for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, ml[2 * s]);
  const float safe = mx == -INFINITY ? 0.0f : mx;
  float den = 0.0f;
  for (int s = 0; s < num_splits; ++s) den += ml[2 * s + 1] * exp2f(ml[2 * s] - safe);
  const float inv = den > 0.0f ? 1.0f / den : 0.0f;
  const int64_t token = row / p.num_heads, head = row % p.num_heads;
  T* out = static_cast<T*>(p.out) + token * p.out_token_stride + head * p.out_head_stride;
  const float* acc = p.split_acc + row * num_splits * head_dim;
  for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
    float num = 0.0f;
    for (int s = 0; s < num_splits; ++s) num += acc[s * head_dim + e] * exp2f(ml[2 * s] - safe);
    out[e] = from_float<T>(num * inv);
  }
}

}  // namespace

bool has_tensor_core_kernel(DType dtype, int64_t head_dim) {
#if defined(TIDAL_USE_HIP)
  (void)dtype;
  (void)head_dim;
  return false;
#else
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) &&
         (head_dim == 64 || head_dim == 128 || head_dim == 256);
#endif
}

Plan make_plan(DType dtype, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
               int64_t max_seqlen_q, int64_t max_seqlen_k, int device, bool allow_tensor_cores, bool fp8_cache,
               cudaStream_t stream) {
  Plan plan;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t rows = std::max<int64_t>(max_seqlen_q, 1) * group;
  if (allow_tensor_cores && max_seqlen_q > 1 && has_tensor_core_kernel(dtype, head_dim)) {
    plan.tensor_cores = true;
    plan.rows_per_block = prefill_rows();
    plan.row_blocks = static_cast<int>((rows + plan.rows_per_block - 1) / plan.rows_per_block);
    return plan;
  }
  // NOTE(tidal): decode with a KV head per 2 or more query heads goes to tensor cores (see
  // paged_decode.cuh): even 2 rows of an m16 tile cost fewer instructions per key than the SIMT
  // kernel's per-row FMAs and shuffles. Multi-head attention (group 1) keeps the SIMT kernel, unless
  // the cache holds FP8 codes, which only the tensor-core kernels read.
  if (allow_tensor_cores && max_seqlen_q <= 1 && (group >= 2 || fp8_cache) && has_tensor_core_kernel(dtype, head_dim)) {
    plan.decode_tensor_cores = true;
    plan.rows_per_block = kDecodeRows;
  } else {
    plan.rows_per_block = rows <= 2 ? 2 : rows <= 4 ? 4 : 8;
  }
  plan.row_blocks = static_cast<int>((rows + plan.rows_per_block - 1) / plan.rows_per_block);
  // NOTE(tidal): flash-decoding. The decode kernels hold about 3 blocks per SM; with too few blocks
  // the last wave leaves SMs idle, so the key range of each (sequence, KV head) is split until the
  // grid reaches ~8 blocks per SM, each split keeping >= kMinKeysPerSplit keys (measured on H200 at
  // batch 64 x 2048 / 8192: a target of 8 blocks per SM 75% / 95% of the copy ceiling, 6: 75% / 89%,
  // 12: 71% / 89%). The split count depends on shapes only, so a CUDA graph captured at
  // max_seqlen_k = max_model_len stays right for shorter contexts: the kernel sizes each split from
  // the sequence's own length.
  const int64_t blocks = num_seqs * num_kv_heads * plan.row_blocks;
  const int64_t target = kBlocksPerSmTarget * multiprocessor_count(device, stream);
  if (blocks < target) {
    const int64_t wanted = (target + blocks - 1) / std::max<int64_t>(blocks, 1);
    const int64_t by_keys = (std::max<int64_t>(max_seqlen_k, 1) + kMinKeysPerSplit - 1) / kMinKeysPerSplit;
    plan.num_splits = static_cast<int>(std::clamp<int64_t>(std::min(wanted, by_keys), 1, kMaxSplits));
  }
  return plan;
}

int64_t workspace_bytes(const Plan& plan, int64_t num_tokens, int64_t num_heads, int64_t head_dim) {
  if (plan.num_splits <= 1) return 0;
  return num_tokens * num_heads * plan.num_splits * (head_dim + 2) * static_cast<int64_t>(sizeof(float));
}

void launch_split_reduce(const PagedParams& p, DType dtype, int64_t num_tokens, cudaStream_t stream) {
  const int64_t rows = num_tokens * p.num_heads;
  if (rows == 0) return;
  TIDAL_DISPATCH_FLOAT(dtype, T, {
    launch_dependent(paged_attention_reduce_kernel<T>, dim3(static_cast<unsigned>(rows)), dim3(128), 0, stream,
                     current_device(), p);
  });
}

}  // namespace attn

int64_t paged_attention_workspace_size(DType dtype, int64_t num_tokens, int64_t num_seqs, int64_t num_heads,
                                       int64_t num_kv_heads, int64_t head_dim, int64_t max_seqlen_q,
                                       int64_t max_seqlen_k, int device) {
  // NOTE(tidal): an FP8 cache changes the plan only for decode with one query head per KV head (the
  // tensor-core kernel instead of the SIMT one); a decode row fits one block of either, so the split
  // count, and with it this size, is the same for both caches.
  const attn::Plan plan =
      attn::make_plan(dtype, num_seqs, num_heads, num_kv_heads, head_dim, max_seqlen_q, max_seqlen_k, device);
  return attn::workspace_bytes(plan, num_tokens, num_heads, head_dim);
}

void paged_attention(TensorView out, TensorView query, TensorView key_cache, TensorView value_cache,
                     TensorView block_tables, TensorView seq_lens, TensorView cu_seqlens_q, float scale,
                     int64_t sliding_window, int64_t max_seqlen_q, int64_t max_seqlen_k, TensorView workspace,
                     TensorView split_counters, TensorView seq_order, Stream stream) {
  const int64_t num_tokens = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t num_seqs = block_tables.size(0);
  if (num_tokens == 0 || num_seqs == 0) return;
  DeviceGuard guard(query.device.index);
  const bool fp8_cache = key_cache.dtype == DType::kUInt8;
  TIDAL_CHECK(!fp8_cache || attn::has_tensor_core_kernel(query.dtype, head_dim), "an FP8 KV cache on the GPU needs ",
              "float16 or bfloat16 queries with head_dim 64, 128 or 256 on CUDA; got query.dtype=",
              dtype_name(query.dtype), ", head_dim=", head_dim);
  attn::Plan plan = attn::make_plan(query.dtype, num_seqs, num_heads, key_cache.size(2), head_dim, max_seqlen_q,
                                    max_seqlen_k, query.device.index, /*allow_tensor_cores=*/true, fp8_cache,
                                    static_cast<cudaStream_t>(stream.handle));
  // The tensor-core kernels move Q in 16-byte chunks.
  const bool tensor_core_aligned = is_aligned(query.data, 16) && query.stride(0) % 8 == 0 &&
                                   query.stride(1) % 8 == 0 && out.stride(0) % 2 == 0 && out.stride(1) % 2 == 0 &&
                                   is_aligned(key_cache.data, 16) && is_aligned(value_cache.data, 16);
  TIDAL_CHECK(!fp8_cache || tensor_core_aligned, "an FP8 KV cache on the GPU needs 16-byte aligned query and caches, ",
              "query strides that are multiples of 8 and even out strides; got query strides (", query.stride(0), ", ",
              query.stride(1), "), out strides (", out.stride(0), ", ", out.stride(1), ")");
  if ((plan.tensor_cores || plan.decode_tensor_cores) && !tensor_core_aligned) {
    // The caller sized the workspace for the tensor-core plan (the prefill kernel never splits
    // keys): the SIMT plan may split into no more slices than that.
    const int sized_splits = plan.tensor_cores ? 1 : plan.num_splits;
    plan = attn::make_plan(query.dtype, num_seqs, num_heads, key_cache.size(2), head_dim, max_seqlen_q, max_seqlen_k,
                           query.device.index, /*allow_tensor_cores=*/false, false,
                           static_cast<cudaStream_t>(stream.handle));
    plan.num_splits = std::min(plan.num_splits, sized_splits);
  }
  const int64_t needed = attn::workspace_bytes(plan, num_tokens, num_heads, head_dim);
  TIDAL_CHECK(workspace.numel() * workspace.element_size() >= needed, "workspace holds ",
              workspace.numel() * workspace.element_size(), " bytes but this call needs ", needed,
              " (paged_attention_workspace_size)");

  attn::PagedParams p{};
  p.out = out.data;
  p.out_token_stride = out.stride(0);
  p.out_head_stride = out.stride(1);
  p.query = query.data;
  p.q_token_stride = query.stride(0);
  p.q_head_stride = query.stride(1);
  p.key_cache = key_cache.data;
  p.value_cache = value_cache.data;
  p.block_tables = block_tables.data_ptr<const int32_t>();
  p.block_table_stride = block_tables.stride(0);
  p.seq_lens = seq_lens.data_ptr<const int32_t>();
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<const int32_t>();
  p.seq_order = seq_order.data != nullptr ? seq_order.data_ptr<const int32_t>() : nullptr;
  p.num_seqs = static_cast<int>(num_seqs);
  p.num_heads = static_cast<int>(num_heads);
  p.num_kv_heads = static_cast<int>(key_cache.size(2));
  p.head_dim = static_cast<int>(head_dim);
  p.block_size = static_cast<int>(key_cache.size(1));
  p.block_shift = -1;
  for (int shift = 0; shift < 31; ++shift) {
    if ((int64_t{1} << shift) == p.block_size) p.block_shift = shift;
  }
  p.scale_log2 = scale * 1.4426950408889634f;
  p.sliding_window = sliding_window > 0 ? static_cast<int>(std::min<int64_t>(sliding_window, 1 << 30)) : 0;
  p.num_splits = plan.num_splits;
  if (plan.num_splits > 1) {
    p.split_acc = static_cast<float*>(workspace.data);
    p.split_ml = p.split_acc + num_tokens * num_heads * plan.num_splits * head_dim;
    // The in-kernel merge keeps a row's split weights in the reduction scratch of store_rows, which
    // holds them from head_dim 16 up.
    const int64_t counters = num_seqs * p.num_kv_heads * plan.row_blocks;
    if (split_counters.data != nullptr && split_counters.numel() >= counters && head_dim >= 16) {
      p.split_counters = static_cast<int*>(split_counters.data);
    }
  }
  const auto s = static_cast<cudaStream_t>(stream.handle);
  if (fp8_cache && plan.decode_tensor_cores) {
    attn::launch_decode_fp8(p, plan, query.dtype, s);
  } else if (fp8_cache) {
    attn::launch_prefill_fp8(p, plan, query.dtype, s);
    return;  // the prefill kernel never splits keys
  } else if (plan.decode_tensor_cores) {
    if (query.dtype == DType::kBFloat16) {
      attn::launch_decode_bf16(p, plan, s);
    } else {
      attn::launch_decode_f16(p, plan, s);
    }
  } else if (plan.tensor_cores) {
    if (query.dtype == DType::kBFloat16) {
      attn::launch_prefill_bf16(p, plan, s);
    } else {
      attn::launch_prefill_f16(p, plan, s);
    }
    return;  // the prefill kernel never splits keys
  } else {
    switch (query.dtype) {
      case DType::kFloat32: attn::launch_simt_f32(p, plan, s); break;
      case DType::kFloat16: attn::launch_simt_f16(p, plan, s); break;
      case DType::kBFloat16: attn::launch_simt_bf16(p, plan, s); break;
      default: TIDAL_THROW_(std::invalid_argument, "query.dtype=", dtype_name(query.dtype), " is not supported");
    }
  }
  if (plan.num_splits > 1 && p.split_counters == nullptr) attn::launch_split_reduce(p, query.dtype, num_tokens, s);
}

}  // namespace tidal::gpu
