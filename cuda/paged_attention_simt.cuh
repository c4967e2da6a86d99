// SPDX-License-Identifier: Apache-2.0
// The SIMT paged-attention kernel: decode (one query token, every head of the KV group in one
// block), and the fallback for every case the tensor-core kernel does not take (fp32, odd head
// sizes, HIP). Flash-decoding: a block's key range may be one of num_splits slices, merged by the
// split reduction. Included by one translation unit per dtype (paged_attention_simt_*.cu).
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/paged_attention.cuh"

namespace tidal::gpu::attn {

// NOTE(tidal): napkin math, decode at batch 64 x context 2048, Llama-3-8B heads (8 KV heads of
// 128, bf16): K and V are 64 x 2048 x 8 x 256 B x 2 = 537 MB per layer; at the 4.2 TB/s copy
// ceiling 128 us. Mapping: kLanes lanes own one key (16 bytes each: 16 lanes for head_dim 128 in
// bf16), so a warp covers 32 / kLanes keys per step and kUnroll steps' K and V loads are issued
// before the first use (8 x 16 B per lane in flight). Each lane keeps the query rows' slices and
// accumulators for its 8 dims in registers; the online softmax runs per lane group and is merged
// across groups (shuffles), warps (shared memory) and splits (the reduction kernel) at the end.
inline constexpr int kSimtWarps = kSimtThreads / kWarpSize;
inline constexpr int kMaxHeadDim = 256;

template <typename T, int kVec>
__device__ __forceinline__ Vec<T, kVec> zero_vec() {
  Vec<T, kVec> z;
#pragma unroll
  for (int j = 0; j < kVec; ++j) z.v[j] = from_float<T>(0.0f);
  return z;
}

// kVec elements per access (16 bytes, or 1 for unaligned head sizes), kLanes lanes per key,
// kChunks accesses per lane per key, kRows query rows per block, kUnroll keys per lane group in flight.
// NOTE(tidal): measured on H200 (bench/bench_attention.py, batch 64-256, bf16, head_dim 128, 30 or
// more repeats): this pipeline (block id read from the table, then one register buffer of K/V per
// step) reached 43-49% of the copy ceiling; staging the block ids in shared memory 27-33%; that
// plus two register buffers (next step's loads in flight, 151-220 registers) 28%; 8 keys per lane
// group in flight 39%, 2 keys 40%. See bench/RESULTS.md.
template <typename T, int kVec, int kLanes, int kChunks, int kRows, int kUnroll>
__global__ void __launch_bounds__(kSimtThreads) paged_attention_simt_kernel(PagedParams p) {
  constexpr int kGroups = kWarpSize / kLanes;  // keys per warp per step
  constexpr int kElems = kVec * kChunks;       // dims per lane
  constexpr int kPadDim = kLanes * kElems;     // >= head_dim
  constexpr int kStep = kUnroll * kGroups;     // keys per warp per step
  __shared__ float red_acc[kSimtWarps][kRows][kPadDim];
  __shared__ float red_m[kSimtWarps][kRows];
  __shared__ float red_l[kSimtWarps][kRows];

  const int seq = blockIdx.z;
  const int kv_head = blockIdx.y % p.num_kv_heads, split = blockIdx.y / p.num_kv_heads;
  const int q_begin = p.cu_seqlens_q[seq];
  const int q_len = p.cu_seqlens_q[seq + 1] - q_begin;
  const int group = p.num_heads / p.num_kv_heads;
  const int first_row = blockIdx.x * kRows;
  if (first_row >= q_len * group) return;  // past this sequence's rows (the grid fits the longest)
  const int last_row = min(first_row + kRows, q_len * group) - 1;
  const int seq_len = p.seq_lens[seq];
  const int first_pos = seq_len - q_len;  // position of the sequence's first query token
  const int min_pos = first_pos + first_row / group, max_pos = first_pos + last_row / group;
  const int window = p.sliding_window;
  const int lo = window > 0 ? max(0, min_pos - window + 1) : 0;
  const int per_split = (max_pos + 1 - lo + p.num_splits - 1) / p.num_splits;
  const int begin = lo + split * per_split;
  const int end = min(max_pos + 1, begin + per_split);

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int sub = lane % kLanes, grp = lane / kLanes;
  const int head_dim = p.head_dim;

  float q[kRows][kElems];
  int row_pos[kRows];  // -1 for rows past the run: such a row sees no key
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int flat = first_row + r;
    const bool valid = flat <= last_row;
    row_pos[r] = valid ? first_pos + flat / group : -1;
    const T* q_row = static_cast<const T*>(p.query) + (q_begin + (valid ? flat / group : 0)) * p.q_token_stride +
                     (kv_head * group + (valid ? flat % group : 0)) * p.q_head_stride;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const int e = (c * kLanes + sub) * kVec + j;
        q[r][c * kVec + j] = valid && e < head_dim ? to_float(q_row[e]) * p.scale_log2 : 0.0f;
      }
    }
  }

  float m[kRows], l[kRows], acc[kRows][kElems];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < kElems; ++e) acc[r][e] = 0.0f;
  }

  const int32_t* table = p.block_tables + seq * p.block_table_stride;
  const T* k_cache = static_cast<const T*>(p.key_cache);
  const T* v_cache = static_cast<const T*>(p.value_cache);
  const int num_kv_heads = p.num_kv_heads, block_size = p.block_size;

  using Frags = Vec<T, kVec>[kUnroll][kChunks];
  // Issues the K and V loads of the kUnroll keys of step `base` (zeros past `end` and past head_dim).
  auto load = [&](int base, Frags& kf, Frags& vf) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = base + u * kGroups + grp;
      int64_t offset = -1;
      if (j < end) {
        const int64_t block = table[j / block_size];
        offset = ((block * block_size + j % block_size) * num_kv_heads + kv_head) * head_dim;
      }
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int e = (c * kLanes + sub) * kVec;
        if (offset >= 0 && e < head_dim) {
          kf[u][c] = load_vec<T, kVec>(k_cache + offset + e);
          vf[u][c] = load_vec<T, kVec>(v_cache + offset + e);
        } else {
          kf[u][c] = zero_vec<T, kVec>();
          vf[u][c] = zero_vec<T, kVec>();
        }
      }
    }
  };
  // Scores, the online-softmax update and the accumulation of the keys of step `base`.
  auto consume = [&](int base, const Frags& kf, const Frags& vf) {
    float s[kUnroll][kRows];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = base + u * kGroups + grp;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) dot += q[r][c * kVec + k] * element_to_float(kf[u][c], k);
        }
