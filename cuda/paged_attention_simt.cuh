// SPDX-License-Identifier: Apache-2.0
// The paged-attention kernels without tensor cores: decode (one query token, every head of the KV
// group in one block), and the fallback for every case the tensor-core kernel does not take (fp32,
// odd head sizes, HIP). Two ways to feed them, one arithmetic:
//   - pipelined (CUDA, 16-byte rows): K/V tiles gathered through the block table by cp.async into
//     a ring of shared-memory stages, several tiles in flight while the warps work on the oldest;
//   - direct (HIP, unaligned head sizes): each lane loads its keys into registers.
// Flash-decoding: a block's key range may be one of num_splits slices, merged by the split
// reduction. Included by one translation unit per dtype (paged_attention_simt_*.cu).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/async_copy.cuh"
#include "cuda/paged_attention.cuh"

namespace tidal::gpu::attn {

// NOTE(tidal): napkin math, decode at batch 64 x context 2048, Llama-3-8B heads (8 KV heads of
// 128, bf16): K and V are 64 x 2048 x 8 x 256 B x 2 = 537 MB per layer; at the 4.2 TB/s copy
// ceiling 128 us. Mapping: kLanes lanes own one key (16 bytes each: 16 lanes for head_dim 128 in
// bf16), so a warp covers 32 / kLanes keys per pass and kUnroll passes' keys are scored together.
// Each lane keeps the query rows' slices and accumulators for its dims in registers; the online
// softmax runs per lane group and is merged across groups (shuffles), warps (shared memory) and
// splits (the reduction kernel) at the end. To keep HBM busy, an SM needs bandwidth x latency
// (~4.8 TB/s x ~1 us / 132 SMs ~ 36 KB) in flight at all times: the direct kernel holds at most
// 8 x 16 B per lane, and only between a step's loads and its use; the pipelined kernel keeps
// kStages - 1 tiles (48 KB for head_dim 128) in flight per block without spending a register.
inline constexpr int kSimtWarps = kSimtThreads / kWarpSize;
inline constexpr int kMaxHeadDim = 256;

template <typename T, int kVec>
__device__ __forceinline__ Vec<T, kVec> zero_vec() {
  Vec<T, kVec> z;
#pragma unroll
  for (int j = 0; j < kVec; ++j) z.v[j] = from_float<T>(0.0f);
  return z;
}

// The query rows of one block and the keys of its split. Rows are (token, head of the group)
// pairs of one sequence, flattened token-major.
struct RowSpan {
  int seq;        // the sequence (block_seq)
  int q_begin;    // the sequence's first query token
  int first_row;  // this block's first flat row
  int last_row;   // and last
  int group;      // query heads per KV head
  int first_pos;  // position of the sequence's first query token
  int begin, end;  // keys [begin, end) of this split
};

// False when the block has no rows (the grid fits the longest sequence).
template <int kRows>
__device__ __forceinline__ bool row_span(const PagedParams& p, int split, RowSpan& s) {
  const int seq = block_seq(p);
  s.seq = seq;
  s.q_begin = p.cu_seqlens_q[seq];
  const int q_len = p.cu_seqlens_q[seq + 1] - s.q_begin;
  s.group = p.num_heads / p.num_kv_heads;
  s.first_row = blockIdx.x * kRows;
  if (s.first_row >= q_len * s.group) return false;
  s.last_row = min(s.first_row + kRows, q_len * s.group) - 1;
  s.first_pos = p.seq_lens[seq] - q_len;
  const int min_pos = s.first_pos + s.first_row / s.group, max_pos = s.first_pos + s.last_row / s.group;
  const int lo = p.sliding_window > 0 ? max(0, min_pos - p.sliding_window + 1) : 0;
  const int per_split = (max_pos + 1 - lo + p.num_splits - 1) / p.num_splits;
  s.begin = lo + split * per_split;
  s.end = min(max_pos + 1, s.begin + per_split);
  return true;
}

// The lane's slice of every query row, pre-scaled into base 2, and each row's position (-1 for
// rows past the run: such a row sees no key).
template <typename T, int kVec, int kLanes, int kChunks, int kRows>
__device__ __forceinline__ void load_query(const PagedParams& p, const RowSpan& s, int kv_head, int sub,
                                           float (&q)[kRows][kVec * kChunks], int (&row_pos)[kRows]) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int flat = s.first_row + r;
    const bool valid = flat <= s.last_row;
    row_pos[r] = valid ? s.first_pos + flat / s.group : -1;
    const T* q_row = static_cast<const T*>(p.query) + (s.q_begin + (valid ? flat / s.group : 0)) * p.q_token_stride +
                     (kv_head * s.group + (valid ? flat % s.group : 0)) * p.q_head_stride;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const int e = (c * kLanes + sub) * kVec + j;
        q[r][c * kVec + j] = valid && e < p.head_dim ? to_float(q_row[e]) * p.scale_log2 : 0.0f;
      }
    }
  }
}

