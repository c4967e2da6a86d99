// SPDX-License-Identifier: Apache-2.0
// A linear layer for a few rows (decode at small batch): y = f(x) W^T (+ bias), with the elementwise
// op before it and the residual add after it fused in (tidal::gpu::skinny_linear). Built by nvcc,
// and by hipcc with -DTIDAL_USE_HIP.
//
// f is one of: identity; RMSNorm(x) * norm_weight; silu(x[:, :k]) * x[:, k:]. The result either goes
// to `out` (x's dtype or fp32) or is added into `residual` in place. A Llama layer at batch 1 is
// then four of these (qkv with the input norm, o_proj + residual, gate_up with the post-attention
// norm, down_proj with silu_and_mul + residual) plus rotary and attention, instead of ten kernels.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/async_copy.cuh"
#include "cuda/common.cuh"
#include "cuda/quant_linear.cuh"
#include "cuda/quant_mma.cuh"
#include "ops/kernels.h"

namespace tidal::gpu {
namespace {

// NOTE(tidal): napkin math. Llama-3-8B at batch 1 reads 16 GB of weights per token: 3.8 ms at the
// H200's 4.2 TB/s copy ceiling, so every GEMV must stream its weight at the ceiling and the rest of
// the step is overhead. Warp g of the grid takes rows g, g + warps, ... (no split-K, so the residual
// add needs no atomics) and walks each in groups of kUnroll 16-byte vectors per lane (4 KB): while
// it multiplies one group from registers, the next is loading. f(x) is computed once per block into
// shared memory (m * k elements, at most kMaxSmem), read as 16-byte vectors. Past 4 rows the
// shared-memory reads of x, not DRAM, bound the kernel (8 rows: 2x slower than cuBLAS on H200), so
// it takes at most 4. Measured on H200 and not kept (each slower, in the kernel and in S2): a
// contiguous run of rows per warp, L2 bulk prefetches 1-7 groups ahead, an early
// griddepcontrol.launch_dependents, and one block per SM to leave room for the next kernel.
constexpr int kThreads = 256;
constexpr int kUnroll = 8;
#if defined(TIDAL_USE_HIP)
constexpr int64_t kMaxSmem = 64 * 1024;
#else
constexpr int64_t kMaxSmem = 100 * 1024;
#endif
constexpr int64_t kMaxRows = 4;
// NOTE(tidal): both kernels are always launched as programmatic dependents (sm_90): their blocks start
// while the previous kernel drains, issue their first weight reads, and wait in wait_for_prior_grid
// for its results. Inside a CUDA graph this removes most of the gap between a decode step's kernels.
constexpr bool kProgrammatic = true;

// x's rows as the kernels hold them: 1, 2 or 4.
int padded_rows(int64_t m) { return m <= 1 ? 1 : m <= 2 ? 2 : 4; }

enum Prologue : int { kIdentity = 0, kRmsNorm = 1, kSiluMul = 2 };

// The weight's storage: x's dtype (kDense), or the codes of a quantized weight (quant::kInt8,
// quant::kInt4, quant::kFp8: quant_linear's layouts and format codes; the streamed kernel only).
constexpr int kDense = -1;

struct Params {
  const void* x;          // [m, k] (kSiluMul: [m, 2k]), row stride x_stride
  const void* weight;     // [n, k] (quantized: its codes, [n, k / 2] for int4), row stride w_stride
  const void* bias;       // [n] or null
  const void* norm_weight;  // [k] (kRmsNorm)
  void* out;              // [m, n] x's dtype or fp32 (out_fp32), row stride out_stride; null with residual
  void* residual;         // [m, n] x's dtype, row stride residual_stride; null without
  const float* scales;    // quantized: [n, num_groups], contiguous
  const uint8_t* zeros;   // int4: [n, num_groups], contiguous
  int64_t x_stride, w_stride, out_stride, residual_stride;
  int m, n, k;
  int num_groups;
  int group_shift;  // quantized: log2 of a group's 16-byte chunks of codes; -1 when num_groups is 1
  int prologue;
  bool out_fp32;
  float eps;
};

// One weight vector through the non-coherent path, not kept in L1 (each is read once).
template <typename V>
__device__ __forceinline__ V load_weight(const V* ptr) {
#if !defined(TIDAL_USE_HIP)
  if constexpr (sizeof(V) == 16) {
    uint4 raw;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(raw.x), "=r"(raw.y), "=r"(raw.z), "=r"(raw.w)
                 : "l"(ptr));
    V out;
    memcpy(&out, &raw, sizeof(out));
    return out;
  }
#endif
  return *ptr;
}

// f(x) for rows [0, m) into xs ([kM, k] in T); rows m .. kM-1 are zeros. Threads [0, num_threads)
// take part (a whole number of warps); sync() synchronises exactly them. scratch: kM floats per warp.
template <typename T, int kM, int kVec, typename Sync>
__device__ void prologue(const Params& p, T* xs, float* scratch, int tid, int num_threads, Sync sync) {
  using V = Vec<T, kVec>;
  const int num_vecs = p.k / kVec;
  const T* x = static_cast<const T*>(p.x);
  float inv_rms[kM];
#pragma unroll
  for (int r = 0; r < kM; ++r) inv_rms[r] = 1.0f;
  if (p.prologue == kRmsNorm) {
    float ss[kM];
#pragma unroll
    for (int r = 0; r < kM; ++r) ss[r] = 0.0f;
    for (int i = tid; i < num_vecs; i += num_threads) {
#pragma unroll
      for (int r = 0; r < kM; ++r) {
        if (r >= p.m) continue;
        const V v = load_vec<T, kVec>(x + r * p.x_stride + static_cast<int64_t>(i) * kVec);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float f = element_to_float(v, j);
          ss[r] += f * f;
        }
      }
    }
    const int warp = tid / kWarpSize, lane = tid % kWarpSize;
    const int num_warps = num_threads / kWarpSize;
#pragma unroll
    for (int r = 0; r < kM; ++r) {
      const float s = warp_sum(ss[r]);
      if (lane == 0) scratch[r * num_warps + warp] = s;
    }
    sync();
#pragma unroll
    for (int r = 0; r < kM; ++r) {
      float s = 0.0f;
      for (int w = 0; w < num_warps; ++w) s += scratch[r * num_warps + w];
      inv_rms[r] = rsqrtf(s / static_cast<float>(p.k) + p.eps);
    }
  }
  const T* nw = static_cast<const T*>(p.norm_weight);
  for (int i = tid; i < num_vecs; i += num_threads) {
    V w;
    if (p.prologue == kRmsNorm) w = load_vec_readonly<T, kVec>(nw + static_cast<int64_t>(i) * kVec);
#pragma unroll
    for (int r = 0; r < kM; ++r) {
      V o;
      if (r >= p.m) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) o.v[j] = from_float<T>(0.0f);
      } else if (p.prologue == kSiluMul) {
        const V g = load_vec<T, kVec>(x + r * p.x_stride + static_cast<int64_t>(i) * kVec);
        const V u = load_vec<T, kVec>(x + r * p.x_stride + p.k + static_cast<int64_t>(i) * kVec);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {  // silu_and_mul's expression and rounding
          const float gj = element_to_float(g, j);
          o.v[j] = from_float<T>(gj / (1.0f + __expf(-gj)) * element_to_float(u, j));
        }
      } else {
        const V v = load_vec<T, kVec>(x + r * p.x_stride + static_cast<int64_t>(i) * kVec);
        if (p.prologue == kRmsNorm) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) {  // rms_norm's expression and rounding
            const float f = element_to_float(v, j) * inv_rms[r];
            o.v[j] = from_float<T>(f * element_to_float(w, j));
          }
        } else {
          o = v;
        }
      }
      store_vec(xs + r * p.k + static_cast<int64_t>(i) * kVec, o);
    }
  }
  sync();
}

