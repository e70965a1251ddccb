// Stochastic rounding of fp32 values to bf16, from a counter-based hash: the integer steps of
// ndadam_fused/rounding.py (the specification), written once for every kernel.
//
// Torch-free, for the CPU kernels, the CUDA kernels and the C++ tests alike:
//
//   key  = fmix32(seed32 ^ (t · 0x85EBCA77 mod 2³²))              per tensor and step t
//   r    = fmix32((i · 0x9E3779B1 mod 2³²) ^ key) & 0xFFFF        per element, i = row-major index
//   bf16 = upper 16 bits of ((fp32 bits of x) + r) mod 2³²
//
// fmix32 is MurmurHash3's finalizer. Unsigned 32-bit arithmetic wraps mod 2³² by definition,
// which is what the specification spells out with masks.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define NDADAM_ROUNDING_INLINE __host__ __device__ __forceinline__
#else
#define NDADAM_ROUNDING_INLINE inline
#endif

namespace ndadam::rounding {

constexpr uint32_t kGolden = 0x9E3779B1u;
constexpr uint32_t kStepMultiplier = 0x85EBCA77u;

NDADAM_ROUNDING_INLINE uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// The key of one tensor at one step: `seed` is the tensor's int64 seed (its low 32 bits count),
// `step` the step count after its increment (a whole number held in float32).
NDADAM_ROUNDING_INLINE uint32_t step_key(int64_t seed, float step) {
  const uint32_t t = static_cast<uint32_t>(static_cast<int64_t>(step));
  return fmix32(static_cast<uint32_t>(seed) ^ (t * kStepMultiplier));
}

// The 16 random bits of element `index` (the row-major index in the tensor, mod 2³²).
NDADAM_ROUNDING_INLINE uint32_t random_bits(uint32_t key, uint32_t index) {
  return fmix32((index * kGolden) ^ key) & 0xFFFFu;
}
NDADAM_ROUNDING_INLINE uint32_t random_bits(uint32_t key, int64_t index) {
  return random_bits(key, static_cast<uint32_t>(index));
}

NDADAM_ROUNDING_INLINE uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}

NDADAM_ROUNDING_INLINE float float_of(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
#endif
}

// x rounded stochastically to a bf16 value, returned as the fp32 that holds it exactly (its low
// 16 bits are 0): converting it to bf16 with any rounding mode gives that bf16.
NDADAM_ROUNDING_INLINE float stochastically_rounded(float x, uint32_t random) {
  return float_of((bits_of(x) + random) & 0xFFFF0000u);
}

}  // namespace ndadam::rounding