// load_query, and each row's online-softmax state before its first key (max -inf, sum and
// accumulators 0).
template <typename T, int kVec, int kLanes, int kChunks, int kRows>
__device__ __forceinline__ void start_rows(const PagedParams& p, const RowSpan& s, int kv_head, int sub,
                                           float (&q)[kRows][kVec * kChunks], int (&row_pos)[kRows],
                                           float (&m)[kRows], float (&l)[kRows],
                                           float (&acc)[kRows][kVec * kChunks]) {
  load_query<T, kVec, kLanes, kChunks, kRows>(p, s, kv_head, sub, q, row_pos);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < kVec * kChunks; ++e) acc[r][e] = 0.0f;
  }
}

// The kUnroll keys one lane group holds in registers, kChunks accesses of kVec elements each.
template <typename T, int kVec, int kChunks, int kUnroll>
using KeyFrags = Vec<T, kVec>[kUnroll][kChunks];

// Scores of the lane group's kUnroll keys (key of pass u: base + u * kGroups + grp), the online
// softmax update and the accumulation of their values. Keys outside [.., end), past a row's
// position or before its window score -inf.
template <typename T, int kVec, int kLanes, int kChunks, int kRows, int kUnroll>
__device__ __forceinline__ void attend(int base, int grp, int end, int window, const int (&row_pos)[kRows],
                                       const float (&q)[kRows][kVec * kChunks],
                                       const KeyFrags<T, kVec, kChunks, kUnroll>& kf,
                                       const KeyFrags<T, kVec, kChunks, kUnroll>& vf, float (&m)[kRows],
                                       float (&l)[kRows], float (&acc)[kRows][kVec * kChunks]) {
  constexpr int kGroups = kWarpSize / kLanes;
  constexpr int kElems = kVec * kChunks;
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
}

// A float another block of this kernel wrote (after its __threadfence): read from L2, never from this
// SM's L1.
__device__ __forceinline__ float load_from_peer(const float* address) {
  return *reinterpret_cast<const volatile float*>(address);
}

