// SPDX-License-Identifier: Apache-2.0
// Rotary position embedding on the GPU, alone (rotary_embedding: query and key rotated in place) and
// fused with the KV-cache write and, for Qwen3, the per-head q/k RMSNorm (rotary_embedding_and_cache:
// query normalised and rotated in place, key normalised and rotated straight into its cache slot,
// value copied into its slot). The general kernel: a warp per (token, head job), a job being a query,
// key or value head; the head is staged in fp32 in shared memory so any rotary pairing and head_dim
// work. Plain Neox rotary over 16-byte-aligned heads (training, prefill) takes a streaming kernel.
// An FP8 cache (uint8 E4M3 codes, scale 1) gets each key and value element rounded to nearest even
// and saturated at +-448, as the CPU twin writes it.
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "cuda/common.cuh"
#include "ops/fp8.h"
#include "ops/kernels.h"

namespace tidal::gpu {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxHeadDim = 512;

// NOTE(tidal): napkin math, Llama-3-8B decode at batch 256: q, k, v of 256 tokens are 256 x 48
// heads x 128 x 2 bytes = 3 MB in, the same out: ~2 us of bandwidth; the kernel is launch-bound
// there. A prefill of 8192 tokens moves 200 MB: ~50 us. A warp per head keeps the norm's
// reduction in shuffles.
struct RopeArgs {
  const int64_t* positions;  // [num_tokens]
  int64_t positions_stride;
  const float* cos_sin;  // [max_position, rotary_dim]
  int64_t cos_sin_stride;
  int64_t max_position;
  int rotary_dim;
  int head_dim;
  bool is_neox;
  int num_heads;
  int num_kv_heads;
  // query: [num_tokens, num_heads, head_dim], rotated in place
  void* query;
  int64_t q_token_stride, q_head_stride;
  // key: [num_tokens, num_kv_heads, head_dim]; rotated in place when key_cache is null
  void* key;
  int64_t k_token_stride, k_head_stride;
  // value: [num_tokens, num_kv_heads, head_dim], only with caches
  const void* value;
  int64_t v_token_stride, v_head_stride;
  // caches: [num_blocks, block_size, num_kv_heads, head_dim] contiguous, or null; T or FP8 codes
  void* key_cache;
  void* value_cache;
  bool fp8_cache;
  const int64_t* slot_mapping;  // [num_tokens]
  int64_t slot_stride;
  int64_t num_slots;
  // per-head RMSNorm weights [head_dim], or null
  const void* q_norm_weight;
  const void* k_norm_weight;
  float eps;
};

template <typename T>
__device__ __forceinline__ float load_float(const void* base, int64_t i) {
  return to_float(static_cast<const T*>(base)[i]);
}

// An element as a cache of D stores it: T, or its FP8 E4M3 code.
template <typename D, typename T>
__device__ __forceinline__ D cache_element(float v) {
  if constexpr (std::is_same_v<D, uint8_t>) {
    return fp8::from_float(v);
  } else {
    return from_float<T>(v);
  }
}

// One head: src -> (optional RMSNorm) -> (optional rotary) -> dst; `row` is this warp's
// [head_dim] fp32 staging area.
template <typename T, typename D = T>
__device__ void process_head(const RopeArgs& a, const T* src, D* dst, const void* norm_weight, bool rotate,
                             const float* cos, float* row) {
  const int lane = threadIdx.x % kWarpSize;
  const int head_dim = a.head_dim;
  float sum_sq = 0.0f;
  for (int e = lane; e < head_dim; e += kWarpSize) {
    const float v = to_float(src[e]);
    row[e] = v;
    sum_sq += v * v;
  }
  if (norm_weight != nullptr) {
    const float inv_rms = rsqrtf(warp_sum(sum_sq) / static_cast<float>(head_dim) + a.eps);
    for (int e = lane; e < head_dim; e += kWarpSize) row[e] = row[e] * inv_rms * load_float<T>(norm_weight, e);
  }
  TIDAL_SYNCWARP();
  const int half = a.rotary_dim / 2;
  for (int e = lane; e < head_dim; e += kWarpSize) {
    float out = row[e];
    if (rotate && e < a.rotary_dim) {
      if (a.is_neox) {
        const int i = e < half ? e : e - half;
        const float c = cos[i], s = cos[half + i];
        out = e < half ? row[e] * c - row[e + half] * s : row[e] * c + row[e - half] * s;
      } else {
        const int i = e / 2;
        const float c = cos[i], s = cos[half + i];
        out = (e % 2 == 0) ? row[e] * c - row[e + 1] * s : row[e] * c + row[e - 1] * s;
      }
    }
    dst[e] = cache_element<D, T>(out);
  }
  TIDAL_SYNCWARP();  // the staging row is reused by this warp's next head
}

template <typename T>
__global__ void __launch_bounds__(kWarps * kWarpSize) rotary_kernel(RopeArgs a) {
  wait_for_prior_grid();  // launched by launch_dependent
  allow_dependents();
  __shared__ float rows[kWarps][kMaxHeadDim];
  const int64_t t = blockIdx.x;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t pos = a.positions[t * a.positions_stride];
  const bool rotate = pos >= 0 && pos < a.max_position;  // NOTE(tidal): checked on the CPU only
  const float* cos = a.cos_sin + (rotate ? pos : 0) * a.cos_sin_stride;
  const bool to_cache = a.key_cache != nullptr;
  int64_t slot = -1;
  if (to_cache) {
    slot = a.slot_mapping[t * a.slot_stride];
    if (slot >= a.num_slots) slot = -1;  // out of range: never written (checked on the CPU only)
  }
  const int64_t slot_offset = slot * a.num_kv_heads * a.head_dim;
  const int num_jobs = a.num_heads + a.num_kv_heads * (to_cache ? 2 : 1);
  for (int job = blockIdx.y * kWarps + warp; job < num_jobs; job += gridDim.y * kWarps) {
    if (job < a.num_heads) {
      T* q = static_cast<T*>(a.query) + t * a.q_token_stride + job * a.q_head_stride;
      process_head<T>(a, q, q, a.q_norm_weight, rotate, cos, rows[warp]);
    } else if (job < a.num_heads + a.num_kv_heads) {
      const int h = job - a.num_heads;
      T* k = static_cast<T*>(a.key) + t * a.k_token_stride + h * a.k_head_stride;
      if (!to_cache) {
        process_head<T>(a, k, k, a.k_norm_weight, rotate, cos, rows[warp]);
      } else if (slot >= 0) {
        const int64_t offset = slot_offset + static_cast<int64_t>(h) * a.head_dim;
        if (a.fp8_cache) {
          process_head<T>(a, k, static_cast<uint8_t*>(a.key_cache) + offset, a.k_norm_weight, rotate, cos, rows[warp]);
        } else {
          process_head<T>(a, k, static_cast<T*>(a.key_cache) + offset, a.k_norm_weight, rotate, cos, rows[warp]);
        }
      }
    } else if (slot >= 0) {
      const int h = job - a.num_heads - a.num_kv_heads;
      const T* v = static_cast<const T*>(a.value) + t * a.v_token_stride + h * a.v_head_stride;
      const int64_t offset = slot_offset + static_cast<int64_t>(h) * a.head_dim;
      for (int e = threadIdx.x % kWarpSize; e < a.head_dim; e += kWarpSize) {
        if (a.fp8_cache) {
          static_cast<uint8_t*>(a.value_cache)[offset + e] = fp8::from_float(to_float(v[e]));
        } else {
          static_cast<T*>(a.value_cache)[offset + e] = v[e];
        }
      }
    }
  }
}

// NOTE(tidal): the serving step's kernel (caches given, full rotary, head_dim a multiple of 2 x
// kWarpSize). Measured on H200 (bench/profile_step.py, Qwen3-0.6B prefill of 16 x 512 tokens), the
// warp-per-head kernel above took 143 us a layer for ~100 MB moved, ~6x its floor: each warp moved
// 256 bytes through a chain of three dependent memory latencies (position, then the head, then
// cos/sin after a shared-memory round trip). Here a warp takes one head job for kRegTokens tokens
// with every element in registers: a lane holds kV consecutive elements of each half of the head
// (Neox pairs x[i], x[i + half]) or 2 kV consecutive ones (GPT-J pairs x[2i], x[2i + 1]); the
// positions, slots and heads of all its tokens are requested before any is used.
constexpr int kRegTokens = 4;

template <int kHeadDim, bool kNeox>
struct RegLayout {
  static constexpr int kV = kHeadDim / (2 * kWarpSize);  // rotary pairs per lane
  static constexpr int kN = 2 * kV;                      // elements per lane
  static_assert(kV >= 1 && kHeadDim % (2 * kWarpSize) == 0, "head_dim must be a multiple of 2 x kWarpSize");
  // The lane's elements e < kV (first members of its pairs) and kV + e (second members) start at:
  __device__ static int first(int lane) { return kNeox ? lane * kV : lane * kN; }
};

// This lane's kN elements of a head (first members, then second members) in fp32.
template <typename T, int kHeadDim, bool kNeox>
__device__ __forceinline__ void load_head(const T* head, int lane, float (&x)[2 * (kHeadDim / (2 * kWarpSize))]) {
  using L = RegLayout<kHeadDim, kNeox>;
  if constexpr (kNeox) {
    const Vec<T, L::kV> lo = load_vec<T, L::kV>(head + L::first(lane));
    const Vec<T, L::kV> hi = load_vec<T, L::kV>(head + kHeadDim / 2 + L::first(lane));
#pragma unroll
    for (int j = 0; j < L::kV; ++j) {
      x[j] = to_float(lo.v[j]);
      x[L::kV + j] = to_float(hi.v[j]);
    }
  } else {
    const Vec<T, L::kN> v = load_vec<T, L::kN>(head + L::first(lane));
#pragma unroll
    for (int j = 0; j < L::kV; ++j) {
      x[j] = to_float(v.v[2 * j]);
      x[L::kV + j] = to_float(v.v[2 * j + 1]);
    }
  }
}

// Stores x (in load_head's order) as elements of D: T, or FP8 E4M3 codes.
template <typename T, typename D, int kHeadDim, bool kNeox>
__device__ __forceinline__ void store_head(D* head, int lane, const float (&x)[2 * (kHeadDim / (2 * kWarpSize))]) {
  using L = RegLayout<kHeadDim, kNeox>;
  if constexpr (kNeox) {
    Vec<D, L::kV> lo, hi;
#pragma unroll
    for (int j = 0; j < L::kV; ++j) {
      lo.v[j] = cache_element<D, T>(x[j]);
      hi.v[j] = cache_element<D, T>(x[L::kV + j]);
    }
    store_vec(head + L::first(lane), lo);
    store_vec(head + kHeadDim / 2 + L::first(lane), hi);
  } else {
    Vec<D, L::kN> v;
#pragma unroll
    for (int j = 0; j < L::kV; ++j) {
      v.v[2 * j] = cache_element<D, T>(x[j]);
      v.v[2 * j + 1] = cache_element<D, T>(x[L::kV + j]);
    }
    store_vec(head + L::first(lane), v);
  }
}

template <typename T, int kHeadDim, bool kNeox>
__global__ void __launch_bounds__(kWarps * kWarpSize) rotary_cache_reg_kernel(RopeArgs a, int num_tokens) {
  wait_for_prior_grid();  // launched by launch_dependent
  allow_dependents();
  using L = RegLayout<kHeadDim, kNeox>;
  constexpr int kV = L::kV, kN = L::kN;
  const int lane = threadIdx.x % kWarpSize;
  const int job = blockIdx.y * kWarps + threadIdx.x / kWarpSize;
  if (job >= a.num_heads + 2 * a.num_kv_heads) return;
  const int t0 = blockIdx.x * kRegTokens;
  const bool is_query = job < a.num_heads, is_key = !is_query && job < a.num_heads + a.num_kv_heads;
  const int h = is_query ? job : is_key ? job - a.num_heads : job - a.num_heads - a.num_kv_heads;

  // Positions and slots of the warp's tokens; a token whose slot is out of range writes no cache
  // (checked on the CPU only), one past the last token does nothing.
  int64_t pos[kRegTokens], slot[kRegTokens];
#pragma unroll
  for (int r = 0; r < kRegTokens; ++r) {
    const int t = t0 + r;
    pos[r] = t < num_tokens && (is_query || is_key) ? a.positions[t * a.positions_stride] : -1;
    slot[r] = t < num_tokens && !is_query ? a.slot_mapping[t * a.slot_stride] : -1;
    if (slot[r] >= a.num_slots) slot[r] = -1;
  }
  const int64_t head_offset = static_cast<int64_t>(h) * kHeadDim;

  if (!is_query && !is_key) {  // a value head: copied into its slot
#pragma unroll
    for (int r = 0; r < kRegTokens; ++r) {
      if (slot[r] < 0) continue;
      float x[kN];
      load_head<T, kHeadDim, false>(static_cast<const T*>(a.value) + (t0 + r) * a.v_token_stride + h * a.v_head_stride,
                                    lane, x);
      const int64_t offset = slot[r] * a.num_kv_heads * kHeadDim + head_offset;
      if (a.fp8_cache) {
        store_head<T, uint8_t, kHeadDim, false>(static_cast<uint8_t*>(a.value_cache) + offset, lane, x);
      } else {
        store_head<T, T, kHeadDim, false>(static_cast<T*>(a.value_cache) + offset, lane, x);
      }
    }
    return;
  }

  // A query head (rotated in place, padding tokens included) or a key head (into its slot).
  const T* src[kRegTokens];
  bool active[kRegTokens];
#pragma unroll
  for (int r = 0; r < kRegTokens; ++r) {
    const int t = t0 + r;
    active[r] = t < num_tokens && (is_query || slot[r] >= 0);
    src[r] = is_query ? static_cast<const T*>(a.query) + t * a.q_token_stride + h * a.q_head_stride
                      : static_cast<const T*>(a.key) + t * a.k_token_stride + h * a.k_head_stride;
  }
  float x[kRegTokens][kN];
#pragma unroll
  for (int r = 0; r < kRegTokens; ++r) {
    if (active[r]) load_head<T, kHeadDim, kNeox>(src[r], lane, x[r]);
  }
  float cs[kRegTokens][kV], sn[kRegTokens][kV];
#pragma unroll
  for (int r = 0; r < kRegTokens; ++r) {
    if (!active[r] || pos[r] < 0 || pos[r] >= a.max_position) continue;  // NOTE(tidal): checked on the CPU only
    const float* row = a.cos_sin + pos[r] * a.cos_sin_stride + lane * kV;
    const Vec<float, kV> c = load_vec<float, kV>(row), s = load_vec<float, kV>(row + kHeadDim / 2);
#pragma unroll
    for (int j = 0; j < kV; ++j) {
      cs[r][j] = c.v[j];
      sn[r][j] = s.v[j];
    }
  }
  const void* norm_weight = is_query ? a.q_norm_weight : a.k_norm_weight;
  if (norm_weight != nullptr) {
    float w[kN];
    load_head<T, kHeadDim, kNeox>(static_cast<const T*>(norm_weight), lane, w);
#pragma unroll
    for (int r = 0; r < kRegTokens; ++r) {
      if (!active[r]) continue;  // warp-uniform
      float sum_sq = 0.0f;
#pragma unroll
      for (int e = 0; e < kN; ++e) sum_sq += x[r][e] * x[r][e];
      const float inv_rms = rsqrtf(warp_sum(sum_sq) / static_cast<float>(kHeadDim) + a.eps);
#pragma unroll
      for (int e = 0; e < kN; ++e) x[r][e] = x[r][e] * inv_rms * w[e];
    }
  }
#pragma unroll
  for (int r = 0; r < kRegTokens; ++r) {
    if (!active[r]) continue;
    if (pos[r] >= 0 && pos[r] < a.max_position) {
#pragma unroll
      for (int j = 0; j < kV; ++j) {
        const float u = x[r][j], v = x[r][kV + j];
        x[r][j] = u * cs[r][j] - v * sn[r][j];
        x[r][kV + j] = v * cs[r][j] + u * sn[r][j];
      }
    }
    if (is_query) {
      store_head<T, T, kHeadDim, kNeox>(const_cast<T*>(src[r]), lane, x[r]);
    } else {
      const int64_t offset = slot[r] * a.num_kv_heads * kHeadDim + head_offset;
      if (a.fp8_cache) {
        store_head<T, uint8_t, kHeadDim, kNeox>(static_cast<uint8_t*>(a.key_cache) + offset, lane, x[r]);
      } else {
        store_head<T, T, kHeadDim, kNeox>(static_cast<T*>(a.key_cache) + offset, lane, x[r]);
      }
    }
  }
}

// NOTE(tidal): Llama-3.2-1B training, micro-batch 4 x 2048: q and k of a layer are 8192 tokens x
// 40 heads x 64 x 2 bytes = 42 MB read and written, 20 us at 4.2 TB/s. The warp-per-head kernel
// above took 150 us there (2-byte accesses, a staging round trip and two warp barriers per head).
// Plain Neox rotary (no norm, no cache) moves 16-byte chunks instead: a thread per (token, head,
// chunk of the first half), each rotating kVec pairs (x[i], x[i + half]) by its own cos/sin.
constexpr int kVecThreads = 256;

template <typename T, int kVec>
__global__ void __launch_bounds__(kVecThreads) rotary_neox_vec_kernel(RopeArgs a, int64_t num_tokens) {
  wait_for_prior_grid();  // launched by launch_dependent
  allow_dependents();
  const int half = a.rotary_dim / 2;
  const int chunks = half / kVec;
  const int heads = a.num_heads + a.num_kv_heads;
  const int64_t total = num_tokens * heads * chunks;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(i % chunks) * kVec;
    const int64_t token_head = i / chunks;
    const int h = static_cast<int>(token_head % heads);
    const int64_t t = token_head / heads;
    const int64_t pos = a.positions[t * a.positions_stride];
    if (pos < 0 || pos >= a.max_position) continue;  // left as is, as the warp kernel leaves it
    T* head = h < a.num_heads ? static_cast<T*>(a.query) + t * a.q_token_stride + h * a.q_head_stride
                              : static_cast<T*>(a.key) + t * a.k_token_stride + (h - a.num_heads) * a.k_head_stride;
    const float* cos = a.cos_sin + pos * a.cos_sin_stride + c;
    const Vec<T, kVec> x1 = load_vec<T, kVec>(head + c), x2 = load_vec<T, kVec>(head + half + c);
    Vec<T, kVec> o1, o2;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float u = to_float(x1.v[j]), w = to_float(x2.v[j]);
      const float cj = __ldg(cos + j), sj = __ldg(cos + half + j);
      o1.v[j] = from_float<T>(u * cj - w * sj);
      o2.v[j] = from_float<T>(w * cj + u * sj);
    }
    store_vec(head + c, o1);
    store_vec(head + half + c, o2);
  }
}

