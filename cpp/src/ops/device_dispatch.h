// SPDX-License-Identifier: Apache-2.0
// Device dispatch shared by every op family in cpp/src/ops: run the CPU or GPU kernel for a tensor's
// device, or say clearly that this build has no kernel there. There is never a silent
// fallback from a GPU tensor to the CPU.
#pragma once

#include <string>

#include "tidal/status.h"
#include "tidal/tensor_view.h"

namespace tidal::ops::detail {

[[noreturn]] inline void throw_no_kernel(const char* op, Device device, const char* why) {
  throw Error(std::string(op) + ": the tensors are on " + device_name(device) + " but " + why);
}

/// Calls `cpu_fn` or `gpu_fn` for `device`; `op` names the op in errors.
template <typename CpuFn, typename GpuFn>
void dispatch(const char* op, Device device, CpuFn&& cpu_fn, [[maybe_unused]] GpuFn&& gpu_fn) {
  switch (device.type) {
    case DeviceType::kCPU:
      cpu_fn();
      return;
    case DeviceType::kCUDA:
#if TIDAL_WITH_CUDA
      gpu_fn();
      return;
#else
      throw_no_kernel(op, device, "this build of tidal has no CUDA kernels (tidal.build_info()['cuda'] is False)");
#endif
    case DeviceType::kROCM:
      throw_no_kernel(op, device, "this build of tidal has no HIP kernels (tidal.build_info()['hip'] is False)");
  }
}

}  // namespace tidal::ops::detail