// The in-kernel merge of the key splits: called by every split's block after it wrote its rows'
// partials; the last of the splits to arrive (counted in p.split_counters, set back to zero for the
// next call) combines them into `out` with the arithmetic of paged_attention_reduce_kernel, so the
// bits equal the separate reduction's. `scratch`: kRows x kMaxSplits floats of shared memory,
// `inv_den`: kRows.
// NOTE(tidal): this saves the second kernel of flash-decoding, which at batch 1 costs more than its
// work (a launch, a gap, ~3.6 us per layer on H200 against under 1 us of reads); the fence before
// the count makes a split's partials visible before any block can see it counted.
template <typename T, int kRows>
__device__ __forceinline__ void merge_splits(const PagedParams& p, const RowSpan& s, int kv_head, float* scratch,
                                             float* inv_den) {
  __shared__ int is_last;
  __threadfence();
  __syncthreads();  // every thread's partials are written and fenced; the scratch is free to reuse
  if (threadIdx.x == 0) {
    int* counter =
        p.split_counters + (static_cast<int64_t>(blockIdx.z) * p.num_kv_heads + kv_head) * gridDim.x + blockIdx.x;
    is_last = atomicAdd(counter, 1) == p.num_splits - 1;
    if (is_last) atomicExch(counter, 0);  // every split has arrived: ready for the next call
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const int num_rows = s.last_row - s.first_row + 1, num_splits = p.num_splits, head_dim = p.head_dim;
  for (int r = threadIdx.x; r < num_rows; r += kSimtThreads) {
    const int flat = s.first_row + r;
    const int64_t slot = ((s.q_begin + flat / s.group) * p.num_heads + kv_head * s.group + flat % s.group) * num_splits;
    const float* ml = p.split_ml + slot * 2;
    float mx = -INFINITY;
    for (int k = 0; k < num_splits; ++k) mx = fmaxf(mx, load_from_peer(ml + 2 * k));
    const float safe = mx == -INFINITY ? 0.0f : mx;
    float den = 0.0f;
    for (int k = 0; k < num_splits; ++k) {
      const float w = exp2f(load_from_peer(ml + 2 * k) - safe);
      scratch[r * kMaxSplits + k] = w;
      den += load_from_peer(ml + 2 * k + 1) * w;
    }
    inv_den[r] = den > 0.0f ? 1.0f / den : 0.0f;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < num_rows * head_dim; idx += kSimtThreads) {
    const int r = idx / head_dim, e = idx % head_dim;
    const int flat = s.first_row + r;
    const int64_t token = s.q_begin + flat / s.group;
    const int head = kv_head * s.group + flat % s.group;
    const float* acc = p.split_acc + (token * p.num_heads + head) * num_splits * head_dim + e;
    float num = 0.0f;
    for (int k = 0; k < num_splits; ++k) num += load_from_peer(acc + k * head_dim) * scratch[r * kMaxSplits + k];
    T* out = static_cast<T*>(p.out) + token * p.out_token_stride + head * p.out_head_stride;
    out[e] = from_float<T>(num * inv_den[r]);
  }
}

// Every warp's partial rows (red_acc [kSimtWarps][kRows][kPadDim] unnormalised outputs, red_m and
// red_l [kSimtWarps][kRows] their running max and sum, written before a __syncthreads) combined and
// written: to `out`, or to the split buffers when the keys are split (then merged here by the last
// split when p.split_counters is set; red_acc and red_l become its scratch).
template <typename T, int kRows, int kPadDim>
__device__ __forceinline__ void store_rows(const PagedParams& p, const RowSpan& s, int kv_head, int split,
                                           float* red_acc, const float* red_m, float* red_l) {
  const int head_dim = p.head_dim;
  for (int idx = threadIdx.x; idx < kRows * kPadDim; idx += kSimtThreads) {
    const int r = idx / kPadDim, e = idx % kPadDim;
    const int flat = s.first_row + r;
    if (flat > s.last_row || e >= head_dim) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kSimtWarps; ++w) mx = fmaxf(mx, red_m[w * kRows + r]);
    const float safe = mx == -INFINITY ? 0.0f : mx;
    float num = 0.0f, den = 0.0f;
#pragma unroll
    for (int w = 0; w < kSimtWarps; ++w) {
      const float scale = exp2f(red_m[w * kRows + r] - safe);
      num += red_acc[(w * kRows + r) * kPadDim + e] * scale;
      den += red_l[w * kRows + r] * scale;
    }
    const int64_t token = s.q_begin + flat / s.group;
    const int head = kv_head * s.group + flat % s.group;
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
  // The host sets split_counters only from head_dim 16 up, where the scratch holds kRows x kMaxSplits.
  if constexpr (kSimtWarps * kPadDim >= kMaxSplits) {
    if (p.num_splits > 1 && p.split_counters != nullptr) merge_splits<T, kRows>(p, s, kv_head, red_acc, red_l);
  }
}

// Merges the lane groups of each warp (each saw different keys), then the warps (store_rows).
// red_acc holds [kSimtWarps][kRows][kLanes * kVec * kChunks] floats, red_m and red_l [kSimtWarps][kRows].
template <typename T, int kVec, int kLanes, int kChunks, int kRows>
__device__ __forceinline__ void merge_and_store(const PagedParams& p, const RowSpan& s, int kv_head, int split,
                                                float (&m)[kRows], float (&l)[kRows],
                                                float (&acc)[kRows][kVec * kChunks], float* red_acc, float* red_m,
                                                float* red_l) {
  constexpr int kPadDim = kLanes * kVec * kChunks;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int off = kLanes; off < kWarpSize; off *= 2) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float m_other = TIDAL_SHFL_XOR(m[r], off), l_other = TIDAL_SHFL_XOR(l[r], off);
      const MergeScales sc = merge_state(m[r], l[r], m_other, l_other);
#pragma unroll
      for (int e = 0; e < kVec * kChunks; ++e) {
        acc[r][e] = acc[r][e] * sc.self + TIDAL_SHFL_XOR(acc[r][e], off) * sc.other;
      }
    }
  }
  if (lane < kLanes) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          red_acc[(warp * kRows + r) * kPadDim + (c * kLanes + lane) * kVec + k] = acc[r][c * kVec + k];
        }
      }
      if (lane == 0) {
        red_m[warp * kRows + r] = m[r];
        red_l[warp * kRows + r] = l[r];
      }
    }
  }
  __syncthreads();
  store_rows<T, kRows, kPadDim>(p, s, kv_head, split, red_acc, red_m, red_l);
}

