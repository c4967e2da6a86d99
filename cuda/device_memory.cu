// SPDX-License-Identifier: Apache-2.0
// The virtual-memory calls behind tidal::SleepableMemory: reserve an address range, map physical
// memory into it, unmap and free that memory, all at one address. CUDA reaches the driver API
// through the runtime's entry-point lookup (the core links no libcuda); HIP calls its runtime.
#include <cstdint>
#include <string>

#include "cuda/common.cuh"
#include "ops/kernels.h"

#if !defined(TIDAL_USE_HIP)
#include <cuda.h>
#endif

namespace tidal::gpu {
namespace {

#if defined(TIDAL_USE_HIP)

using Handle = hipMemGenericAllocationHandle_t;

hipMemAllocationProp device_prop(int device) {
  hipMemAllocationProp prop{};
  prop.type = hipMemAllocationTypePinned;
  prop.location.type = hipMemLocationTypeDevice;
  prop.location.id = device;
  return prop;
}

void check(hipError_t status, const char* what, int64_t bytes) {
  if (status == hipSuccess) return;
  if (status == hipErrorOutOfMemory) {
    TIDAL_THROW_(OutOfMemory, what, " of ", bytes, " bytes: out of device memory");
  }
  TIDAL_THROW_(CudaError, what, " of ", bytes, " bytes failed: ", hipGetErrorString(status));
}

#else

// The driver functions this file uses, looked up once through the runtime.
struct Driver {
  decltype(&::cuMemGetAllocationGranularity) granularity = nullptr;
  decltype(&::cuMemAddressReserve) reserve = nullptr;
  decltype(&::cuMemAddressFree) address_free = nullptr;
  decltype(&::cuMemCreate) create = nullptr;
  decltype(&::cuMemRelease) release = nullptr;
  decltype(&::cuMemMap) map = nullptr;
  decltype(&::cuMemUnmap) unmap = nullptr;
  decltype(&::cuMemSetAccess) set_access = nullptr;
  decltype(&::cuGetErrorString) error_string = nullptr;
};

template <typename Fn>
void lookup(const char* symbol, Fn& fn) {
  driver_function(symbol, fn, 12000, "virtual memory management");
}

const Driver& driver() {
  static const Driver d = [] {
    Driver out;
    lookup("cuMemGetAllocationGranularity", out.granularity);
    lookup("cuMemAddressReserve", out.reserve);
    lookup("cuMemAddressFree", out.address_free);
    lookup("cuMemCreate", out.create);
    lookup("cuMemRelease", out.release);
    lookup("cuMemMap", out.map);
    lookup("cuMemUnmap", out.unmap);
    lookup("cuMemSetAccess", out.set_access);
    lookup("cuGetErrorString", out.error_string);
    return out;
  }();
  return d;
}

CUmemAllocationProp device_prop(int device) {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  return prop;
}

void check(CUresult status, const char* what, int64_t bytes) {
  if (status == CUDA_SUCCESS) return;
  if (status == CUDA_ERROR_OUT_OF_MEMORY) {
    TIDAL_THROW_(OutOfMemory, what, " of ", bytes, " bytes: out of device memory");
  }
  const char* message = nullptr;
  if (driver().error_string(status, &message) != CUDA_SUCCESS || message == nullptr) message = "unknown error";
  TIDAL_THROW_(CudaError, what, " of ", bytes, " bytes failed: ", message, " (CUresult ", static_cast<int>(status),
               ")");
}

#endif

}  // namespace

int64_t vmm_granularity(int device) {
  auto prop = device_prop(device);
  size_t granularity = 0;
#if defined(TIDAL_USE_HIP)
  check(hipMemGetAllocationGranularity(&granularity, &prop, hipMemAllocationGranularityMinimum),
        "hipMemGetAllocationGranularity", 0);
#else
  check(driver().granularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM), "cuMemGetAllocationGranularity",
        0);
#endif
  return static_cast<int64_t>(granularity);
}

