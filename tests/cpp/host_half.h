// bfloat16 and float16 as host types, for running the CUDA kernel's bf16/fp16 code in the
// emulation: stored in 16 bits, converted to float exactly and from float with round to nearest
// even, as the GPU's conversions (__float2bfloat16_rn, __float2half_rn) do.
#pragma once

#include <cstdint>
#include <cstring>

struct HostBFloat16 {
  uint16_t bits;

  HostBFloat16() = default;
  HostBFloat16(float value) {  // NOLINT(google-explicit-constructor): converts like c10::BFloat16
    uint32_t u;
    std::memcpy(&u, &value, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = 0x7fc0;  // a quiet NaN
      return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    bits = static_cast<uint16_t>(u >> 16);
  }
  operator float() const {  // NOLINT(google-explicit-constructor)
    const uint32_t u = uint32_t(bits) << 16;
    float value;
    std::memcpy(&value, &u, sizeof(value));
    return value;
  }
};

#if defined(__FLT16_MAX__)
#define NDADAM_HOST_HALF 1
// GCC and Clang's _Float16 converts with IEEE round to nearest even (in software where the
// CPU has no fp16 instructions).
struct HostHalf {
  _Float16 value;

  HostHalf() = default;
  HostHalf(float f) : value(static_cast<_Float16>(f)) {}  // NOLINT(google-explicit-constructor)
  operator float() const { return static_cast<float>(value); }  // NOLINT(google-explicit-constructor)
};
#endif
