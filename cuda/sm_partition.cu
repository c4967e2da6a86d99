// SPDX-License-Identifier: Apache-2.0
// The calls behind tidal::SmPartition: a device's SMs split in two groups, streams whose kernels
// run on one group only, and a kernel that reports the SM each of its blocks ran on. CUDA makes a
// green context per group (driver API, reached through the runtime's entry-point lookup: the core
// links no libcuda); HIP gives each group a contiguous range of compute units and its streams that
// range as their CU mask. Launchers size their grids by the SMs of the stream they launch on
// (multiprocessor_count(device, stream)): a grid of one block per SM of the device would run in two
// waves on a group's stream.
#include <atomic>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "cuda/common.cuh"
#include "ops/kernels.h"

#if !defined(TIDAL_USE_HIP)
#include <cuda.h>
#endif

namespace tidal::gpu {
namespace {

// The streams of SM groups and each one's SM count. Registrations are rare (a stream per engine);
// lookups happen at every launch, so the common case of no group at all reads one atomic.
std::atomic<int> group_streams{0};
std::mutex group_streams_mutex;
std::vector<std::pair<uintptr_t, int>> group_stream_sms;

void register_group_stream(uintptr_t stream, int sms) {
  std::lock_guard<std::mutex> lock(group_streams_mutex);
  group_stream_sms.emplace_back(stream, sms);
  group_streams.store(static_cast<int>(group_stream_sms.size()), std::memory_order_release);
}

void unregister_group_stream(uintptr_t stream) {
  std::lock_guard<std::mutex> lock(group_streams_mutex);
  for (size_t i = 0; i < group_stream_sms.size(); ++i) {
    if (group_stream_sms[i].first == stream) {
      group_stream_sms.erase(group_stream_sms.begin() + static_cast<std::ptrdiff_t>(i));
      break;
    }
  }
  group_streams.store(static_cast<int>(group_stream_sms.size()), std::memory_order_release);
}

// Blocks of the SM-id kernel: at most two fit an SM (2,048 threads), so a launch of a few blocks
// per SM covers every SM its stream may use instead of packing onto a few.
constexpr int kSmIdThreads = 1024;

__global__ void sm_id_kernel(int* __restrict__ out, long long spin_cycles) {
  unsigned id = 0;
#if defined(TIDAL_USE_HIP)
  id = __smid();
#else
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
#endif
  // Stay resident a while, so the scheduler spreads the blocks rather than reusing the first SMs.
  const long long start = clock64();
  while (clock64() - start < spin_cycles) {
  }
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<int>(id);
}

#if defined(TIDAL_USE_HIP)

void check(hipError_t status, const char* what) {
  if (status != hipSuccess) TIDAL_THROW_(CudaError, what, " failed: ", hipGetErrorString(status));
}

int cu_count(int device) {
  int count = 0;
  check(hipDeviceGetAttribute(&count, hipDeviceAttributeMultiprocessorCount, device), "hipDeviceGetAttribute");
  return count;
}

// A group is its first compute unit and its count, packed into the handle.
uintptr_t pack(int first, int count) {
  return (static_cast<uintptr_t>(first) << 32) | static_cast<uint32_t>(count);
}

#else

// The driver functions this file uses, looked up once through the runtime at the ABI of the
// headers it was compiled with (CUdevResource's layout is versioned).
struct Driver {
  decltype(&::cuDeviceGet) device_get = nullptr;
  decltype(&::cuDeviceGetDevResource) get_resource = nullptr;
  decltype(&::cuDevSmResourceSplitByCount) split = nullptr;
  decltype(&::cuDevResourceGenerateDesc) describe = nullptr;
  decltype(&::cuGreenCtxCreate) create = nullptr;
  decltype(&::cuGreenCtxDestroy) destroy = nullptr;
  decltype(&::cuGreenCtxStreamCreate) stream_create = nullptr;
  decltype(&::cuStreamDestroy) stream_destroy = nullptr;
  decltype(&::cuGetErrorString) error_string = nullptr;
};

template <typename Fn>
void lookup(const char* symbol, Fn& fn) {
  driver_function(symbol, fn, CUDART_VERSION, "an SM partition (green contexts)");
}

const Driver& driver() {
  static const Driver d = [] {
    Driver out;
    lookup("cuDeviceGet", out.device_get);
    lookup("cuDeviceGetDevResource", out.get_resource);
    lookup("cuDevSmResourceSplitByCount", out.split);
    lookup("cuDevResourceGenerateDesc", out.describe);
    lookup("cuGreenCtxCreate", out.create);
    lookup("cuGreenCtxDestroy", out.destroy);
    lookup("cuGreenCtxStreamCreate", out.stream_create);
    lookup("cuStreamDestroy", out.stream_destroy);
    lookup("cuGetErrorString", out.error_string);
    return out;
  }();
  return d;
}

void check(CUresult status, const char* what) {
  if (status == CUDA_SUCCESS) return;
  const char* message = nullptr;
  if (driver().error_string(status, &message) != CUDA_SUCCESS || message == nullptr) message = "unknown error";
  TIDAL_THROW_(CudaError, what, " failed: ", message, " (CUresult ", static_cast<int>(status), ")");
}

CUdevResource device_sms(int device) {
  TIDAL_CUDA_CHECK(cudaFree(nullptr));  // the primary context exists before the driver is asked
  CUdevice dev = 0;
  check(driver().device_get(&dev, device), "cuDeviceGet");
  CUdevResource sms{};
  check(driver().get_resource(dev, &sms, CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource");
  return sms;
}

uintptr_t green_context(int device, CUdevResource& sms) {
  CUdevice dev = 0;
  check(driver().device_get(&dev, device), "cuDeviceGet");
  CUdevResourceDesc desc = nullptr;
  check(driver().describe(&desc, &sms, 1), "cuDevResourceGenerateDesc");
  CUgreenCtx ctx = nullptr;
  check(driver().create(&ctx, desc, dev, CU_GREEN_CTX_DEFAULT_STREAM), "cuGreenCtxCreate");
  return reinterpret_cast<uintptr_t>(ctx);
}

#endif

}  // namespace

void sm_layout(int device, int* sm_count, int* min_group, int* alignment) {
  DeviceGuard guard(device);
#if defined(TIDAL_USE_HIP)
  *sm_count = cu_count(device);
  *min_group = 1;
  *alignment = 1;
#else
  const CUdevResource sms = device_sms(device);
  *sm_count = static_cast<int>(sms.sm.smCount);
  *min_group = static_cast<int>(sms.sm.minSmPartitionSize);
  *alignment = static_cast<int>(sms.sm.smCoscheduledAlignment);
#endif
}

std::vector<uintptr_t> sm_groups_create(int device, int first_sms, std::vector<int>& sm_counts) {
  DeviceGuard guard(device);
#if defined(TIDAL_USE_HIP)
  const int total = cu_count(device);
  if (first_sms >= total) {
    TIDAL_THROW_(std::invalid_argument, "first_sms=", first_sms, " leaves no compute unit of the device's ", total,
                 " for the second group");
  }
  sm_counts = {first_sms, total - first_sms};
  return {pack(0, first_sms), pack(first_sms, total - first_sms)};
#else
  CUdevResource sms = device_sms(device);
  CUdevResource first{}, rest{};
  unsigned int groups = 1;
  check(driver().split(&first, &groups, &sms, &rest, 0, static_cast<unsigned int>(first_sms)),
        "cuDevSmResourceSplitByCount");
  if (groups != 1 || rest.sm.smCount == 0) {
    TIDAL_THROW_(std::invalid_argument, "first_sms=", first_sms, " leaves no SM of the device's ", sms.sm.smCount,
                 " for the second group (groups are multiples of ", sms.sm.smCoscheduledAlignment, " SMs, at least ",
                 sms.sm.minSmPartitionSize, ")");
  }
  sm_counts = {static_cast<int>(first.sm.smCount), static_cast<int>(rest.sm.smCount)};
  std::vector<uintptr_t> handles;
  handles.push_back(green_context(device, first));
  try {
    handles.push_back(green_context(device, rest));
  } catch (...) {
    (void)driver().destroy(reinterpret_cast<CUgreenCtx>(handles[0]));
    throw;
  }
  return handles;
#endif
}

void sm_group_destroy(uintptr_t group) {
#if !defined(TIDAL_USE_HIP)
  check(driver().destroy(reinterpret_cast<CUgreenCtx>(group)), "cuGreenCtxDestroy");
#else
  (void)group;  // a range of compute units holds nothing
#endif
}

int multiprocessor_count(int device, cudaStream_t stream) {
  if (stream != nullptr && group_streams.load(std::memory_order_acquire) > 0) {
    std::lock_guard<std::mutex> lock(group_streams_mutex);
    for (const auto& [handle, sms] : group_stream_sms) {
      if (handle == reinterpret_cast<uintptr_t>(stream)) return sms;
    }
  }
  return multiprocessor_count(device);
}

uintptr_t sm_group_stream(int device, uintptr_t group, int sms, int priority) {
  DeviceGuard guard(device);
  uintptr_t handle = 0;
#if defined(TIDAL_USE_HIP)
  const int first = static_cast<int>(group >> 32), count = static_cast<int>(group & 0xffffffffu);
  std::vector<uint32_t> mask((cu_count(device) + 31) / 32, 0u);
  for (int cu = first; cu < first + count; ++cu) mask[cu / 32] |= 1u << (cu % 32);
  hipStream_t stream = nullptr;
  // NOTE(tidal): HIP's CU-masked streams take no priority; the mask alone keeps the groups apart.
  (void)priority;
  check(hipExtStreamCreateWithCUMask(&stream, static_cast<uint32_t>(mask.size()), mask.data()),
        "hipExtStreamCreateWithCUMask");
  handle = reinterpret_cast<uintptr_t>(stream);
#else
  CUstream stream = nullptr;
  check(driver().stream_create(&stream, reinterpret_cast<CUgreenCtx>(group), CU_STREAM_NON_BLOCKING, priority),
        "cuGreenCtxStreamCreate");
  handle = reinterpret_cast<uintptr_t>(stream);
#endif
  register_group_stream(handle, sms);
  return handle;
}

void sm_group_stream_destroy(uintptr_t stream) {
  unregister_group_stream(stream);
#if defined(TIDAL_USE_HIP)
  check(hipStreamDestroy(reinterpret_cast<hipStream_t>(stream)), "hipStreamDestroy");
#else
  check(driver().stream_destroy(reinterpret_cast<CUstream>(stream)), "cuStreamDestroy");
#endif
}

void record_sm_ids(uintptr_t stream, int blocks, uintptr_t out) {
  int device = 0, clock_khz = 0;
  TIDAL_CUDA_CHECK(cudaGetDevice(&device));
  TIDAL_CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device));
  const long long spin = static_cast<long long>(clock_khz > 0 ? clock_khz : 1000000) / 10;  // ~100 us
  sm_id_kernel<<<blocks, kSmIdThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(reinterpret_cast<int*>(out), spin);
  TIDAL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace tidal::gpu