// Element offset of key j's row for kv_head in the cache, -1 when j is past `end`.
__device__ __forceinline__ int64_t key_offset(const int32_t* table, int j, int end, int block_size,
                                              int num_kv_heads, int kv_head, int head_dim) {
  if (j >= end) return -1;
  const int64_t block = table[j / block_size];
  return ((block * block_size + j % block_size) * num_kv_heads + kv_head) * head_dim;
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
  wait_for_prior_grid();  // launched by launch_dependent
  allow_dependents();
  constexpr int kGroups = kWarpSize / kLanes;  // keys per warp per pass
  constexpr int kElems = kVec * kChunks;       // dims per lane
  constexpr int kPadDim = kLanes * kElems;     // >= head_dim
  constexpr int kStep = kUnroll * kGroups;     // keys per warp per step
  __shared__ float red_acc[kSimtWarps * kRows * kPadDim];
  __shared__ float red_m[kSimtWarps * kRows], red_l[kSimtWarps * kRows];

  const int kv_head = blockIdx.y % p.num_kv_heads, split = blockIdx.y / p.num_kv_heads;
  RowSpan s;
  if (!row_span<kRows>(p, split, s)) return;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int sub = lane % kLanes, grp = lane / kLanes;
  const int head_dim = p.head_dim;

  float q[kRows][kElems], m[kRows], l[kRows], acc[kRows][kElems];
  int row_pos[kRows];
  start_rows<T, kVec, kLanes, kChunks, kRows>(p, s, kv_head, sub, q, row_pos, m, l, acc);

  const int32_t* table = p.block_tables + s.seq * p.block_table_stride;
  const T* k_cache = static_cast<const T*>(p.key_cache);
  const T* v_cache = static_cast<const T*>(p.value_cache);
  for (int base = s.begin + warp * kStep; base < s.end; base += kSimtWarps * kStep) {
    KeyFrags<T, kVec, kChunks, kUnroll> kf, vf;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t offset =
          key_offset(table, base + u * kGroups + grp, s.end, p.block_size, p.num_kv_heads, kv_head, head_dim);
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
    attend<T, kVec, kLanes, kChunks, kRows, kUnroll>(base, grp, s.end, p.sliding_window, row_pos, q, kf, vf, m, l,
                                                     acc);
  }
  merge_and_store<T, kVec, kLanes, kChunks, kRows>(p, s, kv_head, split, m, l, acc, red_acc, red_m, red_l);
}

