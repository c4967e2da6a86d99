// SPDX-License-Identifier: Apache-2.0
// Shared pieces of the GPU kernels: the runtime error check that throws tidal::CudaError, a device
// guard for launches, 16-byte vector loads and stores, warp and per-row block sums, and the dtype
// dispatch used by launchers. CUDA and HIP alike (names come from vendor.h).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <type_traits>
#include <utility>

#include "cuda/vendor.h"
#include "tidal/status.h"
#include "tidal/tensor_view.h"

/// Throws tidal::CudaError with the failing expression, the runtime's error string and file:line.
#define TIDAL_CUDA_CHECK(expr)                                                                   \
  do {                                                                                           \
    const cudaError_t tidal_err_ = (expr);                                                       \
    if (tidal_err_ != cudaSuccess) {                                                             \
      TIDAL_THROW_(::tidal::CudaError, #expr, " failed: ", cudaGetErrorString(tidal_err_));      \
    }                                                                                            \
  } while (0)

/// Runs the statements in __VA_ARGS__ with `T` bound to the element type of `dtype` (float32,
/// float16 or bfloat16); any other dtype throws std::invalid_argument naming it. Launchers only.
#define TIDAL_DISPATCH_FLOAT(dtype, T, ...)                                                      \
  do {                                                                                           \
    switch (dtype) {                                                                             \
      case ::tidal::DType::kFloat32: { using T = float; __VA_ARGS__; break; }                    \
      case ::tidal::DType::kFloat16: { using T = ::tidal::gpu::half_t; __VA_ARGS__; break; }     \
      case ::tidal::DType::kBFloat16: { using T = ::tidal::gpu::bf16_t; __VA_ARGS__; break; }    \
      default:                                                                                   \
        TIDAL_THROW_(std::invalid_argument, "dtype=", ::tidal::dtype_name(dtype),                \
                     " is not supported; expected float32, float16 or bfloat16");                \
    }                                                                                            \
  } while (0)

namespace tidal::gpu {

/// Makes `device` current for the scope of a launch and restores the caller's device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    TIDAL_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ == device) {
      previous_ = -1;
    } else {
      TIDAL_CUDA_CHECK(cudaSetDevice(device));
    }
  }
  // NOTE(tidal): a destructor must not throw; a failure to switch back shows up at the next check.
  ~DeviceGuard() {
    if (previous_ >= 0) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

/// The SM count of `device` (launchers size grids by it), read once per device.
inline int multiprocessor_count(int device) {
  constexpr int kMaxDevices = 64;
  static int counts[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) return 132;
  if (counts[device] == 0) {
    int value = 0;
    TIDAL_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device));
    counts[device] = value > 0 ? value : 1;
  }
  return counts[device];
}

#if !defined(TIDAL_USE_HIP)
/// Looks a CUDA driver function up through the runtime (the core links no libcuda) at the ABI of
/// CUDA `version` (a CUDART_VERSION-style number); throws CudaError naming `symbol` and what needs it
/// when the driver lacks it.
template <typename Fn>
void driver_function(const char* symbol, Fn& fn, unsigned int version, const char* needed_for) {
  void* ptr = nullptr;
  cudaDriverEntryPointQueryResult found{};
  TIDAL_CUDA_CHECK(cudaGetDriverEntryPointByVersion(symbol, &ptr, version, cudaEnableDefault, &found));
  if (found != cudaDriverEntryPointSuccess || ptr == nullptr) {
    TIDAL_THROW_(CudaError, "the CUDA driver has no ", symbol, " (", needed_for, " needs a driver for CUDA ",
                 version / 1000, ".", version % 1000 / 10, " or newer)");
  }
  fn = reinterpret_cast<Fn>(ptr);
}
#endif

/// The SMs a kernel launched on `stream` may use (launchers size grids by it): its group's count for
/// a stream of a tidal::SmPartition (registered by cuda/sm_partition.cu), else the device's.
int multiprocessor_count(int device, cudaStream_t stream);

// ---- programmatic dependent launch (sm_90 and up) -------------------------------------------------
// NOTE(tidal): at batch 1 a decode step is ~300 kernels of a few microseconds each, and inside a CUDA
// graph each dependent kernel still starts ~2 us after the one before it ends (bench/RESULTS.md). A
// kernel launched by launch_dependent may be scheduled while the kernel before it in the stream is
// still running: its blocks wait in wait_for_prior_grid() until that kernel has finished and its
// writes are visible, so the launch latency is hidden. Every kernel launched this way calls
// wait_for_prior_grid() before its first access to memory another kernel writes or reads, and may
// call allow_dependents() (once every block of it has, the next dependent kernel may be scheduled;
// it still waits for this one to finish). Kernels launched normally (cuBLAS, torch's) keep full stream
// order. Off until measured on a GPU: TIDAL_PROGRAMMATIC_LAUNCH=1 in the environment turns it on
// (otherwise every launch is a plain one, and the two instructions are no-ops).

