// The tally of a C++ test: check() counts a result and prints a failure.
#pragma once

#include <cstdio>
#include <string>

namespace batchkl_test {

inline int g_checks = 0;
inline int g_failures = 0;

inline void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

}  // namespace batchkl_test
