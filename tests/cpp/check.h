// SPDX-License-Identifier: Apache-2.0
// A test harness small enough to read in one glance: CHECK(expr) prints file:line and the expression
// when it fails and counts the failure; CHECK_THROWS checks an exception's type and message; each test
// executable's main() returns check_failures() so ctest sees any failure.
#pragma once

#include <cstdio>
#include <string>

namespace tidal::test {

inline int& failures() {
  static int count = 0;
  return count;
}

inline int check_failures() {
  if (failures() != 0) std::fprintf(stderr, "%d check(s) failed\n", failures());
  else std::fprintf(stderr, "all checks passed\n");
  return failures() == 0 ? 0 : 1;
}

}  // namespace tidal::test

#define CHECK(expr)                                                              \
  do {                                                                           \
    if (!(expr)) {                                                               \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #expr); \
      ++::tidal::test::failures();                                               \
    }                                                                            \
  } while (0)

/// Runs `stmt`, which must throw `Type` with a what() containing `needle`.
#define CHECK_THROWS(Type, needle, stmt)                                                      \
  do {                                                                                        \
    bool thrown_ = false;                                                                     \
    try {                                                                                     \
      stmt;                                                                                   \
    } catch (const Type& e_) {                                                                \
      thrown_ = true;                                                                         \
      if (std::string(e_.what()).find(needle) == std::string::npos) {                         \
        std::fprintf(stderr, "%s:%d: message of %s lacks \"%s\": %s\n", __FILE__, __LINE__,   \
                     #stmt, std::string(needle).c_str(), e_.what());                          \
        ++::tidal::test::failures();                                                          \
      }                                                                                       \
    } catch (...) {                                                                           \
    }                                                                                         \
    if (!thrown_) {                                                                           \
      std::fprintf(stderr, "%s:%d: %s did not throw %s\n", __FILE__, __LINE__, #stmt, #Type); \
      ++::tidal::test::failures();                                                            \
    }                                                                                         \
  } while (0)