#pragma unroll
        for (int off = kLanes / 2; off > 0; off /= 2) dot += TIDAL_SHFL_XOR(dot, off);
        const bool visible = j < end && j <= row_pos[r] && (window <= 0 || j > row_pos[r] - window);
        s[u][r] = visible ? dot : -INFINITY;
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float mx = m[r];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) mx = fmaxf(mx, s[u][r]);
      const float safe = mx == -INFINITY ? 0.0f : mx;
      const float alpha = exp2f(m[r] - safe);
      l[r] *= alpha;
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[r][e] *= alpha;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float pr = exp2f(s[u][r] - safe);
        l[r] += pr;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) acc[r][c * kVec + k] += pr * element_to_float(vf[u][c], k);
        }
      }
      m[r] = mx;
    }
  };
  for (int base = begin + warp * kStep; base < end; base += kSimtWarps * kStep) {
    Frags kf, vf;
    load(base, kf, vf);
    consume(base, kf, vf);
  }

  // Merge the lane groups of the warp (each saw different keys), then the warps.
#pragma unroll
  for (int off = kLanes; off < kWarpSize; off *= 2) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float m_other = TIDAL_SHFL_XOR(m[r], off), l_other = TIDAL_SHFL_XOR(l[r], off);
      const MergeScales sc = merge_state(m[r], l[r], m_other, l_other);
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[r][e] = acc[r][e] * sc.self + TIDAL_SHFL_XOR(acc[r][e], off) * sc.other;
    }
  }
  if (lane < kLanes) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) red_acc[warp][r][(c * kLanes + lane) * kVec + k] = acc[r][c * kVec + k];
      }
      if (lane == 0) {
        red_m[warp][r] = m[r];
        red_l[warp][r] = l[r];
      }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kRows * kPadDim; idx += kSimtThreads) {
    const int r = idx / kPadDim, e = idx % kPadDim;
    const int flat = first_row + r;
    if (flat > last_row || e >= head_dim) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kSimtWarps; ++w) mx = fmaxf(mx, red_m[w][r]);
    const float safe = mx == -INFINITY ? 0.0f : mx;
    float num = 0.0f, den = 0.0f;
