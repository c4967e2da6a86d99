// SPDX-License-Identifier: Apache-2.0
// The quantized linear layer on tensor cores for decode batches (bf16 or fp16 activations, up to 32
// rows): a persistent grid whose blocks walk tiles of 16 output rows, their warps splitting each
// tile's k; every warp streams its codes through a cp.async ring in shared memory, so loads stay in
// flight across tile boundaries; codes are widened straight into mma.sync A fragments (int4: two
// codes per instruction pair, exactly, as code - zero), the rows of x are the B fragments, fp32
// accumulators take each group's scale after its k-steps. NVIDIA only (mma.sync, cp.async); the HIP
// build and other shapes keep the SIMT kernel of quant_linear.cu.
#include <climits>
#include <cstdint>

#include "cuda/async_copy.cuh"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/quant_linear.cuh"
#include "cuda/quant_mma.cuh"
#include "ops/kernels.h"

namespace tidal::gpu {

#if !defined(TIDAL_USE_HIP)
namespace {

using quant::block_dot, quant::inputs_per_block, quant::kInt4, quant::kInt8, quant::offset_pair, quant::Params;
constexpr int kWarps = 8;       // warps per block, each a share of k
constexpr int kStages = 4;      // k blocks of codes in flight per warp (its ring of shared memory)
constexpr int kMaxTiles = 4;    // 8 rows of x per B tile: up to 32 rows
// NOTE(tidal): k blocks and fragments as cuda/quant_mma.cuh says. Napkin math, int4 at m = 1: 2
// instructions widen 2 codes, ~1 per weight, a third of the SIMT kernel's. An H200 streams ~32 GB/s
// per SM at its copy ceiling, so with ~1 us of DRAM latency an SM needs ~32 KB in flight at all
// times: kStages x 1 KB per warp x 8 warps x 3-4 blocks per SM is 96-128 KB. The first version of
// this kernel (one tile per block, each warp loading its 4 k blocks, then widening, then exiting)
// kept loads in flight only part of each block's life: 25% occupancy and 46% of DRAM bandwidth on
// H100 (ncu, Llama-3-8B gate_up at one row).

// 16 bytes of shared memory; volatile, so it stays between the cp.async wait before it and the
// cp.async that refills the slot after it.
__device__ __forceinline__ uint4 load_shared_16(uint32_t address) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(address));
  return v;
}

// Shared memory: the warps' rings, then the partial sums (two buffers).
template <int kTiles>
constexpr int smem_bytes() {
  return static_cast<int>(sizeof(uint4) * kWarps * kStages * 2 * kWarpSize + sizeof(float) * 2 * kWarps * kTiles * 4 * kWarpSize);
}

