// SPDX-License-Identifier: Apache-2.0
// What this build of libtidal_core contains: version, compilers, and which device kernels.
#pragma once

#include <string>

namespace tidal {

struct BuildInfo {
  std::string version;         // "0.1.0"
  bool cuda = false;           // CUDA kernels compiled in
  std::string cuda_archs;      // "90" or "80;90"; empty without CUDA
  std::string cuda_version;    // CUDA runtime the kernels were built against, "13.0"; empty without CUDA
  std::string cuda_compiler;   // "NVIDIA 13.0.88"; empty without CUDA
  bool hip = false;            // HIP kernels usable at run time (never in this release: compile check only)
  std::string hip_checked_archs;  // archs the HIP compile check passed for, "gfx90a"; empty if not run
  std::string compiler;        // C++ compiler, "GNU 12.2.0"
  std::string build_type;      // "Release"
};

/// Facts fixed when libtidal_core was compiled; touches no device and no driver.
BuildInfo build_info();

}  // namespace tidal
