// The CUDA kernels of the rows-split ops (split_rows_op.h): ndadam_fused::row_statistics_ and
// ndadam_fused::apply_row_statistics_, each ONE launch over every row of every tensor of the call.
//
// The device code is split_rows_cuda_kernel.cuh (the C++ tests run it on the CPU); the plan, the
// table cache and the per-launch addresses are the vector step's (ndadam_cuda_plan.h,
// launch_tables.h). Per launch, the gradients' addresses and each tensor's first row in the
// statistics buffer travel beside the cached table; hyper, grad_scale and found_inf are read on
// the device, so a step reads nothing back to the host and a CUDA graph replays with their
// current values.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>

#include "../ndadam_op.h"
#include "../split_rows_op.h"
#include "launch_tables.h"
#include "ndadam_cuda_plan.h"
#include "split_rows_cuda_kernel.cuh"

namespace ndadam {
namespace cuda_kernel {

// 1024 threads of at most 64 registers, as the vector step (tools/compile_cuda.py fails on a spill).
template <typename param_t, typename acc_t, bool kFromMaster>
__global__ void __launch_bounds__(kThreadsPerBlock) row_statistics_kernel(const SplitLaunchArguments split) {
  __shared__ SplitShared<acc_t> shared;
  row_statistics_block<param_t, acc_t, kFromMaster>(split, shared);
}

template <typename param_t, typename acc_t, RowWrite kWrite>
__global__ void __launch_bounds__(kThreadsPerBlock) apply_row_statistics_kernel(const SplitLaunchArguments split) {
  __shared__ SplitShared<acc_t> shared;
  apply_row_statistics_block<param_t, acc_t, kWrite>(split, shared);
}

namespace {

// The plan of one rows-split launch (rows up to the on-chip capacity in teams, longer ones a
// block each; rows of no local element kept) and its per-launch addresses: the gradients, then
// each tensor's first row in the statistics buffer, both in the table's order.
struct SplitLaunch {
  cuda_plan::LaunchPlan plan;
  std::vector<int64_t> per_launch;
};

template <typename param_t>
SplitLaunch plan_split_launch(const VectorStepTensors& call, bool with_state, bool with_master,
                              bool with_rounding_seeds) {
  using acc_t = at::opmath_type<param_t>;
  const size_t n = call.params.size();
  std::vector<cuda_plan::TensorArguments> tensors(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = call.params[i];
    tensors[i] = cuda_plan::TensorArguments{
        p.data_ptr(), call.grads[i].const_data_ptr(), call.exp_avgs[i].data_ptr(),
        with_state ? call.exp_avg_sqs[i].data_ptr() : nullptr,
        with_state ? call.state_steps[i].data_ptr<float>() : nullptr, p.size(0), p.size(0) == 0 ? 0 : p.numel() / p.size(0)};
    if (with_master) {
      tensors[i].master = call.master_params[i].data_ptr();
    }
    if (with_rounding_seeds) {
      tensors[i].rounding_seed = call.rounding_seeds[i].const_data_ptr<int64_t>();
    }
  }
  SplitLaunch launch;
  launch.plan = cuda_plan::make_launch_plan(tensors, sizeof(param_t), sizeof(acc_t), cuda_plan::kOnChipRowCapacity,
                                            /*rows_without_elements=*/true);
  TORCH_CHECK(launch.plan.blocks <= std::numeric_limits<int32_t>::max(), "ndadam_fused: ", launch.plan.blocks,
              " thread blocks exceed one launch; split the params into several calls");
  const std::vector<int64_t> first_rows = statistics_first_rows(call.params);
  launch.per_launch.resize(2 * n);
  for (size_t i = 0; i < n; ++i) {
    const int32_t caller_index = launch.plan.order[i];
    launch.per_launch[i] = reinterpret_cast<int64_t>(tensors[caller_index].grad);
    launch.per_launch[n + i] = first_rows[caller_index];
  }
  return launch;
}

SplitLaunchArguments split_arguments(const SplitLaunch& launch, const LaunchTables& tables, const at::Tensor& statistics,
                                     const double* hyper, const std::optional<at::Tensor>& grad_scale,
                                     const std::optional<at::Tensor>& found_inf) {
  const cuda_plan::LaunchPlan& plan = launch.plan;
  SplitLaunchArguments split{};
  LaunchArguments& args = split.args;
  args.entries = reinterpret_cast<const cuda_plan::TensorEntry*>(tables.table);
  args.first_warp = reinterpret_cast<const int64_t*>(tables.table + plan.first_warp_offset);
  args.arrivals = reinterpret_cast<int32_t*>(const_cast<uint8_t*>(tables.table + plan.arrivals_offset));
  args.grads = reinterpret_cast<const void* const*>(tables.per_launch);
  args.hyper = hyper;
  args.grad_scale = grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr;
  args.found_inf = found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr;
  args.tensors = plan.tensors();
  split.statistics = const_cast<void*>(statistics.const_data_ptr());
  split.first_rows = tables.per_launch + plan.tensors();
  return split;
}

template <typename param_t, bool kFromMaster>
void launch_row_statistics(const VectorStepTensors& call, at::Tensor& statistics,
                           const std::optional<at::Tensor>& grad_scale) {
  using acc_t = at::opmath_type<param_t>;
  const SplitLaunch launch = plan_split_launch<param_t>(call, false, kFromMaster, false);
  const at::Device device = call.params[0].device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  std::lock_guard<std::mutex> lock(cache_mutex());
  const LaunchTables tables = launch_tables(kRowStatisticsTables, launch.plan.table, launch.per_launch, device, stream);
  const SplitLaunchArguments split = split_arguments(launch, tables, statistics, nullptr, grad_scale, std::nullopt);
  row_statistics_kernel<param_t, acc_t, kFromMaster>
      <<<static_cast<unsigned int>(launch.plan.blocks), kThreadsPerBlock, 0, stream>>>(split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename param_t, RowWrite kWrite>
void launch_apply_row_statistics(const VectorStepTensors& call, const at::Tensor& statistics, const at::Tensor& hyper,
                                 const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf) {
  using acc_t = at::opmath_type<param_t>;
  const SplitLaunch launch = plan_split_launch<param_t>(call, true, kWrite == RowWrite::kMasterAndParam,
                                                        kWrite == RowWrite::kStochasticParam);
  const at::Device device = call.params[0].device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  std::lock_guard<std::mutex> lock(cache_mutex());
  const LaunchTables tables =
      launch_tables(kApplyRowStatisticsTables, launch.plan.table, launch.per_launch, device, stream);
  const SplitLaunchArguments split =
      split_arguments(launch, tables, statistics, hyper.const_data_ptr<double>(), grad_scale, found_inf);
  apply_row_statistics_kernel<param_t, acc_t, kWrite>
      <<<static_cast<unsigned int>(launch.plan.blocks), kThreadsPerBlock, 0, stream>>>(split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void row_statistics_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::Tensor statistics,
                         const std::optional<at::Tensor>& grad_scale, at::TensorList master_params) {
  check_row_statistics_arguments(params, grads, exp_avgs, statistics, grad_scale, master_params, c10::DeviceType::CUDA);
  if (params.empty()) {
    return;
  }
  const VectorStepTensors call{params, grads, exp_avgs, {}, {}, master_params, {}};
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "ndadam_fused::row_statistics_", [&] {
    if constexpr (std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>) {
      if (!master_params.empty()) {
        return launch_row_statistics<scalar_t, true>(call, statistics, grad_scale);
      }
    }
    launch_row_statistics<scalar_t, false>(call, statistics, grad_scale);
  });
}

void apply_row_statistics_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList state_steps, const at::Tensor& statistics,
                               const at::Tensor& hyper, const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& found_inf, at::TensorList master_params,
                               at::TensorList rounding_seeds) {
  const VectorStepTensors call{params, grads, exp_avgs, exp_avg_sqs, state_steps, master_params, rounding_seeds};
  check_apply_row_statistics_arguments(call, statistics, hyper, grad_scale, found_inf, c10::DeviceType::CUDA);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "ndadam_fused::apply_row_statistics_", [&] {
                                    if constexpr (std::is_same_v<scalar_t, at::BFloat16> ||
                                                  std::is_same_v<scalar_t, at::Half>) {
                                      if (!master_params.empty()) {
                                        return launch_apply_row_statistics<scalar_t, RowWrite::kMasterAndParam>(
                                            call, statistics, hyper, grad_scale, found_inf);
                                      }
                                    }
                                    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
                                      if (!rounding_seeds.empty()) {
                                        return launch_apply_row_statistics<scalar_t, RowWrite::kStochasticParam>(
                                            call, statistics, hyper, grad_scale, found_inf);
                                      }
                                    }
                                    launch_apply_row_statistics<scalar_t, RowWrite::kParam>(call, statistics, hyper,
                                                                                           grad_scale, found_inf);
                                  });
}

}  // namespace

}  // namespace cuda_kernel
}  // namespace ndadam

TORCH_LIBRARY_IMPL(ndadam_fused, CUDA, m) {
  m.impl("row_statistics_", &ndadam::cuda_kernel::row_statistics_cuda);
  m.impl("apply_row_statistics_", &ndadam::cuda_kernel::apply_row_statistics_cuda);
}