// Grid: at most one wave of resident blocks; block b takes the 16-row tiles b, b + grid, ... .
// Each warp streams its units (tile, k block w, w + kWarps, ...) through a ring of kStages slots of
// shared memory that only its own lanes touch (each lane reads back the 32 bytes it copied), so the
// next tiles' codes are in flight while a tile finishes; at each tile's end the warps' partial sums
// meet in shared memory (double-buffered: one barrier per tile).
// NOTE(tidal): the kernel is bound by instructions issued as much as by bytes (ncu, H100, int4 gate_up
// at one row, one block per tile: 58% of issue slots busy at 40% of DRAM bandwidth; the integer pipe
// that LOP3/SHF/PRMT share throttles it). So the loop keeps two cursors (the unit being loaded, the
// unit being multiplied) advanced by additions, 32-bit offsets (quant_linear_tc_supported bounds the
// tensors), one LOP3 per code pair (and_or), the tile's reduction spread over the warps, and rows of x
// past m read row m - 1 instead of being zeroed: 272 -> 213 instructions per 1 KB unit, gate_up 43.2
// -> 39.9 us. Tried and not kept: folding the zero point out of the widening (A = magic + code, then
// (magic + zero) * sum(x) per k block, x's block sums computed at each block's start): the start-up
// sums cost more than the 32 subtractions per unit saved (gate_up 52 us, down 76 us against 29).
template <typename T, int kFormat, int kTiles>
__global__ void __launch_bounds__(kWarps* kWarpSize, kTiles == 1 ? 3 : 2) quant_linear_tc_kernel(Params p) {
  wait_for_prior_grid();  // launched by launch_dependent
  allow_dependents();
  constexpr int kBlockInputs = inputs_per_block<kFormat>();
  constexpr int kChunkBytes = 64;  // a k block's bytes of one row (4 lanes x 16)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // this lane's slots: ring[warp][stage][row][lane], 16 bytes each (row 0: row0's codes, 1: row1's)
  constexpr uint32_t kSlotRow = kWarpSize * 16, kSlotStage = 2 * kSlotRow;
  auto& partial = *reinterpret_cast<float(*)[2][kWarps][kTiles * 4][kWarpSize]>(
      smem_raw + sizeof(uint4) * kWarps * kStages * 2 * kWarpSize);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int group_id = lane / 4, tid = lane % 4;
  const uint32_t ring = shared_address(smem_raw) + warp * kStages * kSlotStage + lane * 16;
  const int row_bytes = kFormat == kInt4 ? p.k / 2 : p.k;
  const int num_tiles = (p.n + 15) / 16, num_blocks = p.k / kBlockInputs;
  const int blocks_per_group = p.k / p.num_groups / kBlockInputs;
  const int grid = static_cast<int>(gridDim.x);
  // every warp walks the same number of units per tile (the last ones past k are empty), so the
  // barrier at each tile's end is reached by all of them
  const int per_tile = (num_blocks + kWarps - 1) / kWarps;
  const T* x = static_cast<const T*>(p.x);

  // the load cursor: tile, unit within it, its k block; row offsets of this lane's two rows
  int load_tile = static_cast<int>(blockIdx.x), load_unit = 0, load_block = warp;
  int code0 = 0, code1 = 0, group0 = 0, group1 = 0;
  const auto enter_tile = [&]() {
    const int row0 = min(load_tile * 16 + group_id, p.n - 1), row1 = min(load_tile * 16 + 8 + group_id, p.n - 1);
    code0 = row0 * row_bytes + tid * 16;
    code1 = row1 * row_bytes + tid * 16;
    group0 = row0 * p.num_groups;
    group1 = row1 * p.num_groups;
  };
  enter_tile();
  float scale0[kStages], scale1[kStages];
  uint32_t zero0[kStages], zero1[kStages];
  const auto issue = [&](int s) {
    if (load_tile < num_tiles && load_block < num_blocks) {
      const int offset = load_block * kChunkBytes;
      cp_async_16(ring + s * kSlotStage, p.qweight + code0 + offset, true);
      cp_async_16(ring + s * kSlotStage + kSlotRow, p.qweight + code1 + offset, true);
      const int g = blocks_per_group == 1 ? load_block : load_block / blocks_per_group;
      scale0[s] = TIDAL_LDG(p.scales + group0 + g);
      scale1[s] = TIDAL_LDG(p.scales + group1 + g);
      if constexpr (kFormat == kInt4) {
        zero0[s] = TIDAL_LDG(p.zeros + group0 + g);
        zero1[s] = TIDAL_LDG(p.zeros + group1 + g);
      }
    }
    cp_async_commit();  // empty past the end: the group count stays one per unit
    load_block += kWarps;
    if (++load_unit == per_tile) {
      load_unit = 0;
      load_block = warp;
      load_tile += grid;
      if (load_tile < num_tiles) enter_tile();
    }
  };

#pragma unroll
  for (int s = 0; s < kStages; ++s) issue(s);
  float acc[kTiles][4] = {};
  int parity = 0;
  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
  // the multiply cursor (the same walk, kStages units behind)
  int tile = static_cast<int>(blockIdx.x), unit = 0, block = warp;
  while (tile < num_tiles) {  // the same count of iterations in every warp of the block
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      cp_async_wait<kStages - 1>();
      if (block < num_blocks) {
        uint32_t off0 = 0, off1 = 0;
        if constexpr (kFormat == kInt4) {
          off0 = offset_pair<T>(zero0[s]);
          off1 = offset_pair<T>(zero1[s]);
        }
        float blk[kTiles][4] = {};
        const int first = block * kBlockInputs + tid * (kBlockInputs / 4);
        block_dot<T, kFormat, kTiles>(p.m, p.x_stride, x, group_id, first, load_shared_16(ring + s * kSlotStage),
                                      load_shared_16(ring + s * kSlotStage + kSlotRow), off0, off1, blk);
        const float s0 = scale0[s], s1 = scale1[s];
#pragma unroll
        for (int t = 0; t < kTiles; ++t) {
          acc[t][0] = fmaf(s0, blk[t][0], acc[t][0]);
          acc[t][1] = fmaf(s0, blk[t][1], acc[t][1]);
          acc[t][2] = fmaf(s1, blk[t][2], acc[t][2]);
          acc[t][3] = fmaf(s1, blk[t][3], acc[t][3]);
        }
      }
      issue(s);  // the slot just read takes the unit kStages ahead
      block += kWarps;
      if (++unit == per_tile) {  // the tile's last unit: sum the warps' partials
#pragma unroll
        for (int t = 0; t < kTiles; ++t) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            partial[parity][warp][t * 4 + c][lane] = acc[t][c];
            acc[t][c] = 0.f;
          }
        }
        __syncthreads();
        // accumulator slot q = t * 4 + c (B tile t, fragment register c) is summed by warp q % kWarps,
        // and only where some lane's token is below m
#pragma unroll
        for (int q = warp; q < kTiles * 4; q += kWarps) {
          const int t = q / 4, c = q % 4;
          if (t * 8 + (c & 1) >= p.m) continue;  // uniform: no lane's token is below m
          const int row = tile * 16 + group_id + (c < 2 ? 0 : 8), token = t * 8 + 2 * tid + (c & 1);
          if (row < p.n && token < p.m) {
            float sum = 0.f;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) sum += partial[parity][w][q][lane];
            out[token * p.out_stride + row] = from_float<T>(sum + (bias == nullptr ? 0.f : to_float(bias[row])));
          }
        }
        parity ^= 1;
        unit = 0;
        block = warp;
        tile += grid;
        if (tile >= num_tiles) break;  // uniform across the block
      }
    }
  }
}


