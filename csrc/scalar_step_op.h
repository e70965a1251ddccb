// ndadam_fused::scalar_step_: Adam with L2 weight decay (DESIGN.md section 2's scalars: biases,
// norm gains) over every tensor of a call. Schema and checks in scalar_step_op.cpp; the C++ CPU
// kernel in cpu/scalar_step_cpu.cpp. There is no CUDA kernel: on a GPU torch's fused Adam is
// already one multi-tensor launch, while on the CPU it forks the intra-op threads once per
// tensor (WRN-28-10's 51 scalar tensors: 0.6 ms a step, against a 19 ms vector step).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>

namespace ndadam {

// Checks every argument of scalar_step_ before anything is modified, and raises an error that
// names the argument and its index otherwise: one entry per param in every list; params of one
// device (of `device_type`) and dtype (float32, float64, bfloat16 or float16); gradients and
// both moments shaped like them, in their dtype; all contiguous; a one-element float32 step each;
// weight_decay finite and >= 0; hyper, grad_scale and found_inf as for vector_step_.
void check_scalar_step_arguments(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                 at::TensorList exp_avg_sqs, at::TensorList state_steps, const at::Tensor& hyper,
                                 double weight_decay, const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf, c10::DeviceType device_type);

}  // namespace ndadam
