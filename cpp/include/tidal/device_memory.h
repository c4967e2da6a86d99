// SPDX-License-Identifier: Apache-2.0
// Device memory that can give its physical pages back and take new ones at the same virtual address
// (CUDA / HIP virtual memory management). The serving engine keeps its KV pool in one: while a
// training step runs in the same process the pool's memory is released, and kernels and CUDA graphs
// that captured the pool's address stay valid once it is mapped again.
#pragma once

#include <cstdint>

namespace tidal {

class SleepableMemory {
 public:
  /// Reserves `bytes` (rounded up to the device's allocation granularity) of address space on
  /// `device` and maps zeroed physical memory there. Throws OutOfMemory when the device lacks it and
  /// Error in a build without a GPU.
  SleepableMemory(int device, int64_t bytes);
  ~SleepableMemory();
  SleepableMemory(const SleepableMemory&) = delete;
  SleepableMemory& operator=(const SleepableMemory&) = delete;

  /// Unmaps and frees the physical memory; the address stays reserved. The contents are lost.
  /// A no-op when already released.
  void release();
  /// Maps new physical memory at the same address and zeroes it (synchronously). A no-op when
  /// mapped. Throws OutOfMemory naming the size when the device lacks it.
  void remap();

  uintptr_t address() const { return address_; }
  int64_t size() const { return size_; }  // the mapped size: `bytes` rounded up
  int64_t requested() const { return requested_; }
  int device() const { return device_; }
  bool is_mapped() const { return handle_ != 0; }

 private:
  int device_;
  int64_t requested_, size_ = 0;
  uintptr_t address_ = 0;
  unsigned long long handle_ = 0;  // the physical allocation's handle; 0 when released
};

}  // namespace tidal