template <typename T, int kFormat, int kTiles>
void launch(const Params& p, int device, cudaStream_t stream) {
  const auto kernel = quant_linear_tc_kernel<T, kFormat, kTiles>;
  constexpr int kSmem = smem_bytes<kTiles>();
  // NOTE(tidal): past 48 KB of dynamic shared memory a kernel must ask for it, once per device
  static bool raised[64] = {};
  if (device >= 0 && device < 64 && !raised[device]) {
    TIDAL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    raised[device] = true;
  }
  int per_sm = 0;
  TIDAL_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarps * kWarpSize, kSmem));
  const int64_t resident = static_cast<int64_t>(per_sm > 0 ? per_sm : 1) * multiprocessor_count(device, stream);
  const int64_t tiles = (p.n + 15) / 16;
  const dim3 grid(static_cast<unsigned>(tiles < resident ? tiles : resident)), block(kWarps * kWarpSize);
  launch_dependent(kernel, grid, block, kSmem, stream, device, p);
}

template <typename T, int kFormat>
void launch_tiles(const Params& p, int device, cudaStream_t stream) {
  const int tiles = (p.m + 7) / 8;
  if (tiles <= 1) return launch<T, kFormat, 1>(p, device, stream);
  if (tiles <= 2) return launch<T, kFormat, 2>(p, device, stream);
  launch<T, kFormat, 4>(p, device, stream);
}

}  // namespace

bool quant_linear_tc_supported(TensorView x, TensorView qweight, TensorView scales, int format) {
  if (x.dtype != DType::kBFloat16 && x.dtype != DType::kFloat16) return false;
  if (format != kInt4 && format != kInt8) return false;
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  const int64_t block = format == kInt4 ? 128 : 64, group = k / scales.size(1);
  // the kernel's offsets are 32-bit: the codes and the scales must fit them
  const int64_t row_bytes = format == kInt4 ? k / 2 : k;
  if (m < 1 || m > kMaxTiles * 8 || group % block != 0 || n * row_bytes > INT_MAX || n * scales.size(1) > INT_MAX) {
    return false;
  }
  int device = x.device.index, major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major < 8) return false;
  return is_aligned(x.data, 16) && is_aligned(qweight.data, 16) && x.stride(0) % 8 == 0;
}

void quant_linear_tc(TensorView out, TensorView x, TensorView qweight, TensorView scales, TensorView zeros,
                     TensorView bias, int format, Stream stream) {
  const Params p = quant::make_params(out, x, qweight, scales, zeros, bias);
  DeviceGuard guard(x.device.index);
  const auto s = static_cast<cudaStream_t>(stream.handle);
  if (x.dtype == DType::kBFloat16) {
    format == kInt4 ? launch_tiles<bf16_t, kInt4>(p, x.device.index, s) : launch_tiles<bf16_t, kInt8>(p, x.device.index, s);
  } else {
    format == kInt4 ? launch_tiles<half_t, kInt4>(p, x.device.index, s) : launch_tiles<half_t, kInt8>(p, x.device.index, s);
  }
}

#else  // TIDAL_USE_HIP: no mma.sync; the SIMT kernel serves every shape

bool quant_linear_tc_supported(TensorView, TensorView, TensorView, int) { return false; }
void quant_linear_tc(TensorView, TensorView, TensorView, TensorView, TensorView, TensorView, int, Stream) {}

#endif

}  // namespace tidal::gpu
