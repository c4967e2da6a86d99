// SPDX-License-Identifier: Apache-2.0
// The kernel table behind tidal::ops: each op has a CPU kernel (plain C++, the reference) and a GPU
// kernel (cuda/*.cu, also compiled as HIP) with identical signatures. Arguments arrive validated by
// cpp/src/ops (shapes, dtypes, devices, last dim contiguous), so kernels check nothing but launches.
#pragma once

#include <cstdint>
#include <vector>

#include "tidal/stream.h"
#include "tidal/tensor_view.h"

namespace tidal::cpu {

// out, x: [num_tokens, hidden_size] (row stride any, last dim contiguous); weight: [hidden_size]
void rms_norm(TensorView out, TensorView x, TensorView weight, float eps, Stream stream);
// out, residual_out, x, residual: [num_tokens, hidden_size]; out may alias x, residual_out residual
void fused_add_rms_norm(TensorView out, TensorView residual_out, TensorView x, TensorView residual,
                        TensorView weight, float eps, Stream stream);

}  // namespace tidal::cpu

namespace tidal::gpu {

// Same contracts as tidal::cpu; launched on `stream`, on the device of `x`.
void rms_norm(TensorView out, TensorView x, TensorView weight, float eps, Stream stream);
void fused_add_rms_norm(TensorView out, TensorView residual_out, TensorView x, TensorView residual,
                        TensorView weight, float eps, Stream stream);

}  // namespace tidal::gpu

// ---- serving ops: the paged-KV path (cpp/cpu/{activation,rotary,kv_cache,paged_attention,sampling}.cpp,
// cuda/{activation,rotary,kv_cache,paged_attention*,sampling}.cu). Integer arguments (positions,
// slots, block ids, lengths) of CPU tensors arrive with their values checked as well; on the GPU
// they are not (that would need a host synchronisation), and the kernels skip out-of-range
// positions and slots rather than touching memory outside the tensors.

namespace tidal::cpu {

// out: [num_tokens, d]; x: [num_tokens, 2 * d], gate half first (row strides any, last dim contiguous)
void silu_and_mul(TensorView out, TensorView x, Stream stream);
// The backward passes of tidal/ops_train.h, same contracts.
void silu_and_mul_backward(TensorView grad_x, TensorView grad, TensorView x, TensorView out, Stream stream);
void rms_norm_backward(TensorView grad_x, TensorView grad_weight_partial, TensorView grad, TensorView x,
                       TensorView weight, float eps, Stream stream);
void softmax_cross_entropy(TensorView logits, TensorView loss, TensorView labels, TensorView scale,
                           int64_t ignore_index, bool write_grad, Stream stream);

// positions: [num_tokens] int64, each in [0, max_position);
// query: [num_tokens, num_heads, head_dim], key: [num_tokens, num_kv_heads, head_dim], rotated in
//   place (token and head strides any, last dim contiguous, no element shared between them);
// cos_sin_cache: [max_position, rotary_dim] float32, row p = cos(p * inv_freq) then sin(p * inv_freq)
void rotary_embedding(TensorView positions, TensorView query, TensorView key, TensorView cos_sin_cache,
                      bool is_neox, Stream stream);

// As rotary_embedding for query (in place), plus: value: [num_tokens, num_kv_heads, head_dim];
// key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim] contiguous;
// slot_mapping: [num_tokens] int64 (negative: skipped); q_norm_weight, k_norm_weight: [head_dim] or
// empty views (data null) for no per-head RMSNorm. key itself is left unchanged.
void rotary_embedding_and_cache(TensorView positions, TensorView query, TensorView key, TensorView value,
                                TensorView key_cache, TensorView value_cache, TensorView slot_mapping,
                                TensorView cos_sin_cache, bool is_neox, TensorView q_norm_weight,
                                TensorView k_norm_weight, float eps, Stream stream);

// key, value: [num_tokens, num_kv_heads, head_dim] (token and head strides any, last dim contiguous);
// key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous, same dtype;
// slot_mapping: [num_tokens] int64, each < num_blocks * block_size; negative slots are skipped
void reshape_and_cache(TensorView key, TensorView value, TensorView key_cache, TensorView value_cache,
                       TensorView slot_mapping, Stream stream);

// The largest head_dim paged_attention takes: its per-thread fp32 tiles live on the stack.
inline constexpr int64_t kPagedAttentionMaxHeadDim = 256;

// out: [num_tokens, num_heads, head_dim] (token and head strides any, last dim contiguous);
// query: [num_tokens, num_heads, head_dim], same; num_heads % num_kv_heads == 0;
// key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous;
// block_tables: [num_seqs, max_num_blocks] int32, every entry a sequence reads in [0, num_blocks);
// seq_lens: [num_seqs] int32, seq_lens[s] >= q_len(s) and <= max_num_blocks * block_size;
// cu_seqlens_q: [num_seqs + 1] int32, first 0, non-decreasing, last num_tokens;
// sliding_window <= 0: none
void paged_attention(TensorView out, TensorView query, TensorView key_cache, TensorView value_cache,
                     TensorView block_tables, TensorView seq_lens, TensorView cu_seqlens_q, float scale,
                     int64_t sliding_window, Stream stream);

// out: [num_rows, vocab] float32 (row stride any, last dim contiguous); seeds, offsets: [num_rows] int64
void seeded_exponential(TensorView out, TensorView seeds, TensorView offsets, Stream stream);

// out, x: [num_tokens, hidden]; router_logits: [num_tokens, num_experts] (x's dtype or float32);
// w13: [num_experts, 2 * inter, hidden], w2: [num_experts, hidden, inter], contiguous; 1 <= top_k <= num_experts
void fused_moe(TensorView out, TensorView x, TensorView router_logits, TensorView w13, TensorView w2, int64_t top_k,
               bool renormalize, bool fp32_weights, Stream stream);

}  // namespace tidal::cpu