// Output row `row` for input row `r` (< m): value + bias, written to out or added into residual.
template <typename T>
__device__ __forceinline__ void store_result(const Params& p, int64_t row, int r, float value) {
  if (p.bias != nullptr) value += to_float(static_cast<const T*>(p.bias)[row]);
  if (p.residual != nullptr) {
    T* res = static_cast<T*>(p.residual) + r * p.residual_stride + row;
    *res = from_float<T>(to_float(*res) + value);
  } else if (p.out_fp32) {
    static_cast<float*>(p.out)[r * p.out_stride + row] = value;
  } else {
    static_cast<T*>(p.out)[r * p.out_stride + row] = from_float<T>(value);
  }
}

// Grid: enough blocks to fill the GPU once. Warp g of the grid takes rows g, g + warps, ... .
// Block: kThreads threads; dynamic shared memory kM * k elements of T.
template <typename T, int kM>
__global__ void __launch_bounds__(kThreads) skinny_linear_kernel(const Params p) {
  constexpr int kVec = 16 / sizeof(T);
  using V = Vec<T, kVec>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float scratch[kM * (kThreads / kWarpSize)];  // per row and warp: the norm's partial sums
  T* xs = reinterpret_cast<T*>(smem_raw);

  const int lane = threadIdx.x % kWarpSize;
  const int warps_per_block = blockDim.x / kWarpSize;
  const int64_t total_warps = static_cast<int64_t>(gridDim.x) * warps_per_block;
  const int64_t warp_id = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarpSize;
  const int num_vecs = p.k / kVec;
  const int group_span = kUnroll * kWarpSize;  // vectors of a row one group covers
  const V* weight = static_cast<const V*>(p.weight);
  const int64_t w_vec_stride = p.w_stride / kVec;

  // The warp's work is a sequence of groups (row, first vector of the row), row-major.
  const auto advance = [&](int64_t& r, int& b) {
    b += group_span;
    if (b >= num_vecs) {
      r += total_warps;
      b = 0;
    }
  };
  int64_t row = warp_id;
  int base = 0;
  V cur[kUnroll];
  const auto load_group = [&](V (&dst)[kUnroll], int64_t r, int b) {
    const V* w_row = weight + r * w_vec_stride;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int idx = b + u * kWarpSize + lane;
      if (idx < num_vecs) dst[u] = load_weight(w_row + idx);
    }
  };
  // The weights do not depend on the previous kernel: start streaming them before waiting for it.
  if (row < p.n) load_group(cur, row, base);

  wait_for_prior_grid();
  prologue<T, kM, kVec>(p, xs, scratch, threadIdx.x, blockDim.x, [] { __syncthreads(); });

  float acc[kM];
#pragma unroll
  for (int r = 0; r < kM; ++r) acc[r] = 0.0f;
  while (row < p.n) {
    int64_t next_row = row;
    int next_base = base;
    advance(next_row, next_base);
    V nxt[kUnroll];
    if (next_row < p.n) load_group(nxt, next_row, next_base);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int idx = base + u * kWarpSize + lane;
      if (idx < num_vecs) {
        float wf[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) wf[j] = element_to_float(cur[u], j);
#pragma unroll
        for (int r = 0; r < kM; ++r) {
          const V xv = load_vec<T, kVec>(xs + r * p.k + static_cast<int64_t>(idx) * kVec);
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[r] += wf[j] * element_to_float(xv, j);
        }
      }
    }
    if (next_row != row) {  // the row is done: reduce over the warp, lane r writes row r's output
#pragma unroll
      for (int r = 0; r < kM; ++r) acc[r] = warp_sum(acc[r]);
      float mine = 0.0f;
#pragma unroll
      for (int r = 0; r < kM; ++r) {
        if (lane == r) mine = acc[r];
        acc[r] = 0.0f;
      }
      if (lane < p.m) store_result<T>(p, row, lane, mine);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) cur[u] = nxt[u];
    row = next_row;
    base = next_base;
  }
}

