// Schema and argument checks of ndadam_fused::scalar_step_ (see scalar_step_op.h). A fragment of
// the ndadam_fused library, whose TORCH_LIBRARY block is in ndadam_op.cpp; the fake (meta)
// implementation that torch.compile traces with is registered from Python
// (ndadam_fused/backends/native.py).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <utility>

#include "ndadam_op.h"
#include "scalar_step_op.h"

namespace ndadam {

namespace {

constexpr const char* kOp = "ndadam_fused::scalar_step_";

}  // namespace

void check_scalar_step_arguments(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                 at::TensorList exp_avg_sqs, at::TensorList state_steps, const at::Tensor& hyper,
                                 double weight_decay, const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf, c10::DeviceType device_type) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && state_steps.size() == n,
              kOp, ": every list needs one entry per param, but got ", n, " params, ", grads.size(), " grads, ",
              exp_avgs.size(), " exp_avgs, ", exp_avg_sqs.size(), " exp_avg_sqs and ", state_steps.size(),
              " state_steps");
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0.0, kOp,
              ": weight_decay must be a finite number >= 0, got ", weight_decay);
  TORCH_CHECK(hyper.device().type() == device_type, kOp, ": hyper is a ", describe(hyper), " but this is the ",
              c10::DeviceTypeName(device_type), " kernel");
  check_hyper_tensor(kOp, hyper, hyper.device());
  check_scaler_tensors(kOp, grad_scale, found_inf, hyper.device());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::ScalarType dtype = p.scalar_type();
    TORCH_CHECK(p.device() == hyper.device() && dtype == params[0].scalar_type(), kOp, ": params[", i, "] is a ",
                describe(p), " but params[0] is a ", describe(params[0]), " and hyper is on ", hyper.device().str(),
                "; call the op once per (device, dtype), as ndadam_fused.backends.native does");
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, kOp,
                ": params[", i, "] is a ", describe(p), "; the kernel takes float32, float64, bfloat16 or float16");
    TORCH_CHECK(p.is_contiguous(), kOp, ": params[", i, "] (", describe(p), ") must be contiguous");
    check_gradient(kOp, grads, params, i);
    const at::Tensor& g = grads[i];
    TORCH_CHECK(!g.is_same(p), kOp, ": grads[", i, "] is params[", i, "] itself");
    for (const auto& [name, state] : {std::pair<const char*, const at::Tensor&>{"exp_avgs", exp_avgs[i]},
                                      std::pair<const char*, const at::Tensor&>{"exp_avg_sqs", exp_avg_sqs[i]}}) {
      TORCH_CHECK(state.device() == p.device() && state.scalar_type() == dtype && state.sizes() == p.sizes() &&
                      state.is_contiguous(),
                  kOp, ": ", name, "[", i, "] is a ", describe(state), "; expected a contiguous ", c10::toString(dtype),
                  " tensor of shape ", c10::str(p.sizes()), " on ", p.device().str(), " (a scalar's state is kept in its dtype)");
      TORCH_CHECK(!state.is_same(p) && !state.is_same(g), kOp, ": ", name, "[", i, "] is params[", i,
                  "] or grads[", i, "] itself");
    }
    TORCH_CHECK(!exp_avgs[i].is_same(exp_avg_sqs[i]), kOp, ": exp_avgs[", i, "] is exp_avg_sqs[", i, "] itself");
    const at::Tensor& step = state_steps[i];
    TORCH_CHECK(step.scalar_type() == at::kFloat && step.numel() == 1 && step.device() == p.device(), kOp,
                ": state_steps[", i, "] is a ", describe(step), "; expected a one-element float32 tensor on ",
                p.device().str());
  }
}

}  // namespace ndadam

TORCH_LIBRARY_FRAGMENT(ndadam_fused, m) {
  m.def(
      "scalar_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] state_steps, Tensor hyper, float weight_decay, Tensor? grad_scale, Tensor? found_inf) -> ()");
}
