// SPDX-License-Identifier: Apache-2.0
// Bindings of tidal::ops: every tensor arrives as a DLPack capsule, the stream as an integer handle
// (torch's current stream; 0 for CPU tensors). Outputs are allocated by the Python caller.
#include <cstdint>

#include <pybind11/pybind11.h>

#include "tensor.h"
#include "tidal/ops.h"

namespace py = pybind11;

namespace tidal::bindings {

void bind_ops(py::module_& m) {
  m.def(
      "rms_norm",
      [](py::handle out, py::handle x, py::handle weight, float eps, std::uintptr_t stream) {
        ops::rms_norm(view_capsule(out, "out"), view_capsule(x, "x"), view_capsule(weight, "weight"), eps,
                      Stream::from_int(stream));
      },
      py::arg("out"), py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("stream") = 0,
      "out = x * rsqrt(mean(x^2, -1) + eps) * weight, for [num_tokens, hidden_size] DLPack capsules.");
  m.def(
      "fused_add_rms_norm",
      [](py::handle out, py::handle residual_out, py::handle x, py::handle residual, py::handle weight, float eps,
         std::uintptr_t stream) {
        ops::fused_add_rms_norm(view_capsule(out, "out"), view_capsule(residual_out, "residual_out"),
                                view_capsule(x, "x"), view_capsule(residual, "residual"),
                                view_capsule(weight, "weight"), eps, Stream::from_int(stream));
      },
      py::arg("out"), py::arg("residual_out"), py::arg("x"), py::arg("residual"), py::arg("weight"),
      py::arg("eps"), py::arg("stream") = 0,
      "residual_out = x + residual; out = rms_norm(residual_out, weight, eps), for DLPack capsules.");
}

}  // namespace tidal::bindings