#if !defined(TIDAL_USE_HIP)
// ---- the streamed kernel (sm_90) --------------------------------------------------------------------
// NOTE(tidal): the register-streamed kernel above keeps ~4 KB per warp in flight and walks its rows
// one group after another, so each projection pays the DRAM latency a few times over at its start
// and tail: the small projections of a Llama-3-8B layer ran at 43-50% of the copy ceiling (qkv 18
// us, o_proj 13 us in a graph, against 12 and 8 at the ceiling) and a layer lost ~27 us a step. Here
// one block per SM streams its share of the weight through a ring of 32 KB shared-memory stages
// filled by bulk copies (one producer lane, an mbarrier per stage): 128 KB per SM is in flight from
// the kernel's first instruction, before the previous kernel has even finished (its results, x, are
// only read after wait_for_prior_grid), so the ramp overlaps the kernel before. Eight consumer
// warps compute f(x) into shared memory once, then take a tile's rows (one row each; a row longer
// than a tile is split into segments of one group's consecutive tiles, its sum kept in registers).
// Blocks take contiguous runs of row groups (groups of 8 rows: at most 1/8 of a group of imbalance
// per block for a Llama layer's shapes).
// A quantized weight streams the same way, as bytes: each stage also carries its rows' scales (and
// int4 zero points), copied with the codes. Its tiles are 16 rows, which the consumer warps take as
// mma A fragments (quant::block_dot: x read once per 16 rows; two int4 codes widened in two
// instructions, two FP8 codes in four), each warp a share of the tile's k blocks, their sums met in
// shared memory at each row group's end. Widened in registers one code at a time, the quantized
// formats had left the consumers behind the ring (H100, Llama-3-8B gate_up at one row: int4 at 38%
// of the copy ceiling, int8 and FP8 60%); on tensor cores the same projection runs at 66% (int8),
// 52% (int4) and 67% (FP8), as fast as quant_linear's kernels or faster (bench/RESULTS.md).
constexpr int kStreamConsumerWarps = 8;
constexpr int kStreamConsumers = kStreamConsumerWarps * kWarpSize;
constexpr int kStreamThreads = kStreamConsumers + kWarpSize;  // plus the producer warp
constexpr int kMaxStages = 8;
// dynamic shared memory: stages + f(x) (the quantized consumers add 8 KB of static partial sums
// within the 227 KB a block may have)
constexpr int64_t kStreamSmemBudget = 216 * 1024;
constexpr int kMmaRows = 16;  // weight rows per tile of the quantized consumers (one mma A tile)

// The ring: `stages` stages of `stage_bytes`. 4 x 32 KB unless TIDAL_SKINNY_STAGES (STAGESxKIB, e.g.
// 3x32) says otherwise: a knob for measuring the ring, read once.
struct StreamRing {
  int stages;
  int64_t stage_bytes;
};

StreamRing stream_ring() {
  static const StreamRing ring = [] {
    StreamRing r{4, 32 * 1024};
    const char* value = std::getenv("TIDAL_SKINNY_STAGES");
    if (value == nullptr || *value == '\0') return r;
    int stages = 0, kib = 0;
    char tail = 0;
    if (std::sscanf(value, "%dx%d%c", &stages, &kib, &tail) != 2 || stages < 2 || stages > kMaxStages ||
        (kib != 8 && kib != 16 && kib != 32 && kib != 64)) {
      throw std::invalid_argument(std::string("TIDAL_SKINNY_STAGES=") + value +
                                  ": expected STAGESxKIB, 2 to 8 stages of 8, 16, 32 or 64 KiB (default 4x32)");
    }
    r.stages = stages;
    r.stage_bytes = static_cast<int64_t>(kib) * 1024;
    return r;
  }();
  return ring;
}

// The first bytes each block of a streamed skinny_linear over the next kernel's weight reads (its
// first row group's start, as many bytes as its ring holds), prefetched into L2 by this kernel's
// producers once their own copies are issued. base null: none.
struct L2Prefetch {
  const char* base;
  int64_t extent;       // bytes from base to the end of the weight's last row
  int64_t group_bytes;  // bytes between consecutive row groups of the next kernel
  int64_t groups;       // the next kernel's row groups
  int64_t bytes;        // per block of the next kernel
  int blocks;           // the next kernel's grid
};

struct StreamPlan {
  int rows;         // weight rows per tile: kStreamConsumerWarps, or a multiple of it when segments == 1
  int seg_bytes;    // bytes of a row per tile (a multiple of 16); a row's last tile may be shorter
  int segments;     // tiles per group of `rows` rows, ceil(row bytes / seg_bytes)
  int stages;       // ring depth
  int stage_bytes;  // the weight bytes a stage holds
  int stage_stride;  // bytes from one stage to the next: stage_bytes, plus a quantized weight's tail
  // A quantized weight's tail of each stage: the tile's scales ([rows][scale_stride] fp32) at
  // scale_offset and zero points ([rows][zero_stride] uint8) at zero_offset. whole_groups: a tile
  // reads whole rows of them (one segment a row, or one group a row), copied at once; otherwise the
  // groups segment `seg` covers (segment_groups), one copy per row.
  int scale_offset, zero_offset, scale_stride, zero_stride;
  bool whole_groups;
};

