// SPDX-License-Identifier: Apache-2.0
// The public ops of the paged-KV serving path: the gated activation, rotary position embedding,
// the KV-cache write and paged attention. Same conventions as tidal/ops.h: destination-passing
// (the caller allocates every output), validated once, dispatched by device. CPU kernels only for
// now: GPU tensors are a tidal::Error that says so.
#pragma once

#include <cstdint>

#include "tidal/stream.h"
#include "tidal/tensor_view.h"

namespace tidal::ops {

/// The gated activation of Llama-family MLPs:
///   out[t, i] = silu(x[t, i]) * x[t, d + i],   silu(g) = g / (1 + exp(-g)),   i < d
/// computed in fp32 and rounded once to the dtype.
/// x:   [num_tokens, 2 * d], gate half first; out: [num_tokens, d]. Last dims contiguous, any row
///      stride; same dtype (float32, float16 or bfloat16) and device; out must not overlap x.
void silu_and_mul(TensorView out, TensorView x, Stream stream);

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

/// Writes this step's keys and values into the paged KV cache:
///   key_cache[slot / block_size, slot % block_size] = key[t],   slot = slot_mapping[t]
/// and the same for value. A negative slot (padding) is skipped; a slot >= num_blocks * block_size
/// is std::out_of_range naming the token and the slot, raised before anything is written. Two
/// tokens with one slot: the later one wins.
/// key, value:               [num_tokens, num_kv_heads, head_dim], any token and head strides,
///                           last dim contiguous.
/// key_cache, value_cache:   [num_blocks, block_size, num_kv_heads, head_dim], contiguous, the
///                           dtype of key.
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
///                           num_heads % num_kv_heads == 0.
/// block_tables:             [num_seqs, max_num_blocks] int32, entries in [0, num_blocks) as far
///                           as each sequence reads.
/// seq_lens:                 [num_seqs] int32, context length including this step's tokens;
///                           q_len(s) <= seq_lens[s] <= max_num_blocks * block_size.
/// cu_seqlens_q:             [num_seqs + 1] int32, first 0, non-decreasing, last num_tokens.
/// scale:                    finite, usually 1 / sqrt(head_dim).
/// Runs on all OpenMP threads when the batch is large enough.
void paged_attention(TensorView out, TensorView query, TensorView key_cache, TensorView value_cache,
                     TensorView block_tables, TensorView seq_lens, TensorView cu_seqlens_q, float scale,
                     int64_t sliding_window, Stream stream);

}  // namespace tidal::ops