uintptr_t vmm_reserve(int64_t size) {
#if defined(TIDAL_USE_HIP)
  void* ptr = nullptr;
  check(hipMemAddressReserve(&ptr, static_cast<size_t>(size), 0, nullptr, 0), "hipMemAddressReserve", size);
  return reinterpret_cast<uintptr_t>(ptr);
#else
  CUdeviceptr ptr = 0;
  check(driver().reserve(&ptr, static_cast<size_t>(size), 0, 0, 0), "cuMemAddressReserve", size);
  return static_cast<uintptr_t>(ptr);
#endif
}

void vmm_free(uintptr_t address, int64_t size) {
#if defined(TIDAL_USE_HIP)
  check(hipMemAddressFree(reinterpret_cast<void*>(address), static_cast<size_t>(size)), "hipMemAddressFree", size);
#else
  check(driver().address_free(static_cast<CUdeviceptr>(address), static_cast<size_t>(size)), "cuMemAddressFree",
        size);
#endif
}

unsigned long long vmm_map(int device, uintptr_t address, int64_t size) {
  DeviceGuard guard(device);
  auto prop = device_prop(device);
  const auto bytes = static_cast<size_t>(size);
#if defined(TIDAL_USE_HIP)
  Handle handle{};
  check(hipMemCreate(&handle, bytes, &prop, 0), "hipMemCreate", size);
  void* ptr = reinterpret_cast<void*>(address);
  hipError_t status = hipMemMap(ptr, bytes, 0, handle, 0);
  if (status == hipSuccess) {
    hipMemAccessDesc access{};
    access.location = prop.location;
    access.flags = hipMemAccessFlagsProtReadWrite;
    status = hipMemSetAccess(ptr, bytes, &access, 1);
    if (status != hipSuccess) (void)hipMemUnmap(ptr, bytes);
  }
  if (status != hipSuccess) {
    (void)hipMemRelease(handle);
    check(status, "hipMemMap", size);
  }
  const auto id = reinterpret_cast<unsigned long long>(handle);
#else
  const Driver& d = driver();
  CUmemGenericAllocationHandle handle = 0;
  check(d.create(&handle, bytes, &prop, 0), "cuMemCreate", size);
  const auto ptr = static_cast<CUdeviceptr>(address);
  CUresult status = d.map(ptr, bytes, 0, handle, 0);
  if (status == CUDA_SUCCESS) {
    CUmemAccessDesc access{};
    access.location = prop.location;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    status = d.set_access(ptr, bytes, &access, 1);
    if (status != CUDA_SUCCESS) (void)d.unmap(ptr, bytes);
  }
  if (status != CUDA_SUCCESS) {
    (void)d.release(handle);
    check(status, "cuMemMap", size);
  }
  const auto id = static_cast<unsigned long long>(handle);
#endif
  // New pages hold whatever they held; the KV pool starts zeroed, as torch.zeros would give it.
  TIDAL_CUDA_CHECK(cudaMemset(reinterpret_cast<void*>(address), 0, bytes));
  TIDAL_CUDA_CHECK(cudaDeviceSynchronize());
  return id;
}

void vmm_unmap(int device, uintptr_t address, int64_t size, unsigned long long handle) {
  DeviceGuard guard(device);
  // Kernels still reading the pool finish before its pages go.
  TIDAL_CUDA_CHECK(cudaDeviceSynchronize());
#if defined(TIDAL_USE_HIP)
  check(hipMemUnmap(reinterpret_cast<void*>(address), static_cast<size_t>(size)), "hipMemUnmap", size);
  check(hipMemRelease(reinterpret_cast<Handle>(handle)), "hipMemRelease", size);
#else
  check(driver().unmap(static_cast<CUdeviceptr>(address), static_cast<size_t>(size)), "cuMemUnmap", size);
  check(driver().release(static_cast<CUmemGenericAllocationHandle>(handle)), "cuMemRelease", size);
#endif
}

}  // namespace tidal::gpu
