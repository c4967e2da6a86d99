// SPDX-License-Identifier: Apache-2.0
// Argument checks shared by the ops in cpp/src/ops: each throws std::invalid_argument whose message
// names the op's argument and the offending value, so a Python user sees what to fix.
#pragma once

#include <cmath>

#include "tidal/ops_quant.h"
#include "tidal/status.h"
#include "tidal/tensor_view.h"

namespace tidal::ops::detail {

/// Checks a quantized weight's qweight, scales and zeros against each other (tidal/ops_quant.h's
/// layouts); returns k, the number of inputs (ops/dispatch_quant.cpp).
int64_t check_quant_weight(TensorView qweight, TensorView scales, TensorView zeros, WeightFormat format);

/// `t` is [rows, cols] with a contiguous last dim and a row stride of at least cols.
inline void check_rows(const TensorView& t, const char* name) {
  TIDAL_CHECK(t.ndim == 2, name, " must be 2-D [num_tokens, hidden_size], got shape ", t.shape_str());
  TIDAL_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, ".stride(-1)=", t.stride(1), " must be 1");
  TIDAL_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1), name, ".stride(0)=", t.stride(0),
              " must be >= hidden_size=", t.size(1), " (rows must not overlap)");
}

/// `t` has the same shape, dtype and device as `ref`.
inline void check_like(const TensorView& t, const char* name, const TensorView& ref, const char* ref_name) {
  TIDAL_CHECK(t.ndim == ref.ndim && t.size(0) == ref.size(0) && t.size(1) == ref.size(1), name, ".shape=",
              t.shape_str(), " must equal ", ref_name, ".shape=", ref.shape_str());
  TIDAL_CHECK(t.dtype == ref.dtype, name, ".dtype=", dtype_name(t.dtype), " must equal ", ref_name,
              ".dtype=", dtype_name(ref.dtype));
  TIDAL_CHECK(t.device == ref.device, name, " is on ", device_name(t.device), " but ", ref_name, " is on ",
              device_name(ref.device));
}

inline void check_norm_weight(const TensorView& weight, const TensorView& x) {
  TIDAL_CHECK(weight.ndim == 1 && weight.size(0) == x.size(1), "weight.shape=", weight.shape_str(),
              " must be [hidden_size] = [", x.size(1), "]");
  TIDAL_CHECK(weight.size(0) <= 1 || weight.stride(0) == 1, "weight must be contiguous, got stride ",
              weight.stride(0));
  TIDAL_CHECK(weight.dtype == x.dtype, "weight.dtype=", dtype_name(weight.dtype), " must equal x.dtype=",
              dtype_name(x.dtype));
  TIDAL_CHECK(weight.device == x.device, "weight is on ", device_name(weight.device), " but x is on ",
              device_name(x.device));
}

inline void check_eps(float eps) {
  TIDAL_CHECK(std::isfinite(eps) && eps >= 0.f, "eps=", eps, " must be finite and >= 0");
}

/// Byte range [first, last) that the elements of `t` span.
inline std::pair<uintptr_t, uintptr_t> byte_extent(const TensorView& t) {
  uintptr_t lo = reinterpret_cast<uintptr_t>(t.data), hi = lo;
  if (t.numel() == 0) return {lo, lo};
  int64_t last = 0;
  for (int d = 0; d < t.ndim; ++d) last += (t.shape[d] - 1) * t.strides[d];
  hi = lo + static_cast<uintptr_t>((last + 1) * t.element_size());
  return {lo, hi};
}

inline bool overlaps(const TensorView& a, const TensorView& b) {
  const auto [a_lo, a_hi] = byte_extent(a);
  const auto [b_lo, b_hi] = byte_extent(b);
  return a.device == b.device && a_lo < b_hi && b_lo < a_hi;
}

}  // namespace tidal::ops::detail
