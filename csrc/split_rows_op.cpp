// Schemas and argument checks of the rows-split ops (see split_rows_op.h). A fragment of the
// ndadam_fused library, whose TORCH_LIBRARY block is in ndadam_op.cpp; the fake (meta)
// implementations that torch.compile traces with are registered from Python
// (ndadam_fused/backends/native.py).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "ndadam_op.h"
#include "split_rows_op.h"

namespace ndadam {

namespace {

// Checks shared by both ops: one entry per param in every list, params of one device and dtype
// with 2+ dims, gradients and first moments shaped like them, all contiguous, and the buffer.
// Returns nothing: raises with the op's name, the argument and its index.
void check_rows(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                const at::Tensor& statistics, c10::DeviceType device_type) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n, op, ": every list needs one entry per param, but got ", n,
              " params, ", grads.size(), " grads and ", exp_avgs.size(), " exp_avgs");
  TORCH_CHECK(statistics.device().type() == device_type, op, ": statistics is a ", describe(statistics), " but this is the ",
              c10::DeviceTypeName(device_type), " kernel");
  const at::ScalarType acc_dtype = statistics.scalar_type();
  TORCH_CHECK(acc_dtype == at::kFloat || acc_dtype == at::kDouble, op, ": statistics is a ", describe(statistics),
              "; it holds the state dtype, float32 (float64 for float64 params)");
  int64_t rows = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::ScalarType dtype = p.scalar_type();
    TORCH_CHECK(p.device() == statistics.device() && p.scalar_type() == params[0].scalar_type(), op, ": params[", i,
                "] is a ", describe(p), " but params[0] is a ", describe(params[0]), " and statistics a ",
                describe(statistics), "; call the op once per (device, dtype)");
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                ": params[", i, "] is a ", describe(p), "; the kernels take float32, float64, bfloat16 or float16");
    TORCH_CHECK((dtype == at::kDouble) == (acc_dtype == at::kDouble), op, ": params[", i, "] is a ", describe(p),
                " but statistics is ", c10::toString(acc_dtype), "; the state dtype of ", c10::toString(dtype),
                " params is ", dtype == at::kDouble ? "float64" : "float32");
    TORCH_CHECK(p.dim() >= 2, op, ": params[", i, "] is a ", describe(p),
                "; a vector tensor needs at least 2 dims (one row per hidden unit)");
    TORCH_CHECK(p.is_contiguous(), op, ": params[", i, "] (", describe(p), ") must be contiguous");
    check_gradient(op, grads, params, i);
    const at::Tensor& m = exp_avgs[i];
    TORCH_CHECK(m.device() == p.device() && m.scalar_type() == acc_dtype && m.sizes() == p.sizes() &&
                    m.is_contiguous(),
                op, ": exp_avgs[", i, "] is a ", describe(m), "; expected a contiguous ", c10::toString(acc_dtype),
                " tensor of shape ", c10::str(p.sizes()), " on ", p.device().str());
    rows += p.size(0);
  }
  TORCH_CHECK(statistics.dim() == 2 && statistics.size(0) == rows && statistics.size(1) == kRowStatisticsPerRow &&
                  statistics.is_contiguous(),
              op, ": statistics is a ", describe(statistics), "; expected a contiguous tensor of shape [", rows, ", ",
              kRowStatisticsPerRow, "] (six statistics per row of the params, in order)");
}

}  // namespace

void check_row_statistics_arguments(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                    const at::Tensor& statistics, const std::optional<at::Tensor>& grad_scale,
                                    at::TensorList master_params, c10::DeviceType device_type) {
  constexpr const char* op = "ndadam_fused::row_statistics_";
  check_rows(op, params, grads, exp_avgs, statistics, device_type);
  check_scaler_tensors(op, grad_scale, std::nullopt, statistics.device());
  check_master_and_rounding(op, params, master_params, {});
}

void check_apply_row_statistics_arguments(const VectorStepTensors& call, const at::Tensor& statistics,
                                          const at::Tensor& hyper, const std::optional<at::Tensor>& grad_scale,
                                          const std::optional<at::Tensor>& found_inf, c10::DeviceType device_type) {
  constexpr const char* op = "ndadam_fused::apply_row_statistics_";
  const size_t n = call.params.size();
  TORCH_CHECK(call.exp_avg_sqs.size() == n && call.state_steps.size() == n, op,
              ": every list needs one entry per param, but got ", n, " params, ", call.exp_avg_sqs.size(),
              " exp_avg_sqs and ", call.state_steps.size(), " state_steps");
  check_rows(op, call.params, call.grads, call.exp_avgs, statistics, device_type);
  check_hyper_tensor(op, hyper, statistics.device());
  check_scaler_tensors(op, grad_scale, found_inf, statistics.device());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& v = call.exp_avg_sqs[i];
    TORCH_CHECK(v.device() == statistics.device() && v.scalar_type() == statistics.scalar_type() && v.dim() == 1 &&
                    v.size(0) == call.params[i].size(0) && v.is_contiguous(),
                op, ": exp_avg_sqs[", i, "] is a ", describe(v), "; expected a contiguous ",
                c10::toString(statistics.scalar_type()), " tensor of shape [", call.params[i].size(0),
                "] (one second moment per row)");
    const at::Tensor& step = call.state_steps[i];
    TORCH_CHECK(step.device() == statistics.device() && step.scalar_type() == at::kFloat && step.numel() == 1, op,
                ": state_steps[", i, "] is a ", describe(step), "; expected a one-element float32 tensor on ",
                statistics.device().str());
  }
  check_master_and_rounding(op, call.params, call.master_params, call.rounding_seeds);
}

std::vector<int64_t> statistics_first_rows(at::TensorList params) {
  std::vector<int64_t> offsets(params.size(), 0);
  int64_t rows = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    offsets[i] = rows;
    rows += params[i].size(0);
  }
  return offsets;
}

}  // namespace ndadam

// row_statistics_ writes `statistics` only; apply_row_statistics_ updates params, exp_avgs,
// exp_avg_sqs, state_steps (incremented by 1 before the math) and master_params in place and reads
// the rest. The options are vector_step_'s (ndadam_op.cpp); empty lists where unused.
TORCH_LIBRARY_FRAGMENT(ndadam_fused, m) {
  m.def(
      "row_statistics_(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor(a!) statistics, "
      "Tensor? grad_scale, Tensor[] master_params) -> ()");
  m.def(
      "apply_row_statistics_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] state_steps, Tensor statistics, Tensor hyper, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor(e!)[] master_params, Tensor[] rounding_seeds) -> ()");
}
