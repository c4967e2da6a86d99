// SPDX-License-Identifier: Apache-2.0
// CPU kernel for paged_attention: causal (optionally sliding-window) attention of a flat batch of
// query tokens over the paged KV cache, for prefill, chunked prefill and decode alike. A work item
// holds up to 16 (token, head) rows that share one KV head and streams the sequence's keys in tiles
// of 32 positions (across block boundaries) with an online softmax in fp32. Items run on OpenMP
// threads, through an AVX2+FMA twin where the CPU has one.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/dispatch_float.h"
#include "cpu/vectorize.h"
#include "ops/kernels.h"

namespace tidal::cpu {
namespace {

// NOTE(tidal): napkin math for the serving shape (decode, 64 seqs x 512 keys, 4 q / 2 kv heads,
// head_dim 64, fp32): K and V are 64 * 512 * 2 * 64 * 4 B * 2 = 33.5 MB per layer, read once since
// an item carries every query head of its KV head (the GQA group), and 8.4 M multiply-adds each for
// q.k and p.v. Per (row, key) the loops issue ~47 instructions for 16 FMAs (score8's shared
// transposed reduction, 64-wide accumulator chunks held in registers). Measured on the 2-core dev
// VM (AVX2 twin): 2.0 ms on one thread, 1.2 ms on two; torch's SDPA over the same keys laid out
// densely takes 2.3 / 1.3 ms. A 1400-token prefill: 22 / 12 ms (SDPA: 11 / 6 ms). Rows per item:
// 16 keeps q and the accumulators (2 x 16 x head_dim floats, 8 KB at head_dim 64) in L1 next to a
// 32-key tile of K and V, and lets a prefill item reuse each tile for 8 tokens x 2 heads.
constexpr int kMaxRows = 16;
constexpr int kKeyTile = 32;
constexpr int kLanes = 16;  // partial sums of a dot product: two AVX2 registers
constexpr int64_t kMaxHeadDim = kPagedAttentionMaxHeadDim;
// Below ~256K multiply-adds (~30 us on one core) a parallel region costs more than it saves.
constexpr int64_t kParallelMinWork = 1 << 18;

struct Problem {
  const void* query;  // [num_tokens, num_heads, head_dim]
  int64_t query_stride_token, query_stride_head;
  void* out;  // [num_tokens, num_heads, head_dim]
  int64_t out_stride_token, out_stride_head;
  const void* key_cache;    // [num_blocks, block_size, num_kv_heads, head_dim]
  const void* value_cache;  // same
  int64_t slot_stride;      // num_kv_heads * head_dim: elements from one slot to the next
  const int32_t* block_tables;  // [num_seqs, max_num_blocks]
  int64_t block_tables_stride_seq, block_tables_stride_block;
  const int32_t* seq_lens;  // [num_seqs]
  int64_t seq_lens_stride;
  const int32_t* cu_seqlens_q;  // [num_seqs + 1]
  int64_t cu_seqlens_q_stride;
  int64_t head_dim, block_size, group;  // group = num_heads / num_kv_heads
  float scale;
  int64_t sliding_window;  // <= 0: none
};

// Query rows tokens [token_begin, token_end) (counted within the sequence) x query heads
// kv_head * group + [head_begin, head_end) of sequence `seq`; rows are token-major.
struct WorkItem {
  int32_t seq, kv_head, head_begin, head_end, token_begin, token_end;
};

// Sum of kLanes partial sums in a fixed tree: each level is one vector add, where a serial sum
// would be kLanes - 1 dependent adds.
TIDAL_CPU_INLINE float reduce_lanes(float* partial) {
  for (int width = kLanes / 2; width >= 1; width /= 2) {
    for (int l = 0; l < width; ++l) partial[l] += partial[l + width];
  }
  return partial[0];
}

[[maybe_unused]] TIDAL_CPU_INLINE float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float partial[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) partial[l] += a[i + l] * b[i + l];
  }
  for (; i < n; ++i) partial[0] += a[i] * b[i];
  return reduce_lanes(partial);
}

#if TIDAL_CPU_HAS_VEC8
// out[j] = q . keys[j] for j < 8, with keys j >= n standing in for key n - 1 (their scores land
// in out but are never used). q is loaded once for eight keys, and the eight horizontal sums
// share one transposed reduction.
TIDAL_CPU_INLINE void score8(const float* __restrict q, const float* const* keys, int64_t n, int64_t hd,
                             float* __restrict out) {
  const float* key[8];
  for (int j = 0; j < 8; ++j) key[j] = keys[j < n ? j : n - 1];
  Vec8 acc[8] = {};
  int64_t d = 0;
  for (; d + 8 <= hd; d += 8) {
    const Vec8 x = load8(q + d);
    for (int j = 0; j < 8; ++j) acc[j] += x * load8(key[j] + d);
  }
  store8(out, sum8(acc));
  for (; d < hd; ++d) {
    for (int j = 0; j < 8; ++j) out[j] += q[d] * key[j][d];
  }
}
#endif

