// SPDX-License-Identifier: Apache-2.0
// The stream a kernel is launched on, passed in from the caller (torch's current stream on the
// Python side). CPU kernels receive it and ignore it.
#pragma once

#include <cstdint>

namespace tidal {

/// An opaque cudaStream_t / hipStream_t; null is the legacy default stream.
struct Stream {
  void* handle = nullptr;

  static Stream from_int(std::uintptr_t value) { return Stream{reinterpret_cast<void*>(value)}; }
};

}  // namespace tidal