/// Blocks until the kernel before this one in the stream has completed and its memory is visible.
/// A no-op for a kernel launched normally and on GPUs before sm_90.
__device__ __forceinline__ void wait_for_prior_grid() {
#if !defined(TIDAL_USE_HIP) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/// Lets the next kernel in the stream, if launched by launch_dependent, be scheduled now.
__device__ __forceinline__ void allow_dependents() {
#if !defined(TIDAL_USE_HIP) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

namespace detail {
// Compiled like every kernel of the library: its PTX version says whether the code that runs on a
// device holds the griddepcontrol instructions (compute_90 and up), a PTX JIT from an older target not.
static __global__ void programmatic_launch_probe() {}
}  // namespace detail

/// Whether launch_dependent launches programmatically on `device`: TIDAL_PROGRAMMATIC_LAUNCH=1,
/// compute capability >= 9.0, and code compiled for compute_90 or later running there. Read once per
/// device.
inline bool programmatic_launch(int device) {
  constexpr int kMaxDevices = 64;
  static const bool enabled = [] {
    const char* value = std::getenv("TIDAL_PROGRAMMATIC_LAUNCH");
    return value != nullptr && std::strcmp(value, "1") == 0;
  }();
  static int state[kMaxDevices] = {};  // 0: not read yet, 1: yes, 2: no
  if (!enabled || device < 0 || device >= kMaxDevices) return false;
#if defined(TIDAL_USE_HIP)
  return false;
#else
  if (state[device] == 0) {
    int major = 0;
    TIDAL_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    bool supported = major >= 9;
    if (supported) {
      cudaFuncAttributes attributes{};
      TIDAL_CUDA_CHECK(cudaFuncGetAttributes(&attributes, detail::programmatic_launch_probe));
      supported = attributes.ptxVersion >= 90;
    }
    state[device] = supported ? 1 : 2;
  }
  return state[device] == 1;
#endif
}

/// kernel<<<grid, block, smem, stream>>>(args...), launched as a programmatic dependent of the kernel
/// before it in the stream when `programmatic` (on CUDA; HIP launches plainly). The kernel must call
/// wait_for_prior_grid() first.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   bool programmatic, Args&&... args) {
#if defined(TIDAL_USE_HIP)
  (void)programmatic;
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
#else
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = programmatic ? 1 : 0;
  TIDAL_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
#endif
  TIDAL_CUDA_CHECK(cudaGetLastError());
}

/// launch_kernel, programmatic where programmatic_launch(device) holds.
template <typename... Params, typename... Args>
void launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, int device,
                      Args&&... args) {
  launch_kernel(kernel, grid, block, smem, stream, programmatic_launch(device), std::forward<Args>(args)...);
}

