// SPDX-License-Identifier: Apache-2.0
// tidal::SleepableMemory over the virtual-memory calls of cuda/device_memory.cu.
#include "tidal/device_memory.h"

#include "ops/kernels.h"
#include "tidal/status.h"

namespace tidal {

#if TIDAL_WITH_CUDA

SleepableMemory::SleepableMemory(int device, int64_t bytes) : device_(device), requested_(bytes) {
  TIDAL_CHECK(device >= 0, "device=", device, " must be a GPU index");
  TIDAL_CHECK(bytes > 0, "bytes=", bytes, " must be positive");
  const int64_t granularity = gpu::vmm_granularity(device);
  size_ = (bytes + granularity - 1) / granularity * granularity;
  address_ = gpu::vmm_reserve(size_);
  try {
    remap();
  } catch (...) {
    gpu::vmm_free(address_, size_);
    throw;
  }
}

SleepableMemory::~SleepableMemory() {
  // NOTE(tidal): a destructor must not throw; a failure here leaves the memory to the process's end.
  try {
    release();
    gpu::vmm_free(address_, size_);
  } catch (...) {
  }
}

void SleepableMemory::release() {
  if (handle_ == 0) return;
  gpu::vmm_unmap(device_, address_, size_, handle_);
  handle_ = 0;
}

void SleepableMemory::remap() {
  if (handle_ != 0) return;
  handle_ = gpu::vmm_map(device_, address_, size_);
}

#else

SleepableMemory::SleepableMemory(int device, int64_t bytes) : device_(device), requested_(bytes) {
  TIDAL_THROW_(Error, "SleepableMemory(device=", device, ", bytes=", bytes,
               "): this build of tidal has no GPU support (built without CUDA)");
}

SleepableMemory::~SleepableMemory() = default;
void SleepableMemory::release() {}
void SleepableMemory::remap() {}

#endif

}  // namespace tidal
