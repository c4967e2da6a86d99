// SPDX-License-Identifier: Apache-2.0
// The DLPack exchange ABI (major version 1), declared here from the published specification so that
// the core needs no third-party header: device, dtype, the plain tensor and the two managed wrappers
// (legacy "dltensor" capsules and versioned "dltensor_versioned" ones). Layouts must not change.
#pragma once

#include <cstdint>

extern "C" {

/// Version of a DLManagedTensorVersioned; a different major means a different layout.
struct DLPackVersion {
  uint32_t major;
  uint32_t minor;
};

/// Device kinds tidal reads; the numeric values are fixed by the ABI.
enum DLDeviceType : int32_t {
  kDLCPU = 1,
  kDLCUDA = 2,
  kDLCUDAHost = 3,
  kDLROCM = 10,
  kDLROCMHost = 11,
  kDLCUDAManaged = 13,
};

struct DLDevice {
  DLDeviceType device_type;
  int32_t device_id;
};

/// Type codes tidal reads; the numeric values are fixed by the ABI.
enum DLDataTypeCode : uint8_t {
  kDLInt = 0,
  kDLUInt = 1,
  kDLFloat = 2,
  kDLBfloat = 4,
  kDLBool = 6,
  kDLFloat8_e4m3fn = 10,
  kDLFloat8_e5m2 = 12,
};

struct DLDataType {
  uint8_t code;    // a DLDataTypeCode
  uint8_t bits;    // bits per lane: 8, 16, 32, 64
  uint16_t lanes;  // 1 for every tensor tidal accepts
};

/// A tensor view: nothing here is owned.
struct DLTensor {
  void* data;            // base pointer; the first element is at data + byte_offset
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;        // [ndim]
  int64_t* strides;      // [ndim] in elements; may be null (then compact row-major)
  uint64_t byte_offset;
};

struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

struct DLManagedTensorVersioned {
  DLPackVersion version;
  void* manager_ctx;
  void (*deleter)(DLManagedTensorVersioned* self);
  uint64_t flags;
  DLTensor dl_tensor;
};

}  // extern "C"
