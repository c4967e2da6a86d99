// SPDX-License-Identifier: Apache-2.0
// fused_moe on the GPU, five launches and no host synchronisation:
//   1. route:    a warp per token: fp32 softmax of the router logits, top-k (ties: lower expert),
//                renormalisation, the weights rounded to the model dtype unless fp32_weights, the
//                token's slots written in ascending expert order (the order the combine sums in);
//   2. align:    one block: slots counted per expert, each expert's run padded to the tile height,
//                the slots placed in expert order, one tile -> expert entry per tile;
//   3. gate_up:  one grouped GEMM over every expert's tiles, gate and up columns of one tile side by
//                side so the epilogue writes silu(gate) * up, rounded to the dtype, into `act`;
//   4. down:     one grouped GEMM of act by each tile's expert's down projection into fp32 partial
//                sums, split over the inner dimension when the tiles alone cannot fill the GPU;
//   5. combine:  out[t] = sum over the token's slots (ascending expert) of weight * (sum of splits).
// The GEMMs run on tensor cores (mma.sync m16n8k16, cp.async pipelines into swizzled shared memory)
// for fp16/bf16 when the sizes allow 16-byte rows, else on a SIMT kernel (fp32, HIP, odd sizes).
// The launch grids are sized by upper bounds computed on the host; blocks past the real tile
// count exit at once.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/async_copy.cuh"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "ops/kernels.h"