namespace tidal::gpu {

// Same contracts as tidal::cpu; launched on `stream`, on the device of the first tensor.
void silu_and_mul(TensorView out, TensorView x, Stream stream);
void silu_and_mul_backward(TensorView grad_x, TensorView grad, TensorView x, TensorView out, Stream stream);
void rms_norm_backward(TensorView grad_x, TensorView grad_weight_partial, TensorView grad, TensorView x,
                       TensorView weight, float eps, Stream stream);
void softmax_cross_entropy(TensorView logits, TensorView loss, TensorView labels, TensorView scale,
                           int64_t ignore_index, bool write_grad, Stream stream);
void rotary_embedding(TensorView positions, TensorView query, TensorView key, TensorView cos_sin_cache,
                      bool is_neox, Stream stream);
void rotary_embedding_and_cache(TensorView positions, TensorView query, TensorView key, TensorView value,
                                TensorView key_cache, TensorView value_cache, TensorView slot_mapping,
                                TensorView cos_sin_cache, bool is_neox, TensorView q_norm_weight,
                                TensorView k_norm_weight, float eps, Stream stream);
void reshape_and_cache(TensorView key, TensorView value, TensorView key_cache, TensorView value_cache,
                       TensorView slot_mapping, Stream stream);
void seeded_exponential(TensorView out, TensorView seeds, TensorView offsets, Stream stream);
// GPU only (tidal::ops::skinny_linear). prologue: SkinnyPrologue's value. format: -1 for a dense
// weight, else a quantized one's WeightFormat value (weight: its codes; scales, zeros: its groups').
bool skinny_linear_supported(TensorView x, TensorView weight, int format, TensorView scales, TensorView zeros);
void skinny_linear(TensorView out, TensorView residual, TensorView x, TensorView weight, TensorView bias,
                   TensorView norm_weight, int prologue, float eps, int format, TensorView scales, TensorView zeros,
                   TensorView prefetch, Stream stream);

// max_seqlen_q, max_seqlen_k: the longest query run and context of the batch (host ints, they size
// the grid). workspace: paged_attention_workspace_size bytes (0 when the plan does not split keys).
// split_counters: int32 zeros for the in-kernel merge of the splits (empty: a separate kernel).
// seq_order: the order in which the grid takes the sequences, a permutation (empty: 0, 1, ...).
void paged_attention(TensorView out, TensorView query, TensorView key_cache, TensorView value_cache,
                     TensorView block_tables, TensorView seq_lens, TensorView cu_seqlens_q, float scale,
                     int64_t sliding_window, int64_t max_seqlen_q, int64_t max_seqlen_k, TensorView workspace,
                     TensorView split_counters, TensorView seq_order, Stream stream);
int64_t paged_attention_workspace_size(DType dtype, int64_t num_tokens, int64_t num_seqs, int64_t num_heads,
                                       int64_t num_kv_heads, int64_t head_dim, int64_t max_seqlen_q,
                                       int64_t max_seqlen_k, int device);

// workspace: fused_moe_workspace_size bytes (routing, the slots sorted by expert, the activations
// between the two grouped GEMMs and their fp32 partial sums). At most 512 experts.
void fused_moe(TensorView out, TensorView x, TensorView router_logits, TensorView w13, TensorView w2, int64_t top_k,
               bool renormalize, bool fp32_weights, TensorView workspace, Stream stream);
int64_t fused_moe_workspace_size(DType dtype, int64_t num_tokens, int64_t hidden, int64_t inter, int64_t num_experts,
                                 int64_t top_k, int device);

}  // namespace tidal::gpu

// ---- training ops: the fused optimizer step (cpp/cpu/adam.cpp, cuda/adam.cu) ------------------------
// cpp/src/ops/dispatch_train.cpp validates, then dispatches by device.