// acc += sum_k p[k] * values[k], k < n: each chunk of the accumulator stays in registers while
// the keys stream by.
TIDAL_CPU_INLINE void accumulate(float* __restrict acc, const float* __restrict p, const float* const* values,
                                 int64_t n, int64_t hd) {
  int64_t d0 = 0;
#if TIDAL_CPU_HAS_VEC8
  // NOTE(tidal): written with vectors because GCC turns the equivalent array loops into memcpy
  // calls that then keep the accumulator in memory.
  constexpr int kChunk = 64;  // 8 AVX registers; the keys' loop costs 3 instructions per chunk
  for (; d0 + kChunk <= hd; d0 += kChunk) {
    Vec8 a[kChunk / 8];
    for (int c = 0; c < kChunk / 8; ++c) a[c] = load8(acc + d0 + 8 * c);
    for (int64_t k = 0; k < n; ++k) {
      const Vec8 w = Vec8{} + p[k];
      const float* v = values[k] + d0;
      for (int c = 0; c < kChunk / 8; ++c) a[c] += w * load8(v + 8 * c);
    }
    for (int c = 0; c < kChunk / 8; ++c) store8(acc + d0 + 8 * c, a[c]);
  }
  for (; d0 + 8 <= hd; d0 += 8) {
    Vec8 a = load8(acc + d0);
    for (int64_t k = 0; k < n; ++k) a += (Vec8{} + p[k]) * load8(values[k] + d0);
    store8(acc + d0, a);
  }
#endif
  if (d0 == hd) return;
  for (int64_t k = 0; k < n; ++k) {
    const float w = p[k];
    const float* __restrict v = values[k];
    for (int64_t d = d0; d < hd; ++d) acc[d] += w * v[d];
  }
}

// One row against the n keys of a tile the row sees: scores, online-softmax update of
// (row_max, row_sum, acc), accumulation of p * v. Scores come in groups of 8 lanes; lanes past n
// in the last group hold copies of a real score (never above the maximum) and are zeroed before
// the sum.
TIDAL_CPU_INLINE void attend_keys(const float* __restrict q, float* __restrict acc, float& row_max, float& row_sum,
                                  const float* const* keys, const float* const* values, int64_t n, int64_t hd) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  constexpr int kGroup = 8;
  alignas(64) float p[kKeyTile];
#if TIDAL_CPU_HAS_VEC8
  Vec8 lane_max = Vec8{} + kNegInf;
  for (int64_t k = 0; k < n; k += kGroup) {
    score8(q, keys + k, n - k, hd, p + k);
    const Vec8 s = load8(p + k);
    lane_max = s > lane_max ? s : lane_max;
  }
  float tile_max = lane_max[0];
  for (int l = 1; l < kGroup; ++l) tile_max = lane_max[l] > tile_max ? lane_max[l] : tile_max;
#else
  float tile_max = kNegInf;
  for (int64_t k = 0; k < n; ++k) {
    p[k] = dot(q, keys[k], hd);
    tile_max = p[k] > tile_max ? p[k] : tile_max;
  }
  std::fill(p + n, p + kKeyTile, 0.f);  // the lanes past n that the loop below reads
#endif
  if (tile_max > row_max) {
    if (row_max != kNegInf) {  // rescale what earlier tiles accumulated
      const float correction = std::exp(row_max - tile_max);
      row_sum *= correction;
      for (int64_t d = 0; d < hd; ++d) acc[d] *= correction;
    }
    row_max = tile_max;
  }
  const float m = row_max;
  float lane_sum[kGroup] = {};
  for (int64_t i = 0; i < n; i += kGroup) {
    for (int l = 0; l < kGroup; ++l) {
      p[i + l] = select(i + l < n, exp_approx(p[i + l] - m), 0.f);
      lane_sum[l] += p[i + l];
    }
  }
  float sum = 0.f;
  for (int l = 0; l < kGroup; ++l) sum += lane_sum[l];
  row_sum += sum;
  accumulate(acc, p, values, n, hd);
}

template <typename T>
TIDAL_CPU_INLINE void load_row(float* __restrict dst, const T* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = widen(src[i]);
}

