// SPDX-License-Identifier: Apache-2.0
// The tensor-core paged-attention kernel for prefill, chunked prefill and mixed batches in fp16 and
// bf16: FlashAttention-2 style (mma.sync m16n8k16 with fp32 accumulators, the online softmax in
// registers, P fed back to the second product from the accumulators), with K and V tiles gathered
// through the block table by cp.async into swizzled shared memory, double-buffered. A block is 64
// query rows ((token, head of the KV group) pairs of one sequence) x one KV head, 4 warps of 16
// rows. With an FP8 cache (C = uint8_t, E4M3 codes) the double buffer holds the codes, and each
// tile is converted into T in a buffer of its own before the products read it.
// NVIDIA-only (inline PTX): under HIP the SIMT kernel takes every case instead.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/async_copy.cuh"
#include "cuda/mma.cuh"
#include "cuda/paged_attention.cuh"

#if !defined(TIDAL_USE_HIP)

namespace tidal::gpu::attn {

// NOTE(tidal): napkin math, S3's prefill (500 prompts of 202 tokens, Llama-3-8B): attention is
// 4 * 202^2 / 2 * 4096 * 32 layers ~ 11 GFLOP per prompt against ~3.2 TFLOP of projections for
// all 500, so this kernel needs to be reasonable, not heroic: mma.sync at well under the wgmma
// peak is enough. A 64-key tile of K and V for head_dim 128 in bf16 is 32 KB; Q (16 KB) + two
// stages of K and V (64 KB) = 80 KB of shared memory: two blocks per SM.

// Shared memory: Q, the K and V double buffers of C, and for an FP8 cache one converted K and V tile.
template <typename T, typename C, int kHeadDim, int kBlockN, int kWarps>
constexpr int prefill_smem_bytes() {
  const int converted = std::is_same_v<C, uint8_t> ? 2 * kBlockN * kHeadDim * static_cast<int>(sizeof(T)) : 0;
  return 16 * kWarps * kHeadDim * static_cast<int>(sizeof(T)) +
         4 * kBlockN * kHeadDim * static_cast<int>(sizeof(C)) + converted;
}

// kWarps warps of 16 query rows each: kBlockM = 16 kWarps rows a block.
template <typename T, typename C, int kHeadDim, int kBlockN, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) paged_prefill_kernel(PagedParams p) {
  wait_for_prior_grid();  // launched by launch_dependent
  allow_dependents();
  constexpr bool kFp8 = std::is_same_v<C, uint8_t>;
  constexpr int kBlockM = 16 * kWarps, kThreads = 32 * kWarps;
  constexpr int kChunks = kHeadDim / 8;   // 16-byte chunks of T per row
  constexpr int kChunkElems = 16 / static_cast<int>(sizeof(C));  // cache elements per 16-byte chunk
  constexpr int kCacheChunks = kHeadDim / kChunkElems;            // and such chunks per K (or V) row
  constexpr int kDimSteps = kHeadDim / 16;
  constexpr int kKeyTiles = kBlockN / 8;  // n8 tiles of S
  constexpr bool kQInRegisters = kHeadDim <= 128;
  extern __shared__ __align__(128) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);                          // [kBlockM, kHeadDim]
  C* s_k = reinterpret_cast<C*>(s_q + kBlockM * kHeadDim);      // [2, kBlockN, kHeadDim]
  C* s_v = s_k + 2 * kBlockN * kHeadDim;                        // [2, kBlockN, kHeadDim]
  using M = OperandType<T, C>;  // what the mma.sync instructions multiply
  M* s_convert = reinterpret_cast<M*>(s_v + 2 * kBlockN * kHeadDim);  // [K, V][kBlockN, kHeadDim], FP8 only

  const int seq = block_seq(p), kv_head = blockIdx.y;
  const int q_begin = p.cu_seqlens_q[seq];
  const int q_len = p.cu_seqlens_q[seq + 1] - q_begin;
  const int group = p.num_heads / p.num_kv_heads;
  // NOTE(tidal): the row blocks of a (sequence, KV head) run last-first: under the causal mask a
  // block's keys grow with its rows, so the longest blocks start in the first wave and the short
  // ones fill the tail.
  const int first_row = (gridDim.x - 1 - blockIdx.x) * kBlockM;
  if (first_row >= q_len * group) return;
  const int num_rows = min(kBlockM, q_len * group - first_row);
  const int seq_len = p.seq_lens[seq];
  const int first_pos = seq_len - q_len;
  const int min_pos = first_pos + first_row / group;
  const int max_pos = first_pos + (first_row + num_rows - 1) / group;
  const int window = p.sliding_window;
  const int kv_lo = window > 0 ? max(0, min_pos - window + 1) : 0;
  const int kv_hi = max_pos + 1;
  const int tile_lo = kv_lo / kBlockN, tile_hi = (kv_hi + kBlockN - 1) / kBlockN;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const T* query = static_cast<const T*>(p.query);
  const C* k_cache = static_cast<const C*>(p.key_cache);
  const C* v_cache = static_cast<const C*>(p.value_cache);
  const int32_t* table = p.block_tables + seq * p.block_table_stride;

  for (int i = tid; i < kBlockM * kChunks; i += kThreads) {
    const int row = i / kChunks, chunk = i % kChunks;
    const bool valid = row < num_rows;
    const int flat = first_row + row;
    const T* src = valid ? query + (q_begin + flat / group) * p.q_token_stride +
                               (kv_head * group + flat % group) * p.q_head_stride + chunk * 8
                         : query;
    cp_async_16(shared_address(s_q + swizzle<kHeadDim>(row, chunk)), src, valid);
  }
  auto load_kv = [&](int tile, int buf) {
    const int n0 = tile * kBlockN;
    for (int i = tid; i < kBlockN * kCacheChunks; i += kThreads) {
      const int row = i / kCacheChunks, chunk = i % kCacheChunks, j = n0 + row;
      const bool valid = j >= kv_lo && j < kv_hi;  // blocks outside [kv_lo, kv_hi) are never read
      int64_t offset = 0;
      if (valid) {
        const bool shift = p.block_shift >= 0;
        const int64_t block = table[shift ? j >> p.block_shift : j / p.block_size];
        const int in_block = shift ? j & (p.block_size - 1) : j % p.block_size;
        offset = ((block * p.block_size + in_block) * p.num_kv_heads + kv_head) * kHeadDim + chunk * kChunkElems;
      }
      const int dst = buf * kBlockN * kHeadDim +
                      (kFp8 ? row * kHeadDim + chunk * kChunkElems : swizzle<kHeadDim>(row, chunk));
      cp_async_16(shared_address(s_k + dst), k_cache + offset, valid);
      cp_async_16(shared_address(s_v + dst), v_cache + offset, valid);
    }
  };
  load_kv(tile_lo, 0);
  cp_async_commit();

  // This lane's two rows of the warp's 16: r and r + 8.
  const int row0 = warp * 16 + lane / 4;
  int pos[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int row = row0 + rr * 8;
    pos[rr] = row < num_rows ? first_pos + (first_row + row) / group : -1;
  }
  const bool warp_active = warp * 16 < num_rows;

  uint32_t q_frag[kQInRegisters ? kDimSteps : 1][4];
  float o[kHeadDim / 8][4];
