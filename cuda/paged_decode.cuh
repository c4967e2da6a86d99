// SPDX-License-Identifier: Apache-2.0
// The tensor-core paged-attention kernel for decode in fp16 and bf16 when a KV head serves several
// query heads (GQA groups of 2 and more): the group's rows (one token each) form one m16 tile, so a
// K/V element read from HBM meets every query head of its group in one mma.sync. A block is those
// 16 rows x one KV head x one key split, 4 warps; each key tile of kBlockN = 64 keys goes through a
// ring of kStages shared-memory stages by cp.async, warp w takes the tile's keys [16 w, 16 w + 16)
// with an online softmax of its own, and the warps' states are merged at the end (store_rows).
// With an FP8 cache (C = uint8_t, E4M3 codes) the ring holds the codes, half the bytes, and each
// tile is converted into T in a buffer of its own before the products read it.
// NVIDIA-only (inline PTX): under HIP the SIMT kernel takes every case instead.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/async_copy.cuh"
#include "cuda/mma.cuh"
#include "cuda/paged_attention_simt.cuh"

#if !defined(TIDAL_USE_HIP)

namespace tidal::gpu::attn {

// NOTE(tidal): why tensor cores for a memory-bound kernel. Measured on H200 at batch 64 x context
// 2048 (Llama-3-8B heads, bf16): the SIMT kernel reached 46-52% of the copy ceiling whether its keys
// came straight into registers or through a 4-stage cp.async ring, so HBM was not what bounded it:
// issue was. Per key and KV head it spends ~60 warp instructions (per-row FMAs on 16 lanes, four
// shuffles per row for the dot products, bf16 unpacking); here 16 keys x 16 rows cost 32 mma.sync
// and 12 ldmatrix per warp for head_dim 128, under 3 instructions per key.
template <typename T, typename C, int kHeadDim, int kStages>
struct DecodeTiles {
  static constexpr bool kFp8 = std::is_same_v<C, uint8_t>;
  static constexpr int kBlockM = 16;  // rows: (token, head of the group) pairs
  static constexpr int kBlockN = 64;  // keys per tile, 16 per warp
  static constexpr int kTileElems = kBlockN * kHeadDim;
  static constexpr int kChunkElems = 16 / static_cast<int>(sizeof(C));  // cache elements per 16-byte chunk
  static constexpr int kChunks = kHeadDim / kChunkElems;                // chunks per K (or V) row
  static constexpr int kLoads = kBlockN * kChunks / 128;  // K (and V) rows' chunks per thread per tile
  static constexpr int kRingBytes = 2 * kStages * kTileElems * static_cast<int>(sizeof(C));
  static constexpr int kConvertBytes = kFp8 ? 2 * kTileElems * static_cast<int>(sizeof(T)) : 0;
  static constexpr int kSmemBytes = std::max(kRingBytes + kConvertBytes,
                                             kSimtWarps * kBlockM * kHeadDim * static_cast<int>(sizeof(float)));
};

template <typename T, typename C, int kHeadDim, int kStages, int kMinBlocks = 1>
__global__ void __launch_bounds__(128, kMinBlocks) paged_decode_kernel(PagedParams p) {
  wait_for_prior_grid();  // launched by launch_dependent
  allow_dependents();
  using Tiles = DecodeTiles<T, C, kHeadDim, kStages>;
  constexpr bool kFp8 = Tiles::kFp8;
  constexpr int kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN;
  constexpr int kChunks = Tiles::kChunks;
  constexpr int kDimSteps = kHeadDim / 16;
  extern __shared__ __align__(128) unsigned char smem[];
  // [kStages][K, V][kBlockN, kHeadDim] of C: swizzled T, or FP8 codes row-major
  C* s_kv = reinterpret_cast<C*>(smem);
  using M = OperandType<T, C>;  // what the mma.sync instructions multiply
  M* s_convert = reinterpret_cast<M*>(smem + Tiles::kRingBytes);  // [K, V][kBlockN, kHeadDim], FP8 only
  __shared__ float red_m[kSimtWarps * kBlockM], red_l[kSimtWarps * kBlockM];

  const int kv_head = blockIdx.y % p.num_kv_heads, split = blockIdx.y / p.num_kv_heads;
  RowSpan s;
  if (!row_span<kBlockM>(p, split, s)) return;
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const C* k_cache = static_cast<const C*>(p.key_cache);
  const C* v_cache = static_cast<const C*>(p.value_cache);
  const int32_t* table = p.block_tables + s.seq * p.block_table_stride;
  const int num_rows = s.last_row - s.first_row + 1;
  const int num_tiles = s.end > s.begin ? (s.end - s.begin + kBlockN - 1) / kBlockN : 0;

  // Thread tid moves chunk (n * 128 + tid) % kChunks of row (n * 128 + tid) / kChunks of each K
  // and V tile. The block ids of a tile's rows are read one tile ahead of its request, so the
  // table's latency is spent while the warps work.
  auto lookup = [&](int t, int32_t (&blocks)[Tiles::kLoads]) {
#pragma unroll
    for (int n = 0; n < Tiles::kLoads; ++n) {
      const int j = s.begin + t * kBlockN + (n * 128 + tid) / kChunks;
      blocks[n] = j < s.end ? table[p.block_shift >= 0 ? j >> p.block_shift : j / p.block_size] : -1;
    }
  };
  // Requests tile t into stage t % kStages; keys past the split's end are zero-filled and never
  // read from the cache.
  auto request = [&](int t, const int32_t (&blocks)[Tiles::kLoads]) {
    C* k_dst = s_kv + (t % kStages) * 2 * Tiles::kTileElems;
    C* v_dst = k_dst + Tiles::kTileElems;
#pragma unroll
    for (int n = 0; n < Tiles::kLoads; ++n) {
      const int i = n * 128 + tid, row = i / kChunks, chunk = i % kChunks;
      const int j = s.begin + t * kBlockN + row;
      const int in_block = p.block_shift >= 0 ? j & (p.block_size - 1) : j % p.block_size;
      const int64_t src = blocks[n] >= 0 ? ((static_cast<int64_t>(blocks[n]) * p.block_size + in_block) *
                                                p.num_kv_heads + kv_head) * kHeadDim + chunk * Tiles::kChunkElems
                                         : 0;
      const int dst = kFp8 ? row * kHeadDim + chunk * Tiles::kChunkElems : swizzle<kHeadDim>(row, chunk);
      cp_async_16(shared_address(k_dst + dst), k_cache + src, blocks[n] >= 0);
      cp_async_16(shared_address(v_dst + dst), v_cache + src, blocks[n] >= 0);
    }
  };
  int32_t blocks[Tiles::kLoads];
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < num_tiles) {
      lookup(t, blocks);
      request(t, blocks);
    }
    cp_async_commit();
  }
  lookup(kStages - 1, blocks);

  // Q straight into the A fragments (rows lane / 4 and lane / 4 + 8; zero past the run).
  uint32_t q_frag[kDimSteps][4];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int row = lane / 4 + rr * 8;
    const bool valid = row < num_rows;
    const int flat = s.first_row + (valid ? row : 0);
    const T* q_row = static_cast<const T*>(p.query) + (s.q_begin + flat / s.group) * p.q_token_stride +
                     (kv_head * s.group + flat % s.group) * p.q_head_stride + (lane % 4) * 2;
