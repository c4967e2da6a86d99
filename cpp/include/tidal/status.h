// SPDX-License-Identifier: Apache-2.0
// Errors of the native core. Every failure is a C++ exception whose message names the argument and
// its value; the Python bindings map each type to one Python exception (see README, "Errors").
#pragma once

#include <cstdio>
#include <sstream>
#include <string_view>
#include <type_traits>
#include <stdexcept>
#include <string>

namespace tidal {

/// Anything that is neither bad input nor a bad index: a broken invariant, an invalid request state
/// transition, a device failure. Python: RuntimeError.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A device or host allocation that tidal asked for and did not get. Python: MemoryError.
class OutOfMemory : public Error {
 public:
  using Error::Error;
};

/// A CUDA/HIP runtime failure, with file:line and the runtime's own error string. Python: RuntimeError.
class CudaError : public Error {
 public:
  using Error::Error;
};

namespace detail {

// NOTE(tidal): numbers are formatted without iostreams. In the pybind11 module (built with hidden
// visibility), an ostream insertion of an integer crashed inside libstdc++'s locale code once torch
// 2.11 was loaded (GCC 13, Python 3.12); std::to_string and snprintf carry no locale state.
template <typename T>
void append_arg(std::string& out, const T& value) {
  if constexpr (std::is_same_v<T, bool>) {
    out += value ? "true" : "false";
  } else if constexpr (std::is_same_v<T, char>) {
    out += value;
  } else if constexpr (std::is_integral_v<T>) {
    out += std::to_string(value);
  } else if constexpr (std::is_floating_point_v<T>) {
    char buffer[32];
    std::snprintf(buffer, sizeof(buffer), "%g", static_cast<double>(value));
    out += buffer;
  } else if constexpr (std::is_enum_v<T>) {
    out += std::to_string(static_cast<std::underlying_type_t<T>>(value));
  } else if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    out += std::string_view(value);
  } else {
    std::ostringstream os;
    os << value;
    out += os.str();
  }
}

template <typename... Args>
std::string str_cat(const Args&... args) {
  std::string out;
  (append_arg(out, args), ...);
  return out;
}

inline const char* basename(const char* path) {
  const char* base = path;
  for (const char* p = path; *p; ++p) {
    if (*p == '/' || *p == '\\') base = p + 1;
  }
  return base;
}

}  // namespace detail
}  // namespace tidal

// NOTE(tidal): the message comes first so that Python users read "rms_norm: x.shape[-1]=..." before
// any location; the location helps the people who fix the bug.
#define TIDAL_THROW_(Type, ...)                                                          \
  throw Type(::tidal::detail::str_cat(__func__, ": ", __VA_ARGS__, " [",                 \
                                      ::tidal::detail::basename(__FILE__), ":", __LINE__, "]"))

/// Bad argument -> std::invalid_argument (Python ValueError). Usage:
/// TIDAL_CHECK(n > 0, "num_blocks=", n, " must be positive");
#define TIDAL_CHECK(cond, ...)                                \
  do {                                                        \
    if (!(cond)) TIDAL_THROW_(std::invalid_argument, __VA_ARGS__); \
  } while (0)

/// Bad id or index -> std::out_of_range (Python IndexError).
#define TIDAL_CHECK_INDEX(cond, ...)                       \
  do {                                                     \
    if (!(cond)) TIDAL_THROW_(std::out_of_range, __VA_ARGS__); \
  } while (0)

/// Broken invariant or invalid state transition -> tidal::Error (Python RuntimeError).
#define TIDAL_CHECK_STATE(cond, ...)                     \
  do {                                                   \
    if (!(cond)) TIDAL_THROW_(::tidal::Error, __VA_ARGS__); \
  } while (0)