// Bytes of one weight row: k elements of T, or k codes of a quantized format.
template <typename T, int kFormat>
__host__ __device__ __forceinline__ int64_t weight_row_bytes(int64_t k) {
  return kFormat == kDense ? k * static_cast<int64_t>(sizeof(T)) : kFormat == quant::kInt4 ? k / 2 : k;
}

// The groups [lo, hi) of scales that segment `seg` of a row reads (a quantized weight whose groups
// are not whole per tile).
__host__ __device__ __forceinline__ void segment_groups(const StreamPlan& plan, int64_t row_bytes, int group_shift,
                                                        int seg, int& lo, int& hi) {
  const int64_t first = static_cast<int64_t>(seg) * (plan.seg_bytes / 16);
  const int64_t end = (row_bytes < static_cast<int64_t>(seg + 1) * plan.seg_bytes ? row_bytes
                                                                                   : static_cast<int64_t>(seg + 1) * plan.seg_bytes) / 16;
  lo = group_shift < 0 ? 0 : static_cast<int>(first >> group_shift);
  hi = group_shift < 0 ? 1 : static_cast<int>(((end - 1) >> group_shift) + 1);
}

template <typename T, int kM, int kFormat>
__global__ void __launch_bounds__(kStreamThreads, 1) skinny_linear_streamed_kernel(const Params p, const StreamPlan plan,
                                                                                    const L2Prefetch next) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kVec = 16 / sizeof(T);
  using V = Vec<T, kVec>;
  // inputs of x one 16-byte chunk of the weight covers
  constexpr int kChunkInputs = kFormat == kDense ? kVec : quant::codes_per_chunk<kFormat>();
  // quantized weights take tensor cores (kMmaRows-row tiles, stream_plan's tile_rows)
  constexpr bool kMma = kFormat != kDense;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float partial[kMma ? 2 * 4 * kStreamConsumers : 1];  // kMma: the warps' sums, two buffers
  __shared__ __align__(8) uint64_t full[kMaxStages];   // a stage's bytes have landed
  __shared__ __align__(8) uint64_t empty[kMaxStages];  // every consumer warp is done with a stage
  __shared__ float scratch[kM * kStreamConsumerWarps];
  T* xs = reinterpret_cast<T*>(smem_raw + plan.stages * plan.stage_stride);

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t row_bytes = weight_row_bytes<T, kFormat>(p.k);
  const int64_t groups = (p.n + plan.rows - 1) / plan.rows;
  const int64_t first_group = groups * blockIdx.x / gridDim.x;
  const int64_t num_tiles = (groups * (blockIdx.x + 1) / gridDim.x - first_group) * plan.segments;
  if (threadIdx.x == 0) {
    for (int s = 0; s < plan.stages; ++s) {
      mbarrier_init(shared_address(&full[s]), 1);
      mbarrier_init(shared_address(&empty[s]), kStreamConsumerWarps);
    }
    mbarrier_init_fence();
  }
  __syncthreads();

  if (warp == kStreamConsumerWarps) {
    // The producer lane: the weights do not depend on the previous kernel, so the first stages are
    // filled before waiting for it.
    if (lane == 0) {
      const char* weight = static_cast<const char*>(p.weight);
      const int64_t w_stride = p.w_stride * (kFormat == kDense ? static_cast<int64_t>(sizeof(T)) : 1);  // bytes
      const bool contiguous = plan.segments == 1 && w_stride == row_bytes;  // a tile is one run of bytes
      for (int64_t t = 0; t < num_tiles; ++t) {
        const int s = static_cast<int>(t % plan.stages);
        const int64_t round = t / plan.stages;
        if (round > 0) mbarrier_wait(shared_address(&empty[s]), static_cast<uint32_t>((round - 1) & 1));
        const int64_t row0 = (first_group + t / plan.segments) * plan.rows;
        const int seg = static_cast<int>(t % plan.segments);
        const int rows = static_cast<int>(min(static_cast<int64_t>(plan.rows), p.n - row0));
        const uint32_t seg_bytes = static_cast<uint32_t>(min(static_cast<int64_t>(plan.seg_bytes),
                                                             row_bytes - static_cast<int64_t>(seg) * plan.seg_bytes));
        const uint32_t bar = shared_address(&full[s]);
        const uint32_t stage = shared_address(smem_raw + s * plan.stage_stride);
        const char* src = weight + row0 * w_stride + static_cast<int64_t>(seg) * plan.seg_bytes;
        int lo = 0, hi = p.num_groups;  // the tile's groups of scales (quantized)
        if (kFormat != kDense && !plan.whole_groups) segment_groups(plan, row_bytes, p.group_shift, seg, lo, hi);
        const uint32_t group_bytes = kFormat == kDense ? 0u : (kFormat == quant::kInt4 ? 5u : 4u) * (hi - lo);
        mbarrier_arrive_expect_tx(bar, (seg_bytes + group_bytes) * rows);
        if (contiguous) {
          bulk_copy_to_shared(stage, src, seg_bytes * rows, bar);
        } else {
          for (int r = 0; r < rows; ++r) {
            bulk_copy_to_shared(stage + static_cast<uint32_t>(r * plan.seg_bytes), src + r * w_stride, seg_bytes, bar);
          }
        }
        if constexpr (kFormat != kDense) {
          const int64_t g0 = row0 * p.num_groups;
          const uint32_t span = static_cast<uint32_t>(hi - lo);
          if (plan.whole_groups) {
            bulk_copy_to_shared(stage + plan.scale_offset, p.scales + g0, 4u * span * rows, bar);
            if (kFormat == quant::kInt4) bulk_copy_to_shared(stage + plan.zero_offset, p.zeros + g0, span * rows, bar);
          } else {
            for (int r = 0; r < rows; ++r) {
              const int64_t g = g0 + static_cast<int64_t>(r) * p.num_groups + lo;
              bulk_copy_to_shared(stage + plan.scale_offset + 4u * r * plan.scale_stride, p.scales + g, 4u * span, bar);
              if (kFormat == quant::kInt4) {
                bulk_copy_to_shared(stage + plan.zero_offset + static_cast<uint32_t>(r * plan.zero_stride), p.zeros + g,
                                    span, bar);
              }
            }
          }
        }
      }
      // NOTE(tidal): the next projection's first tiles, into L2 while this kernel drains and the kernels
      // between the two (rotary, attention: latency-bound, DRAM mostly idle) run.
      constexpr int64_t kChunk = 32 * 1024;
      for (int64_t j = blockIdx.x; next.base != nullptr && j < next.blocks; j += gridDim.x) {
        const int64_t start = next.groups * j / next.blocks * next.group_bytes;
        const int64_t len = min(next.bytes, next.extent - start) / 16 * 16;
        for (int64_t off = 0; off < len; off += kChunk) {
          bulk_prefetch_l2(next.base + start + off, static_cast<uint32_t>(min(kChunk, len - off)));
        }
      }
      allow_dependents();
    }
    return;
  }

  wait_for_prior_grid();
  prologue<T, kM, kVec>(p, xs, scratch, threadIdx.x, kStreamConsumers,
                        [] { asm volatile("bar.sync 1, %0;" ::"n"(kStreamConsumers) : "memory"); });

  float acc[kM];