#pragma unroll
    for (int kk = 0; kk < kDimSteps; ++kk) {
      q_frag[kk][rr] = valid ? as_operand<T, M>(*reinterpret_cast<const uint32_t*>(q_row + kk * 16)) : 0u;
      q_frag[kk][rr + 2] = valid ? as_operand<T, M>(*reinterpret_cast<const uint32_t*>(q_row + kk * 16 + 8)) : 0u;
    }
  }
  int pos[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int row = lane / 4 + rr * 8;
    pos[rr] = row < num_rows ? s.first_pos + (s.first_row + row) / s.group : -1;
  }
  const int window = p.sliding_window;
  float o[kHeadDim / 8][4];
#pragma unroll
  for (int dt = 0; dt < kHeadDim / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

  for (int t = 0; t < num_tiles; ++t) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile t is in; every warp is done with the stage tile t + kStages - 1 reuses
    if (t + kStages - 1 < num_tiles) request(t + kStages - 1, blocks);
    cp_async_commit();
    if (t + kStages < num_tiles) lookup(t + kStages, blocks);
    const M* k_tile;
    if constexpr (kFp8) {
      const C* codes = s_kv + (t % kStages) * 2 * Tiles::kTileElems;
      convert_fp8_tile<kHeadDim, kBlockN>(codes, s_convert, tid);
      convert_fp8_tile<kHeadDim, kBlockN>(codes + Tiles::kTileElems, s_convert + Tiles::kTileElems, tid);
      __syncthreads();  // the converted tile is whole; the barrier above kept it from the last tile's readers
      k_tile = s_convert;
    } else {
      k_tile = reinterpret_cast<const M*>(s_kv) + (t % kStages) * 2 * Tiles::kTileElems;
    }
    const M* v_tile = k_tile + Tiles::kTileElems;
    // S = Q K^T for the warp's 16 keys: two n8 tiles.
    float sc[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < kDimSteps; ++kk) {
      uint32_t b[4];
      ldmatrix_x4(b, shared_address(k_tile + swizzle<kHeadDim>(warp * 16 + (lane & 7) + ((lane >> 4) << 3),
                                                                kk * 2 + ((lane >> 3) & 1))));
      mma_16816<M>(sc[0], q_frag[kk], b[0], b[1]);
      mma_16816<M>(sc[1], q_frag[kk], b[2], b[3]);
    }
    const int n0 = s.begin + t * kBlockN + warp * 16;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int j = n0 + nt * 8 + (lane % 4) * 2 + (i & 1);
        const int row_pos = pos[i / 2];
        const bool visible = j < s.end && j <= row_pos && (window <= 0 || j > row_pos - window);
        sc[nt][i] = visible ? sc[nt][i] * p.scale_log2 : -INFINITY;
      }
    }
    online_softmax_step(sc, m, l, o);  // this lane's columns of l: the quad is summed at the end
    // O += P V over the warp's 16 keys.
    const uint32_t a[4] = {pack2<M>(sc[0][0], sc[0][1]), pack2<M>(sc[0][2], sc[0][3]), pack2<M>(sc[1][0], sc[1][1]),
                           pack2<M>(sc[1][2], sc[1][3])};