// One work item. kHeadDim > 0 fixes head_dim at compile time (the common sizes), so the inner
// loops unroll completely; 0 reads it from the problem. C: the caches' element type (T, or
// Fp8E4M3 for an FP8 cache).
template <typename T, typename C, int64_t kHeadDim>
TIDAL_CPU_INLINE void attend(const Problem& pb, const WorkItem& item) {
  constexpr bool kIsFloat = std::is_same_v<C, float>;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t hd = kHeadDim > 0 ? kHeadDim : pb.head_dim, bs = pb.block_size;
  const int64_t seq_len = pb.seq_lens[item.seq * pb.seq_lens_stride];
  const int64_t q_begin = pb.cu_seqlens_q[item.seq * pb.cu_seqlens_q_stride];
  const int64_t q_len = pb.cu_seqlens_q[(item.seq + 1) * pb.cu_seqlens_q_stride] - q_begin;
  const int64_t first_pos = seq_len - q_len;  // position of the sequence's first query row
  const int num_heads = item.head_end - item.head_begin;
  const int num_rows = num_heads * (item.token_end - item.token_begin);
  const int32_t* block_table = pb.block_tables + item.seq * pb.block_tables_stride_seq;
  if (num_rows <= 0) return;  // never built so; keeps key_begin[0] below provably written

  alignas(64) float q[kMaxRows * kMaxHeadDim];    // [num_rows, hd], pre-scaled
  alignas(64) float acc[kMaxRows * kMaxHeadDim];  // [num_rows, hd], sum of p * v
  float row_max[kMaxRows], row_sum[kMaxRows];
  int64_t key_begin[kMaxRows], key_end[kMaxRows];  // each row's visible keys
  const T* query = static_cast<const T*>(pb.query);
  for (int r = 0; r < num_rows; ++r) {
    const int64_t token = item.token_begin + r / num_heads;
    const int64_t head = item.kv_head * pb.group + item.head_begin + r % num_heads;
    const T* src = query + (q_begin + token) * pb.query_stride_token + head * pb.query_stride_head;
    for (int64_t d = 0; d < hd; ++d) q[r * hd + d] = widen(src[d]) * pb.scale;
    std::fill_n(acc + r * hd, hd, 0.f);
    row_max[r] = kNegInf;
    row_sum[r] = 0.f;
    const int64_t pos = first_pos + token;
    key_end[r] = pos + 1;
    key_begin[r] = pb.sliding_window > 0 ? std::max<int64_t>(0, pos - pb.sliding_window + 1) : 0;
  }
  // Rows are token-major, so the first row sees the earliest keys and the last row the latest.
  const int64_t keys_begin = key_begin[0], keys_end = key_end[num_rows - 1];

  // A tile is up to kKeyTile consecutive positions, across block boundaries: one row pointer per
  // key. 16-bit caches are widened into k_tile / v_tile once per tile, for all rows of the item.
  alignas(64) float k_tile[kIsFloat ? 1 : kKeyTile * kMaxHeadDim];
  alignas(64) float v_tile[kIsFloat ? 1 : kKeyTile * kMaxHeadDim];
  const float* key_rows[kKeyTile];
  const float* value_rows[kKeyTile];
  const C* key_cache = static_cast<const C*>(pb.key_cache) + item.kv_head * hd;
  const C* value_cache = static_cast<const C*>(pb.value_cache) + item.kv_head * hd;
  for (int64_t k0 = keys_begin; k0 < keys_end; k0 += kKeyTile) {
    const int64_t k1 = std::min(keys_end, k0 + kKeyTile);
    for (int64_t k = k0; k < k1;) {  // one run of consecutive slots per block
      const int64_t block = k / bs, offset = k - block * bs, run = std::min(k1 - k, bs - offset);
      const int64_t slot = static_cast<int64_t>(block_table[block * pb.block_tables_stride_block]) * bs + offset;
      for (int64_t i = 0; i < run; ++i) {
        const int64_t t = k - k0 + i;
        const C* k_src = key_cache + (slot + i) * pb.slot_stride;
        const C* v_src = value_cache + (slot + i) * pb.slot_stride;
        if constexpr (kIsFloat) {
          key_rows[t] = k_src;
          value_rows[t] = v_src;
        } else {
          load_row(k_tile + t * hd, k_src, hd);
          load_row(v_tile + t * hd, v_src, hd);
          key_rows[t] = k_tile + t * hd;
          value_rows[t] = v_tile + t * hd;
        }
      }
      k += run;
    }
    for (int r = 0; r < num_rows; ++r) {
      const int64_t a = std::max(key_begin[r], k0), b = std::min(key_end[r], k1);
      if (a >= b) continue;
      attend_keys(q + r * hd, acc + r * hd, row_max[r], row_sum[r], key_rows + (a - k0), value_rows + (a - k0), b - a,
                  hd);
    }
  }

  T* out = static_cast<T*>(pb.out);
  for (int r = 0; r < num_rows; ++r) {
    const int64_t token = item.token_begin + r / num_heads;
    const int64_t head = item.kv_head * pb.group + item.head_begin + r % num_heads;
    T* dst = out + (q_begin + token) * pb.out_stride_token + head * pb.out_stride_head;
    const float* acc_row = acc + r * hd;
    const float sum = row_sum[r];
    for (int64_t d = 0; d < hd; ++d) dst[d] = from_float<T>(acc_row[d] / sum);
  }
}