/// The device a launch goes to (the current one: launchers run under a DeviceGuard).
inline int current_device() {
  int device = 0;
  TIDAL_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

inline bool is_aligned(const void* ptr, std::uintptr_t bytes) {
  return reinterpret_cast<std::uintptr_t>(ptr) % bytes == 0;
}

/// Whether rows of `row_width` elements can move as 16-byte accesses of `width` elements: the
/// width divides row_width and the row stride of every 2-D view, and every base is 16-byte aligned.
inline bool can_vectorize(int64_t row_width, int64_t width, std::initializer_list<const TensorView*> views) {
  if (row_width % width != 0) return false;
  for (const TensorView* v : views) {
    if (!is_aligned(v->data, 16)) return false;
    if (v->ndim == 2 && v->stride(0) % width != 0) return false;
  }
  return true;
}

/// kN consecutive elements moved as one access; 16 bytes (a single LDG.128/STG.128) when
/// kN * sizeof(T) == 16, in which case the address must be 16-byte aligned.
template <typename T, int kN>
struct alignas(sizeof(T) * kN) Vec {
  T v[kN];
};

template <typename T, int kN>
__device__ __forceinline__ Vec<T, kN> load_vec(const T* ptr) {
  return *reinterpret_cast<const Vec<T, kN>*>(ptr);
}

/// load_vec through the read-only path; only for memory that no thread of the kernel writes.
template <typename T, int kN>
__device__ __forceinline__ Vec<T, kN> load_vec_readonly(const T* ptr) {
  if constexpr (sizeof(Vec<T, kN>) == 16) {
    const uint4 raw = TIDAL_LDG(reinterpret_cast<const uint4*>(ptr));
    Vec<T, kN> out;
    *reinterpret_cast<uint4*>(&out) = raw;
    return out;
  } else {
    return load_vec<T, kN>(ptr);
  }
}

template <typename T, int kN>
__device__ __forceinline__ void store_vec(T* ptr, const Vec<T, kN>& value) {
  *reinterpret_cast<Vec<T, kN>*>(ptr) = value;
}

/// Element j of v in fp32. NOTE(tidal): bf16 is the top half of an fp32, so it is widened with bit
/// operations on the packed word; through cvt.f32.bf16, ptxas unpacked every cached element into a
/// register of its own (64 instead of 40 registers for rms_norm<bf16>, halving blocks per SM).
template <typename T, int kN>
__device__ __forceinline__ float element_to_float(const Vec<T, kN>& vec, int j) {
  if constexpr (std::is_same_v<T, bf16_t> && kN % 2 == 0) {
    uint32_t word;
    memcpy(&word, &vec.v[j & ~1], sizeof(word));
    return __uint_as_float(j % 2 == 0 ? word << 16 : word & 0xffff0000u);
  } else if constexpr (std::is_same_v<T, bf16_t>) {
    uint16_t bits;
    memcpy(&bits, &vec.v[j], sizeof(bits));
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  } else {
    return to_float(vec.v[j]);
  }
}

/// Sum over aligned groups of `width` lanes (a power of two <= kWarpSize); every lane of a group
/// gets the same bits. All lanes of the warp must call it.
__device__ __forceinline__ float warp_sum(float value, int width = kWarpSize) {
  for (int mask = width / 2; mask > 0; mask /= 2) value += TIDAL_SHFL_XOR(value, mask);
  return value;
}

/// Most warps a block can hold (1024 threads); the size of block_row_sum's scratch.
inline constexpr int kMaxWarpsPerBlock = 1024 / kWarpSize;

/// Sum of `value` over the blockDim.x threads of each row (threadIdx.y) of the block, returned to
/// all of them. blockDim.x is a power of two <= kWarpSize or a multiple of kWarpSize. Every thread
/// of the block must call it: for blockDim.x > kWarpSize it synchronises the block (twice, so the
/// scratch may be reused by the next call).
__device__ __forceinline__ float block_row_sum(float value,
                                               float* scratch /* [kMaxWarpsPerBlock] */) {
  if (blockDim.x <= kWarpSize) return warp_sum(value, blockDim.x);
  value = warp_sum(value);
  const int lane = threadIdx.x % kWarpSize;
  const int warps_per_row = blockDim.x / kWarpSize;
  const int first_warp = threadIdx.y * warps_per_row;
  if (lane == 0) scratch[first_warp + threadIdx.x / kWarpSize] = value;
  __syncthreads();
  value = warp_sum(lane < warps_per_row ? scratch[first_warp + lane] : 0.0f);
  __syncthreads();
  return value;
}

/// silu(g) * u in fp32: the one expression silu_and_mul's kernels round, so that a fused variant
/// (silu_and_mul_quant_fp8) sees the same bits.
__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + __expf(-g)) * u; }

/// block_row_sum's maximum: the largest `value` over the blockDim.x threads of each row, returned to
/// all of them (the same layout rules and barriers).
__device__ __forceinline__ float block_row_max(float value, float* scratch /* [kMaxWarpsPerBlock] */) {
  const int width = blockDim.x < kWarpSize ? blockDim.x : kWarpSize;
  for (int mask = width / 2; mask > 0; mask /= 2) value = fmaxf(value, TIDAL_SHFL_XOR(value, mask));
  if (blockDim.x <= kWarpSize) return value;
  const int lane = threadIdx.x % kWarpSize;
  const int warps_per_row = blockDim.x / kWarpSize;
  const int first_warp = threadIdx.y * warps_per_row;
  if (lane == 0) scratch[first_warp + threadIdx.x / kWarpSize] = value;
  __syncthreads();
  value = lane < warps_per_row ? scratch[first_warp + lane] : 0.0f;
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) value = fmaxf(value, TIDAL_SHFL_XOR(value, mask));
  __syncthreads();
  return value;
}

}  // namespace tidal::gpu
