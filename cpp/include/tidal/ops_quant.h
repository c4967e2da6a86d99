// SPDX-License-Identifier: Apache-2.0
// The ops of quantized serving: a linear layer whose weight is stored as int8, packed int4 or FP8
// E4M3 codes with fp32 scales (and int4 zero points) per output row and group of inputs, computed
// with the codes widened in registers; and the dequantization of such a weight back to floats (the
// large-batch path feeds that to a dense matmul). Same conventions as tidal/ops.h.
#pragma once

#include <cstdint>

#include "tidal/stream.h"
#include "tidal/tensor_view.h"

namespace tidal::ops {

/// How a quantized weight stores its codes. Every format reads
///   w[j, i] = (code(j, i) - zero(j, i / g)) * scale(j, i / g),   g = k / num_groups
/// with zero 0 unless the format has zero points.
/// kInt8:    qweight [n, k] int8, code = the signed byte.
/// kInt4:    qweight [n, k / 2] uint8, code of input 2c in the low nibble of byte c, 2c + 1 in the
///           high nibble (0..15); zeros [n, num_groups] uint8 (0..15) required.
/// kFp8E4M3: qweight [n, k] uint8 holding FP8 E4M3 (fn: no infinities, 0x7f/0xff NaN) bit patterns.
enum class WeightFormat : int { kInt8 = 0, kInt4 = 1, kFp8E4M3 = 2 };

/// out = x w^T (+ bias) with w as WeightFormat says, accumulated in fp32 and rounded once.
/// x:       [m, k] float32, float16 or bfloat16, last dim contiguous, any row stride;
/// qweight: [n, k] or [n, k / 2] (kInt4), contiguous; scales: [n, num_groups] float32, contiguous,
///          num_groups dividing k (1: one scale per output row); zeros: [n, num_groups] uint8
///          (kInt4), else empty; bias: [n] in x's dtype or empty; out: [m, n] in x's dtype, last
///          dim contiguous, not overlapping x. All on one device.
/// On the GPU, returns false (writing nothing) when no kernel takes these shapes: the tensor-core
/// kernel takes int4 and int8 with bf16 or fp16 x, up to 32 rows, groups of a multiple of 128 (int4)
/// or 64 (int8) inputs; the SIMT kernel up to 8 rows whose codes are whole 16-byte chunks (k a
/// multiple of 16 codes, 32 for kInt4, each group whole chunks, 16-byte aligned rows). The CPU kernel
/// takes every shape.
bool quant_linear(TensorView out, TensorView x, TensorView qweight, TensorView scales, TensorView zeros,
                  TensorView bias, WeightFormat format, Stream stream);

/// out = w (the dequantized weight, rounded once to out's dtype), with the arguments of quant_linear;
/// out: [n, k] float32, float16 or bfloat16, contiguous.
void dequantize_weight(TensorView out, TensorView qweight, TensorView scales, TensorView zeros, WeightFormat format,
                       Stream stream);

/// Activations to FP8 E4M3 per row (W8A8's dynamic per-token scaling):
///   scale[t] = max(max_i |x[t, i]| / 448, 1e-12)   (or static_scale for every row when given)
///   codes[t, i] = e4m3(clamp(x[t, i] / scale[t], -448, 448))   rounded to nearest even
/// x: [m, k] float32, float16 or bfloat16, last dim contiguous; codes: [m, k] uint8 (E4M3 bits),
/// contiguous; scales: [m] float32 (written); static_scale: [1] float32 or empty. One device.
void quantize_fp8_per_token(TensorView codes, TensorView scales, TensorView x, TensorView static_scale, Stream stream);

/// fused_add_rms_norm (residual_out = round(x + residual), then the row's RMSNorm times weight,
/// rounded to x's dtype) with that normalised row quantized as quantize_fp8_per_token would (dynamic
/// per-row scales): the same codes and scales, bit for bit, in one pass on the GPU where the row
/// fits a block's registers. x, residual, residual_out: [m, k] of one float dtype, last dim
/// contiguous (residual_out may be residual); weight: [k]; codes: [m, k] uint8, contiguous; scales:
/// [m] float32. x is scratch: its contents afterwards are unspecified.
void fused_add_rms_norm_quant_fp8(TensorView codes, TensorView scales, TensorView residual_out, TensorView x,
                                  TensorView residual, TensorView weight, float eps, Stream stream);

/// silu_and_mul (out[t, i] = silu(x[t, i]) * x[t, d + i], rounded to x's dtype) with that row
/// quantized as quantize_fp8_per_token would (dynamic per-row scales): the same codes and scales,
/// bit for bit, in one pass on the GPU where the row fits a block's registers (the input of a W8A8
/// down projection). x: [m, 2d] float32, float16 or bfloat16, last dim contiguous; codes: [m, d]
/// uint8, contiguous; scales: [m] float32. x is scratch: its contents afterwards are unspecified.
void silu_and_mul_quant_fp8(TensorView codes, TensorView scales, TensorView x, Stream stream);

}  // namespace tidal::ops
