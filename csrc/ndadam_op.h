// The op that binds the kernels to tensors: ndadam_fused::vector_step_ (schema in ndadam_op.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>

namespace ndadam {

// Checks every argument of vector_step_ before anything is modified, and raises an error that
// names the argument and its index otherwise. `device_type` is the kernel's (CPU or CUDA).
void check_vector_step_arguments(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                 at::TensorList exp_avg_sqs, at::TensorList state_steps, const at::Tensor& lr,
                                 double beta1, double beta2, double eps, int64_t max_single_pass_row_length,
                                 c10::DeviceType device_type);

// The cut-over the kernels use: the argument, or kSinglePassMaxRowLength when it is -1.
int64_t resolve_single_pass_limit(int64_t max_single_pass_row_length);

// Device tables the CUDA kernel has built and uploaded so far in this process (a build counter
// for tests: steady-state steps build none). Defined in cuda/vector_step_cuda.cu.
int64_t cuda_table_builds();

// Rows of a vector tensor: p.reshape(p.shape[0], -1).
inline int64_t row_count(const at::Tensor& param) { return param.size(0); }
inline int64_t row_length(const at::Tensor& param) {
  return param.size(0) == 0 ? 0 : param.numel() / param.size(0);
}

}  // namespace ndadam
