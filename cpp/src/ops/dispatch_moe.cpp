// SPDX-License-Identifier: Apache-2.0
// fused_moe of tidal/ops_serving.h: validate shapes, dtypes and devices, then run the CPU or GPU kernel.
#include <string>

#include "ops/checks.h"
#include "ops/device_dispatch.h"
#include "ops/kernels.h"
#include "tidal/ops_serving.h"

namespace tidal::ops {

void fused_moe(TensorView out, TensorView x, TensorView router_logits, TensorView w13, TensorView w2, int64_t top_k,
               bool renormalize, bool fp32_weights, TensorView workspace, Stream stream) {
  detail::check_rows(x, "x");
  detail::check_rows(out, "out");
  detail::check_like(out, "out", x, "x");
  TIDAL_CHECK(x.dtype == DType::kFloat32 || x.dtype == DType::kFloat16 || x.dtype == DType::kBFloat16, "x.dtype=",
              dtype_name(x.dtype), " is not supported; expected float32, float16 or bfloat16");
  TIDAL_CHECK(w13.ndim == 3 && w13.is_contiguous(), "w13 must be a contiguous [num_experts, 2 * inter, hidden] "
              "tensor, got shape ", w13.shape_str());
  const int64_t num_experts = w13.size(0), hidden = x.size(1);
  TIDAL_CHECK(num_experts >= 1 && w13.size(1) % 2 == 0 && w13.size(2) == hidden, "w13.shape=", w13.shape_str(),
              " must be [num_experts, 2 * inter, hidden=", hidden, "]");
  const int64_t inter = w13.size(1) / 2;
  TIDAL_CHECK(w2.ndim == 3 && w2.is_contiguous() && w2.size(0) == num_experts && w2.size(1) == hidden &&
                  w2.size(2) == inter,
              "w2.shape=", w2.shape_str(), " must be contiguous [num_experts, hidden, inter] = [", num_experts, ", ",
              hidden, ", ", inter, "]");
  TIDAL_CHECK(router_logits.ndim == 2 && router_logits.size(0) == x.size(0) && router_logits.size(1) == num_experts,
              "router_logits.shape=", router_logits.shape_str(), " must be [num_tokens, num_experts] = [", x.size(0),
              ", ", num_experts, "]");
  TIDAL_CHECK(router_logits.size(1) <= 1 || router_logits.stride(1) == 1, "router_logits.stride(-1)=",
              router_logits.stride(1), " must be 1");
  TIDAL_CHECK(router_logits.dtype == x.dtype || router_logits.dtype == DType::kFloat32, "router_logits.dtype=",
              dtype_name(router_logits.dtype), " must be x.dtype=", dtype_name(x.dtype), " or float32");
  for (const auto& [t, name] : {std::pair{&w13, "w13"}, std::pair{&w2, "w2"}}) {
    TIDAL_CHECK(t->dtype == x.dtype, name, ".dtype=", dtype_name(t->dtype), " must equal x.dtype=", dtype_name(x.dtype));
    TIDAL_CHECK(t->device == x.device, name, " is on ", device_name(t->device), " but x is on ", device_name(x.device));
  }
  TIDAL_CHECK(router_logits.device == x.device, "router_logits is on ", device_name(router_logits.device),
              " but x is on ", device_name(x.device));
  TIDAL_CHECK(top_k >= 1 && top_k <= num_experts, "top_k=", top_k, " must be in [1, num_experts=", num_experts, "]");
  TIDAL_CHECK(!detail::overlaps(out, x), "out overlaps x in memory; pass a distinct out");
  TIDAL_CHECK(workspace.data == nullptr || workspace.device == x.device, "workspace is on ",
              device_name(workspace.device), " but x is on ", device_name(x.device));
  if (x.size(0) == 0) return;
  detail::dispatch(
      "fused_moe", x.device,
      [&] { cpu::fused_moe(out, x, router_logits, w13, w2, top_k, renormalize, fp32_weights, stream); },
      [&] { gpu::fused_moe(out, x, router_logits, w13, w2, top_k, renormalize, fp32_weights, workspace, stream); });
}

int64_t fused_moe_workspace_size(Device device, [[maybe_unused]] DType dtype, int64_t num_tokens, int64_t hidden,
                                 int64_t inter, int64_t num_experts, int64_t top_k) {
  TIDAL_CHECK(num_tokens >= 0 && hidden >= 1 && inter >= 1 && num_experts >= 1 && top_k >= 1 && top_k <= num_experts,
              "fused_moe_workspace_size: num_tokens=", num_tokens, ", hidden=", hidden, ", inter=", inter,
              ", num_experts=", num_experts, ", top_k=", top_k, " must be non-negative, positive, positive, positive "
              "and in [1, num_experts]");
  if (device.type != DeviceType::kCUDA) return 0;
#if TIDAL_WITH_CUDA
  return gpu::fused_moe_workspace_size(dtype, num_tokens, hidden, inter, num_experts, top_k, device.index);
#else
  return 0;
#endif
}

}  // namespace tidal::ops
