// Host memory for the emulated kernels' tensors (tests/cpp/test_*_emulated.cpp): aligned as the
// caching allocators align, optionally a view some elements into its buffer, with guard bytes
// that must survive every launch; and the names of the element types the tests run.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "host_half.h"

template <typename T>
constexpr const char* type_name() {
  if constexpr (std::is_same_v<T, float>) {
    return "float32";
  } else if constexpr (std::is_same_v<T, double>) {
    return "float64";
  } else if constexpr (std::is_same_v<T, HostBFloat16>) {
    return "bfloat16";
  } else {
    return "float16";
  }
}

// Memory for one array of a tensor: 256-byte aligned (as the caching allocators align), starting
// `offset_elements` in (a view into a larger buffer), with guard bytes on both sides that must
// survive every launch.
template <typename T>
class Buffer {
 public:
  Buffer(size_t elements, size_t offset_elements)
      : elements_(elements), offset_bytes_(offset_elements * sizeof(T)),
        storage_((kGuard * 2 + offset_bytes_ + elements * sizeof(T) + 255) / 256 * 256 + 256) {
    const uintptr_t start = (reinterpret_cast<uintptr_t>(storage_.data()) + kGuard + 255) / 256 * 256;
    data_ = reinterpret_cast<T*>(start + offset_bytes_);
    std::fill(storage_.begin(), storage_.end(), kPattern);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  T* data() { return data_; }
  T& operator[](size_t i) { return data_[i]; }
  size_t size() const { return elements_; }

  bool guards_intact() const {
    const auto* begin = reinterpret_cast<const uint8_t*>(data_);
    const auto* end = begin + elements_ * sizeof(T);
    for (const uint8_t* p = storage_.data(); p < begin; ++p) {
      if (*p != kPattern) return false;
    }
    for (const uint8_t* p = end; p < storage_.data() + storage_.size(); ++p) {
      if (*p != kPattern) return false;
    }
    return true;
  }

 private:
  static constexpr size_t kGuard = 64;
  static constexpr uint8_t kPattern = 0xa5;
  size_t elements_;
  size_t offset_bytes_;
  std::vector<uint8_t> storage_;
  T* data_;
};

