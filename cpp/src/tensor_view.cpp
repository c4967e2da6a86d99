// SPDX-License-Identifier: Apache-2.0
// TensorView construction from DLPack and its small helpers (dtype names and sizes, shape strings).
#include "tidal/tensor_view.h"

#include <sstream>

namespace tidal {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
    case DType::kInt8: return "int8";
    case DType::kUInt8: return "uint8";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kBool: return "bool";
  }
  return "unknown";
}

int64_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: case DType::kInt32: return 4;
    case DType::kFloat16: case DType::kBFloat16: return 2;
    case DType::kFloat64: case DType::kInt64: return 8;
    case DType::kInt8: case DType::kUInt8: case DType::kBool: return 1;
  }
  return 0;
}

DType dtype_from_dlpack(DLDataType t, const char* what) {
  TIDAL_CHECK(t.lanes == 1, what, ".dtype has lanes=", t.lanes, "; only scalar element types are supported");
  const int code = t.code, bits = t.bits;
  if (code == kDLFloat && bits == 32) return DType::kFloat32;
  if (code == kDLFloat && bits == 16) return DType::kFloat16;
  if (code == kDLBfloat && bits == 16) return DType::kBFloat16;
  if (code == kDLFloat && bits == 64) return DType::kFloat64;
  if (code == kDLInt && bits == 8) return DType::kInt8;
  if (code == kDLUInt && bits == 8) return DType::kUInt8;
  if (code == kDLInt && bits == 32) return DType::kInt32;
  if (code == kDLInt && bits == 64) return DType::kInt64;
  if (code == kDLBool) return DType::kBool;
  TIDAL_THROW_(std::invalid_argument, what, ".dtype (DLPack code=", code, ", bits=", bits, ") is not supported");
}

std::string device_name(Device device) {
  switch (device.type) {
    case DeviceType::kCPU: return "cpu";
    case DeviceType::kCUDA: return "cuda:" + std::to_string(device.index);
    case DeviceType::kROCM: return "rocm:" + std::to_string(device.index);
  }
  return "unknown";
}

TensorView TensorView::from_dlpack(const DLTensor& t, const char* what) {
  TensorView v;
  TIDAL_CHECK(t.ndim >= 0 && t.ndim <= kMaxDims, what, ".ndim=", t.ndim, " must be in [0, ", kMaxDims, "]");
  switch (t.device.device_type) {
    case kDLCPU: case kDLCUDAHost: case kDLROCMHost:
      v.device = {DeviceType::kCPU, 0};
      break;
    case kDLCUDA: case kDLCUDAManaged:
      v.device = {DeviceType::kCUDA, t.device.device_id};
      break;
    case kDLROCM:
      v.device = {DeviceType::kROCM, t.device.device_id};
      break;
    default:
      TIDAL_THROW_(std::invalid_argument, what, " is on DLPack device type ", static_cast<int>(t.device.device_type),
                   ", which tidal does not support");
  }
  v.dtype = dtype_from_dlpack(t.dtype, what);
  v.ndim = t.ndim;
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  int64_t expected = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    v.shape[d] = t.shape[d];
    v.strides[d] = t.strides ? t.strides[d] : expected;
    expected *= t.shape[d];
  }
  return v;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

std::string TensorView::shape_str() const {
  std::ostringstream os;
  os << '[';
  for (int d = 0; d < ndim; ++d) os << (d ? ", " : "") << shape[d];
  os << ']';
  return os.str();
}

}  // namespace tidal