#pragma unroll
  for (int dt = 0; dt < kHeadDim / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

  for (int tile = tile_lo; tile < tile_hi; ++tile) {
    const int buf = (tile - tile_lo) & 1;
    if (tile + 1 < tile_hi) {
      load_kv(tile + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const M* k_tile;
    const M* v_tile;
    if constexpr (kFp8) {
      convert_fp8_tile<kHeadDim, kBlockN, kThreads>(s_k + buf * kBlockN * kHeadDim, s_convert, tid);
      convert_fp8_tile<kHeadDim, kBlockN, kThreads>(s_v + buf * kBlockN * kHeadDim, s_convert + kBlockN * kHeadDim,
                                                    tid);
      __syncthreads();  // the converted tiles are whole (the barrier closing the last tile kept their readers)
      k_tile = s_convert;
      v_tile = s_convert + kBlockN * kHeadDim;
    } else {
      k_tile = reinterpret_cast<const M*>(s_k) + buf * kBlockN * kHeadDim;
      v_tile = reinterpret_cast<const M*>(s_v) + buf * kBlockN * kHeadDim;
    }
    if (warp_active) {
      if (kQInRegisters && tile == tile_lo) {
#pragma unroll
        for (int kk = 0; kk < kDimSteps; ++kk) {
          uint32_t(&q)[4] = q_frag[kQInRegisters ? kk : 0];
          ldmatrix_x4(q, shared_address(s_q + swizzle<kHeadDim>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4))));
#pragma unroll
          for (int i = 0; i < 4; ++i) q[i] = as_operand<T, M>(q[i]);
        }
      }
      float s[kKeyTiles][4];
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < kDimSteps; ++kk) {
        uint32_t a_reload[4];
        if constexpr (!kQInRegisters) {
          ldmatrix_x4(a_reload, shared_address(s_q + swizzle<kHeadDim>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4))));
#pragma unroll
          for (int i = 0; i < 4; ++i) a_reload[i] = as_operand<T, M>(a_reload[i]);
        }
        const uint32_t(&a)[4] = kQInRegisters ? q_frag[kQInRegisters ? kk : 0] : a_reload;
#pragma unroll
        for (int nb = 0; nb < kBlockN / 16; ++nb) {
          uint32_t b[4];
          ldmatrix_x4(b, shared_address(k_tile + swizzle<kHeadDim>(nb * 16 + (lane & 7) + ((lane >> 4) << 3),
                                                                    kk * 2 + ((lane >> 3) & 1))));
          mma_16816<M>(s[2 * nb], a, b[0], b[1]);
          mma_16816<M>(s[2 * nb + 1], a, b[2], b[3]);
        }
      }
      const int n0 = tile * kBlockN;
      const bool needs_mask = n0 + kBlockN - 1 > min_pos || (window > 0 && n0 <= max_pos - window);
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int j = n0 + nt * 8 + (lane % 4) * 2 + (i & 1);
          const int row_pos = pos[i / 2];
          const bool visible = !needs_mask || (j <= row_pos && (window <= 0 || j > row_pos - window));
          s[nt][i] = visible ? s[nt][i] * p.scale_log2 : -INFINITY;
        }
      }
      online_softmax_step(s, m, l, o);  // this lane's columns of l: the quad is summed at the end
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        const uint32_t a[4] = {pack2<M>(s[2 * kk][0], s[2 * kk][1]), pack2<M>(s[2 * kk][2], s[2 * kk][3]),
                               pack2<M>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                               pack2<M>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < kHeadDim / 16; ++dp) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, shared_address(v_tile + swizzle<kHeadDim>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                                                          dp * 2 + (lane >> 4))));
          mma_16816<M>(o[2 * dp], a, b[0], b[1]);
          mma_16816<M>(o[2 * dp + 1], a, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // the buffer read here is the next iteration's load target
  }