namespace tidal::gpu {
namespace {

// NOTE(tidal): napkin math, Mixtral-8x7B decode at batch 64 in bf16 (hidden 4096, inter 14336, 8
// experts, top-2): 128 slots touch all 8 experts, so a layer reads all its expert weights once,
// 8 * 3 * 4096 * 14336 * 2 B = 2.8 GB: 0.67 ms at 4.2 TB/s, against 45 GFLOP (58 us at the
// mma.sync rate). The GEMMs are a weight stream: each block streams a 128-row slab of one expert's
// weights through a 3- or 4-stage cp.async pipeline (16 KB a stage), and each expert's tokens fit one
// tile so the slab is read once. Prefill (thousands of tokens) is compute-bound instead: 64-row
// tiles reuse each weight slab over 64 tokens.
constexpr int kMaxExperts = 512;
constexpr int kRouteThreads = 256;
constexpr int kAlignThreads = 1024;
constexpr int kTcThreads = 128;   // 4 warps; each covers every row of the tile
constexpr int kTcBlockK = 64;     // one 128-byte row of a stage per weight row
// cp.async stages: 3 for 16-row tiles (55 KB of shared memory: four blocks per SM, so a decode
// step's few hundred weight slabs all stream at once instead of in one and a bit waves) and for
// 128-row tiles (96 KB: two blocks per SM), else 4.
template <int kBM>
constexpr int tc_stages() {
  return kBM == 16 || kBM == 128 ? 3 : 4;
}
constexpr int kGateUpCols = 64;   // gate columns of a gate_up tile (and as many up columns)
constexpr int kDownCols = 128;    // output columns of a down tile
constexpr int kSimtThreads = 256;
constexpr int kSimtBlockK = 32;
constexpr int kSimtRows = 16;     // rows a SIMT block computes at once (tiles are walked in these)
constexpr int kSimtGateUpCols = 32;
constexpr int kSimtDownCols = 64;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t align_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// How one call runs and where its scratch lives in the workspace (byte offsets).
struct Plan {
  bool tensor_cores = false;
  int block_m = 16;         // rows (slots) per tile
  int64_t num_slots = 0;    // num_tokens * top_k
  int64_t max_tiles = 0;    // bound on sum_e ceil(count_e / block_m)
  int64_t padded_rows = 0;  // max_tiles * block_m
  int splits = 1;           // of the down GEMM's inner dimension
  int64_t split_k = 0;      // inner elements per split
  int64_t topk_ids = 0, topk_weights = 0, slot_row = 0, sorted_slot = 0, tile_expert = 0, num_tiles = 0, act = 0,
          partial = 0, bytes = 0;
};

bool tensor_core_shapes(DType dtype, int64_t hidden, int64_t inter) {
#if defined(TIDAL_USE_HIP)
  (void)dtype, (void)hidden, (void)inter;
  return false;
#else
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) && hidden % 8 == 0 && inter % 8 == 0;
#endif
}

// `stream`: the launch's, whose SMs size the split of the down GEMM (null: the device's, an upper
// bound of the workspace any stream needs).
Plan make_plan(DType dtype, int64_t num_tokens, int64_t hidden, int64_t inter, int64_t num_experts, int64_t top_k,
               int device, cudaStream_t stream = nullptr) {
  Plan p;
  p.tensor_cores = tensor_core_shapes(dtype, hidden, inter);
  p.num_slots = num_tokens * top_k;
  // Tile height from the slots an expert gets when routing is even: one tile per expert at decode
  // (each weight slab read once), 128 rows when there are enough tokens to reuse a slab that often.
  const int64_t per_expert = ceil_div(p.num_slots, num_experts);
  p.block_m = per_expert <= 12 ? 16 : per_expert <= 24 ? 32 : per_expert <= 48 ? 64 : 128;
  const int64_t used_experts = std::min(num_experts, p.num_slots);
  p.max_tiles = std::min(p.num_slots, (p.num_slots + used_experts * (p.block_m - 1)) / p.block_m);
  p.padded_rows = p.max_tiles * p.block_m;
  // Split the down GEMM's inner dimension until the grid has two blocks per SM (as the tiles bound
  // it; the real count is often lower), keeping at least 2 k-steps per split.
  const int64_t block_k = p.tensor_cores ? kTcBlockK : kSimtBlockK;
  const int64_t down_blocks = p.max_tiles * ceil_div(hidden, p.tensor_cores ? kDownCols : kSimtDownCols);
  const int64_t target = 2 * static_cast<int64_t>(multiprocessor_count(device, stream));
  while (p.splits < 16 && down_blocks * p.splits < target && inter >= 2 * p.splits * 2 * block_k) p.splits *= 2;
  p.split_k = align_up(ceil_div(inter, p.splits), block_k);
  int64_t at = 0;
  auto take = [&at](int64_t bytes) {
    const int64_t offset = at;
    at = align_up(at + bytes, 256);
    return offset;
  };
  p.topk_ids = take(p.num_slots * 4);
  p.topk_weights = take(p.num_slots * 4);
  p.slot_row = take(p.num_slots * 4);
  p.sorted_slot = take(p.padded_rows * 4);
  p.tile_expert = take(p.max_tiles * 4);
  p.num_tiles = take(4);
  p.act = take(p.padded_rows * inter * dtype_size(dtype));
  p.partial = take(p.splits * p.padded_rows * hidden * 4);
  p.bytes = at;
  return p;
}

// ---- 1. routing --------------------------------------------------------------------------------

// kPerLane: experts per lane, the fewest that cover num_experts (loops over it are unrolled).
template <typename T, typename L, int kPerLane>
__global__ void __launch_bounds__(kRouteThreads)
    moe_route_kernel(const L* __restrict__ logits, int64_t logits_stride, int num_tokens, int num_experts, int top_k,
                     bool renormalize, bool fp32_weights, int32_t* __restrict__ topk_ids,
                     float* __restrict__ topk_weights) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t token = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  if (token >= num_tokens) return;  // the whole warp: one token per warp
  const L* row = logits + token * logits_stride;
  float p[kPerLane];
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + i * kWarpSize;
    p[i] = e < num_experts ? to_float(row[e]) : -INFINITY;
    mx = fmaxf(mx, p[i]);
  }
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) mx = fmaxf(mx, TIDAL_SHFL_XOR(mx, mask));
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    p[i] = lane + i * kWarpSize < num_experts ? expf(p[i] - mx) : 0.0f;
    sum += p[i];
  }
  sum = warp_sum(sum);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) p[i] = lane + i * kWarpSize < num_experts ? p[i] / sum : -1.0f;
  // top-k by repeated warp argmax; `picked` sums the choices in the order they are made
  uint32_t chosen = 0;
  float picked = 0.0f;
  for (int j = 0; j < top_k; ++j) {
    float best = -2.0f;
    int best_e = num_experts;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if (!(chosen >> i & 1u) && p[i] > best) best = p[i], best_e = lane + i * kWarpSize;
    }
    for (int mask = kWarpSize / 2; mask > 0; mask /= 2) {
      const float other = TIDAL_SHFL_XOR(best, mask);
      const int other_e = TIDAL_SHFL_XOR(best_e, mask);
      if (other > best || (other == best && other_e < best_e)) best = other, best_e = other_e;
    }
    picked += best;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if (lane + i * kWarpSize == best_e) chosen |= 1u << i;
    }
  }
  // the chosen experts in ascending order: lane-major within each group of kWarpSize experts
  int base = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const bool mine = chosen >> i & 1u;
    const uint64_t ballot = TIDAL_BALLOT(mine);
    if (mine) {
      const int slot = base + __popcll(ballot & ((uint64_t{1} << lane) - 1));
      float w = p[i];
      if (renormalize) w /= picked;
      if (!fp32_weights) w = to_float(from_float<T>(w));
      topk_ids[token * top_k + slot] = lane + i * kWarpSize;
      topk_weights[token * top_k + slot] = w;
    }
    base += __popcll(ballot);
  }
}