using AttendFn = void (*)(const Problem&, const WorkItem&);

template <typename T, typename C, int64_t kHeadDim>
TIDAL_CPU_TARGET_AVX2 void attend_avx2(const Problem& pb, const WorkItem& item) {
  attend<T, C, kHeadDim>(pb, item);
}

template <typename T, typename C>
void attend_base(const Problem& pb, const WorkItem& item) {
  attend<T, C, 0>(pb, item);
}

// NOTE(tidal): head_dim 64 and 128 get their own AVX2 versions (fully unrolled inner loops, about
// 15% faster); the baseline, for CPUs without AVX2, keeps one generic version to bound code size.
template <typename T, typename C>
AttendFn pick_attend(int64_t head_dim) {
  if (!cpu_has_avx2()) return &attend_base<T, C>;
  if (head_dim == 64) return &attend_avx2<T, C, 64>;
  if (head_dim == 128) return &attend_avx2<T, C, 128>;
  return &attend_avx2<T, C, 0>;
}

template <typename Int>
Int element(const TensorView& t, int64_t i) {
  return t.data_ptr<const Int>()[i * t.stride(0)];
}

template <typename T>
void paged_attention_impl(TensorView out, TensorView query, TensorView key_cache, TensorView value_cache,
                          TensorView block_tables, TensorView seq_lens, TensorView cu_seqlens_q, float scale,
                          int64_t sliding_window) {
  const int64_t num_heads = query.size(1), num_kv_heads = key_cache.size(2), head_dim = query.size(2);
  const Problem pb{query.data, query.stride(0), query.stride(1), out.data, out.stride(0), out.stride(1),
                   key_cache.data, value_cache.data, num_kv_heads * head_dim,
                   block_tables.data_ptr<const int32_t>(), block_tables.stride(0), block_tables.stride(1),
                   seq_lens.data_ptr<const int32_t>(), seq_lens.stride(0),
                   cu_seqlens_q.data_ptr<const int32_t>(), cu_seqlens_q.stride(0),
                   head_dim, key_cache.size(1), num_heads / num_kv_heads, scale, sliding_window};

  // Items: per sequence and KV head, the group's heads in chunks of <= kMaxRows, times the
  // sequence's query tokens in chunks that fill kMaxRows rows.
  const int64_t heads_per_item = std::min<int64_t>(pb.group, kMaxRows);
  const int64_t tokens_per_item = std::max<int64_t>(1, kMaxRows / heads_per_item);
  std::vector<WorkItem> items;
  int64_t work = 0;  // multiply-adds of q.k, an upper bound
  const int64_t num_seqs = seq_lens.size(0);
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = element<int32_t>(cu_seqlens_q, s + 1) - element<int32_t>(cu_seqlens_q, s);
    work += q_len * num_heads * element<int32_t>(seq_lens, s) * head_dim;
    for (int64_t kv = 0; kv < num_kv_heads; ++kv) {
      for (int64_t h = 0; h < pb.group; h += heads_per_item) {
        for (int64_t t = 0; t < q_len; t += tokens_per_item) {
          items.push_back({static_cast<int32_t>(s), static_cast<int32_t>(kv), static_cast<int32_t>(h),
                           static_cast<int32_t>(std::min(pb.group, h + heads_per_item)), static_cast<int32_t>(t),
                           static_cast<int32_t>(std::min(q_len, t + tokens_per_item))});
        }
      }
    }
  }
  const AttendFn run = key_cache.dtype == DType::kUInt8 ? pick_attend<T, Fp8E4M3>(head_dim) : pick_attend<T, T>(head_dim);
  const int64_t num_items = static_cast<int64_t>(items.size());
  [[maybe_unused]] const bool parallel = num_items > 1 && work >= kParallelMinWork;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
#endif
  for (int64_t i = 0; i < num_items; ++i) run(pb, items[i]);
}

}  // namespace

void paged_attention(TensorView out, TensorView query, TensorView key_cache, TensorView value_cache,
                     TensorView block_tables, TensorView seq_lens, TensorView cu_seqlens_q, float scale,
                     int64_t sliding_window, Stream) {
  TIDAL_CPU_DISPATCH_FLOAT(query.dtype, T,
                           paged_attention_impl<T>(out, query, key_cache, value_cache, block_tables, seq_lens,
                                                   cu_seqlens_q, scale, sliding_window));
}

}  // namespace tidal::cpu
