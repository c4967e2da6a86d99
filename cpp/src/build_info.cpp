// SPDX-License-Identifier: Apache-2.0
// build_info(): the compile-time facts of this library, from the CMake-generated config header.
#include "tidal/build_info.h"

#include "tidal_build_config.h"

#if TIDAL_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace tidal {

BuildInfo build_info() {
  BuildInfo info;
  info.version = TIDAL_VERSION_STRING;
#if TIDAL_WITH_CUDA
  info.cuda = true;
  info.cuda_archs = TIDAL_CUDA_ARCHS_STRING;
  info.cuda_version = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  info.cuda_compiler = TIDAL_CUDA_COMPILER_STRING;
#endif
  if (std::string(TIDAL_HIP_CHECKED) == "ON") info.hip_checked_archs = TIDAL_HIP_ARCHS_STRING;
  info.compiler = TIDAL_CXX_COMPILER_STRING;
  info.build_type = TIDAL_BUILD_TYPE_STRING;
  return info;
}

}  // namespace tidal
