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
#include <stdexcept>
#include <vector>

#include "../ndadam_op.h"
#include "../ndadam_row_math.h"
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
template <typename param_t, typename acc_t>
__global__ void __launch_bounds__(kThreadsPerBlock) vector_step_kernel(const LaunchArguments args) {
  extern __shared__ __align__(16) unsigned char dynamic_shared[];
  vector_step_block<param_t, acc_t>(args, *reinterpret_cast<SharedStorage<param_t, acc_t>*>(dynamic_shared));
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

// Shared memory per block: every GPU of compute capability 8.x and 9.0 allows 99 KiB (sm_86,
// sm_89) or more (A100 163 KiB, H100 227 KiB) with the kernel's consent.
static_assert(sizeof(SharedStorage<float, float>) <= 99 * 1024, "fp32 blocks must fit sm_86/sm_89");
static_assert(sizeof(SharedStorage<c10::BFloat16, float>) <= 99 * 1024, "bf16 blocks must fit sm_86/sm_89");
static_assert(sizeof(SharedStorage<double, double>) <= 163 * 1024, "fp64 blocks must fit an A100");

// More than 48 KiB of dynamic shared memory per block needs the kernel's consent, once per
// device; a GPU with less than the kernel needs gets a clear error. The first launch may come
// during stream capture: neither call is a stream operation, and relaxed mode lets them through.
template <typename param_t, typename acc_t>
void allow_shared_memory(int device) {
  static std::mutex mutex;
  static std::vector<bool> done;
  std::lock_guard<std::mutex> lock(mutex);
  // One flag per device of this dtype's kernel.
  if (static_cast<size_t>(device) >= done.size()) {
    done.resize(device + 1, false);
  }
  if (!done[device]) {
    const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
    constexpr size_t kBytes = sizeof(SharedStorage<param_t, acc_t>);
    int allowed = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&allowed, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK(kBytes <= static_cast<size_t>(allowed), "ndadam_fused::vector_step_: the CUDA kernel needs ", kBytes,
                " bytes of shared memory per block for ", c10::CppTypeToScalarType<param_t>::value, " params, but GPU ",
                device, " allows ", allowed, "; it runs on GPUs of compute capability 8.0 or newer");
    C10_CUDA_CHECK(cudaFuncSetAttribute(vector_step_kernel<param_t, acc_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(kBytes)));
    done[device] = true;
  }
}

template <typename param_t>
void launch(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
            at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2, double eps,
            int64_t single_pass_limit) {
  using acc_t = at::opmath_type<param_t>;
  const size_t n = params.size();
  std::vector<cuda_plan::TensorArguments> tensors(n);
  for (size_t i = 0; i < n; ++i) {
    tensors[i] = cuda_plan::TensorArguments{params[i].data_ptr(), grads[i].const_data_ptr(), exp_avgs[i].data_ptr(),
                                            exp_avg_sqs[i].data_ptr(), state_steps[i].data_ptr<float>(),
                                            row_count(params[i]), row_length(params[i])};
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

  const at::Device device = params[0].device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  cudaStreamCaptureStatus capture_status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture_status));
  const bool capturing = capture_status != cudaStreamCaptureStatusNone;

  std::lock_guard<std::mutex> lock(cache_mutex());
  const uint8_t* table = nullptr;
  const void* const* device_grads = nullptr;
  at::Tensor eager_grads;  // released after the launch is queued: freed in stream order
  if (!capturing) {
    const auto found = table_cache().find_or_build(
        plan.table, device.index(), reinterpret_cast<uintptr_t>(stream), false,
        [&](const std::vector<uint8_t>& bytes) { return DeviceTable{upload_eager(bytes, device)}; });
    table = static_cast<const uint8_t*>(found.storage->on_device.const_data_ptr());
    at::Tensor pinned = at::empty({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::memcpy(pinned.data_ptr<int64_t>(), grad_addresses.data(), n * sizeof(int64_t));
    eager_grads = at::empty({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kLong).device(device));
    eager_grads.copy_(pinned, /*non_blocking=*/true);
    device_grads = reinterpret_cast<const void* const*>(eager_grads.const_data_ptr<int64_t>());
  } else {
    // The graph replays these very gradients: they go into the captured table itself.
    std::vector<uint8_t> bytes = plan.table;
    const size_t grads_offset = (bytes.size() + 7) / 8 * 8;
    bytes.resize(grads_offset + n * sizeof(int64_t), 0);
    std::memcpy(bytes.data() + grads_offset, grad_addresses.data(), n * sizeof(int64_t));
    const auto found = table_cache().find_or_build(
        bytes, device.index(), reinterpret_cast<uintptr_t>(stream), true,
        [&](const std::vector<uint8_t>& b) { return upload_captured(b, device, stream); });
    table = static_cast<const uint8_t*>(found.storage->on_device.const_data_ptr());
    device_grads = reinterpret_cast<const void* const*>(table + grads_offset);
  }

  LaunchArguments args{};
  args.entries = reinterpret_cast<const cuda_plan::TensorEntry*>(table);
  args.first_warp = reinterpret_cast<const int64_t*>(table + plan.first_warp_offset);
  args.arrivals = reinterpret_cast<int32_t*>(const_cast<uint8_t*>(table + plan.arrivals_offset));
  args.grads = device_grads;
  args.lr = lr.const_data_ptr();
  args.lr_is_double = lr.scalar_type() == at::kDouble;
  args.beta1 = beta1;
  args.beta2 = beta2;
  args.eps = eps;
  args.tensors = plan.tensors();
  constexpr size_t kSharedBytes = sizeof(SharedStorage<param_t, acc_t>);
  allow_shared_memory<param_t, acc_t>(device.index());
  vector_step_kernel<param_t, acc_t>
      <<<static_cast<unsigned int>(plan.blocks), kThreadsPerBlock, kSharedBytes, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void vector_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList state_steps, const at::Tensor& lr, double beta1,
                      double beta2, double eps, int64_t max_single_pass_row_length) {
  check_vector_step_arguments(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
                              max_single_pass_row_length, c10::DeviceType::CUDA);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "ndadam_fused::vector_step_",
                                  [&] {
                                    launch<scalar_t>(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1,
                                                     beta2, eps, single_pass_limit);
                                  });
}

}  // namespace cuda_kernel

int64_t cuda_table_builds() {
  std::lock_guard<std::mutex> lock(cuda_kernel::cache_mutex());
  return cuda_kernel::table_cache().builds();
}

}  // namespace ndadam

TORCH_LIBRARY_IMPL(ndadam_fused, CUDA, m) { m.impl("vector_step_", &ndadam::cuda_kernel::vector_step_cuda); }