#pragma unroll
  for (int r = 0; r < kM; ++r) acc[r] = 0.0f;
  float mma_acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // kMma: rows lane/4 and lane/4 + 8, tokens 2 (lane % 4) + {0, 1}
  int parity = 0;
  for (int64_t t = 0; t < num_tiles; ++t) {
    const int s = static_cast<int>(t % plan.stages);
    mbarrier_wait(shared_address(&full[s]), static_cast<uint32_t>((t / plan.stages) & 1));
    const int64_t row0 = (first_group + t / plan.segments) * plan.rows;
    const int seg = static_cast<int>(t % plan.segments);
    const int chunks = static_cast<int>(min(static_cast<int64_t>(plan.seg_bytes),
                                            row_bytes - static_cast<int64_t>(seg) * plan.seg_bytes) / 16);
    const int first_chunk = seg * (plan.seg_bytes / 16);  // of the row
    const unsigned char* stage = smem_raw + s * plan.stage_stride;
    const T* x_seg = xs + static_cast<int64_t>(first_chunk) * kChunkInputs;
    if constexpr (kMma) {
      // k block kb of the segment: 64 bytes of each of the 16 rows, lane (gid, tig) holding 16 bytes of
      // rows gid and gid + 8
      const int gid = lane / 4, tig = lane % 4;
      int lo = 0, hi = 0;
      if (!plan.whole_groups) segment_groups(plan, row_bytes, p.group_shift, seg, lo, hi);
      const float* scales = reinterpret_cast<const float*>(stage + plan.scale_offset) - lo;
      const uint8_t* zeros = stage + plan.zero_offset - lo;
      for (int kb = warp; kb < chunks / 4; kb += kStreamConsumerWarps) {
        const unsigned char* w = stage + kb * 64 + tig * 16;
        const uint4 raw0 = *reinterpret_cast<const uint4*>(w + gid * plan.seg_bytes);
        const uint4 raw1 = *reinterpret_cast<const uint4*>(w + (gid + 8) * plan.seg_bytes);
        const int chunk = first_chunk + kb * 4;  // the k block's first chunk of the row
        const int g = p.group_shift < 0 ? 0 : chunk >> p.group_shift;
        const float s0 = scales[gid * plan.scale_stride + g], s1 = scales[(gid + 8) * plan.scale_stride + g];
        uint32_t off0 = 0, off1 = 0;
        if constexpr (kFormat == quant::kInt4) {
          off0 = quant::offset_pair<T>(zeros[gid * plan.zero_stride + g]);
          off1 = quant::offset_pair<T>(zeros[(gid + 8) * plan.zero_stride + g]);
        }
        float blk[1][4] = {{0.0f, 0.0f, 0.0f, 0.0f}};
        quant::block_dot<T, kFormat, 1, true>(kM, p.k, xs, gid, (chunk + tig) * kChunkInputs, raw0, raw1, off0, off1,
                                              blk);
        mma_acc[0] = fmaf(s0, blk[0][0], mma_acc[0]);
        mma_acc[1] = fmaf(s0, blk[0][1], mma_acc[1]);
        mma_acc[2] = fmaf(s1, blk[0][2], mma_acc[2]);
        mma_acc[3] = fmaf(s1, blk[0][3], mma_acc[3]);
      }
    } else {
      for (int rl = warp; rl < plan.rows && row0 + rl < p.n; rl += kStreamConsumerWarps) {
        const V* w = reinterpret_cast<const V*>(stage + rl * plan.seg_bytes);
#pragma unroll 4
        for (int i = lane; i < chunks; i += kWarpSize) {
          const V wv = w[i];
          float wf[kVec];
#pragma unroll
          for (int j = 0; j < kVec; ++j) wf[j] = element_to_float(wv, j);
#pragma unroll
          for (int r = 0; r < kM; ++r) {
            const V xv = load_vec<T, kVec>(x_seg + r * p.k + i * kVec);
#pragma unroll
            for (int j = 0; j < kVec; ++j) acc[r] += wf[j] * element_to_float(xv, j);
          }
        }
        if (seg == plan.segments - 1) {  // the row is done: lane r writes input row r's result
          float mine = 0.0f;
#pragma unroll
          for (int r = 0; r < kM; ++r) {
            const float sum = warp_sum(acc[r]);
            if (lane == r) mine = sum;
            acc[r] = 0.0f;
          }
          if (lane < p.m) store_result<T>(p, row0 + rl, lane, mine);
        }
      }
    }
    __syncwarp();
    if (lane == 0) mbarrier_arrive(shared_address(&empty[s]));
    if constexpr (kMma) {
      if (seg == plan.segments - 1) {
        // the row group is done: the warps' sums meet in shared memory (two buffers: one barrier a
        // group), consumer thread (c, l) sums accumulator c of lane l
        float* part = partial + parity * (kStreamConsumers * 4);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          part[c * kStreamConsumers + threadIdx.x] = mma_acc[c];
          mma_acc[c] = 0.0f;
        }
        asm volatile("bar.sync 1, %0;" ::"n"(kStreamConsumers) : "memory");
        const int c = threadIdx.x / kWarpSize, l = threadIdx.x % kWarpSize;
        const int token = 2 * (l % 4) + (c & 1);
        const int64_t row = row0 + l / 4 + (c < 2 ? 0 : 8);
        if (c < 4 && token < p.m && row < p.n) {
          float sum = 0.0f;
#pragma unroll
          for (int w = 0; w < kStreamConsumerWarps; ++w) sum += part[c * kStreamConsumers + w * kWarpSize + l];
          store_result<T>(p, row, token, sum);
        }
        parity ^= 1;
      }
    }
  }
