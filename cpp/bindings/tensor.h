// SPDX-License-Identifier: Apache-2.0
// DLPack capsules in, TensorViews out: the one place where a Python object becomes a tensor the core
// can read. The capsule is borrowed (not consumed), so its producer keeps ownership and the view is
// valid for the duration of the call that received it.
#pragma once

#include <pybind11/pybind11.h>

#include "tidal/tensor_view.h"

namespace tidal::bindings {

/// Views a "dltensor" or "dltensor_versioned" capsule (torch.utils.dlpack.to_dlpack, __dlpack__).
/// `what` names the argument in errors; anything else is a TypeError that names it.
inline TensorView view_capsule(pybind11::handle capsule, const char* what) {
  PyObject* obj = capsule.ptr();
  if (PyCapsule_IsValid(obj, "dltensor")) {
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(obj, "dltensor"));
    return TensorView::from_dlpack(managed->dl_tensor, what);
  }
  if (PyCapsule_IsValid(obj, "dltensor_versioned")) {
    auto* managed = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(obj, "dltensor_versioned"));
    TIDAL_CHECK(managed->version.major == 1, what, " is a DLPack capsule of major version ",
                managed->version.major, "; tidal reads version 1");
    return TensorView::from_dlpack(managed->dl_tensor, what);
  }
  throw pybind11::type_error(std::string(what) + " must be an unused DLPack capsule (torch.utils.dlpack.to_dlpack), got " +
                             std::string(pybind11::str(pybind11::type::handle_of(capsule))));
}

/// view_capsule, or an empty view (null data) for None: an optional tensor argument.
inline TensorView view_optional_capsule(pybind11::handle capsule, const char* what) {
  if (capsule.is_none()) return TensorView{};
  return view_capsule(capsule, what);
}

}  // namespace tidal::bindings