#include "tidal/ops_train.h"

namespace tidal::cpu {

// param, grad, exp_avg, exp_avg_sq: [numel] float32, contiguous, pairwise non-overlapping;
// param, exp_avg, exp_avg_sq updated in place; options validated (see tidal/ops_train.h);
// param_copy: empty, or [numel] contiguous float (any of the three dtypes) receiving the new param
void adam_step(TensorView param, TensorView grad, TensorView exp_avg, TensorView exp_avg_sq,
               const ops::AdamOptions& options, Stream stream, TensorView param_copy);

}  // namespace tidal::cpu

namespace tidal::gpu {

// As cpu::adam_step, one launch over the flat buffers on `stream` (does not block the caller).
void adam_step(TensorView param, TensorView grad, TensorView exp_avg, TensorView exp_avg_sq,
               const ops::AdamOptions& options, Stream stream, TensorView param_copy);

}  // namespace tidal::gpu

// ---- device virtual memory (cuda/device_memory.cu), behind tidal::SleepableMemory ----------------

namespace tidal::gpu {

// The size multiple of a physical allocation on `device`.
int64_t vmm_granularity(int device);
// Reserves `size` bytes of address space (a multiple of vmm_granularity) and frees a reservation.
uintptr_t vmm_reserve(int64_t size);
void vmm_free(uintptr_t address, int64_t size);
// Creates `size` bytes of physical memory on `device`, maps it read-write at `address`, zeroes it
// and returns its handle; vmm_unmap (after the device's work is done) unmaps and frees it.
unsigned long long vmm_map(int device, uintptr_t address, int64_t size);
void vmm_unmap(int device, uintptr_t address, int64_t size, unsigned long long handle);

}  // namespace tidal::gpu

// ---- SM partitions (cuda/sm_partition.cu), behind tidal::SmPartition -----------------------------

namespace tidal::gpu {

// The device's SM count, the smallest group and the multiple groups are rounded up to.
void sm_layout(int device, int* sm_count, int* min_group, int* alignment);
// Two groups of `device`'s SMs, the first of at least `first_sms`, the second the rest: a handle per
// group (a green context on CUDA), each group's SM count in `sm_counts`.
std::vector<uintptr_t> sm_groups_create(int device, int first_sms, std::vector<int>& sm_counts);
void sm_group_destroy(uintptr_t group);
// A stream whose kernels run on `group`'s `sms` SMs only (launchers size their grids by that count);
// destroyed by sm_group_stream_destroy.
uintptr_t sm_group_stream(int device, uintptr_t group, int sms, int priority);
void sm_group_stream_destroy(uintptr_t stream);
// Launches `blocks` thread blocks on `stream` that stay resident ~100 us each and write the SM they
// ran on to out[block] (int32 device memory); does not wait.
void record_sm_ids(uintptr_t stream, int blocks, uintptr_t out);

}  // namespace tidal::gpu

// ---- quantized linear layers (cpp/cpu/quant_linear.cpp, cuda/quant_linear.cu) ----------------------
// Contracts of tidal/ops_quant.h; format: WeightFormat's value; arguments validated there.

namespace tidal::cpu {

void quant_linear(TensorView out, TensorView x, TensorView qweight, TensorView scales, TensorView zeros,
                  TensorView bias, int format, Stream stream);
void dequantize_weight(TensorView out, TensorView qweight, TensorView scales, TensorView zeros, int format,
                       Stream stream);
void quantize_fp8_per_token(TensorView codes, TensorView scales, TensorView x, TensorView static_scale, Stream stream);
void fused_add_rms_norm_quant_fp8(TensorView codes, TensorView scales, TensorView residual_out, TensorView x,
                                  TensorView residual, TensorView weight, float eps, Stream stream);
void silu_and_mul_quant_fp8(TensorView codes, TensorView scales, TensorView x, Stream stream);

}  // namespace tidal::cpu

namespace tidal::gpu {

// Whether quant_linear's kernel takes these shapes (at most 8 rows, whole 16-byte chunks per group).
bool quant_linear_supported(TensorView x, TensorView qweight, TensorView scales, int format);
void quant_linear(TensorView out, TensorView x, TensorView qweight, TensorView scales, TensorView zeros,
                  TensorView bias, int format, Stream stream);
void dequantize_weight(TensorView out, TensorView qweight, TensorView scales, TensorView zeros, int format,
                       Stream stream);
void quantize_fp8_per_token(TensorView codes, TensorView scales, TensorView x, TensorView static_scale, Stream stream);
void fused_add_rms_norm_quant_fp8(TensorView codes, TensorView scales, TensorView residual_out, TensorView x,
                                  TensorView residual, TensorView weight, float eps, Stream stream);
void silu_and_mul_quant_fp8(TensorView codes, TensorView scales, TensorView x, Stream stream);

}  // namespace tidal::gpu