#if !defined(TIDAL_USE_HIP)
// The pipelined kernel: a block's keys go through shared memory in tiles of kTile = kSimtWarps *
// kUnroll * kGroups keys (warp w scores keys [w * kUnroll * kGroups, (w + 1) * kUnroll * kGroups)
// of each tile, the same assignment as the direct kernel's steps), kStages tiles in a ring; the
// tile t + kStages - 1 is requested before tile t is worked on. Rows of a tile are kPadDim
// elements (16-byte chunks past head_dim are neither loaded nor read).
template <typename T, int kVec, int kLanes, int kChunks, int kRows, int kUnroll, int kStages>
struct Pipeline {
  static constexpr int kGroups = kWarpSize / kLanes;
  static constexpr int kPadDim = kLanes * kVec * kChunks;
  static constexpr int kTile = kSimtWarps * kUnroll * kGroups;
  static constexpr int kStageElems = 2 * kTile * kPadDim;  // K then V
  static constexpr int kReduceBytes = kSimtWarps * kRows * kPadDim * static_cast<int>(sizeof(float));
  static_assert(kTile * (kPadDim / kVec) % kSimtThreads == 0, "a tile is whole rounds of 16-byte requests");
  static constexpr int kSmemBytes =
      std::max(kStages * kStageElems * static_cast<int>(sizeof(T)), kReduceBytes);
};

template <typename T, int kVec, int kLanes, int kChunks, int kRows, int kUnroll, int kStages>
__global__ void __launch_bounds__(kSimtThreads) paged_attention_pipelined_kernel(PagedParams p) {
  wait_for_prior_grid();  // launched by launch_dependent
  allow_dependents();
  using Pipe = Pipeline<T, kVec, kLanes, kChunks, kRows, kUnroll, kStages>;
  constexpr int kGroups = Pipe::kGroups, kPadDim = Pipe::kPadDim, kTile = Pipe::kTile;
  constexpr int kElems = kVec * kChunks;
  constexpr int kRowChunks = kPadDim / kVec;  // 16-byte chunks per tile row
  extern __shared__ __align__(128) unsigned char smem[];
  T* tiles = reinterpret_cast<T*>(smem);  // [kStages][K, V][kTile][kPadDim]
  __shared__ float red_m[kSimtWarps * kRows], red_l[kSimtWarps * kRows];

  const int kv_head = blockIdx.y % p.num_kv_heads, split = blockIdx.y / p.num_kv_heads;
  RowSpan s;
  if (!row_span<kRows>(p, split, s)) return;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int sub = lane % kLanes, grp = lane / kLanes;
  const int head_dim = p.head_dim;

  const int32_t* table = p.block_tables + s.seq * p.block_table_stride;
  const T* k_cache = static_cast<const T*>(p.key_cache);
  const T* v_cache = static_cast<const T*>(p.value_cache);
  const int num_tiles = s.end > s.begin ? (s.end - s.begin + kTile - 1) / kTile : 0;
  // Requests tile t into stage t % kStages; keys past the split's end are zero-filled.
  auto request = [&](int t) {
    T* k_dst = tiles + (t % kStages) * Pipe::kStageElems;
    T* v_dst = k_dst + kTile * kPadDim;
#pragma unroll
    for (int n = 0; n < kTile * kRowChunks / kSimtThreads; ++n) {
      const int i = n * kSimtThreads + threadIdx.x;
      const int key = i / kRowChunks, e = (i % kRowChunks) * kVec;
      if (e >= head_dim) continue;
      const int64_t offset =
          key_offset(table, s.begin + t * kTile + key, s.end, p.block_size, p.num_kv_heads, kv_head, head_dim);
      const int64_t src = offset >= 0 ? offset + e : 0;
      cp_async_16(shared_address(k_dst + key * kPadDim + e), k_cache + src, offset >= 0);
      cp_async_16(shared_address(v_dst + key * kPadDim + e), v_cache + src, offset >= 0);
    }
  };
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < num_tiles) request(t);
    cp_async_commit();
  }

  float q[kRows][kElems], m[kRows], l[kRows], acc[kRows][kElems];
  int row_pos[kRows];
  start_rows<T, kVec, kLanes, kChunks, kRows>(p, s, kv_head, sub, q, row_pos, m, l, acc);

  for (int t = 0; t < num_tiles; ++t) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile t is in; every warp is done with the stage tile t + kStages - 1 reuses
    if (t + kStages - 1 < num_tiles) request(t + kStages - 1);
    cp_async_commit();
    const T* k_tile = tiles + (t % kStages) * Pipe::kStageElems;
    const T* v_tile = k_tile + kTile * kPadDim;
    const int first = warp * kUnroll * kGroups;  // the warp's first key of the tile
    KeyFrags<T, kVec, kChunks, kUnroll> kf, vf;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int key = first + u * kGroups + grp;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int e = (c * kLanes + sub) * kVec;
        if (e < head_dim) {
          kf[u][c] = load_vec<T, kVec>(k_tile + key * kPadDim + e);
          vf[u][c] = load_vec<T, kVec>(v_tile + key * kPadDim + e);
        } else {
          kf[u][c] = zero_vec<T, kVec>();
          vf[u][c] = zero_vec<T, kVec>();
        }
      }
    }
    attend<T, kVec, kLanes, kChunks, kRows, kUnroll>(s.begin + t * kTile + first, grp, s.end, p.sliding_window,
                                                     row_pos, q, kf, vf, m, l, acc);
  }
  cp_async_wait<0>();
  __syncthreads();  // the stages become the reduction's scratch
  merge_and_store<T, kVec, kLanes, kChunks, kRows>(p, s, kv_head, split, m, l, acc,
                                                   reinterpret_cast<float*>(smem), red_m, red_l);
}
#endif  // !TIDAL_USE_HIP

