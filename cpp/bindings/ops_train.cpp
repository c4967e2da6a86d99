// SPDX-License-Identifier: Apache-2.0
// Bindings of the training ops (tidal/ops_train.h) on tidal._core.ops: DLPack capsules in, updated
// in place. The Adam step runs without the GIL (a shard of millions of elements takes milliseconds),
// and so do the backward kernels (a CPU kernel may take as long).
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
         std::uintptr_t stream, py::object param_copy) {
        const TensorView p = view_capsule(param, "param"), g = view_capsule(grad, "grad");
        const TensorView m1 = view_capsule(exp_avg, "exp_avg"), m2 = view_capsule(exp_avg_sq, "exp_avg_sq");
        const TensorView copy = param_copy.is_none() ? TensorView{} : view_capsule(param_copy, "param_copy");
        const ops::AdamOptions options{step, lr, beta1, beta2, eps, weight_decay, decoupled, grad_scale};
        py::gil_scoped_release release;
        ops::adam_step(p, g, m1, m2, options, Stream::from_int(stream), copy);
      },
      py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("step"), py::arg("lr"),
      py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"),
      py::arg("grad_scale") = 1.0, py::arg("stream") = 0, py::arg("param_copy") = py::none(),
      "One Adam (decoupled=False) / AdamW (decoupled=True) step in place on flat fp32 DLPack capsules "
      "(param, exp_avg, exp_avg_sq written; grad read and multiplied by 1/grad_scale first); param_copy "
      "(optional, a float capsule) receives the updated param in its dtype in the same pass.");
  m.def(
      "silu_and_mul_backward",
      [](py::handle grad_x, py::handle grad, py::handle x, std::uintptr_t stream, py::object out) {
        const TensorView gx = view_capsule(grad_x, "grad_x"), g = view_capsule(grad, "grad");
        const TensorView xv = view_capsule(x, "x");
        const TensorView o = out.is_none() ? TensorView{} : view_capsule(out, "out");
        py::gil_scoped_release release;
        ops::silu_and_mul_backward(gx, g, xv, Stream::from_int(stream), o);
      },
      py::arg("grad_x"), py::arg("grad"), py::arg("x"), py::arg("stream") = 0, py::arg("out") = py::none(),
      "The gradient of silu_and_mul with respect to x ([num_tokens, 2 * d]) from the gradient of its "
      "output ([num_tokens, d]), written into grad_x; out (optional) receives silu_and_mul(x) itself.");
  m.def(
      "rms_norm_backward",
      [](py::handle grad_x, py::handle grad_weight_partial, py::handle grad, py::handle x, py::handle weight,
         float eps, std::uintptr_t stream) {
        const TensorView gx = view_capsule(grad_x, "grad_x");
        const TensorView partial = view_capsule(grad_weight_partial, "grad_weight_partial");
        const TensorView g = view_capsule(grad, "grad"), xv = view_capsule(x, "x");
        const TensorView w = view_capsule(weight, "weight");
        py::gil_scoped_release release;
        ops::rms_norm_backward(gx, partial, g, xv, w, eps, Stream::from_int(stream));
      },
      py::arg("grad_x"), py::arg("grad_weight_partial"), py::arg("grad"), py::arg("x"), py::arg("weight"),
      py::arg("eps"), py::arg("stream") = 0,
      "The gradients of rms_norm: grad_x, and the weight gradient summed over each of "
      "grad_weight_partial.shape[0] contiguous parts of the rows (fp32; the caller sums the parts).");
  m.def(
      "softmax_cross_entropy",
      [](py::handle logits, py::handle loss, py::handle labels, py::handle scale, int64_t ignore_index,
         bool write_grad, std::uintptr_t stream) {
        const TensorView x = view_capsule(logits, "logits"), l = view_capsule(loss, "loss");
        const TensorView y = view_capsule(labels, "labels"), sc = view_capsule(scale, "scale");
        py::gil_scoped_release release;
        ops::softmax_cross_entropy(x, l, y, sc, ignore_index, write_grad, Stream::from_int(stream));
      },
      py::arg("logits"), py::arg("loss"), py::arg("labels"), py::arg("scale"), py::arg("ignore_index"),
      py::arg("write_grad"), py::arg("stream") = 0,
      "Per-row softmax cross-entropy into loss; with write_grad, (softmax - onehot) * scale over the logits.");
}

}  // namespace tidal::bindings
