// SPDX-License-Identifier: Apache-2.0
// GPU device resources on the tidal._core.device submodule: a device's SMs split into groups with
// streams of their own (tidal.serve's disaggregated engines of one process use it).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "tidal/sm_partition.h"

namespace py = pybind11;

namespace tidal::bindings {

void bind_device(py::module_& m) {
  m.def("sm_layout", [](int device) {
    const SmLayout layout = sm_layout(device);
    py::dict d;
    d["sm_count"] = layout.sm_count;
    d["min_group"] = layout.min_group;
    d["alignment"] = layout.alignment;
    return d;
  }, py::arg("device"),
        "The device's SM count, the smallest SM group it makes and the multiple groups round up to.");

  py::class_<SmPartition>(m, "SmPartition",
                          "A device's SMs in two groups (CUDA green contexts; HIP compute-unit masks): group 0 "
                          "of at least first_sms SMs, group 1 the rest. Streams of a group run their kernels "
                          "on its SMs only and live as long as the partition.")
      .def(py::init<int, int>(), py::arg("device"), py::arg("first_sms"))
      .def_property_readonly("device", &SmPartition::device)
      .def_property_readonly("num_groups", &SmPartition::num_groups)
      .def("sm_count", &SmPartition::sm_count, py::arg("group"))
      .def("create_stream", &SmPartition::create_stream, py::arg("group"), py::arg("priority") = 0,
           "A new stream (its raw handle) on group's SMs; lower priority numbers run first.")
      .def_static("record_sm_ids", &SmPartition::record_sm_ids, py::arg("stream"), py::arg("blocks"),
                  py::arg("out"),
                  "Launches `blocks` resident thread blocks on the raw stream, each writing the SM it ran on "
                  "to out[block] (the device address of `blocks` int32 values); does not wait.");
}

}  // namespace tidal::bindings