// Whether rotary_neox_vec_kernel<T, 16 / sizeof(T)> can take `a`: plain Neox rotary with every head
// of q and k starting 16-byte aligned and the half split into whole 16-byte chunks.
bool can_rotate_vectorized(const RopeArgs& a, int element_size) {
  const int vec = 16 / element_size;
  if (a.key_cache != nullptr || a.q_norm_weight != nullptr || a.k_norm_weight != nullptr || !a.is_neox) return false;
  if ((a.rotary_dim / 2) % vec != 0) return false;
  for (int64_t stride : {a.q_token_stride, a.q_head_stride, a.k_token_stride, a.k_head_stride}) {
    if (stride % vec != 0) return false;
  }
  return is_aligned(a.query, 16) && is_aligned(a.key, 16);
}

// Whether rotary_cache_reg_kernel can take `a`: caches given, full rotary, head_dim 64, 128 or 256,
// and every head of q, k and v, the norm weights and the cos/sin rows aligned for its accesses (a
// lane's head_dim / kWarpSize elements, its cos/sin pairs).
bool can_use_register_kernel(const RopeArgs& a, int element_size) {
  if (a.key_cache == nullptr || a.rotary_dim != a.head_dim) return false;
  if ((a.head_dim != 64 && a.head_dim != 128 && a.head_dim != 256) || a.head_dim % (2 * kWarpSize) != 0) return false;
  const int per_lane = a.head_dim / kWarpSize;
  for (int64_t stride : {a.q_token_stride, a.q_head_stride, a.k_token_stride, a.k_head_stride, a.v_token_stride,
                         a.v_head_stride}) {
    if (stride % per_lane != 0) return false;
  }
  const std::initializer_list<const void*> pointers{a.query, a.key, a.value, a.q_norm_weight, a.k_norm_weight};
  for (const void* ptr : pointers) {
    if (ptr != nullptr && !is_aligned(ptr, static_cast<std::uintptr_t>(per_lane * element_size))) return false;
  }
  return a.cos_sin_stride % (per_lane / 2) == 0 && is_aligned(a.cos_sin, per_lane / 2 * sizeof(float));
}