#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    l[rr] += __shfl_xor_sync(0xffffffffu, l[rr], 1);
    l[rr] += __shfl_xor_sync(0xffffffffu, l[rr], 2);
    const int row = row0 + rr * 8;
    if (row >= num_rows) continue;
    const int flat = first_row + row;
    T* out = static_cast<T*>(p.out) + (q_begin + flat / group) * p.out_token_stride +
             (kv_head * group + flat % group) * p.out_head_stride;
    const float inv = l[rr] > 0.0f ? 1.0f / l[rr] : 0.0f;
#pragma unroll
    for (int dt = 0; dt < kHeadDim / 8; ++dt) {
      const uint32_t word = pack2<T>(o[dt][2 * rr] * inv, o[dt][2 * rr + 1] * inv);
      memcpy(out + dt * 8 + (lane % 4) * 2, &word, sizeof(word));
    }
  }
}

template <typename T, typename C, int kHeadDim, int kBlockN>
void launch_prefill_tile(const PagedParams& p, const Plan& plan, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.row_blocks), static_cast<unsigned>(p.num_kv_heads),
                  static_cast<unsigned>(p.num_seqs));
  if (plan.rows_per_block == 128) {
    launch_with_smem(paged_prefill_kernel<T, C, kHeadDim, kBlockN, 8>, grid,
                     prefill_smem_bytes<T, C, kHeadDim, kBlockN, 8>(), stream, p, 256);
  } else {
    launch_with_smem(paged_prefill_kernel<T, C, kHeadDim, kBlockN, 4>, grid,
                     prefill_smem_bytes<T, C, kHeadDim, kBlockN, 4>(), stream, p, 128);
  }
}

template <typename T, typename C = T>
void launch_prefill(const PagedParams& p, const Plan& plan, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: launch_prefill_tile<T, C, 64, 64>(p, plan, stream); break;
    case 128: launch_prefill_tile<T, C, 128, 64>(p, plan, stream); break;
    case 256: launch_prefill_tile<T, C, 256, 32>(p, plan, stream); break;
    default: TIDAL_THROW_(Error, "paged_attention: no tensor-core kernel for head_dim=", p.head_dim);
  }
}

}  // namespace tidal::gpu::attn

#endif  // !TIDAL_USE_HIP