template <typename T>
void launch_route(TensorView logits, int64_t num_tokens, int64_t num_experts, int64_t top_k, bool renormalize,
                  bool fp32_weights, int32_t* topk_ids, float* topk_weights, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(ceil_div(num_tokens * kWarpSize, kRouteThreads));
  auto launch = [&](auto per_lane, auto logit_type) {
    using L = decltype(logit_type);
    moe_route_kernel<T, L, decltype(per_lane)::value><<<blocks, kRouteThreads, 0, stream>>>(
        logits.data_ptr<const L>(), logits.stride(0), static_cast<int>(num_tokens), static_cast<int>(num_experts),
        static_cast<int>(top_k), renormalize, fp32_weights, topk_ids, topk_weights);
  };
  auto by_width = [&](auto logit_type) {
    if (num_experts <= kWarpSize) {
      launch(std::integral_constant<int, 1>{}, logit_type);
    } else if (num_experts <= 4 * kWarpSize) {
      launch(std::integral_constant<int, 4>{}, logit_type);
    } else {
      launch(std::integral_constant<int, kMaxExperts / kWarpSize>{}, logit_type);
    }
  };
  if (logits.dtype == DType::kFloat32) {
    by_width(float{});
  } else {
    by_width(T{});
  }
}

// ---- 2. slots grouped by expert ----------------------------------------------------------------