template <typename T, int kHeadDim>
void launch_register_kernel(const RopeArgs& a, int64_t num_tokens, cudaStream_t stream) {
  const int num_jobs = a.num_heads + 2 * a.num_kv_heads;
  const dim3 grid(static_cast<unsigned>((num_tokens + kRegTokens - 1) / kRegTokens),
                  static_cast<unsigned>((num_jobs + kWarps - 1) / kWarps));
  auto kernel = a.is_neox ? rotary_cache_reg_kernel<T, kHeadDim, true> : rotary_cache_reg_kernel<T, kHeadDim, false>;
  launch_dependent(kernel, grid, dim3(kWarps * kWarpSize), 0, stream, current_device(), a,
                   static_cast<int>(num_tokens));
}

RopeArgs common_args(const TensorView& positions, const TensorView& query, const TensorView& key,
                     const TensorView& cos_sin_cache, bool is_neox) {
  RopeArgs a{};
  a.positions = positions.data_ptr<const int64_t>();
  a.positions_stride = positions.stride(0);
  a.cos_sin = cos_sin_cache.data_ptr<const float>();
  a.cos_sin_stride = cos_sin_cache.stride(0);
  a.max_position = cos_sin_cache.size(0);
  a.rotary_dim = static_cast<int>(cos_sin_cache.size(1));
  a.head_dim = static_cast<int>(query.size(2));
  a.is_neox = is_neox;
  a.num_heads = static_cast<int>(query.size(1));
  a.num_kv_heads = static_cast<int>(key.size(1));
  a.query = query.data;
  a.q_token_stride = query.stride(0);
  a.q_head_stride = query.stride(1);
  a.key = key.data;
  a.k_token_stride = key.stride(0);
  a.k_head_stride = key.stride(1);
  return a;
}

