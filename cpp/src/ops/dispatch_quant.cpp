// SPDX-License-Identifier: Apache-2.0
// quant_linear and dequantize_weight of tidal/ops_quant.h: validate the quantized weight's codes,
// scales and zero points against each other and the input, then run the CPU or GPU kernel.
#include "ops/checks.h"
#include "ops/device_dispatch.h"
#include "ops/kernels.h"
#include "tidal/ops_quant.h"

namespace tidal::ops {
namespace {

const char* format_name(WeightFormat format) {
  switch (format) {
    case WeightFormat::kInt8: return "int8";
    case WeightFormat::kInt4: return "int4";
    case WeightFormat::kFp8E4M3: return "fp8_e4m3";
  }
  return "?";
}

}  // namespace

namespace detail {

/// Checks qweight, scales and zeros; returns k, the number of inputs.
int64_t check_quant_weight(TensorView qweight, TensorView scales, TensorView zeros, WeightFormat format) {
  const int f = static_cast<int>(format);
  TIDAL_CHECK(f >= 0 && f <= 2, "format=", f, " must be 0 (int8), 1 (int4) or 2 (fp8_e4m3)");
  const DType code_dtype = format == WeightFormat::kInt8 ? DType::kInt8 : DType::kUInt8;
  TIDAL_CHECK(qweight.dtype == code_dtype, "qweight.dtype=", dtype_name(qweight.dtype), " must be ",
              dtype_name(code_dtype), " for format ", format_name(format));
  TIDAL_CHECK(qweight.ndim == 2 && qweight.is_contiguous() && qweight.size(0) >= 1 && qweight.size(1) >= 1,
              "qweight must be a contiguous non-empty [n, codes] tensor, got shape ", qweight.shape_str());
  const int64_t n = qweight.size(0);
  const int64_t k = format == WeightFormat::kInt4 ? 2 * qweight.size(1) : qweight.size(1);
  TIDAL_CHECK(scales.dtype == DType::kFloat32 && scales.ndim == 2 && scales.is_contiguous() && scales.size(0) == n &&
                  scales.size(1) >= 1 && k % scales.size(1) == 0,
              "scales must be a contiguous float32 [n, num_groups] tensor with n=", n, " and num_groups dividing k=", k,
              ", got dtype ", dtype_name(scales.dtype), " and shape ", scales.shape_str());
  TIDAL_CHECK(scales.device == qweight.device, "scales is on ", device_name(scales.device), " but qweight is on ",
              device_name(qweight.device));
  if (format == WeightFormat::kInt4) {
    TIDAL_CHECK((k / scales.size(1)) % 2 == 0, "int4 groups must hold an even number of inputs (whole bytes), got ",
                k / scales.size(1), " (k=", k, ", num_groups=", scales.size(1), ")");
    TIDAL_CHECK(zeros.data != nullptr, "format int4 needs zeros [n, num_groups] uint8, got none");
    TIDAL_CHECK(zeros.dtype == DType::kUInt8 && zeros.ndim == 2 && zeros.is_contiguous() && zeros.size(0) == n &&
                    zeros.size(1) == scales.size(1),
                "zeros must be a contiguous uint8 [n, num_groups] = [", n, ", ", scales.size(1),
                "] tensor, got dtype ", dtype_name(zeros.dtype), " and shape ", zeros.shape_str());
    TIDAL_CHECK(zeros.device == qweight.device, "zeros is on ", device_name(zeros.device), " but qweight is on ",
                device_name(qweight.device));
  } else {
    TIDAL_CHECK(zeros.data == nullptr, "format ", format_name(format), " has no zero points; pass zeros=None");
  }
  return k;
}

}  // namespace detail

bool quant_linear(TensorView out, TensorView x, TensorView qweight, TensorView scales, TensorView zeros,
                  TensorView bias, WeightFormat format, Stream stream) {
  const int64_t k = detail::check_quant_weight(qweight, scales, zeros, format);
  detail::check_rows(x, "x");
  detail::check_rows(out, "out");
  TIDAL_CHECK(x.dtype == DType::kFloat32 || x.dtype == DType::kFloat16 || x.dtype == DType::kBFloat16, "x.dtype=",
              dtype_name(x.dtype), " is not supported; expected float32, float16 or bfloat16");
  const int64_t m = x.size(0), n = qweight.size(0);
  TIDAL_CHECK(x.size(1) == k, "x.shape=", x.shape_str(), " must be [m, k] with k=", k, " for qweight.shape=",
              qweight.shape_str());
  TIDAL_CHECK(out.size(0) == m && out.size(1) == n, "out.shape=", out.shape_str(), " must be [m, n] = [", m, ", ",
              n, "]");
  TIDAL_CHECK(out.dtype == x.dtype, "out.dtype=", dtype_name(out.dtype), " must equal x.dtype=", dtype_name(x.dtype));
  for (const auto& [t, name] : {std::pair{&out, "out"}, std::pair{&qweight, "qweight"}}) {
    TIDAL_CHECK(t->device == x.device, name, " is on ", device_name(t->device), " but x is on ",
                device_name(x.device));
  }
  if (bias.data != nullptr) {
    TIDAL_CHECK(bias.ndim == 1 && bias.size(0) == n && (n == 1 || bias.stride(0) == 1), "bias.shape=",
                bias.shape_str(), " must be a contiguous [n] = [", n, "]");
    TIDAL_CHECK(bias.dtype == x.dtype, "bias.dtype=", dtype_name(bias.dtype), " must equal x.dtype=",
                dtype_name(x.dtype));
    TIDAL_CHECK(bias.device == x.device, "bias is on ", device_name(bias.device), " but x is on ",
                device_name(x.device));
  }
  TIDAL_CHECK(!detail::overlaps(out, x), "out overlaps x in memory; pass a distinct out");
  if (m == 0) return true;
  bool done = true;
  detail::dispatch(
      "quant_linear", x.device, [&] { cpu::quant_linear(out, x, qweight, scales, zeros, bias, static_cast<int>(format), stream); },
      [&] {
        done = gpu::quant_linear_supported(x, qweight, scales, static_cast<int>(format));
        if (done) gpu::quant_linear(out, x, qweight, scales, zeros, bias, static_cast<int>(format), stream);
      });
  return done;
}

void dequantize_weight(TensorView out, TensorView qweight, TensorView scales, TensorView zeros, WeightFormat format,
                       Stream stream) {
  const int64_t k = detail::check_quant_weight(qweight, scales, zeros, format);
  TIDAL_CHECK(out.dtype == DType::kFloat32 || out.dtype == DType::kFloat16 || out.dtype == DType::kBFloat16,
              "out.dtype=", dtype_name(out.dtype), " is not supported; expected float32, float16 or bfloat16");
  TIDAL_CHECK(out.ndim == 2 && out.is_contiguous() && out.size(0) == qweight.size(0) && out.size(1) == k,
              "out must be a contiguous [n, k] = [", qweight.size(0), ", ", k, "] tensor, got shape ", out.shape_str());
  TIDAL_CHECK(out.device == qweight.device, "out is on ", device_name(out.device), " but qweight is on ",
              device_name(qweight.device));
  detail::dispatch(
      "dequantize_weight", out.device,
      [&] { cpu::dequantize_weight(out, qweight, scales, zeros, static_cast<int>(format), stream); },
      [&] { gpu::dequantize_weight(out, qweight, scales, zeros, static_cast<int>(format), stream); });
}

namespace {

// The outputs of a per-row FP8 quantization of x [m, k]: codes a contiguous uint8 [m, k], scales a
// contiguous float32 [m], both on x's device.
// codes [m, k] and scales [m] for the rows of x ([m, k], or [m, 2k] for silu_and_mul's input).
void check_fp8_outputs(const TensorView& codes, const TensorView& scales, const TensorView& x, int64_t k) {
  TIDAL_CHECK(codes.dtype == DType::kUInt8 && codes.ndim == 2 && codes.is_contiguous() && codes.size(0) == x.size(0) &&
                  codes.size(1) == k,
              "codes must be a contiguous uint8 [m, k] = [", x.size(0), ", ", k, "] tensor, got dtype ",
              dtype_name(codes.dtype), " and shape ", codes.shape_str());
  TIDAL_CHECK(scales.dtype == DType::kFloat32 && scales.numel() == x.size(0) && scales.is_contiguous(),
              "scales must be a contiguous float32 tensor of m=", x.size(0), " values, got dtype ",
              dtype_name(scales.dtype), " and shape ", scales.shape_str());
  for (const auto& [t, name] : {std::pair{&codes, "codes"}, std::pair{&scales, "scales"}}) {
    TIDAL_CHECK(t->device == x.device, name, " is on ", device_name(t->device), " but x is on ", device_name(x.device));
  }
}

}  // namespace

void quantize_fp8_per_token(TensorView codes, TensorView scales, TensorView x, TensorView static_scale, Stream stream) {
  detail::check_rows(x, "x");
  TIDAL_CHECK(x.dtype == DType::kFloat32 || x.dtype == DType::kFloat16 || x.dtype == DType::kBFloat16, "x.dtype=",
              dtype_name(x.dtype), " is not supported; expected float32, float16 or bfloat16");
  TIDAL_CHECK(static_scale.data == nullptr || (static_scale.dtype == DType::kFloat32 && static_scale.numel() == 1),
              "static_scale must be one float32 value, got dtype ", dtype_name(static_scale.dtype), " and shape ",
              static_scale.shape_str());
  check_fp8_outputs(codes, scales, x, x.size(1));
  TIDAL_CHECK(static_scale.data == nullptr || static_scale.device == x.device, "static_scale is on ",
              device_name(static_scale.device), " but x is on ", device_name(x.device));
  if (x.size(0) == 0) return;
  detail::dispatch(
      "quantize_fp8_per_token", x.device, [&] { cpu::quantize_fp8_per_token(codes, scales, x, static_scale, stream); },
      [&] { gpu::quantize_fp8_per_token(codes, scales, x, static_scale, stream); });
}

void fused_add_rms_norm_quant_fp8(TensorView codes, TensorView scales, TensorView residual_out, TensorView x,
                                  TensorView residual, TensorView weight, float eps, Stream stream) {
  detail::check_rows(x, "x");
  detail::check_rows(residual, "residual");
  detail::check_rows(residual_out, "residual_out");
  detail::check_like(residual, "residual", x, "x");
  detail::check_like(residual_out, "residual_out", x, "x");
  detail::check_norm_weight(weight, x);
  detail::check_eps(eps);
  TIDAL_CHECK(!detail::overlaps(x, residual_out), "x and residual_out overlap in memory; pass distinct tensors");
  check_fp8_outputs(codes, scales, x, x.size(1));
  if (x.size(0) == 0) return;
  detail::dispatch(
      "fused_add_rms_norm_quant_fp8", x.device,
      [&] { cpu::fused_add_rms_norm_quant_fp8(codes, scales, residual_out, x, residual, weight, eps, stream); },
      [&] { gpu::fused_add_rms_norm_quant_fp8(codes, scales, residual_out, x, residual, weight, eps, stream); });
}

void silu_and_mul_quant_fp8(TensorView codes, TensorView scales, TensorView x, Stream stream) {
  detail::check_rows(x, "x");
  TIDAL_CHECK(x.dtype == DType::kFloat32 || x.dtype == DType::kFloat16 || x.dtype == DType::kBFloat16, "x.dtype=",
              dtype_name(x.dtype), " is not supported; expected float32, float16 or bfloat16");
  TIDAL_CHECK(x.size(1) % 2 == 0, "x.shape[1]=", x.size(1), " must be even: x is [m, 2 * d]");
  check_fp8_outputs(codes, scales, x, x.size(1) / 2);
  if (x.size(0) == 0 || x.size(1) == 0) return;
  detail::dispatch(
      "silu_and_mul_quant_fp8", x.device, [&] { cpu::silu_and_mul_quant_fp8(codes, scales, x, stream); },
      [&] { gpu::silu_and_mul_quant_fp8(codes, scales, x, stream); });
}

}  // namespace tidal::ops
