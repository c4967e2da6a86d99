// SPDX-License-Identifier: Apache-2.0
// TIDAL_CPU_DISPATCH_FLOAT: runs a statement with `T` bound to the CPU storage type of a float dtype
// (float, Half, BFloat16); any other dtype is a std::invalid_argument that names it.
#pragma once

#include "cpu/float16.h"
#include "tidal/status.h"
#include "tidal/tensor_view.h"

#define TIDAL_CPU_DISPATCH_FLOAT(dtype, T, ...)                                                 \
  do {                                                                                          \
    switch (dtype) {                                                                            \
      case ::tidal::DType::kFloat32: { using T = float; __VA_ARGS__; break; }                   \
      case ::tidal::DType::kFloat16: { using T = ::tidal::cpu::Half; __VA_ARGS__; break; }      \
      case ::tidal::DType::kBFloat16: { using T = ::tidal::cpu::BFloat16; __VA_ARGS__; break; } \
      default:                                                                                  \
        TIDAL_THROW_(std::invalid_argument, "dtype=", ::tidal::dtype_name(dtype),               \
                     " is not supported; expected float32, float16 or bfloat16");              \
    }                                                                                           \
  } while (0)