void launch(const RopeArgs& a, DType dtype, int64_t num_tokens, Stream stream) {
  TIDAL_CHECK(a.head_dim <= kMaxHeadDim, "head_dim=", a.head_dim, " must be <= ", kMaxHeadDim, " on the GPU");
  TIDAL_CHECK(num_tokens <= 0x7fffffff, "num_tokens=", num_tokens, " is too large");
  if (can_rotate_vectorized(a, dtype_size(dtype))) {
    TIDAL_DISPATCH_FLOAT(dtype, T, {
      constexpr int kVec = 16 / sizeof(T);
      const int64_t total = num_tokens * (a.num_heads + a.num_kv_heads) * (a.rotary_dim / 2 / kVec);
      const auto blocks = static_cast<unsigned>(std::min<int64_t>((total + kVecThreads - 1) / kVecThreads, 132 * 16));
      launch_dependent(rotary_neox_vec_kernel<T, kVec>, dim3(blocks), dim3(kVecThreads), 0,
                       static_cast<cudaStream_t>(stream.handle), current_device(), a, num_tokens);
    });
    return;
  }
  if (can_use_register_kernel(a, dtype_size(dtype))) {
    const auto s = static_cast<cudaStream_t>(stream.handle);
    TIDAL_DISPATCH_FLOAT(dtype, T, {
      if (a.head_dim == 256) {
        launch_register_kernel<T, 256>(a, num_tokens, s);
      } else if (a.head_dim == 128) {
        launch_register_kernel<T, 128>(a, num_tokens, s);
      } else if constexpr (64 % (2 * kWarpSize) == 0) {  // not with 64-lane warps (HIP)
        launch_register_kernel<T, 64>(a, num_tokens, s);
      }
    });
    return;
  }
  // NOTE(tidal): a block per token with its warps looping over the heads left a decode step of
  // 256 tokens at 12 us (H200): too few warps in flight. Now a warp per (token, head).
  const int num_jobs = a.num_heads + a.num_kv_heads * (a.key_cache != nullptr ? 2 : 1);
  const dim3 grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>(std::min((num_jobs + kWarps - 1) / kWarps, 65535)));
  TIDAL_DISPATCH_FLOAT(dtype, T, {
    launch_dependent(rotary_kernel<T>, grid, dim3(kWarps * kWarpSize), 0, static_cast<cudaStream_t>(stream.handle),
                     current_device(), a);
  });
}

}  // namespace