#else
  (void)p, (void)plan, (void)next;
  __trap();
#endif
}

// The ring's tiles for rows of `row_bytes` (the dense layout; a quantized weight adds its tail with
// add_quant_tail). tile_rows > 0: tiles of exactly that many rows (the quantized consumers'), each
// row's segment a multiple of 64 bytes. stages 0: f(x) leaves no room for two stages.
StreamPlan stream_plan(int64_t row_bytes, int64_t xs_bytes, int tile_rows = 0) {
  const StreamRing ring = stream_ring();
  StreamPlan plan{};
  if (tile_rows > 0) {
    plan.rows = tile_rows;
    plan.seg_bytes = static_cast<int>(std::min<int64_t>(ring.stage_bytes / tile_rows / 64 * 64, row_bytes));
    plan.segments = static_cast<int>((row_bytes + plan.seg_bytes - 1) / plan.seg_bytes);
  } else if (row_bytes * kStreamConsumerWarps <= ring.stage_bytes) {  // whole rows, a multiple of the consumer warps a tile
    plan.seg_bytes = static_cast<int>(row_bytes);
    plan.rows = static_cast<int>(ring.stage_bytes / row_bytes / kStreamConsumerWarps * kStreamConsumerWarps);
    plan.segments = 1;
  } else {  // one row per consumer warp, split into segments
    plan.rows = kStreamConsumerWarps;
    plan.seg_bytes = static_cast<int>(ring.stage_bytes / kStreamConsumerWarps / 16 * 16);
    plan.segments = static_cast<int>((row_bytes + plan.seg_bytes - 1) / plan.seg_bytes);
  }
  plan.stage_bytes = plan.stage_stride = static_cast<int>(ring.stage_bytes);
  plan.scale_offset = plan.zero_offset = plan.stage_bytes;
  const int64_t room = kStreamSmemBudget - xs_bytes;
  plan.stages = room < 2 * plan.stage_stride ? 0 : static_cast<int>(std::min<int64_t>(ring.stages, room / plan.stage_stride));
  plan.whole_groups = true;
  return plan;
}

// Gives a quantized weight's plan its tail (scales, zero points) and checks that every copy of it is
// whole 16-byte units at 16-byte boundaries (what bulk copies need); false when one is not, or when
// the stages no longer fit. p: the launch's parameters (n, k, num_groups, group_shift, the pointers).
bool add_quant_tail(StreamPlan& plan, const Params& p, int format, int64_t xs_bytes) {
  const bool has_zeros = format == quant::kInt4;
  const int64_t groups = p.num_groups, row_bytes = format == quant::kInt4 ? p.k / 2 : p.k;
  const auto aligned = [](int64_t bytes) { return bytes % 16 == 0; };
  if (!is_aligned(p.scales, 16) || (has_zeros && !is_aligned(p.zeros, 16))) return false;
  plan.whole_groups = plan.segments == 1 || groups == 1;
  int64_t scale_bytes = 0, zero_bytes = 0;  // per stage
  if (plan.whole_groups) {
    // one copy of rows x groups at row0 x groups: every tile's row count (plan.rows, and the last
    // group's remainder) must keep it whole
    const int64_t last = p.n % plan.rows;
    for (const int64_t rows : {static_cast<int64_t>(plan.rows), last}) {
      if (rows == 0) continue;
      if (!aligned(4 * rows * groups) || (has_zeros && !aligned(rows * groups))) return false;
    }
    plan.scale_stride = plan.zero_stride = static_cast<int>(groups);
    scale_bytes = 4 * plan.rows * groups;
    zero_bytes = has_zeros ? plan.rows * groups : 0;
  } else {
    // one copy per row and segment: its start and length whole units
    if (!aligned(4 * groups) || (has_zeros && !aligned(groups))) return false;
    int widest = 0;
    for (int seg = 0; seg < plan.segments; ++seg) {
      int lo = 0, hi = 0;
      segment_groups(plan, row_bytes, p.group_shift, seg, lo, hi);
      if (!aligned(4 * static_cast<int64_t>(lo)) || !aligned(4 * static_cast<int64_t>(hi - lo))) return false;
      if (has_zeros && (!aligned(lo) || !aligned(hi - lo))) return false;
      widest = std::max(widest, hi - lo);
    }
    plan.scale_stride = plan.zero_stride = widest;  // whole units: checked above
    scale_bytes = 4 * static_cast<int64_t>(plan.rows) * widest;
    zero_bytes = has_zeros ? static_cast<int64_t>(plan.rows) * widest : 0;
  }
  plan.scale_offset = plan.stage_bytes;
  plan.zero_offset = static_cast<int>(plan.scale_offset + scale_bytes);
  plan.stage_stride = static_cast<int>((plan.zero_offset + zero_bytes + 15) / 16 * 16);
  const int64_t room = kStreamSmemBudget - xs_bytes;
  plan.stages = room < 2 * plan.stage_stride ? 0 : static_cast<int>(std::min<int64_t>(stream_ring().stages, room / plan.stage_stride));
  return plan.stages >= 2;
}