// In-place inclusive scan of v[0, n) (n <= kAlignThreads) by the whole block (Hillis-Steele).
__device__ void block_inclusive_scan(int* v, int n) {
  for (int offset = 1; offset < n; offset *= 2) {
    const int add = threadIdx.x < n && threadIdx.x >= offset ? v[threadIdx.x - offset] : 0;
    __syncthreads();
    if (threadIdx.x < n) v[threadIdx.x] += add;
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kAlignThreads)
    moe_align_kernel(const int32_t* __restrict__ topk_ids, int num_slots, int num_experts, int block_m,
                     int32_t* __restrict__ slot_row, int32_t* __restrict__ sorted_slot,
                     int32_t* __restrict__ tile_expert, int32_t* __restrict__ num_tiles_out) {
  __shared__ int count[kMaxExperts];
  __shared__ int tiles_end[kMaxExperts];  // inclusive scan of each expert's tile count
  const int tid = threadIdx.x;
  for (int e = tid; e < num_experts; e += blockDim.x) count[e] = 0;
  __syncthreads();
  for (int s = tid; s < num_slots; s += blockDim.x) atomicAdd(&count[topk_ids[s]], 1);
  __syncthreads();
  for (int e = tid; e < num_experts; e += blockDim.x) tiles_end[e] = (count[e] + block_m - 1) / block_m;
  __syncthreads();
  block_inclusive_scan(tiles_end, num_experts);
  const int num_tiles = tiles_end[num_experts - 1];
  if (tid == 0) *num_tiles_out = num_tiles;
  for (int r = tid; r < num_tiles * block_m; r += blockDim.x) sorted_slot[r] = -1;
  for (int e = tid; e < num_experts; e += blockDim.x) {
    const int first = e == 0 ? 0 : tiles_end[e - 1];
    for (int t = first; t < tiles_end[e]; ++t) tile_expert[t] = e;
    count[e] = first * block_m;  // becomes the expert's next free row
  }
  __syncthreads();  // the -1 fill is visible before any slot lands
  // NOTE(tidal): the order of slots within an expert's run depends on the atomics, but every row of
  // a GEMM tile is computed independently of the others, so the values do not.
  for (int s = tid; s < num_slots; s += blockDim.x) {
    const int row = atomicAdd(&count[topk_ids[s]], 1);
    sorted_slot[row] = s;
    slot_row[s] = row;
  }
}

// ---- 3-4. the grouped GEMMs --------------------------------------------------------------------

struct GemmArgs {
  const void* x;            // gate_up: token rows (gathered); down: act rows (the tile's own)
  int64_t x_stride;
  const void* weight;       // w13 or w2: [num_experts, rows, k]
  int64_t weight_rows;      // rows per expert: 2 * inter or hidden
  int64_t k;                // hidden or inter
  int64_t n;                // output columns: inter or hidden
  int64_t split_k;          // inner elements per blockIdx.z
  void* out;                // act [padded_rows, inter] (T) or partial [splits, padded_rows, hidden] (fp32)
  int64_t out_split_stride; // elements between splits of partial
  const int32_t* sorted_slot;
  const int32_t* tile_expert;
  const int32_t* num_tiles;
  int top_k;
};

__device__ __forceinline__ float silu(float g) { return g / (1.0f + __expf(-g)); }

#if !defined(TIDAL_USE_HIP)

// A block computes a [kBM, 128] tile with 4 warps: kWarpsM along the rows (kBM / kWarpsM rows
// each) by 4 / kWarpsM along the columns. For gate_up (kGateUp) the 128 weight rows are 64 gate
// rows and the 64 up rows of the same columns, and a warp owns a run of gate columns with their up
// twins, so silu(gate) * up meets in one thread; for down, a warp owns a run of output columns.
// 16-row to 64-row tiles: one warp row, each warp all kBM rows of 32 weight rows (decode: the
// weight slab is the traffic, the rows are few). 128-row tiles (prefill): 2 x 2 warps of 64 rows x
// 64 weight rows, four times the mma.sync work per fragment loaded.
template <int kBM>
constexpr int tc_warps_m() {
  return kBM == 128 ? 2 : 1;
}

template <typename T, int kBM, bool kGateUp>
__global__ void __launch_bounds__(kTcThreads) moe_gemm_tc_kernel(GemmArgs a) {
  constexpr int kRowsB = 128, kChunks = kTcBlockK / 8, kTcStages = tc_stages<kBM>();
  constexpr int kWarpsM = tc_warps_m<kBM>(), kWarpsN = 4 / kWarpsM;
  constexpr int kMTiles = kBM / kWarpsM / 16;  // m16 tiles per warp
  constexpr int kNTiles = kRowsB / kWarpsN / 8;  // n8 tiles per warp (half gate, half up for gate_up)
  constexpr int kWarpRowsB = kRowsB / kWarpsN;   // weight rows per warp
  constexpr int kStageElems = (kBM + kRowsB) * kTcBlockK;
  extern __shared__ __align__(128) unsigned char smem[];
  T* stages = reinterpret_cast<T*>(smem);  // per stage: A [kBM, 64] then B [128, 64], swizzled
  __shared__ int64_t a_row_offset[kBM];     // element offset of each A row, -1: padding (zeros)

  const int tile = blockIdx.x;
  if (tile >= *a.num_tiles) return;
  const int expert = a.tile_expert[tile];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * (kGateUp ? kGateUpCols : kDownCols);
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * a.split_k;
  const int64_t k_end = k_begin + a.split_k < a.k ? k_begin + a.split_k : a.k;
  const int num_k_tiles = k_end > k_begin ? static_cast<int>((k_end - k_begin + kTcBlockK - 1) / kTcBlockK) : 0;
  for (int r = tid; r < kBM; r += kTcThreads) {
    const int64_t row = static_cast<int64_t>(tile) * kBM + r;
    if constexpr (kGateUp) {
      const int slot = a.sorted_slot[row];
      a_row_offset[r] = slot < 0 ? -1 : static_cast<int64_t>(slot / a.top_k) * a.x_stride;
    } else {
      a_row_offset[r] = row * a.x_stride;
    }
  }
  __syncthreads();

  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.weight) + static_cast<int64_t>(expert) * a.weight_rows * a.k;
  auto load_stage = [&](int kt, int stage) {
    T* s_a = stages + stage * kStageElems;
    T* s_b = s_a + kBM * kTcBlockK;
    const int64_t k0 = k_begin + static_cast<int64_t>(kt) * kTcBlockK;
    for (int i = tid; i < kBM * kChunks; i += kTcThreads) {
      const int r = i / kChunks, c = i % kChunks;
      const int64_t k = k0 + c * 8;
      const bool valid = a_row_offset[r] >= 0 && k < k_end;
      cp_async_16(shared_address(s_a + swizzle<kTcBlockK>(r, c)), valid ? x + a_row_offset[r] + k : x, valid);
    }
    for (int i = tid; i < kRowsB * kChunks; i += kTcThreads) {
      const int r = i / kChunks, c = i % kChunks;
      const int64_t k = k0 + c * 8;
      int64_t col, wrow;
      if constexpr (kGateUp) {
        col = n0 + (r & (kGateUpCols - 1));
        wrow = r < kGateUpCols ? col : a.n + col;  // up rows follow the inter gate rows
      } else {
        col = n0 + r;
        wrow = col;
      }
      const bool valid = col < a.n && k < k_end;
      cp_async_16(shared_address(s_b + swizzle<kTcBlockK>(r, c)), valid ? w + wrow * a.k + k : w, valid);
    }
  };

  float acc[kMTiles][kNTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.0f;
  // First B row of the warp's 16-row slab j (two n8 tiles each): gate_up's first half of the slabs
  // are gate rows, the second half the up rows of the same columns.
  auto b_slab_row = [&](int j) {
    if constexpr (kGateUp) {
      constexpr int kHalf = kNTiles / 4;  // gate slabs per warp
      return (j < kHalf ? 0 : kGateUpCols) + warp_n * (kWarpRowsB / 2) + (j % kHalf) * 16;
    } else {
      return warp_n * kWarpRowsB + j * 16;
    }
  };
  const int a_row0 = warp_m * (kBM / kWarpsM);

#pragma unroll
  for (int s = 0; s < kTcStages - 1; ++s) {
    if (s < num_k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < num_k_tiles; ++kt) {
    cp_async_wait<kTcStages - 2>();
    __syncthreads();  // stage kt landed for all; everyone is done with the stage reloaded next
    if (kt + kTcStages - 1 < num_k_tiles) load_stage(kt + kTcStages - 1, (kt + kTcStages - 1) % kTcStages);
    cp_async_commit();
    const T* s_a = stages + (kt % kTcStages) * kStageElems;
    const T* s_b = s_a + kBM * kTcBlockK;
#pragma unroll
    for (int kk = 0; kk < kTcBlockK / 16; ++kk) {
      uint32_t b[kNTiles / 2][4];
#pragma unroll
      for (int j = 0; j < kNTiles / 2; ++j) {
        ldmatrix_x4(b[j], shared_address(s_b + swizzle<kTcBlockK>(b_slab_row(j) + (lane & 7) + ((lane >> 4) << 3),
                                                                  kk * 2 + ((lane >> 3) & 1))));
      }
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        uint32_t frag[4];
        ldmatrix_x4(frag, shared_address(s_a + swizzle<kTcBlockK>(a_row0 + mt * 16 + (lane & 15),
                                                                  kk * 2 + (lane >> 4))));
#pragma unroll
        for (int j = 0; j < kNTiles / 2; ++j) {
          mma_16816<T>(acc[mt][2 * j], frag, b[j][0], b[j][1]);
          mma_16816<T>(acc[mt][2 * j + 1], frag, b[j][2], b[j][3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // C fragment: elements 0-1 at row lane / 4, columns 2 * (lane % 4) + {0, 1}; 2-3 eight rows down.
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int64_t row = static_cast<int64_t>(tile) * kBM + a_row0 + mt * 16 + lane / 4 + rr * 8;
      if constexpr (kGateUp) {
#pragma unroll
        for (int nt = 0; nt < kNTiles / 2; ++nt) {
          const int64_t col = n0 + warp_n * (kWarpRowsB / 2) + nt * 8 + (lane % 4) * 2;
          if (col >= a.n) continue;
          const float v0 = silu(acc[mt][nt][2 * rr]) * acc[mt][kNTiles / 2 + nt][2 * rr];
          const float v1 = silu(acc[mt][nt][2 * rr + 1]) * acc[mt][kNTiles / 2 + nt][2 * rr + 1];
          const uint32_t word = pack2<T>(v0, v1);
          memcpy(static_cast<T*>(a.out) + row * a.n + col, &word, sizeof(word));
        }
      } else {
        float* out = static_cast<float*>(a.out) + blockIdx.z * a.out_split_stride + row * a.n;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          const int64_t col = n0 + warp_n * kWarpRowsB + nt * 8 + (lane % 4) * 2;
          if (col < a.n) *reinterpret_cast<float2*>(out + col) = make_float2(acc[mt][nt][2 * rr], acc[mt][nt][2 * rr + 1]);
        }
      }
    }
  }
}

template <typename T, int kBM, bool kGateUp>
void launch_gemm_tc(const GemmArgs& args, dim3 grid, cudaStream_t stream) {
  constexpr int kSmem = tc_stages<kBM>() * (kBM + 128) * kTcBlockK * static_cast<int>(sizeof(T));
  const auto kernel = moe_gemm_tc_kernel<T, kBM, kGateUp>;
  TIDAL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  kernel<<<grid, kTcThreads, kSmem, stream>>>(args);
}

#endif  // !TIDAL_USE_HIP

// The SIMT twin: a block computes kSimtRows rows of a tile at a time over kCols columns (gate_up:
// kSimtGateUpCols gate columns and their up twins), 256 threads as 16 rows x 16 column groups, the
// inner dimension staged through shared memory in fp32.
template <typename T, bool kGateUp>
__global__ void __launch_bounds__(kSimtThreads) moe_gemm_simt_kernel(GemmArgs a, int block_m) {
  constexpr int kCols = kGateUp ? kSimtGateUpCols : kSimtDownCols;
  constexpr int kRowsB = kGateUp ? 2 * kSimtGateUpCols : kSimtDownCols;
  constexpr int kPerThread = kCols / 16;
  __shared__ float s_a[kSimtRows][kSimtBlockK + 1];
  __shared__ float s_b[kRowsB][kSimtBlockK + 1];
  const int tile = blockIdx.x;
  if (tile >= *a.num_tiles) return;
  const int expert = a.tile_expert[tile];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kCols;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * a.split_k;
  const int64_t k_end = k_begin + a.split_k < a.k ? k_begin + a.split_k : a.k;
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.weight) + static_cast<int64_t>(expert) * a.weight_rows * a.k;
  for (int sub = 0; sub < block_m; sub += kSimtRows) {
    const int64_t first_row = static_cast<int64_t>(tile) * block_m + sub;
    float acc[kGateUp ? 2 : 1][kPerThread] = {};
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kSimtBlockK) {
      for (int i = tid; i < kSimtRows * kSimtBlockK; i += kSimtThreads) {
        const int r = i / kSimtBlockK, c = i % kSimtBlockK;
        const int64_t row = first_row + r, k = k0 + c;
        int64_t offset = -1;
        if (k < k_end) {
          if constexpr (kGateUp) {
            const int slot = a.sorted_slot[row];
            offset = slot < 0 ? -1 : static_cast<int64_t>(slot / a.top_k) * a.x_stride + k;
          } else {
            offset = row * a.x_stride + k;
          }
        }
        s_a[r][c] = offset >= 0 ? to_float(x[offset]) : 0.0f;
      }
      for (int i = tid; i < kRowsB * kSimtBlockK; i += kSimtThreads) {
        const int r = i / kSimtBlockK, c = i % kSimtBlockK;
        const int64_t k = k0 + c;
        const int64_t col = n0 + (kGateUp ? r % kSimtGateUpCols : r);
        const int64_t wrow = kGateUp && r >= kSimtGateUpCols ? a.n + col : col;
        s_b[r][c] = col < a.n && k < k_end ? to_float(w[wrow * a.k + k]) : 0.0f;
      }
      __syncthreads();
      for (int c = 0; c < kSimtBlockK; ++c) {
        const float xv = s_a[ty][c];
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) {
          acc[0][j] += xv * s_b[tx + 16 * j][c];
          if constexpr (kGateUp) acc[kGateUp ? 1 : 0][j] += xv * s_b[kSimtGateUpCols + tx + 16 * j][c];
        }
      }
      __syncthreads();
    }
    const int64_t row = first_row + ty;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (col >= a.n) continue;
      if constexpr (kGateUp) {
        static_cast<T*>(a.out)[row * a.n + col] = from_float<T>(silu(acc[0][j]) * acc[kGateUp ? 1 : 0][j]);
      } else {
        static_cast<float*>(a.out)[blockIdx.z * a.out_split_stride + row * a.n + col] = acc[0][j];
      }
    }
  }
}

