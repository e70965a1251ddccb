// What the ctests of the emulated CUDA kernels share: the failure count and checks, the emulated
// device, and main's loop over named tests (argv[1] filters them by substring).
#pragma once

#include <chrono>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "cuda/ndadam_cuda_plan.h"
#include "simt_emulation.h"

namespace emulated_test {

inline int failures = 0;

inline void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

// Every problem the emulation recorded since the last call fails the test under `what`.
inline void check_emulation(const std::string& what) {
  for (const std::string& problem : simt::problems().take()) {
    check(false, what + ": " + problem);
  }
}

inline simt::Device& device() {
  static simt::Device instance(ndadam::cuda_plan::kThreadsPerBlock);
  return instance;
}

// Runs the tests whose names contain argv[1] (all without it); 0 when every check passed.
inline int run(int argc, char** argv, const std::vector<std::pair<std::string, void (*)()>>& tests,
               const char* title) {
  const std::string filter = argc > 1 ? argv[1] : "";
  int ran = 0;
  for (const auto& [name, test] : tests) {
    if (name.find(filter) == std::string::npos) continue;
    const int before = failures;
    const auto started = std::chrono::steady_clock::now();
    test();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    std::printf("%s %s (%.1f s)\n", failures == before ? "ok    " : "FAILED", name.c_str(), seconds);
    ++ran;
  }
  if (ran == 0) {
    std::printf("no test matches '%s'\n", filter.c_str());
    return 1;
  }
  if (failures > 0) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("%s: all checks passed\n", title);
  return 0;
}

}  // namespace emulated_test