#pragma unroll
    for (int dp = 0; dp < kHeadDim / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, shared_address(v_tile + swizzle<kHeadDim>(warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                                                      dp * 2 + (lane >> 4))));
      mma_16816<M>(o[2 * dp], a, b[0], b[1]);
      mma_16816<M>(o[2 * dp + 1], a, b[2], b[3]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the stages become the warps' merge scratch

  float* red_acc = reinterpret_cast<float*>(smem);  // [kSimtWarps][kBlockM][kHeadDim]
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    l[rr] += __shfl_xor_sync(0xffffffffu, l[rr], 1);
    l[rr] += __shfl_xor_sync(0xffffffffu, l[rr], 2);
    const int row = lane / 4 + rr * 8;
    float* dst = red_acc + (warp * kBlockM + row) * kHeadDim + (lane % 4) * 2;
#pragma unroll
    for (int dt = 0; dt < kHeadDim / 8; ++dt) {
      dst[dt * 8] = o[dt][2 * rr];
      dst[dt * 8 + 1] = o[dt][2 * rr + 1];
    }
    if (lane % 4 == 0) {
      red_m[warp * kBlockM + row] = m[rr];
      red_l[warp * kBlockM + row] = l[rr];
    }
  }
  __syncthreads();
  store_rows<T, kBlockM, kHeadDim>(p, s, kv_head, split, red_acc, red_m, red_l);
}

template <typename T, typename C, int kHeadDim, int kStages, int kMinBlocks = 1>
void launch_decode_tile(const PagedParams& p, const Plan& plan, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.row_blocks), static_cast<unsigned>(p.num_kv_heads * plan.num_splits),
                  static_cast<unsigned>(p.num_seqs));
  launch_with_smem(paged_decode_kernel<T, C, kHeadDim, kStages, kMinBlocks>, grid,
                   DecodeTiles<T, C, kHeadDim, kStages>::kSmemBytes, stream, p);
}

// NOTE(tidal): a stage is 2 x 64 keys x head_dim x 2 bytes (32 KB for head_dim 128). Measured on
// H200 (bench/bench_attention.py, bf16, head_dim 128): two stages with three blocks per SM (64 KB
// each, registers capped at 168) reached 75% / 95% / 83% of the copy ceiling at batch 64 x 2048,
// 64 x 8192 and 256 x 1024; three stages at two blocks per SM 72-76% / 89% / 82%; four and five
// stages at one block per SM 41-48%: more warps to hide the per-tile latency beat deeper
// prefetch. head_dim 64 takes four 16 KB stages, head_dim 256 two 64 KB ones. An FP8 cache (C =
// uint8_t) keeps the stage counts: its ring is half the bytes plus one converted tile, no larger.
template <typename T, typename C = T>
void launch_decode(const PagedParams& p, const Plan& plan, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: launch_decode_tile<T, C, 64, 4, 3>(p, plan, stream); break;
    case 128: launch_decode_tile<T, C, 128, 2, 3>(p, plan, stream); break;
    case 256: launch_decode_tile<T, C, 256, 2>(p, plan, stream); break;
    default: TIDAL_THROW_(Error, "paged_attention: no tensor-core decode kernel for head_dim=", p.head_dim);
  }
}

}  // namespace tidal::gpu::attn

#endif  // !TIDAL_USE_HIP
