// The CUDA kernel of ndadam_fused::vector_step_: ONE launch updates every row of every tensor
// of the call (DESIGN.md section 4), with the formulas of ndadam_row_math.h.
//
// The device code is ndadam_cuda_kernel.cuh (the C++ tests run it on the CPU), the launch plan
// and the table cache are ndadam_cuda_plan.h (torch-free, tested the same way). This file binds
// them to tensors and streams: it builds the plan, keeps its device table, passes the step's
// gradient addresses, and launches.
//
// Host work per step, in steady state: the plan is rebuilt on the host (O(tensors)) and found
// in the cache; the gradients' addresses go to the device through a pinned buffer and an
// asynchronous copy on the current stream, so a step never waits for the device.
//
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers that a plain
// CUDA toolkit install may lack (BUILD-NOTES.md).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <utility>
#include <type_traits>
#include <vector>

#include "../ndadam_op.h"
#include "../ndadam_row_math.h"
#include "launch_tables.h"
#include "ndadam_cuda_kernel.cuh"
#include "ndadam_cuda_plan.h"

namespace ndadam {
namespace cuda_kernel {

static_assert(cuda_plan::kOnChipRowCapacity >= kSinglePassMaxRowLength, "the default cut-over must fit on chip");

// 1024 threads of at most 64 registers each: one block of 32 warps per SM. ptxas (CUDA 13.0,
// sm_90 and sm_80) fits every path of every dtype in 64 registers without a spill
// (tools/compile_cuda.py fails CI on a spill). Weighed against 512-thread blocks, same kernel:
// 512 x 16 elements (8192-long rows on the exact path) at 64 registers (two blocks, again 32
// warps per SM) spill 88 B (fp32) to 228 B (fp64); at up to 128 registers they take 80 (fp32)
// to 128 (bf16) registers, so one block of 16 warps per SM, and still spill 8 B in bf16/fp16;
// 512 x 8 holds rows only up to 4096 and spills 4-116 B at 64 registers. A block's warps do not
// wait for each other before their rows (no prologue barrier: each warp computes its own step
// scalars while its row's copies are in flight), so one block per SM costs no idle prologue.
template <typename param_t, typename acc_t, RowWrite kWrite>
__global__ void __launch_bounds__(kThreadsPerBlock) vector_step_kernel(const LaunchArguments args) {
  extern __shared__ __align__(16) unsigned char dynamic_shared[];
  vector_step_block<param_t, acc_t, kWrite>(args,
                                            *reinterpret_cast<SharedStorage<param_t, acc_t, kWrite>*>(dynamic_shared));
}

// ---- Host side ------------------------------------------------------------------------------

// A table on the device, and, for a table made during stream capture, the pinned host copy the
// captured memcpy reads at every replay.
struct DeviceTable {
  at::Tensor on_device;
  void* pinned_for_graph = nullptr;  // never freed: a graph may replay as long as the process lives
};

// Eager tables kept: one per (param group, dtype) of a few optimizers; a capture adds its own,
// kept for ever.
constexpr size_t kEagerTablesKept = 16;

std::mutex& cache_mutex() {
  static std::mutex* mutex = new std::mutex();
  return *mutex;
}

cuda_plan::TableCache<DeviceTable>& table_cache() {
  // Never destroyed: CUDA may be gone at exit.
  static auto* cache = new cuda_plan::TableCache<DeviceTable>(kEagerTablesKept);
  return *cache;
}

// Eager: a pinned buffer from torch's caching host allocator and an asynchronous copy on the
// current stream; the allocator records the copy, so the pinned block is not reused before
// the copy has read it.
at::Tensor upload_eager(const std::vector<uint8_t>& bytes, const at::Device& device) {
  const int64_t size = static_cast<int64_t>(bytes.size());
  at::Tensor pinned = at::empty({size}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(pinned.data_ptr<uint8_t>(), bytes.data(), bytes.size());
  at::Tensor on_device = at::empty({size}, at::TensorOptions().dtype(at::kByte).device(device));
  on_device.copy_(pinned, /*non_blocking=*/true);
  return on_device;
}

// During stream capture: the copy becomes a node of the graph, which reads its host buffer at
// every replay, so that buffer is our own (cudaHostAlloc, never freed or reused) rather than a
// block of the caching host allocator. The device buffer comes from the graph's memory pool and
// is kept by the cache for ever.
DeviceTable upload_captured(const std::vector<uint8_t>& bytes, const at::Device& device, cudaStream_t stream) {
  DeviceTable table;
  {
    // cudaHostAlloc is not a stream operation; relaxed mode lets it run during a global capture.
    const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
    C10_CUDA_CHECK(cudaHostAlloc(&table.pinned_for_graph, bytes.size(), cudaHostAllocDefault));
  }
  std::memcpy(table.pinned_for_graph, bytes.data(), bytes.size());
  const int64_t size = static_cast<int64_t>(bytes.size());
  table.on_device = at::empty({size}, at::TensorOptions().dtype(at::kByte).device(device));
  C10_CUDA_CHECK(cudaMemcpyAsync(table.on_device.data_ptr(), table.pinned_for_graph, bytes.size(),
                                 cudaMemcpyHostToDevice, stream));
  return table;
}

LaunchTables launch_tables(uint8_t kind, const std::vector<uint8_t>& table, const std::vector<int64_t>& per_launch,
                           const at::Device& device, cudaStream_t stream) {
  cudaStreamCaptureStatus capture_status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture_status));
  const bool capturing = capture_status != cudaStreamCaptureStatusNone;
  const size_t count = per_launch.size();
  LaunchTables tables{};
  if (!capturing) {
    // The kind goes after the table's bytes: the kernels never read it, the cache compares it.
    std::vector<uint8_t> key = table;
    key.push_back(kind);
    const auto found = table_cache().find_or_build(
        key, device.index(), reinterpret_cast<uintptr_t>(stream), false,
        [&](const std::vector<uint8_t>& bytes) { return DeviceTable{upload_eager(bytes, device)}; });
    tables.table = static_cast<const uint8_t*>(found.storage->on_device.const_data_ptr());
    tables.built = found.built;
    if (count > 0) {
      at::Tensor pinned =
          at::empty({static_cast<int64_t>(count)}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
      std::memcpy(pinned.data_ptr<int64_t>(), per_launch.data(), count * sizeof(int64_t));
      tables.keep_until_queued =
          at::empty({static_cast<int64_t>(count)}, at::TensorOptions().dtype(at::kLong).device(device));
      tables.keep_until_queued.copy_(pinned, /*non_blocking=*/true);
      tables.per_launch = tables.keep_until_queued.const_data_ptr<int64_t>();
    }
    return tables;
  }
  // The graph replays these very addresses: they go into the captured table itself.
  std::vector<uint8_t> bytes = table;
  const size_t per_launch_offset = (bytes.size() + 7) / 8 * 8;
  bytes.resize(per_launch_offset + count * sizeof(int64_t), 0);
  std::memcpy(bytes.data() + per_launch_offset, per_launch.data(), count * sizeof(int64_t));
  bytes.push_back(kind);
  const auto found = table_cache().find_or_build(
      bytes, device.index(), reinterpret_cast<uintptr_t>(stream), true,
      [&](const std::vector<uint8_t>& b) { return upload_captured(b, device, stream); });
  tables.table = static_cast<const uint8_t*>(found.storage->on_device.const_data_ptr());
  tables.per_launch = reinterpret_cast<const int64_t*>(tables.table + per_launch_offset);
  tables.built = found.built;
  return tables;
}

// Shared memory per block: every GPU of compute capability 8.x and 9.0 allows 99 KiB (sm_86,
// sm_89) or more (A100 163 KiB, H100 227 KiB) with the kernel's consent.
static_assert(sizeof(SharedStorage<float, float>) <= 99 * 1024, "fp32 blocks must fit sm_86/sm_89");
static_assert(sizeof(SharedStorage<c10::BFloat16, float>) <= 99 * 1024, "bf16 blocks must fit sm_86/sm_89");
static_assert(sizeof(SharedStorage<c10::BFloat16, float, RowWrite::kMasterAndParam>) <= 99 * 1024,
              "bf16 blocks with master copies must fit sm_86/sm_89");
static_assert(sizeof(SharedStorage<double, double>) <= 163 * 1024, "fp64 blocks must fit an A100");

// More than 48 KiB of dynamic shared memory per block needs the kernel's consent, once per
// kernel and device; a GPU with less than the kernel needs gets a clear error. The first launch
// may come during stream capture: neither call is a stream operation, and relaxed mode lets them
// through.
void allow_shared_memory(const void* kernel, size_t bytes, at::ScalarType dtype, int device) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> done;
  std::lock_guard<std::mutex> lock(mutex);
  if (done.count({kernel, device}) == 0) {
    const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
    int allowed = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&allowed, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK(bytes <= static_cast<size_t>(allowed), "ndadam_fused: the CUDA kernel needs ", bytes,
                " bytes of shared memory per block for ", dtype, " params, but GPU ", device, " allows ", allowed,
                "; it runs on GPUs of compute capability 8.0 or newer");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    done.insert({kernel, device});
  }
}

template <typename param_t, RowWrite kWrite>
void launch(const VectorStepTensors& call, const at::Tensor& hyper, const std::optional<at::Tensor>& grad_scale,
            const std::optional<at::Tensor>& found_inf, int64_t single_pass_limit) {
  using acc_t = at::opmath_type<param_t>;
  const size_t n = call.params.size();
  std::vector<cuda_plan::TensorArguments> tensors(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = call.params[i];
    tensors[i] = cuda_plan::TensorArguments{p.data_ptr(), call.grads[i].const_data_ptr(), call.exp_avgs[i].data_ptr(),
                                            call.exp_avg_sqs[i].data_ptr(), call.state_steps[i].data_ptr<float>(),
                                            row_count(p), row_length(p)};
    if constexpr (kWrite == RowWrite::kMasterAndParam) {
      tensors[i].master = call.master_params[i].data_ptr();
    } else if constexpr (kWrite == RowWrite::kStochasticParam) {
      tensors[i].rounding_seed = call.rounding_seeds[i].const_data_ptr<int64_t>();
    }
  }
  const cuda_plan::LaunchPlan plan =
      cuda_plan::make_launch_plan(tensors, sizeof(param_t), sizeof(acc_t), single_pass_limit);
  TORCH_CHECK(plan.blocks <= std::numeric_limits<int32_t>::max(), "ndadam_fused::vector_step_: ", plan.blocks,
              " thread blocks exceed one launch; split the params into several calls");
  // This step's gradients, in the table's order.
  std::vector<int64_t> grad_addresses(n);
  for (size_t i = 0; i < n; ++i) {
    grad_addresses[i] = reinterpret_cast<int64_t>(tensors[plan.order[i]].grad);
  }

  const at::Device device = call.params[0].device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  std::lock_guard<std::mutex> lock(cache_mutex());
  const LaunchTables tables = launch_tables(kVectorStepTables, plan.table, grad_addresses, device, stream);

  LaunchArguments args{};
  args.entries = reinterpret_cast<const cuda_plan::TensorEntry*>(tables.table);
  args.first_warp = reinterpret_cast<const int64_t*>(tables.table + plan.first_warp_offset);
  args.arrivals = reinterpret_cast<int32_t*>(const_cast<uint8_t*>(tables.table + plan.arrivals_offset));
  args.grads = reinterpret_cast<const void* const*>(tables.per_launch);
  args.hyper = hyper.const_data_ptr<double>();
  args.grad_scale = grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr;
  args.found_inf = found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr;
  args.tensors = plan.tensors();
  constexpr size_t kSharedBytes = sizeof(SharedStorage<param_t, acc_t, kWrite>);
  allow_shared_memory(reinterpret_cast<const void*>(&vector_step_kernel<param_t, acc_t, kWrite>), kSharedBytes,
                      c10::CppTypeToScalarType<param_t>::value, device.index());
  vector_step_kernel<param_t, acc_t, kWrite>
      <<<static_cast<unsigned int>(plan.blocks), kThreadsPerBlock, kSharedBytes, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void vector_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList state_steps, const at::Tensor& hyper,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      at::TensorList master_params, at::TensorList rounding_seeds,
                      int64_t max_single_pass_row_length) {
  const VectorStepTensors call{params, grads, exp_avgs, exp_avg_sqs, state_steps, master_params, rounding_seeds};
  check_vector_step_arguments(call, hyper, grad_scale, found_inf, max_single_pass_row_length, c10::DeviceType::CUDA);
  const int64_t single_pass_limit = resolve_single_pass_limit(max_single_pass_row_length);
  TORCH_CHECK(single_pass_limit <= cuda_plan::kOnChipRowCapacity,
              "ndadam_fused::vector_step_: max_single_pass_row_length=", max_single_pass_row_length, " exceeds the ",
              cuda_plan::kOnChipRowCapacity,
              " elements the CUDA kernel holds on chip per row; longer rows take the statistics path");
  TORCH_CHECK(params.size() <= size_t(std::numeric_limits<int32_t>::max()),
              "ndadam_fused::vector_step_: too many tensors for one call");
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  // The kernels that can occur: master copies for bf16/fp16 params, stochastic rounding for bf16
  // (the argument checks refused the rest).
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "ndadam_fused::vector_step_",
                                  [&] {
                                    constexpr bool kHalfPrecision = std::is_same_v<scalar_t, at::BFloat16> ||
                                                                    std::is_same_v<scalar_t, at::Half>;
                                    if constexpr (kHalfPrecision) {
                                      if (!master_params.empty()) {
                                        return launch<scalar_t, RowWrite::kMasterAndParam>(
                                            call, hyper, grad_scale, found_inf, single_pass_limit);
                                      }
                                    }
                                    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
                                      if (!rounding_seeds.empty()) {
                                        return launch<scalar_t, RowWrite::kStochasticParam>(
                                            call, hyper, grad_scale, found_inf, single_pass_limit);
                                      }
                                    }
                                    launch<scalar_t, RowWrite::kParam>(call, hyper, grad_scale, found_inf,
                                                                       single_pass_limit);
                                  });
}

}  // namespace cuda_kernel

int64_t cuda_table_builds() {
  std::lock_guard<std::mutex> lock(cuda_kernel::cache_mutex());
  return cuda_kernel::table_cache().builds();
}

}  // namespace ndadam

TORCH_LIBRARY_IMPL(ndadam_fused, CUDA, m) { m.impl("vector_step_", &ndadam::cuda_kernel::vector_step_cuda); }
