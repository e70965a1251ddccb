// Which instruction set the CPU kernels' loops run with, and the copies of a loop compiled for
// each: x86-64 builds target the baseline instruction set (SSE2) so that the wheel runs anywhere;
// the same loops are compiled again for AVX-512 (x86-64-v4) and for AVX2 and FMA (x86-64-v3) and
// picked at run time. One core of a Xeon (Sapphire Rapids), fp32 rows of 768: SSE2 0.83, AVX2
// 0.96-0.99, AVX-512 1.01-1.06 G elements/s.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "ndadam_cpu_rows.h"

namespace ndadam::cpu {

#if defined(__GNUC__) && defined(__x86_64__)
#define NDADAM_X86_COPIES 1
#endif

enum class InstructionSet { kBaseline = 0, kX86_64_V3 = 1, kX86_64_V4 = 2 };

inline InstructionSet best_instruction_set() {
#ifdef NDADAM_X86_COPIES
  static const InstructionSet best = __builtin_cpu_supports("x86-64-v4")   ? InstructionSet::kX86_64_V4
                                     : __builtin_cpu_supports("x86-64-v3") ? InstructionSet::kX86_64_V3
                                                                            : InstructionSet::kBaseline;
  return best;
#else
  return InstructionSet::kBaseline;
#endif
}

// The best copy this CPU runs, or the one NDADAM_CPU_INSTRUCTION_SET names (baseline,
// x86-64-v3, x86-64-v4): tests run every copy that way. Ops read it on every call, before
// anything is modified, so that a bad value is an error (naming `op`) that changes nothing.
inline InstructionSet chosen_instruction_set(const char* op) {
  const InstructionSet best = best_instruction_set();
  const char* requested = std::getenv("NDADAM_CPU_INSTRUCTION_SET");
  if (requested == nullptr || *requested == '\0') {
    return best;
  }
  const std::string name(requested);
  InstructionSet chosen;
  if (name == "baseline") {
    chosen = InstructionSet::kBaseline;
  } else if (name == "x86-64-v3") {
    chosen = InstructionSet::kX86_64_V3;
  } else if (name == "x86-64-v4") {
    chosen = InstructionSet::kX86_64_V4;
  } else {
    TORCH_CHECK(false, op, ": NDADAM_CPU_INSTRUCTION_SET=", name, " is not one of baseline, x86-64-v3, x86-64-v4");
  }
  TORCH_CHECK(static_cast<int>(chosen) <= static_cast<int>(best), op, ": NDADAM_CPU_INSTRUCTION_SET=", name,
              " asks for instructions this CPU (or this build) does not have");
  return chosen;
}

// body(begin, end), with `body`'s operator() (NDADAM_ALWAYS_INLINE, so that it takes the
// caller's instruction set) inlined into a copy compiled for each instruction set.
template <typename Body>
void run_baseline(const Body& body, int64_t begin, int64_t end) {
  body(begin, end);
}

#ifdef NDADAM_X86_COPIES
template <typename Body>
__attribute__((target("arch=x86-64-v4"))) void run_x86_64_v4(const Body& body, int64_t begin, int64_t end) {
  body(begin, end);
}

template <typename Body>
__attribute__((target("arch=x86-64-v3"))) void run_x86_64_v3(const Body& body, int64_t begin, int64_t end) {
  body(begin, end);
}
#endif

template <typename Body>
void run_with(InstructionSet instruction_set, const Body& body, int64_t begin, int64_t end) {
#ifdef NDADAM_X86_COPIES
  switch (instruction_set) {
    case InstructionSet::kX86_64_V4:
      return run_x86_64_v4(body, begin, end);
    case InstructionSet::kX86_64_V3:
      return run_x86_64_v3(body, begin, end);
    case InstructionSet::kBaseline:
      break;
  }
#endif
  run_baseline(body, begin, end);
}

}  // namespace ndadam::cpu
