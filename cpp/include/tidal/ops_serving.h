// SPDX-License-Identifier: Apache-2.0
// The public ops of the paged-KV serving path: the gated activation, rotary position embedding
// (alone, and fused with the per-head q/k RMSNorm and the KV-cache write), the KV-cache write, paged
// attention and the seeded noise of sampling. Same conventions as tidal/ops.h: destination-passing
// (the caller allocates every output and workspace), validated once, dispatched by device to the
// CPU kernel or the CUDA kernel. Integer values (positions, slots, block ids) are checked on the CPU;
// on the GPU that would need a host synchronisation, so there they are the caller's contract.
#pragma once

#include <cstdint>

#include "tidal/ops_quant.h"
#include "tidal/stream.h"
#include "tidal/tensor_view.h"

namespace tidal::ops {

/// The gated activation of Llama-family MLPs:
///   out[t, i] = silu(x[t, i]) * x[t, d + i],   silu(g) = g / (1 + exp(-g)),   i < d
/// computed in fp32 and rounded once to the dtype.
/// x:   [num_tokens, 2 * d], gate half first; out: [num_tokens, d]. Last dims contiguous, any row
///      stride; same dtype (float32, float16 or bfloat16) and device; out must not overlap x.
void silu_and_mul(TensorView out, TensorView x, Stream stream);

/// What skinny_linear computes from x before the product.
enum class SkinnyPrologue : int { kIdentity = 0, kRmsNorm = 1, kSiluMul = 2 };

/// A quantized weight's format and groups, for ops that take one beside its codes.
struct QuantizedWeight {
  WeightFormat format;
  TensorView scales;  // float32 [n, num_groups], contiguous
  TensorView zeros;   // uint8 [n, num_groups] for WeightFormat::kInt4, else empty
};

/// A linear layer over a few rows (decode at small batch) with its neighbours fused in, GPU only:
///   y = f(x) weight^T (+ bias),  then  out = y  or  residual += y  (in place),
/// f = identity; rms_norm(x, norm_weight, eps) (rounded to the dtype, as rms_norm); or
/// silu_and_mul(x) (rounded, as silu_and_mul). fp32 accumulation; y rounded once.
/// x:       [m, k] ([m, 2k] for kSiluMul), m >= 1; weight: [n, k]; bias: [n] or empty;
///          norm_weight: [k] (kRmsNorm only); all of one float dtype and device, last dims contiguous.
/// out:     [m, n] in x's dtype or float32, or empty; residual: [m, n] in x's dtype, or empty;
///          exactly one of them. Neither may overlap x or weight.
/// prefetch: empty, or the 2-D weight (any dtype, last dim contiguous, 16-byte aligned rows) that the
///          next kernel in the stream streams first, on x's device: once this kernel has issued its
///          own weight reads it asks L2 to prefetch the first bytes each block of a skinny_linear
///          over that weight would read, so the next projection's start does not wait on DRAM (a
///          hint: results never depend on it; sm_90 only, ignored elsewhere).
/// quant:   null for a dense weight; else `weight` holds a quantized weight's codes, in quant_linear's
///          layouts and with its scales and zero points (tidal/ops_quant.h), x is float16 or
///          bfloat16 and out (if given) in x's dtype. Computed as quant_linear computes it.
/// Returns false, writing nothing, when the kernel does not take these shapes or alignments
/// (rows past 4, k not a multiple of 16 bytes, f(x) larger than shared memory; a quantized weight:
/// GPUs before sm_90, rows of codes that are not whole 64-byte blocks, groups that are not a power
/// of two (at least 4) of 16-byte chunks of codes, scales whose slices are not whole 16-byte units):
/// the caller runs the unfused ops instead.
bool skinny_linear(TensorView out, TensorView residual, TensorView x, TensorView weight, TensorView bias,
                   TensorView norm_weight, SkinnyPrologue prologue, float eps, TensorView prefetch, Stream stream,
                   const QuantizedWeight* quant = nullptr);

/// Rotary position embedding, in place on query and key. For each token t at p = positions[t] and
/// each head, the first rotary_dim entries are rotated in pairs (x1, x2) by the angle of row p:
///   x1' = x1 * cos - x2 * sin,   x2' = x2 * cos + x1 * sin        (fp32 math, one rounding)
/// with pairs (i, i + rotary_dim / 2) when is_neox (Llama, Qwen, Mistral: HF's rotate_half) and
/// (2i, 2i + 1) otherwise (GPT-J); entries past rotary_dim are left untouched.
/// positions:     [num_tokens] int64, each in [0, max_position) (else std::out_of_range naming it).
/// query:         [num_tokens, num_heads, head_dim] or [num_tokens, num_heads * head_dim];
/// key:           [num_tokens, num_kv_heads, head_dim] or [num_tokens, num_kv_heads * head_dim];
///                same dtype; any token and head strides (slices of a fused qkv output work in
///                place), last dim contiguous; query and key must not share elements.
/// head_dim:      the per-head size, which makes the 2-D forms unambiguous.
/// cos_sin_cache: [max_position, rotary_dim] float32, last dim contiguous; row p holds
///                cos(p * inv_freq) in its first rotary_dim / 2 entries and sin(p * inv_freq) in
///                the rest; rotary_dim even and <= head_dim.
void rotary_embedding(TensorView positions, TensorView query, TensorView key, int64_t head_dim,
                      TensorView cos_sin_cache, bool is_neox, Stream stream);

/// The attention block's pre-processing in one pass (Qwen3's q/k norm, rotary, the cache write):
///   q = rope(norm_q(query[t, h]))                      written back into query
///   key_cache[slot] = rope(norm_k(key[t, h])),  value_cache[slot] = value[t, h]
/// where norm_x(v) = v / sqrt(mean(v^2) + eps) * x_norm_weight when that weight is given (a view with
/// null data means no norm) and rope is rotary_embedding's rotation; fp32 math, one rounding per
/// output. key is read, not written. A negative slot skips the token's cache write (query is still
/// rotated). Shapes as rotary_embedding (3-D forms only) and reshape_and_cache;
/// q_norm_weight, k_norm_weight: [head_dim], query's dtype.
void rotary_embedding_and_cache(TensorView positions, TensorView query, TensorView key, TensorView value,
                                TensorView key_cache, TensorView value_cache, TensorView slot_mapping,
                                TensorView cos_sin_cache, bool is_neox, TensorView q_norm_weight,
                                TensorView k_norm_weight, float eps, Stream stream);

/// Writes this step's keys and values into the paged KV cache:
///   key_cache[slot / block_size, slot % block_size] = key[t],   slot = slot_mapping[t]
/// and the same for value. A negative slot (padding) is skipped; a slot >= num_blocks * block_size
/// is std::out_of_range naming the token and the slot, raised before anything is written. Two
/// tokens with one slot: the later one wins on the CPU, either may on the GPU.
/// key, value:               [num_tokens, num_kv_heads, head_dim], any token and head strides,
///                           last dim contiguous.
/// key_cache, value_cache:   [num_blocks, block_size, num_kv_heads, head_dim], contiguous, the
///                           dtype of key; or, on the CPU, uint8 holding FP8 E4M3 codes (scale 1:
///                           each element rounded to nearest even, saturated at +-448).
/// slot_mapping:             [num_tokens] int64.
void reshape_and_cache(TensorView key, TensorView value, TensorView key_cache, TensorView value_cache,
                       TensorView slot_mapping, Stream stream);

/// Causal attention of this step's query tokens over the paged KV cache: prefill, chunked prefill
/// over a cached prefix and decode, mixed in one batch. Sequence s owns query rows
/// [cu_seqlens_q[s], cu_seqlens_q[s + 1]); its row j sits at position p = seq_lens[s] - q_len + j
/// and attends the cached keys at positions k <= p (and k > p - sliding_window when
/// sliding_window > 0); the key at position k lives in block block_tables[s, k / block_size],
/// offset k % block_size. Query head h reads KV head h / (num_heads / num_kv_heads).
///   out[row, h] = softmax_k(scale * q[row, h] . K[k]) V[k]
/// in fp32 with an online softmax over key blocks, rounded once to the dtype. Keys and values of
/// this step's tokens must already be in the cache (reshape_and_cache).
/// out, query:               [num_tokens, num_heads, head_dim], any token and head strides, last
///                           dim contiguous; head_dim <= 256; same dtype as the caches.
/// key_cache, value_cache:   [num_blocks, block_size, num_kv_heads, head_dim], contiguous;
///                           num_heads % num_kv_heads == 0; query's dtype, or (CPU) uint8 FP8
///                           E4M3 codes, widened exactly as they are read.
/// block_tables:             [num_seqs, max_num_blocks] int32, entries in [0, num_blocks) as far
///                           as each sequence reads.
/// seq_lens:                 [num_seqs] int32, context length including this step's tokens;
///                           q_len(s) <= seq_lens[s] <= max_num_blocks * block_size.
/// cu_seqlens_q:             [num_seqs + 1] int32, first 0, non-decreasing, last num_tokens.
/// scale:                    finite, usually 1 / sqrt(head_dim).
/// max_seqlen_q, max_seqlen_k: the batch's longest query run and context (host ints; the GPU
/// launcher sizes its grid from them, so they must bound the true values; ignored on the CPU).
/// workspace: at least paged_attention_workspace_size(...) bytes of scratch on query's device (any
/// dtype; an empty view when that size is 0). On the CPU the kernel runs on all OpenMP threads when
/// the batch is large enough; on the GPU decode runs the SIMT kernel (split-K over keys for small
/// batches) and prefill or mixed batches in 16-bit types the tensor-core kernel.
/// split_counters (GPU, optional): int32 zeros that the caller keeps for its calls on one stream
/// (calls that may run concurrently need their own); num_seqs * num_heads of them cover any decode
/// batch. With them the last key split of each (sequence, KV head) to finish merges the splits
/// itself, in the same kernel, and sets its counter back to zero; without them (or when a call needs
/// more than there are) a second kernel merges the splits. The outputs are the same bits either way.
/// seq_order (optional): [num_seqs] int32, a permutation of 0 .. num_seqs - 1: the order in which the
/// GPU kernels take the sequences (the GPU model runner passes them longest context first, so the
/// longest blocks start in the first wave rather than the last). The outputs are the same bits in
/// any order. The GPU takes it on trust (a check would read it back); the CPU checks it and then
/// ignores it (its threads balance by themselves).
void paged_attention(TensorView out, TensorView query, TensorView key_cache, TensorView value_cache,
                     TensorView block_tables, TensorView seq_lens, TensorView cu_seqlens_q, float scale,
                     int64_t sliding_window, int64_t max_seqlen_q, int64_t max_seqlen_k, TensorView workspace,
                     Stream stream, TensorView split_counters = TensorView{}, TensorView seq_order = TensorView{});

/// Bytes of workspace paged_attention needs for these shapes on `device` (always 0 on the CPU).
int64_t paged_attention_workspace_size(Device device, DType dtype, int64_t num_tokens, int64_t num_seqs,
                                       int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                       int64_t max_seqlen_q, int64_t max_seqlen_k);

/// A mixture-of-experts MLP layer (Mixtral, Qwen2-MoE, Qwen3-MoE), routing included:
///   p = softmax(router_logits[t])  (fp32);  S = the top_k experts by p (ties: lower index first);
///   w_e = p_e / sum_{e' in S} p_e' when renormalize, else p_e; rounded to x's dtype unless fp32_weights;
///   out[t] = sum_{e in S, ascending e} w_e * W2[e] (silu(G_e x[t]) * (U_e x[t])),  W13[e] = [G_e; U_e]
/// Tokens are grouped by expert, so each expert's weights are read once per call.
/// out, x:         [num_tokens, hidden] (row strides any, last dim contiguous), one float dtype;
/// router_logits:  [num_tokens, num_experts], x's dtype or float32;
/// w13:            [num_experts, 2 * inter, hidden] contiguous, gate rows then up rows; x's dtype;
/// w2:             [num_experts, hidden, inter] contiguous; x's dtype;
/// top_k:          in [1, num_experts];
/// workspace:      at least fused_moe_workspace_size(...) bytes of scratch on x's device (an empty
///                 view on the CPU, where the size is 0).
/// On the CPU the work runs on all OpenMP threads. On the GPU: five launches, no host
/// synchronisation (routing, grouping by expert, one grouped GEMM for every expert's gate-up with
/// SiLU-and-mul fused, one for down, the weighted combine); the gate-up activations are rounded to
/// x's dtype between the two products (the CPU keeps them in fp32). At most 512 experts there.
void fused_moe(TensorView out, TensorView x, TensorView router_logits, TensorView w13, TensorView w2, int64_t top_k,
               bool renormalize, bool fp32_weights, TensorView workspace, Stream stream);

/// Bytes of workspace fused_moe needs for these shapes on `device` (always 0 on the CPU).
int64_t fused_moe_workspace_size(Device device, DType dtype, int64_t num_tokens, int64_t hidden, int64_t inter,
                                 int64_t num_experts, int64_t top_k);

/// Exp(1) noise for seeded sampling (the exponential race argmax(p / E) draws from p):
///   out[r, v] = -log(u),  u in (0, 1) from Philox4x32-10 keyed by seeds[r] at counter
///   (v / 4, offsets[r] low word, offsets[r] high word, 0), word v % 4.
/// Each value depends on (seeds[r], offsets[r], v) alone, on every device.
/// out: [num_rows, vocab] float32, last dim contiguous; seeds, offsets: [num_rows] int64;
/// num_rows <= 65535.
void seeded_exponential(TensorView out, TensorView seeds, TensorView offsets, Stream stream);

}  // namespace tidal::ops
