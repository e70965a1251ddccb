// The op that binds the kernels to tensors: ndadam_fused::vector_step_ (schema in ndadam_op.cpp),
// and the argument checks that it shares with the rows-split ops (split_rows_op.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace ndadam {

// The tensor lists of one call. master_params and rounding_seeds are empty where the call has
// none (the schema's empty lists); otherwise one per param.
struct VectorStepTensors {
  at::TensorList params;
  at::TensorList grads;
  at::TensorList exp_avgs;
  at::TensorList exp_avg_sqs;
  at::TensorList state_steps;
  at::TensorList master_params;
  at::TensorList rounding_seeds;
};

// The hyperparameter tensor's values, read on the host (CPU kernels only).
struct HostHyperparameters {
  double lr;
  double beta1;
  double beta2;
  double eps;
};

// Checks every argument of vector_step_ before anything is modified, and raises an error that
// names the argument and its index otherwise. `device_type` is the kernel's (CPU or CUDA).
void check_vector_step_arguments(const VectorStepTensors& call, const at::Tensor& hyper,
                                 const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf, int64_t max_single_pass_row_length,
                                 c10::DeviceType device_type);

// The checks of the options every step op takes, each naming `op`:
// hyper: a contiguous float64 tensor of 4 elements (lr, β1, β2, ε) on `device`;
void check_hyper_tensor(const char* op, const at::Tensor& hyper, const at::Device& device);
// grad_scale, found_inf: absent, or one float32 element on `device`;
void check_scaler_tensors(const char* op, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf, const at::Device& device);
// master_params: absent, or one contiguous float32 copy per bfloat16/float16 param, shaped like it;
// rounding_seeds: absent, or one int64 element per bfloat16 param, not together with master_params.
void check_master_and_rounding(const char* op, at::TensorList params, at::TensorList master_params,
                               at::TensorList rounding_seeds);

// "<dtype> tensor of shape [...] on <device>", as the ops' error messages describe a tensor.
std::string describe(const at::Tensor& t);

// CPU kernels, after every check: whether GradScaler's found_inf (given and nonzero) says the
// step changes nothing, step counts included;
bool cpu_found_inf(const std::optional<at::Tensor>& found_inf);
// and, when it does not, every step count plus 1 (in float32, as the reference increments its
// float32 step tensor), written back and returned.
std::vector<float> increment_cpu_steps(at::TensorList state_steps);

// grads[index]: dense, contiguous, and like params[index] in shape, dtype and device.
void check_gradient(const char* op, at::TensorList grads, at::TensorList params, size_t index);

// The values of a CPU hyper tensor, checked as the optimizer checks them (lr and eps finite and
// >= 0, betas in [0, 1)): an error names the element.
HostHyperparameters read_and_check_hyperparameters(const char* op, const at::Tensor& hyper);
inline HostHyperparameters read_and_check_hyperparameters(const at::Tensor& hyper) {
  return read_and_check_hyperparameters("ndadam_fused::vector_step_", hyper);
}

// The cut-over the kernels use: the argument, or kSinglePassMaxRowLength when it is -1.
int64_t resolve_single_pass_limit(int64_t max_single_pass_row_length);

// Device tables the CUDA kernels have built and uploaded so far in this process (a build counter
// for tests: steady-state steps build none). Defined in cuda/vector_step_cuda.cu.
int64_t cuda_table_builds();

// Rows of a vector tensor: p.reshape(p.shape[0], -1).
inline int64_t row_count(const at::Tensor& param) { return param.size(0); }
inline int64_t row_length(const at::Tensor& param) {
  return param.size(0) == 0 ? 0 : param.numel() / param.size(0);
}

}  // namespace ndadam
