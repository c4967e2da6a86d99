// SPDX-License-Identifier: Apache-2.0
// Bindings of the training ops (tidal/ops_train.h) on tidal._core.ops: DLPack capsules in, updated
// in place. The Adam step runs without the GIL (a shard of millions of elements takes milliseconds).
#include <cstdint>

#include <pybind11/pybind11.h>

#include "tensor.h"
#include "tidal/ops_train.h"

namespace py = pybind11;

namespace tidal::bindings {

void bind_ops_train(py::module_& m) {
  m.def(
      "adam_step",
      [](py::handle param, py::handle grad, py::handle exp_avg, py::handle exp_avg_sq, int64_t step, double lr,
         double beta1, double beta2, double eps, double weight_decay, bool decoupled, double grad_scale,
         std::uintptr_t stream) {
        const TensorView p = view_capsule(param, "param"), g = view_capsule(grad, "grad");
        const TensorView m1 = view_capsule(exp_avg, "exp_avg"), m2 = view_capsule(exp_avg_sq, "exp_avg_sq");
        const ops::AdamOptions options{step, lr, beta1, beta2, eps, weight_decay, decoupled, grad_scale};
        py::gil_scoped_release release;
        ops::adam_step(p, g, m1, m2, options, Stream::from_int(stream));
      },
      py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("step"), py::arg("lr"),
      py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"),
      py::arg("grad_scale") = 1.0, py::arg("stream") = 0,
      "One Adam (decoupled=False) / AdamW (decoupled=True) step in place on flat fp32 DLPack capsules "
      "(param, exp_avg, exp_avg_sq written; grad read and multiplied by 1/grad_scale first).");
}

}  // namespace tidal::bindings