void rotary_embedding(TensorView positions, TensorView query, TensorView key, TensorView cos_sin_cache,
                      bool is_neox, Stream stream) {
  const int64_t num_tokens = query.size(0);
  if (num_tokens == 0) return;
  DeviceGuard guard(query.device.index);
  launch(common_args(positions, query, key, cos_sin_cache, is_neox), query.dtype, num_tokens, stream);
}

void rotary_embedding_and_cache(TensorView positions, TensorView query, TensorView key, TensorView value,
                                TensorView key_cache, TensorView value_cache, TensorView slot_mapping,
                                TensorView cos_sin_cache, bool is_neox, TensorView q_norm_weight,
                                TensorView k_norm_weight, float eps, Stream stream) {
  const int64_t num_tokens = query.size(0);
  if (num_tokens == 0) return;
  DeviceGuard guard(query.device.index);
  RopeArgs a = common_args(positions, query, key, cos_sin_cache, is_neox);
  a.value = value.data;
  a.v_token_stride = value.stride(0);
  a.v_head_stride = value.stride(1);
  a.key_cache = key_cache.data;
  a.value_cache = value_cache.data;
  a.fp8_cache = key_cache.dtype == DType::kUInt8;
  a.slot_mapping = slot_mapping.data_ptr<const int64_t>();
  a.slot_stride = slot_mapping.stride(0);
  a.num_slots = key_cache.size(0) * key_cache.size(1);
  a.q_norm_weight = q_norm_weight.data;
  a.k_norm_weight = k_norm_weight.data;
  a.eps = eps;
  launch(a, query.dtype, num_tokens, stream);
}

}  // namespace tidal::gpu