#pragma unroll
    for (int w = 0; w < kSimtWarps; ++w) {
      const float scale = exp2f(red_m[w][r] - safe);
      num += red_acc[w][r][e] * scale;
      den += red_l[w][r] * scale;
    }
    const int64_t token = q_begin + flat / group;
    const int head = kv_head * group + flat % group;
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + token * p.out_token_stride + head * p.out_head_stride;
      out[e] = from_float<T>(den > 0.0f ? num / den : 0.0f);
    } else {
      const int64_t slot = (token * p.num_heads + head) * p.num_splits + split;
      p.split_acc[slot * head_dim + e] = num;
      if (e == 0) {
        p.split_ml[slot * 2] = mx;
        p.split_ml[slot * 2 + 1] = den;
      }
    }
  }
}

// Picks the lane layout for head_dim (16-byte accesses when head_dim allows, else one element per
// access) and the row count, and launches.
template <typename T>
void launch_simt(const PagedParams& p, const Plan& plan, bool vectorized, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>(plan.row_blocks), static_cast<unsigned>(p.num_kv_heads * plan.num_splits),
                  static_cast<unsigned>(p.num_seqs));
  auto go = [&](auto kernel) {
    kernel<<<grid, kSimtThreads, 0, stream>>>(p);
    TIDAL_CUDA_CHECK(cudaGetLastError());
  };
  auto by_rows = [&](auto vec, auto lanes, auto chunks) {
    constexpr int V = decltype(vec)::value, L = decltype(lanes)::value, C = decltype(chunks)::value;
    switch (plan.rows_per_block) {
      case 2: go(paged_attention_simt_kernel<T, V, L, C, 2, 4>); break;
      case 4: go(paged_attention_simt_kernel<T, V, L, C, 4, 4>); break;
      default: go(paged_attention_simt_kernel<T, V, L, C, 8, 2>); break;
    }
  };
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I8 = std::integral_constant<int, 8>;
  using IV = std::integral_constant<int, kVec>;
  if (!vectorized) {
    by_rows(I1{}, std::integral_constant<int, kWarpSize>{}, I8{});
    return;
  }
  const int accesses = (p.head_dim + kVec - 1) / kVec;
  if (accesses <= 4) {
    by_rows(IV{}, std::integral_constant<int, 4>{}, I1{});
  } else if (accesses <= 8) {
    by_rows(IV{}, std::integral_constant<int, 8>{}, I1{});
  } else if (accesses <= 16) {
    by_rows(IV{}, std::integral_constant<int, 16>{}, I1{});
  } else if (accesses <= kWarpSize) {
    by_rows(IV{}, std::integral_constant<int, kWarpSize>{}, I1{});
  } else if constexpr (kMaxHeadDim / kVec > kWarpSize) {  // fp32 head_dim > 128 (CUDA)
    by_rows(IV{}, std::integral_constant<int, kWarpSize>{}, I2{});
  }
}

}  // namespace tidal::gpu::attn