// ---- 5. weighted combine -----------------------------------------------------------------------

// A thread per output element (token blockIdx.x, column blockIdx.y * 256 + threadIdx.x): a decode
// step's few tokens still spread over many blocks, and each thread's top_k * splits loads are
// independent of one another.
constexpr int kCombineThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
    moe_combine_kernel(T* __restrict__ out, int64_t out_stride, const float* __restrict__ partial,
                       const float* __restrict__ topk_weights, const int32_t* __restrict__ slot_row, int top_k,
                       int splits, int64_t split_stride, int64_t hidden) {
  const int64_t token = blockIdx.x;
  const int64_t h = static_cast<int64_t>(blockIdx.y) * kCombineThreads + threadIdx.x;
  if (h >= hidden) return;
  float acc = 0.0f;
#pragma unroll 2
  for (int j = 0; j < top_k; ++j) {
    const int64_t slot = token * top_k + j;
    const float* src = partial + static_cast<int64_t>(slot_row[slot]) * hidden + h;
    float v = 0.0f;
#pragma unroll 4
    for (int s = 0; s < splits; ++s) v += src[s * split_stride];
    acc += topk_weights[slot] * v;
  }
  out[token * out_stride + h] = from_float<T>(acc);
}

template <typename T>
void launch_gemms(const Plan& plan, GemmArgs up, GemmArgs down, bool tensor_cores, cudaStream_t stream) {
  const auto tiles = static_cast<unsigned>(plan.max_tiles);
  const auto splits = static_cast<unsigned>(plan.splits);
#if !defined(TIDAL_USE_HIP)
  if constexpr (!std::is_same_v<T, float>) {
    if (tensor_cores) {
      const dim3 up_grid(tiles, static_cast<unsigned>(ceil_div(up.n, kGateUpCols)), 1);
      const dim3 down_grid(tiles, static_cast<unsigned>(ceil_div(down.n, kDownCols)), splits);
      switch (plan.block_m) {
        case 16:
          launch_gemm_tc<T, 16, true>(up, up_grid, stream);
          launch_gemm_tc<T, 16, false>(down, down_grid, stream);
          return;
        case 32:
          launch_gemm_tc<T, 32, true>(up, up_grid, stream);
          launch_gemm_tc<T, 32, false>(down, down_grid, stream);
          return;
        case 64:
          launch_gemm_tc<T, 64, true>(up, up_grid, stream);
          launch_gemm_tc<T, 64, false>(down, down_grid, stream);
          return;
        default:
          launch_gemm_tc<T, 128, true>(up, up_grid, stream);
          launch_gemm_tc<T, 128, false>(down, down_grid, stream);
          return;
      }
    }
  }
#endif
  (void)tensor_cores;
  const dim3 up_grid(tiles, static_cast<unsigned>(ceil_div(up.n, kSimtGateUpCols)), 1);
  const dim3 down_grid(tiles, static_cast<unsigned>(ceil_div(down.n, kSimtDownCols)), splits);
  moe_gemm_simt_kernel<T, true><<<up_grid, kSimtThreads, 0, stream>>>(up, plan.block_m);
  moe_gemm_simt_kernel<T, false><<<down_grid, kSimtThreads, 0, stream>>>(down, plan.block_m);
}

}  // namespace