// Whether the streamed kernel runs on `device`: sm_90 or later, with code compiled for it.
bool streamed_kernel_runs(int device) {
  constexpr int kMaxDevices = 64;
  static int state[kMaxDevices] = {};  // 0: not read yet, 1: yes, 2: no
  if (device < 0 || device >= kMaxDevices) return false;
  if (state[device] == 0) {
    int major = 0;
    TIDAL_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    bool runs = major >= 9;
    if (runs) {
      cudaFuncAttributes attributes{};
      TIDAL_CUDA_CHECK(cudaFuncGetAttributes(&attributes, skinny_linear_streamed_kernel<float, 1, kDense>));
      runs = attributes.ptxVersion >= 90;
    }
    state[device] = runs ? 1 : 2;
  }
  return state[device] == 1;
}

// Where the blocks of a streamed skinny_linear over `weight` (with m rows of x) start reading: its
// rows as bytes (a quantized weight's codes included; its tail does not move where they start).
L2Prefetch l2_prefetch(TensorView weight, int m, int device, cudaStream_t stream) {
  L2Prefetch next{};
  if (weight.data == nullptr || weight.size(0) == 0) return next;
  const int64_t esize = dtype_size(weight.dtype), n = weight.size(0), k = weight.size(1);
  const StreamPlan plan = stream_plan(k * esize, padded_rows(m) * k * esize);
  if (plan.stages <= 0) return next;
  next.base = static_cast<const char*>(weight.data);
  next.extent = ((n - 1) * weight.stride(0) + k) * esize;
  next.group_bytes = plan.rows * weight.stride(0) * esize;
  next.groups = (n + plan.rows - 1) / plan.rows;
  next.bytes = static_cast<int64_t>(plan.stages) * plan.stage_bytes;
  next.blocks = static_cast<int>(std::min<int64_t>(next.groups, multiprocessor_count(device, stream)));
  return next;
}

// The plan of a streamed launch of these parameters (x's rows held as kM, elements of esize bytes);
// stages 0 when the kernel does not take them.
StreamPlan launch_plan(const Params& p, int format, int64_t esize, int kM) {
  const int64_t xs_bytes = kM * static_cast<int64_t>(p.k) * esize;
  const int64_t row_bytes = format == kDense ? p.k * esize : format == quant::kInt4 ? p.k / 2 : p.k;
  StreamPlan plan = stream_plan(row_bytes, xs_bytes, format == kDense ? 0 : kMmaRows);
  if (format != kDense && plan.stages > 0 && !add_quant_tail(plan, p, format, xs_bytes)) plan.stages = 0;
  return plan;
}

template <typename T, int kM, int kFormat>
void launch_streamed(const Params& p, const StreamPlan& plan, const L2Prefetch& next, int device, cudaStream_t stream) {
  const auto kernel = skinny_linear_streamed_kernel<T, kM, kFormat>;
  const int64_t xs_bytes = kM * static_cast<int64_t>(p.k) * sizeof(T);
  static bool raised[64] = {};
  if (device >= 0 && device < 64 && !raised[device]) {
    TIDAL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(kStreamSmemBudget)));
    raised[device] = true;
  }
  const int64_t groups = (p.n + plan.rows - 1) / plan.rows;
  const int64_t sms = multiprocessor_count(device, stream);
  launch_kernel(kernel, dim3(static_cast<unsigned>(groups < sms ? groups : sms)), dim3(kStreamThreads),
                static_cast<size_t>(static_cast<int64_t>(plan.stages) * plan.stage_stride + xs_bytes), stream, kProgrammatic,
                p, plan, next);
}
#endif  // !TIDAL_USE_HIP

template <typename T, int kM>
void launch(const Params& p, int device, cudaStream_t stream) {
  const auto kernel = skinny_linear_kernel<T, kM>;
  const int smem = static_cast<int>(kM * static_cast<int64_t>(p.k) * sizeof(T));
  const int warps_per_block = kThreads / kWarpSize;
  const int64_t row_blocks = (p.n + warps_per_block - 1) / warps_per_block;
#if defined(TIDAL_USE_HIP)
  const int64_t resident = 2 * static_cast<int64_t>(multiprocessor_count(device, stream));
#else
  // NOTE(tidal): the dynamic size plus the static scratch must fit the kernel's limit, whose default
  // is 48 KB in all; raised once per device to what any k this kernel takes can need.
  static bool raised[64] = {};
  if (device >= 0 && device < 64 && !raised[device]) {
    TIDAL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(kMaxSmem)));
    raised[device] = true;
  }
  int per_sm = 0;
  TIDAL_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, static_cast<size_t>(smem)));
  const int64_t resident = static_cast<int64_t>(per_sm > 0 ? per_sm : 1) * multiprocessor_count(device, stream);
#endif
  const unsigned grid = static_cast<unsigned>(row_blocks < resident ? row_blocks : resident);
  launch_kernel(kernel, dim3(grid), dim3(kThreads), static_cast<size_t>(smem), stream, kProgrammatic, p);
}

