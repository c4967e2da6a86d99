// SPDX-License-Identifier: Apache-2.0
// Bindings of tidal::comm (tidal.comm's NCCL backend): tensors as DLPack capsules, the stream as an
// integer handle, the unique id as bytes. Blocking calls (joining, synchronize) release the GIL.
#include <cstdint>
#include <string>

#include <pybind11/pybind11.h>

#include "tensor.h"
#include "tidal/comm.h"

namespace py = pybind11;

namespace tidal::bindings {

void bind_comm(py::module_& m) {
  using comm::NcclCommunicator;
  using comm::ReduceOp;
  m.def("set_nccl_library_path", &comm::set_nccl_library_path, py::arg("path"),
        "Where to look for libnccl.so.2 first (before TIDAL_NCCL_LIBRARY and the loader's search).");
  m.def("nccl_version", &comm::nccl_version, "NCCL's version code, loading the library if needed.");
  m.def("nccl_unique_id", [] { return py::bytes(comm::nccl_unique_id()); }, "A new 128-byte NCCL unique id.");
  py::enum_<ReduceOp>(m, "ReduceOp")
      .value("SUM", ReduceOp::kSum)
      .value("PROD", ReduceOp::kProd)
      .value("MAX", ReduceOp::kMax)
      .value("MIN", ReduceOp::kMin)
      .value("AVG", ReduceOp::kAvg);
  py::class_<NcclCommunicator>(m, "NcclCommunicator")
      .def(py::init([](const py::bytes& unique_id, int rank, int size, int device, double timeout_s) {
             std::string id = unique_id;
             py::gil_scoped_release release;
             return new NcclCommunicator(id, rank, size, device, timeout_s);
           }),
           py::arg("unique_id"), py::arg("rank"), py::arg("size"), py::arg("device"), py::arg("timeout_s"))
      .def_property_readonly("rank", &NcclCommunicator::rank)
      .def_property_readonly("size", &NcclCommunicator::size)
      .def_property_readonly("device", &NcclCommunicator::device)
      .def(
          "all_reduce",
          [](NcclCommunicator& c, py::handle out, py::handle in, ReduceOp op, std::uintptr_t stream) {
            c.all_reduce(view_capsule(out, "out"), view_capsule(in, "in"), op, Stream::from_int(stream));
          },
          py::arg("out"), py::arg("in"), py::arg("op"), py::arg("stream"))
      .def(
          "reduce_scatter",
          [](NcclCommunicator& c, py::handle out, py::handle in, ReduceOp op, std::uintptr_t stream) {
            c.reduce_scatter(view_capsule(out, "out"), view_capsule(in, "in"), op, Stream::from_int(stream));
          },
          py::arg("out"), py::arg("in"), py::arg("op"), py::arg("stream"))
      .def(
          "all_gather",
          [](NcclCommunicator& c, py::handle out, py::handle in, std::uintptr_t stream) {
            c.all_gather(view_capsule(out, "out"), view_capsule(in, "in"), Stream::from_int(stream));
          },
          py::arg("out"), py::arg("in"), py::arg("stream"))
      .def(
          "broadcast",
          [](NcclCommunicator& c, py::handle buffer, int root, std::uintptr_t stream) {
            c.broadcast(view_capsule(buffer, "buffer"), root, Stream::from_int(stream));
          },
          py::arg("buffer"), py::arg("root"), py::arg("stream"))
      .def(
          "send",
          [](NcclCommunicator& c, py::handle in, int peer, std::uintptr_t stream) {
            c.send(view_capsule(in, "in"), peer, Stream::from_int(stream));
          },
          py::arg("in"), py::arg("peer"), py::arg("stream"))
      .def(
          "recv",
          [](NcclCommunicator& c, py::handle out, int peer, std::uintptr_t stream) {
            c.recv(view_capsule(out, "out"), peer, Stream::from_int(stream));
          },
          py::arg("out"), py::arg("peer"), py::arg("stream"))
      .def("synchronize", &NcclCommunicator::synchronize, py::call_guard<py::gil_scoped_release>(),
           "Waits for every collective enqueued so far; raises the error or timeout that ended them.")
      .def("abort", &NcclCommunicator::abort, py::arg("why"));
}

}  // namespace tidal::bindings
