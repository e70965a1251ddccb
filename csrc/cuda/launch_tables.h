// The device copies of launch tables that the CUDA kernels read (vector_step_cuda.cu defines the
// cache; split_rows_cuda.cu uses it too). Host code only.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <mutex>
#include <vector>

namespace ndadam::cuda_kernel {

// What a launch reads: its table (cached while the same tensors come back) and its per-launch
// addresses (gradients and the like, which change from step to step), both on the device.
struct LaunchTables {
  const uint8_t* table;
  const int64_t* per_launch;
  at::Tensor keep_until_queued;  // eager per-launch copy: released once the launch is queued
  bool built;                    // the table was built (not found in the cache)
};

// Held while a launch finds its tables and is queued: a cached table may not be evicted before
// the launch that reads it is in its stream.
std::mutex& cache_mutex();

// The tables of a launch of `kind` (a tag that keeps the tables of different kernels apart)
// over `table` (a cuda_plan::LaunchPlan's bytes) with `per_launch` addresses, on `stream` of
// `device`. Eager: the table from the cache (uploaded when new), the addresses through a pinned
// buffer and an asynchronous copy. During stream capture: one table holding both, made for the
// graph and kept for ever (the graph replays these very addresses). Call with cache_mutex() held.
LaunchTables launch_tables(uint8_t kind, const std::vector<uint8_t>& table, const std::vector<int64_t>& per_launch,
                           const at::Device& device, cudaStream_t stream);

// Table kinds.
constexpr uint8_t kVectorStepTables = 0;
constexpr uint8_t kRowStatisticsTables = 1;
constexpr uint8_t kApplyRowStatisticsTables = 2;

}  // namespace ndadam::cuda_kernel