// Picks the lane layout for head_dim (16-byte accesses when head_dim allows, else one element per
// access), the row count and the feed (pipelined on CUDA when rows are 16-byte aligned), and launches.
template <typename T>
void launch_simt(const PagedParams& p, const Plan& plan, bool vectorized, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>(plan.row_blocks), static_cast<unsigned>(p.num_kv_heads * plan.num_splits),
                  static_cast<unsigned>(p.num_seqs));
  auto direct = [&](auto kernel) { launch_dependent(kernel, grid, dim3(kSimtThreads), 0, stream, current_device(), p); };
  auto by_rows = [&](auto vec, auto lanes, auto chunks) {
    constexpr int V = decltype(vec)::value, L = decltype(lanes)::value, C = decltype(chunks)::value;
#if !defined(TIDAL_USE_HIP)
    if (V * sizeof(T) == 16) {
      static_assert(kSimtThreads == 128, "launch_with_smem launches 128 threads");
      auto pipelined = [&](auto kernel, int smem_bytes) { launch_with_smem(kernel, grid, smem_bytes, stream, p); };
      // NOTE(tidal): a stage is 16 KB for rows of 256 bytes (head_dim 128 in 16-bit types) and 4 stages
      // keep 48 KB in flight per block; 64 KB of shared memory allows three blocks per SM.
      switch (plan.rows_per_block) {
        case 2: pipelined(paged_attention_pipelined_kernel<T, V, L, C, 2, 4, 4>, Pipeline<T, V, L, C, 2, 4, 4>::kSmemBytes); break;
        case 4: pipelined(paged_attention_pipelined_kernel<T, V, L, C, 4, 4, 4>, Pipeline<T, V, L, C, 4, 4, 4>::kSmemBytes); break;
        default: pipelined(paged_attention_pipelined_kernel<T, V, L, C, 8, 2, 8>, Pipeline<T, V, L, C, 8, 2, 8>::kSmemBytes); break;
      }
      return;
    }
#endif
    switch (plan.rows_per_block) {
      case 2: direct(paged_attention_simt_kernel<T, V, L, C, 2, 4>); break;
      case 4: direct(paged_attention_simt_kernel<T, V, L, C, 4, 4>); break;
      default: direct(paged_attention_simt_kernel<T, V, L, C, 8, 2>); break;
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
