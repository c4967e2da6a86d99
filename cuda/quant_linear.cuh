// SPDX-License-Identifier: Apache-2.0
// What the quantized linear layer's two GPU kernels share: the format codes, the launch parameters
// taken from the op's tensors, and the tensor-core kernel's entry points (quant_linear_tc.cu), which
// quant_linear.cu calls when the shapes suit it.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"
#include "ops/kernels.h"

namespace tidal::gpu {
namespace quant {

constexpr int kInt8 = 0, kInt4 = 1, kFp8 = 2;  // the op's `format` (tidal.ops.quant.WEIGHT_FORMATS)

struct Params {
  const void* x;
  const uint8_t* qweight;
  const float* scales;
  const uint8_t* zeros;
  const void* bias;
  void* out;
  int64_t x_stride, out_stride;
  int m, n, k, num_groups;
};

inline Params make_params(const TensorView& out, const TensorView& x, const TensorView& qweight,
                          const TensorView& scales, const TensorView& zeros, const TensorView& bias) {
  Params p{};
  p.x = x.data;
  p.qweight = static_cast<const uint8_t*>(qweight.data);
  p.scales = static_cast<const float*>(scales.data);
  p.zeros = static_cast<const uint8_t*>(zeros.data);
  p.bias = bias.data;
  p.out = out.data;
  p.x_stride = x.stride(0);
  p.out_stride = out.stride(0);
  p.m = static_cast<int>(x.size(0));
  p.n = static_cast<int>(qweight.size(0));
  p.k = static_cast<int>(x.size(1));
  p.num_groups = static_cast<int>(scales.size(1));
  return p;
}

// Codes per 16-byte chunk: shared by quant_linear.cu and the streamed skinny_linear.
template <int kFormat>
constexpr int codes_per_chunk() { return kFormat == kInt4 ? 32 : 16; }

}  // namespace quant

// The tensor-core kernel (quant_linear_tc.cu): bf16/fp16 activations, int4 and int8, up to 32 rows;
// never supported under HIP.
bool quant_linear_tc_supported(TensorView x, TensorView qweight, TensorView scales, int format);
void quant_linear_tc(TensorView out, TensorView x, TensorView qweight, TensorView scales, TensorView zeros,
                     TensorView bias, int format, Stream stream);

}  // namespace tidal::gpu
