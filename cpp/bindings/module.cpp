// SPDX-License-Identifier: Apache-2.0
// The _core module: registers tidal's exception types and the submodules (ops, kv, sched, zero,
// comm, device). Exceptions map as std::invalid_argument -> ValueError, std::out_of_range -> IndexError,
// tidal::OutOfMemory -> _core.OutOfMemoryError (a MemoryError), tidal::CudaError -> _core.CudaError
// and tidal::Error -> _core.Error (both RuntimeErrors).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "tidal/build_info.h"
#include "tidal/status.h"

namespace py = pybind11;

namespace tidal::bindings {
void bind_ops(py::module_& m);
void bind_ops_serving(py::module_& m);
void bind_kv(py::module_& m);
void bind_sched(py::module_& m);
void bind_ops_train(py::module_& m);
void bind_zero(py::module_& m);
void bind_comm(py::module_& m);
void bind_device(py::module_& m);
}  // namespace tidal::bindings

PYBIND11_MODULE(_core, m) {
  m.doc() = "tidal's native core (libtidal_core) for Python";

  // NOTE(tidal): pybind11 tries translators newest first, so the base type is registered before its
  // subclasses; otherwise a CudaError would surface as a plain tidal.Error.
  auto error = py::register_exception<tidal::Error>(m, "Error", PyExc_RuntimeError);
  py::register_exception<tidal::CudaError>(m, "CudaError", error.ptr());
  py::register_exception<tidal::OutOfMemory>(m, "OutOfMemoryError", PyExc_MemoryError);

  m.def("build_info", [] {
    const tidal::BuildInfo info = tidal::build_info();
    py::dict d;
    d["version"] = info.version;
    d["cuda"] = info.cuda;
    d["cuda_archs"] = info.cuda_archs;
    d["cuda_version"] = info.cuda_version;
    d["cuda_compiler"] = info.cuda_compiler;
    d["hip"] = info.hip;
    d["hip_checked_archs"] = info.hip_checked_archs;
    d["compiler"] = info.compiler;
    d["build_type"] = info.build_type;
    return d;
  }, "Compile-time facts of this build of libtidal_core, as a dict.");

  auto ops = m.def_submodule("ops", "Kernels behind tidal.ops (DLPack capsules in, destination-passing)");
  tidal::bindings::bind_ops(ops);
  tidal::bindings::bind_ops_serving(ops);
  tidal::bindings::bind_ops_train(ops);
  auto kv = m.def_submodule("kv", "The paged KV block pool and KV cache manager");
  tidal::bindings::bind_kv(kv);
  auto sched = m.def_submodule("sched", "The continuous-batching scheduler and request lifecycle");
  tidal::bindings::bind_sched(sched);
  auto zero = m.def_submodule("zero", "The ZeRO partition plan: flat buffer, shards, buckets, gather groups");
  tidal::bindings::bind_zero(zero);
  auto comm = m.def_submodule("comm", "NCCL communicators held by the core (tidal.comm's NCCL backend)");
  tidal::bindings::bind_comm(comm);
  auto device = m.def_submodule("device", "GPU device resources: SM partitions and their streams");
  tidal::bindings::bind_device(device);
}
