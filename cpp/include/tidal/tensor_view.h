// SPDX-License-Identifier: Apache-2.0
// TensorView: the non-owning tensor every kernel takes. It is built from a DLPack DLTensor (the
// published ABI, so no framework header is needed), keeps shape and strides inline, and carries the
// helpers launchers use to validate their arguments with messages that name the argument.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "tidal/dlpack.h"
#include "tidal/status.h"

namespace tidal {

/// The element types kernels dispatch on.
enum class DType : int8_t { kFloat32, kFloat16, kBFloat16, kFloat64, kInt8, kUInt8, kInt32, kInt64, kBool };

const char* dtype_name(DType dtype);
int64_t dtype_size(DType dtype);
/// Throws std::invalid_argument naming `what` when the DLPack dtype has no tidal DType.
DType dtype_from_dlpack(DLDataType dtype, const char* what);

enum class DeviceType : int8_t { kCPU, kCUDA, kROCM };

struct Device {
  DeviceType type = DeviceType::kCPU;
  int32_t index = 0;

  bool is_cpu() const { return type == DeviceType::kCPU; }
  bool operator==(const Device& other) const { return type == other.type && index == other.index; }
  bool operator!=(const Device& other) const { return !(*this == other); }
};

std::string device_name(Device device);

/// A strided view of memory tidal does not own. Strides are in elements, as in DLPack.
struct TensorView {
  static constexpr int kMaxDims = 8;

  void* data = nullptr;  // first element (DLPack's byte_offset already applied)
  Device device;
  DType dtype = DType::kFloat32;
  int32_t ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> strides{};

  /// Views `t`; `what` names the argument in error messages (e.g. "x").
  static TensorView from_dlpack(const DLTensor& t, const char* what);

  int64_t size(int dim) const { return shape[wrap(dim)]; }
  int64_t stride(int dim) const { return strides[wrap(dim)]; }
  int64_t numel() const;
  int64_t element_size() const { return dtype_size(dtype); }
  bool is_contiguous() const;
  /// "[16, 4096]" for messages.
  std::string shape_str() const;

  template <typename T>
  T* data_ptr() const { return static_cast<T*>(data); }

 private:
  int wrap(int dim) const {
    int d = dim < 0 ? dim + ndim : dim;
    TIDAL_CHECK_INDEX(d >= 0 && d < ndim, "dim=", dim, " is out of range for a tensor of ", ndim, " dims");
    return d;
  }
};

}  // namespace tidal