// The kernel for these parameters: the streamed kernel where it runs (sm_90), else the
// register-streamed one (dense weights only: skinny_linear_supported keeps quantized ones off it).
template <typename T, int kM>
void launch_best(const Params& p, int format, TensorView prefetch, int device, cudaStream_t stream) {
#if !defined(TIDAL_USE_HIP)
  if (streamed_kernel_runs(device)) {
    const StreamPlan plan = launch_plan(p, format, sizeof(T), kM);
    const L2Prefetch next = l2_prefetch(prefetch, p.m, device, stream);
    if constexpr (!std::is_same_v<T, float>) {  // quantized weights take 16-bit x only
      switch (format) {
        case quant::kInt8: return launch_streamed<T, kM, quant::kInt8>(p, plan, next, device, stream);
        case quant::kInt4: return launch_streamed<T, kM, quant::kInt4>(p, plan, next, device, stream);
        case quant::kFp8: return launch_streamed<T, kM, quant::kFp8>(p, plan, next, device, stream);
        default: break;
      }
    }
    return launch_streamed<T, kM, kDense>(p, plan, next, device, stream);
  }
#endif
  (void)format, (void)prefetch;
  launch<T, kM>(p, device, stream);
}

template <typename T>
void launch_rows(const Params& p, int format, TensorView prefetch, int device, cudaStream_t stream) {
  if (p.m <= 1) return launch_best<T, 1>(p, format, prefetch, device, stream);
  if (p.m <= 2) return launch_best<T, 2>(p, format, prefetch, device, stream);
  return launch_best<T, 4>(p, format, prefetch, device, stream);
}

// The kernel's parameters from the op's tensors (zeros and scales empty for a dense weight).
Params make_params(TensorView out, TensorView residual, TensorView x, TensorView weight, TensorView bias,
                   TensorView norm_weight, int prologue_kind, float eps, int format, TensorView scales, TensorView zeros) {
  Params p{};
  p.x = x.data;
  p.weight = weight.data;
  p.bias = bias.data;
  p.norm_weight = norm_weight.data;
  p.out = out.data;
  p.residual = residual.data;
  p.scales = static_cast<const float*>(scales.data);
  p.zeros = static_cast<const uint8_t*>(zeros.data);
  p.x_stride = x.stride(0);
  p.w_stride = weight.stride(0);
  p.out_stride = out.data != nullptr ? out.stride(0) : 0;
  p.residual_stride = residual.data != nullptr ? residual.stride(0) : 0;
  p.m = static_cast<int>(x.size(0));
  p.n = static_cast<int>(weight.size(0));
  p.k = static_cast<int>(format == quant::kInt4 ? 2 * weight.size(1) : weight.size(1));
  p.group_shift = -1;
  if (format != kDense) {
    p.num_groups = static_cast<int>(scales.size(1));
    // a group's 16-byte chunks, a power of two (else group_shift stays -1 and, with several groups,
    // the quantized kernel does not take the weight)
    const int64_t inputs = p.k / p.num_groups, chunk = format == quant::kInt4 ? 32 : 16;
    if (p.num_groups > 1 && inputs % chunk == 0) {
      const int64_t chunks = inputs / chunk;
      for (int shift = 0; shift < 31; ++shift) {
        if ((int64_t{1} << shift) == chunks) p.group_shift = shift;
      }
    }
  }
  p.prologue = prologue_kind;
  p.out_fp32 = out.data != nullptr && out.dtype == DType::kFloat32 && x.dtype != DType::kFloat32;
  p.eps = eps;
  return p;
}

}  // namespace

bool skinny_linear_supported(TensorView x, TensorView weight, int format, TensorView scales, TensorView zeros) {
  const int64_t m = x.size(0), k = format == quant::kInt4 ? 2 * weight.size(1) : weight.size(1);
  const int64_t vec = 16 / dtype_size(x.dtype);
  if (m < 1 || m > kMaxRows || k < 1 || k % vec != 0 || weight.size(0) > INT_MAX || k > INT_MAX) return false;
  if (!is_aligned(x.data, 16) || !is_aligned(weight.data, 16) || x.stride(0) % vec != 0) return false;
  if (format == kDense) {
    return padded_rows(m) * k * static_cast<int64_t>(dtype_size(x.dtype)) <= kMaxSmem && weight.stride(0) % vec == 0;
  }
#if defined(TIDAL_USE_HIP)
  (void)scales, (void)zeros;
  return false;
#else
  // quantized: the streamed kernel only (on tensor cores), for 16-bit x, rows of whole 64-byte k
  // blocks of codes, groups of a power of two of k blocks (or one group a row)
  if (x.dtype == DType::kFloat32 || !streamed_kernel_runs(x.device.index)) return false;
  const int64_t chunk = format == quant::kInt4 ? 32 : 16;  // codes per 16 bytes
  if (k % (4 * chunk) != 0 || weight.stride(0) % 16 != 0) return false;
  const Params p = make_params({}, {}, x, weight, {}, {}, kIdentity, 0.0f, format, scales, zeros);
  if (p.num_groups > 1 && p.group_shift < 2) return false;
  return launch_plan(p, format, dtype_size(x.dtype), padded_rows(m)).stages > 0;
#endif
}

void skinny_linear(TensorView out, TensorView residual, TensorView x, TensorView weight, TensorView bias,
                   TensorView norm_weight, int prologue_kind, float eps, int format, TensorView scales,
                   TensorView zeros, TensorView prefetch, Stream stream) {
  const Params p = make_params(out, residual, x, weight, bias, norm_weight, prologue_kind, eps, format, scales, zeros);
  DeviceGuard guard(x.device.index);
  const auto s = static_cast<cudaStream_t>(stream.handle);
  TIDAL_DISPATCH_FLOAT(x.dtype, T, launch_rows<T>(p, format, prefetch, x.device.index, s));
}

}  // namespace tidal::gpu
