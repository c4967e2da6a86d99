// SPDX-License-Identifier: Apache-2.0
// Bindings of the serving ops (tidal/ops_serving.h) on the _core.ops submodule: every tensor is a
// DLPack capsule, the stream an integer handle (0 for CPU tensors); outputs are allocated by the
// Python caller.
#include <cstdint>
#include <string>

#include <pybind11/pybind11.h>

#include "tensor.h"
#include "tidal/ops_quant.h"
#include "tidal/ops_serving.h"

namespace py = pybind11;

namespace tidal::bindings {

void bind_ops_serving(py::module_& m) {
  m.def(
      "quant_linear",
      [](py::handle out, py::handle x, py::handle qweight, py::handle scales, py::handle zeros, py::handle bias,
         int format, std::uintptr_t stream) {
        return ops::quant_linear(view_capsule(out, "out"), view_capsule(x, "x"), view_capsule(qweight, "qweight"),
                                 view_capsule(scales, "scales"), view_optional_capsule(zeros, "zeros"),
                                 view_optional_capsule(bias, "bias"), static_cast<ops::WeightFormat>(format),
                                 Stream::from_int(stream));
      },
      py::arg("out"), py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"),
      py::arg("format"), py::arg("stream") = 0,
      "out = x @ w.T (+ bias) with w the dequantized weight (DLPack capsules, None for absent zeros or bias); "
      "False, writing nothing, when the GPU kernel does not take these shapes.");
  m.def(
      "dequantize_weight",
      [](py::handle out, py::handle qweight, py::handle scales, py::handle zeros, int format, std::uintptr_t stream) {
        ops::dequantize_weight(view_capsule(out, "out"), view_capsule(qweight, "qweight"),
                               view_capsule(scales, "scales"), view_optional_capsule(zeros, "zeros"),
                               static_cast<ops::WeightFormat>(format), Stream::from_int(stream));
      },
      py::arg("out"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("format"),
      py::arg("stream") = 0, "out = (code - zero) * scale, the quantized weight widened to out's dtype.");
  m.def(
      "quantize_fp8_per_token",
      [](py::handle codes, py::handle scales, py::handle x, py::handle static_scale, std::uintptr_t stream) {
        ops::quantize_fp8_per_token(view_capsule(codes, "codes"), view_capsule(scales, "scales"), view_capsule(x, "x"),
                                    view_optional_capsule(static_scale, "static_scale"), Stream::from_int(stream));
      },
      py::arg("codes"), py::arg("scales"), py::arg("x"), py::arg("static_scale"), py::arg("stream") = 0,
      "x [m, k] as FP8 E4M3 codes (uint8 bits) and per-row fp32 scales: max |x[t]| / 448, or static_scale.");
  m.def(
      "fused_add_rms_norm_quant_fp8",
      [](py::handle codes, py::handle scales, py::handle residual_out, py::handle x, py::handle residual,
         py::handle weight, float eps, std::uintptr_t stream) {
        ops::fused_add_rms_norm_quant_fp8(view_capsule(codes, "codes"), view_capsule(scales, "scales"),
                                          view_capsule(residual_out, "residual_out"), view_capsule(x, "x"),
                                          view_capsule(residual, "residual"), view_capsule(weight, "weight"), eps,
                                          Stream::from_int(stream));
      },
      py::arg("codes"), py::arg("scales"), py::arg("residual_out"), py::arg("x"), py::arg("residual"),
      py::arg("weight"), py::arg("eps"), py::arg("stream") = 0,
      "residual_out = x + residual; its RMSNorm times weight as FP8 E4M3 codes with per-row scales (x is scratch).");
  m.def(
      "silu_and_mul_quant_fp8",
      [](py::handle codes, py::handle scales, py::handle x, std::uintptr_t stream) {
        ops::silu_and_mul_quant_fp8(view_capsule(codes, "codes"), view_capsule(scales, "scales"), view_capsule(x, "x"),
                                    Stream::from_int(stream));
      },
      py::arg("codes"), py::arg("scales"), py::arg("x"), py::arg("stream") = 0,
      "silu_and_mul(x) as FP8 E4M3 codes with per-row scales (x is scratch).");
  m.def(
      "silu_and_mul",
      [](py::handle out, py::handle x, std::uintptr_t stream) {
        ops::silu_and_mul(view_capsule(out, "out"), view_capsule(x, "x"), Stream::from_int(stream));
      },
      py::arg("out"), py::arg("x"), py::arg("stream") = 0,
      "out = silu(x[:, :d]) * x[:, d:] for DLPack capsules out [num_tokens, d], x [num_tokens, 2 * d].");
  m.def(
      "skinny_linear",
      [](py::handle out, py::handle residual, py::handle x, py::handle weight, py::handle bias,
         py::handle norm_weight, int prologue, float eps, std::uintptr_t stream, py::handle prefetch,
         int weight_format, py::handle scales, py::handle zeros) {
        TIDAL_CHECK(prologue >= 0 && prologue <= 2, "prologue=", prologue,
                    " must be 0 (identity), 1 (rms_norm) or 2 (silu_and_mul)");
        TIDAL_CHECK(weight_format >= -1 && weight_format <= 2, "weight_format=", weight_format,
                    " must be -1 (a dense weight), 0 (int8), 1 (int4) or 2 (fp8_e4m3)");
        ops::QuantizedWeight quant{static_cast<ops::WeightFormat>(weight_format < 0 ? 0 : weight_format),
                                   view_optional_capsule(scales, "scales"), view_optional_capsule(zeros, "zeros")};
        return ops::skinny_linear(view_optional_capsule(out, "out"), view_optional_capsule(residual, "residual"),
                                  view_capsule(x, "x"), view_capsule(weight, "weight"),
                                  view_optional_capsule(bias, "bias"), view_optional_capsule(norm_weight, "norm_weight"),
                                  static_cast<ops::SkinnyPrologue>(prologue), eps,
                                  view_optional_capsule(prefetch, "prefetch"), Stream::from_int(stream),
                                  weight_format < 0 ? nullptr : &quant);
      },
      py::arg("out"), py::arg("residual"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("norm_weight"),
      py::arg("prologue"), py::arg("eps"), py::arg("stream") = 0, py::arg("prefetch") = py::none(),
      py::arg("weight_format") = -1, py::arg("scales") = py::none(), py::arg("zeros") = py::none(),
      "out = f(x) @ weight.T (+ bias), or residual += it, for a few rows on the GPU (DLPack capsules, None for "
      "absent ones); False when the fused kernel does not take these shapes. prefetch: the next kernel's weight, "
      "whose first bytes L2 is asked to fetch early. weight_format >= 0: weight holds a quantized weight's codes "
      "(quant_linear's format codes and layouts) with its scales and zeros.");
  m.def(
      "rotary_embedding",
      [](py::handle positions, py::handle query, py::handle key, int64_t head_dim, py::handle cos_sin_cache,
         bool is_neox, std::uintptr_t stream) {
        ops::rotary_embedding(view_capsule(positions, "positions"), view_capsule(query, "query"),
                              view_capsule(key, "key"), head_dim, view_capsule(cos_sin_cache, "cos_sin_cache"),
                              is_neox, Stream::from_int(stream));
      },
      py::arg("positions"), py::arg("query"), py::arg("key"), py::arg("head_dim"), py::arg("cos_sin_cache"),
      py::arg("is_neox"), py::arg("stream") = 0,
      "Rotates query and key (DLPack capsules) in place by the cos/sin rows of positions.");
  m.def(
      "rotary_embedding_and_cache",
      [](py::handle positions, py::handle query, py::handle key, py::handle value, py::handle key_cache,
         py::handle value_cache, py::handle slot_mapping, py::handle cos_sin_cache, bool is_neox,
         py::handle q_norm_weight, py::handle k_norm_weight, float eps, std::uintptr_t stream) {
        ops::rotary_embedding_and_cache(
            view_capsule(positions, "positions"), view_capsule(query, "query"), view_capsule(key, "key"),
            view_capsule(value, "value"), view_capsule(key_cache, "key_cache"), view_capsule(value_cache, "value_cache"),
            view_capsule(slot_mapping, "slot_mapping"), view_capsule(cos_sin_cache, "cos_sin_cache"), is_neox,
            view_optional_capsule(q_norm_weight, "q_norm_weight"), view_optional_capsule(k_norm_weight, "k_norm_weight"),
            eps, Stream::from_int(stream));
      },
      py::arg("positions"), py::arg("query"), py::arg("key"), py::arg("value"), py::arg("key_cache"),
      py::arg("value_cache"), py::arg("slot_mapping"), py::arg("cos_sin_cache"), py::arg("is_neox"),
      py::arg("q_norm_weight"), py::arg("k_norm_weight"), py::arg("eps"), py::arg("stream") = 0,
      "Optional per-head q/k RMSNorm, rotary on query (in place) and key, key and value into the cache.");
  m.def(
      "fused_moe",
      [](py::handle out, py::handle x, py::handle router_logits, py::handle w13, py::handle w2, int64_t top_k,
         bool renormalize, bool fp32_weights, py::handle workspace, std::uintptr_t stream) {
        const TensorView out_v = view_capsule(out, "out"), x_v = view_capsule(x, "x");
        const TensorView logits_v = view_capsule(router_logits, "router_logits");
        const TensorView w13_v = view_capsule(w13, "w13"), w2_v = view_capsule(w2, "w2");
        const TensorView workspace_v = view_optional_capsule(workspace, "workspace");
        py::gil_scoped_release release;  // milliseconds on the CPU
        ops::fused_moe(out_v, x_v, logits_v, w13_v, w2_v, top_k, renormalize, fp32_weights, workspace_v,
                       Stream::from_int(stream));
      },
      py::arg("out"), py::arg("x"), py::arg("router_logits"), py::arg("w13"), py::arg("w2"), py::arg("top_k"),
      py::arg("renormalize"), py::arg("fp32_weights"), py::arg("workspace") = py::none(), py::arg("stream") = 0,
      "Mixture-of-experts MLP with softmax/top-k routing into out (DLPack capsules).");
  m.def(
      "fused_moe_workspace_size",
      [](int device_type, int device_index, const std::string& dtype, int64_t num_tokens, int64_t hidden,
         int64_t inter, int64_t num_experts, int64_t top_k) {
        Device device{device_type == 0 ? DeviceType::kCPU : DeviceType::kCUDA, device_index};
        DType dt = dtype == "float16" ? DType::kFloat16 : dtype == "bfloat16" ? DType::kBFloat16 : DType::kFloat32;
        return ops::fused_moe_workspace_size(device, dt, num_tokens, hidden, inter, num_experts, top_k);
      },
      py::arg("device_type"), py::arg("device_index"), py::arg("dtype"), py::arg("num_tokens"), py::arg("hidden"),
      py::arg("inter"), py::arg("num_experts"), py::arg("top_k"),
      "Bytes of workspace fused_moe needs (device_type 0: CPU, 1: CUDA; dtype 'float32', 'float16', 'bfloat16').");
  m.def(
      "seeded_exponential",
      [](py::handle out, py::handle seeds, py::handle offsets, std::uintptr_t stream) {
        ops::seeded_exponential(view_capsule(out, "out"), view_capsule(seeds, "seeds"),
                                view_capsule(offsets, "offsets"), Stream::from_int(stream));
      },
      py::arg("out"), py::arg("seeds"), py::arg("offsets"), py::arg("stream") = 0,
      "Fills out [num_rows, vocab] float32 with Exp(1) noise that depends on (seed, offset, index) alone.");
  m.def(
      "paged_attention_workspace_size",
      [](int device_type, int device_index, const std::string& dtype, int64_t num_tokens, int64_t num_seqs,
         int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t max_seqlen_q, int64_t max_seqlen_k) {
        Device device{device_type == 0 ? DeviceType::kCPU : DeviceType::kCUDA, device_index};
        DType dt = dtype == "float16" ? DType::kFloat16 : dtype == "bfloat16" ? DType::kBFloat16 : DType::kFloat32;
        return ops::paged_attention_workspace_size(device, dt, num_tokens, num_seqs, num_heads, num_kv_heads, head_dim,
                                                   max_seqlen_q, max_seqlen_k);
      },
      py::arg("device_type"), py::arg("device_index"), py::arg("dtype"), py::arg("num_tokens"), py::arg("num_seqs"),
      py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("max_seqlen_q"),
      py::arg("max_seqlen_k"),
      "Bytes of workspace paged_attention needs (device_type 0: CPU, 1: CUDA; dtype 'float32', 'float16', "
      "'bfloat16').");
  m.def(
      "reshape_and_cache",
      [](py::handle key, py::handle value, py::handle key_cache, py::handle value_cache, py::handle slot_mapping,
         std::uintptr_t stream) {
        ops::reshape_and_cache(view_capsule(key, "key"), view_capsule(value, "value"),
                               view_capsule(key_cache, "key_cache"), view_capsule(value_cache, "value_cache"),
                               view_capsule(slot_mapping, "slot_mapping"), Stream::from_int(stream));
      },
      py::arg("key"), py::arg("value"), py::arg("key_cache"), py::arg("value_cache"), py::arg("slot_mapping"),
      py::arg("stream") = 0, "Writes key and value rows into the paged caches at slot_mapping (DLPack capsules).");
  m.def(
      "paged_attention",
      [](py::handle out, py::handle query, py::handle key_cache, py::handle value_cache, py::handle block_tables,
         py::handle seq_lens, py::handle cu_seqlens_q, float scale, int64_t sliding_window, int64_t max_seqlen_q,
         int64_t max_seqlen_k, py::handle workspace, py::handle split_counters, py::handle seq_order,
         std::uintptr_t stream) {
        const TensorView out_v = view_capsule(out, "out"), query_v = view_capsule(query, "query");
        const TensorView key_cache_v = view_capsule(key_cache, "key_cache");
        const TensorView value_cache_v = view_capsule(value_cache, "value_cache");
        const TensorView block_tables_v = view_capsule(block_tables, "block_tables");
        const TensorView seq_lens_v = view_capsule(seq_lens, "seq_lens");
        const TensorView cu_seqlens_q_v = view_capsule(cu_seqlens_q, "cu_seqlens_q");
        const TensorView workspace_v = view_optional_capsule(workspace, "workspace");
        const TensorView counters_v = view_optional_capsule(split_counters, "split_counters");
        const TensorView order_v = view_optional_capsule(seq_order, "seq_order");
        // NOTE(tidal): a decode step over long contexts runs for milliseconds on the CPU; other
        // Python threads (the server's) keep running meanwhile.
        py::gil_scoped_release release;
        ops::paged_attention(out_v, query_v, key_cache_v, value_cache_v, block_tables_v, seq_lens_v, cu_seqlens_q_v,
                             scale, sliding_window, max_seqlen_q, max_seqlen_k, workspace_v, Stream::from_int(stream),
                             counters_v, order_v);
      },
      py::arg("out"), py::arg("query"), py::arg("key_cache"), py::arg("value_cache"), py::arg("block_tables"),
      py::arg("seq_lens"), py::arg("cu_seqlens_q"), py::arg("scale"), py::arg("sliding_window"),
      py::arg("max_seqlen_q") = -1, py::arg("max_seqlen_k") = -1, py::arg("workspace") = py::none(),
      py::arg("split_counters") = py::none(), py::arg("seq_order") = py::none(), py::arg("stream") = 0,
      "Causal paged attention of query over the KV cache into out (DLPack capsules).");
}

}  // namespace tidal::bindings
