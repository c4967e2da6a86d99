// SPDX-License-Identifier: Apache-2.0
// What the paged-attention kernels share: the launch parameters, the plan (which kernel, how many
// query rows per block, how many key splits), and the entry points of the per-dtype translation
// units. Rows: a block handles a run of (query token, head of the KV group) pairs of one sequence
// and one KV head, flattened token-major, so each K/V element it reads serves every query head of
// its group (GQA/MQA) and every query token of the run.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cuda/common.cuh"

namespace tidal::gpu::attn {

struct PagedParams {
  void* out;  // [num_tokens, num_heads, head_dim]
  int64_t out_token_stride, out_head_stride;
  const void* query;  // [num_tokens, num_heads, head_dim]
  int64_t q_token_stride, q_head_stride;
  const void* key_cache;    // [num_blocks, block_size, num_kv_heads, head_dim], contiguous
  const void* value_cache;  // same
  const int32_t* block_tables;  // [num_seqs, max_num_blocks]
  int64_t block_table_stride;
  const int32_t* seq_lens;      // [num_seqs]
  const int32_t* cu_seqlens_q;  // [num_seqs + 1]
  // [num_seqs] or nullptr: grid slice z takes sequence seq_order[z] (a permutation; longest first
  // keeps the last wave short when contexts differ), else sequence z.
  const int32_t* seq_order;
  int num_seqs, num_heads, num_kv_heads, head_dim, block_size;
  int block_shift;     // log2(block_size) when it is a power of two, else -1
  float scale_log2;    // scale * log2(e): scores live in base 2 (exp2)
  int sliding_window;  // <= 0: none
  int num_splits;      // key splits per (sequence, KV head, row run); > 1 needs the two buffers below
  float* split_acc;    // [num_tokens, num_heads, num_splits, head_dim] unnormalised partial outputs
  float* split_ml;     // [num_tokens, num_heads, num_splits, 2] running max (base 2) and sum
  // [num_seqs, num_kv_heads, row_blocks] splits finished so far, zero between calls: the last split
  // of a block's rows to finish merges them (store_rows). nullptr: launch_split_reduce merges instead.
  int* split_counters;
};

// The sequence of this block's grid slice z.
__device__ __forceinline__ int block_seq(const PagedParams& p) {
  return p.seq_order != nullptr ? p.seq_order[blockIdx.z] : static_cast<int>(blockIdx.z);
}

inline constexpr int kMaxSplits = 64;  // key splits per (sequence, KV head, row block) at most

/// The kernel and grid for one call, chosen on the host from shapes alone (no device reads).
struct Plan {
  bool tensor_cores = false;  // the mma.sync prefill kernel (16-bit types, head_dim 64/128/256)
  bool decode_tensor_cores = false;  // the mma.sync decode kernel (the same types; GQA groups >= 2)
  int rows_per_block = 0;     // query rows (token, head) per block
  int row_blocks = 0;         // blocks along the rows of the longest sequence
  int num_splits = 1;
};

/// `allow_tensor_cores` false: the SIMT kernel for every case (inputs the tensor-core kernel cannot load).
/// `fp8_cache`: the caches hold FP8 codes, which only the tensor-core kernels read; decode then takes
/// the tensor-core kernel for every GQA group size, 1 included. `stream`: the launch's, whose SMs
/// size the split-K grid (null: the device's, an upper bound of the workspace any stream needs).
Plan make_plan(DType dtype, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
               int64_t max_seqlen_q, int64_t max_seqlen_k, int device, bool allow_tensor_cores = true,
               bool fp8_cache = false, cudaStream_t stream = nullptr);

/// Whether the tensor-core kernels exist for these queries (fp16 / bf16, head_dim 64, 128 or 256, CUDA).
bool has_tensor_core_kernel(DType dtype, int64_t head_dim);

/// Bytes of fp32 scratch the split-K path needs (0 when the plan does not split).
int64_t workspace_bytes(const Plan& plan, int64_t num_tokens, int64_t num_heads, int64_t head_dim);

// The SIMT kernel (any float type, any head_dim <= 256): one translation unit per dtype.
void launch_simt_f32(const PagedParams& p, const Plan& plan, cudaStream_t stream);
void launch_simt_f16(const PagedParams& p, const Plan& plan, cudaStream_t stream);
void launch_simt_bf16(const PagedParams& p, const Plan& plan, cudaStream_t stream);
// The split-K reduction, any dtype of `out`.
void launch_split_reduce(const PagedParams& p, DType dtype, int64_t num_tokens, cudaStream_t stream);
// The tensor-core prefill kernel (CUDA only).
void launch_prefill_f16(const PagedParams& p, const Plan& plan, cudaStream_t stream);
void launch_prefill_bf16(const PagedParams& p, const Plan& plan, cudaStream_t stream);
// The tensor-core decode kernel (CUDA only).
void launch_decode_f16(const PagedParams& p, const Plan& plan, cudaStream_t stream);
void launch_decode_bf16(const PagedParams& p, const Plan& plan, cudaStream_t stream);
// Both tensor-core kernels over an FP8 E4M3 cache (uint8 codes, scale 1), `dtype` the query's
// (fp16 or bf16; CUDA only). An FP8 cache has no SIMT kernel.
void launch_decode_fp8(const PagedParams& p, const Plan& plan, DType dtype, cudaStream_t stream);
void launch_prefill_fp8(const PagedParams& p, const Plan& plan, DType dtype, cudaStream_t stream);

inline constexpr int kSimtThreads = 128;  // 4 warps (CUDA) per block
// Query rows per block of the tensor-core prefill kernel: 64 (4 warps), or 128 (8 warps) where the
// environment sets TIDAL_PREFILL_ROWS=128 (an experiment until measured; bench_attention.py --prefill).
inline int prefill_rows() {
  static const int rows = [] {
    const char* value = std::getenv("TIDAL_PREFILL_ROWS");
    return value != nullptr && std::strcmp(value, "128") == 0 ? 128 : 64;
  }();
  return rows;
}
inline constexpr int kDecodeRows = 16;    // and of the tensor-core decode kernel

#if !defined(TIDAL_USE_HIP)
/// Launches an attention kernel of `threads` threads (128 unless given) over `grid` with `smem_bytes`
/// of dynamic shared memory, raising the kernel's shared-memory limit first (the kernels that tile
/// K/V need more than 48 KB).
template <typename Kernel>
void launch_with_smem(Kernel kernel, dim3 grid, int smem_bytes, cudaStream_t stream, const PagedParams& p,
                      int threads = 128) {
  TIDAL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  launch_dependent(kernel, grid, dim3(threads), static_cast<size_t>(smem_bytes), stream, current_device(), p);
}
#endif

/// Merges the online-softmax state (m2, l2) into (m1, l1) and returns the scales of both sides'
/// accumulators. m is a running max in base 2, -inf when nothing was seen yet.
struct MergeScales {
  float self, other;
};
__device__ __forceinline__ MergeScales merge_state(float& m1, float& l1, float m2, float l2) {
  const float mx = fmaxf(m1, m2);
  const float safe = mx == -INFINITY ? 0.0f : mx;
  const MergeScales s{exp2f(m1 - safe), exp2f(m2 - safe)};
  l1 = l1 * s.self + l2 * s.other;
  m1 = mx;
  return s;
}

}  // namespace tidal::gpu::attn