int64_t fused_moe_workspace_size(DType dtype, int64_t num_tokens, int64_t hidden, int64_t inter, int64_t num_experts,
                                 int64_t top_k, int device) {
  if (num_tokens == 0) return 0;
  return make_plan(dtype, num_tokens, hidden, inter, num_experts, top_k, device).bytes;
}

void fused_moe(TensorView out, TensorView x, TensorView router_logits, TensorView w13, TensorView w2, int64_t top_k,
               bool renormalize, bool fp32_weights, TensorView workspace, Stream stream) {
  const int64_t num_tokens = x.size(0), hidden = x.size(1), num_experts = w13.size(0), inter = w2.size(2);
  TIDAL_CHECK(num_experts <= kMaxExperts, "num_experts=", num_experts, " must be <= ", kMaxExperts,
              " for the GPU kernel");
  TIDAL_CHECK(num_tokens * top_k < (int64_t{1} << 31), "num_tokens * top_k=", num_tokens * top_k,
              " must be < 2^31 for the GPU kernel");
  DeviceGuard guard(x.device.index);
  const auto s = static_cast<cudaStream_t>(stream.handle);
  const Plan plan = make_plan(x.dtype, num_tokens, hidden, inter, num_experts, top_k, x.device.index, s);
  const int64_t held = workspace.data == nullptr ? 0 : workspace.numel() * workspace.element_size();
  TIDAL_CHECK(held >= plan.bytes, "workspace holds ", held, " bytes but this call needs ", plan.bytes,
              " (fused_moe_workspace_size)");
  auto* base = static_cast<unsigned char*>(workspace.data);
  auto* topk_ids = reinterpret_cast<int32_t*>(base + plan.topk_ids);
  auto* topk_weights = reinterpret_cast<float*>(base + plan.topk_weights);
  auto* slot_row = reinterpret_cast<int32_t*>(base + plan.slot_row);
  auto* sorted_slot = reinterpret_cast<int32_t*>(base + plan.sorted_slot);
  auto* tile_expert = reinterpret_cast<int32_t*>(base + plan.tile_expert);
  auto* num_tiles = reinterpret_cast<int32_t*>(base + plan.num_tiles);
  void* act = base + plan.act;
  auto* partial = reinterpret_cast<float*>(base + plan.partial);
  // 16-byte rows for cp.async: the shapes (checked by the plan) and every base and row stride
  const bool tensor_cores = plan.tensor_cores && can_vectorize(hidden, 8, {&x, &w13, &w2}) &&
                            is_aligned(act, 16) && is_aligned(partial, 16);

  TIDAL_DISPATCH_FLOAT(x.dtype, T, {
    launch_route<T>(router_logits, num_tokens, num_experts, top_k, renormalize, fp32_weights, topk_ids, topk_weights,
                    s);
    moe_align_kernel<<<1, kAlignThreads, 0, s>>>(topk_ids, static_cast<int>(plan.num_slots),
                                                 static_cast<int>(num_experts), plan.block_m, slot_row, sorted_slot,
                                                 tile_expert, num_tiles);
    GemmArgs up{};
    up.x = x.data;
    up.x_stride = x.stride(0);
    up.weight = w13.data;
    up.weight_rows = 2 * inter;
    up.k = hidden;
    up.n = inter;
    up.split_k = hidden;
    up.out = act;
    up.sorted_slot = sorted_slot;
    up.tile_expert = tile_expert;
    up.num_tiles = num_tiles;
    up.top_k = static_cast<int>(top_k);
    GemmArgs down = up;
    down.x = act;
    down.x_stride = inter;
    down.weight = w2.data;
    down.weight_rows = hidden;
    down.k = inter;
    down.n = hidden;
    down.split_k = plan.split_k;
    down.out = partial;
    down.out_split_stride = plan.padded_rows * hidden;
    launch_gemms<T>(plan, up, down, tensor_cores, s);
    const dim3 combine_grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>(ceil_div(hidden, kCombineThreads)));
    moe_combine_kernel<T><<<combine_grid, kCombineThreads, 0, s>>>(
        out.data_ptr<T>(), out.stride(0), partial, topk_weights, slot_row, static_cast<int>(top_k), plan.splits,
        plan.padded_rows * hidden, hidden);
  });
  TIDAL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace tidal::gpu
