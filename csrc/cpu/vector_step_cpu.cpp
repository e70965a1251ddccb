// The C++ CPU kernel of ndadam_fused::vector_step_: every row of every tensor of the call,
// spread over the intra-op threads (at::parallel_for, OpenMP), each row through
// ndadam_cpu_rows.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "../ndadam_op.h"
#include "../ndadam_row_math.h"
#include "ndadam_cpu_rows.h"

namespace ndadam {

namespace {

// Work is cut into runs of whole rows of about this many elements: large enough that a run
// costs far more than scheduling it, small enough that two threads get equal shares of a model
// whose tensors differ in size (at::parallel_for hands each thread a contiguous range of runs).
constexpr int64_t kElementsPerRun = 1 << 16;

struct RowRun {
  int64_t tensor;
  int64_t first_row;
  int64_t end_row;
};

template <typename param_t>
void update_rows(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 const std::vector<double>& steps, double lr, double beta1, double beta2, double eps,
                 int64_t single_pass_limit) {
  using acc_t = at::opmath_type<param_t>;
  const int64_t tensors = static_cast<int64_t>(params.size());

  std::vector<StepScalars<acc_t>> scalars(tensors);
  std::vector<RowRun> runs;
  for (int64_t i = 0; i < tensors; ++i) {
    scalars[i] = make_step_scalars<acc_t>(lr, beta1, beta2, eps, steps[i]);
    const int64_t rows = row_count(params[i]);
    const int64_t length = row_length(params[i]);
    if (rows == 0 || length == 0) {
      continue;
    }
    const int64_t rows_per_run = std::max<int64_t>(1, kElementsPerRun / length);
    for (int64_t first = 0; first < rows; first += rows_per_run) {
      runs.push_back({i, first, std::min(rows, first + rows_per_run)});
    }
  }

  at::parallel_for(0, static_cast<int64_t>(runs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowRun& run = runs[r];
      const int64_t length = row_length(params[run.tensor]);
      param_t* w = params[run.tensor].data_ptr<param_t>();
      const param_t* grad = grads[run.tensor].const_data_ptr<param_t>();
      acc_t* m = exp_avgs[run.tensor].data_ptr<acc_t>();
      acc_t* v = exp_avg_sqs[run.tensor].data_ptr<acc_t>();
      for (int64_t row = run.first_row; row < run.end_row; ++row) {
        cpu::row_step<param_t, acc_t>(w + row * length, grad + row * length, m + row * length, v + row, length,
                                      single_pass_limit, scalars[run.tensor]);
      }
    }
  });
}

void vector_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList state_steps, const at::Tensor& lr, double beta1,
                     double beta2, double eps, int64_t max_single_pass_row_length) {
  check_vector_step_arguments(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
                              max_single_pass_row_length, c10::DeviceType::CPU);
  if (params.empty()) {
    return;
  }
  const double lr_value = lr.item<double>();
  // Everything is checked: from here on the op runs to the end.
  std::vector<double> steps(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    float* step = state_steps[i].data_ptr<float>();
    // In float32, as the reference increments its float32 step tensor.
    *step = *step + 1.0f;
    steps[i] = static_cast<double>(*step);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "ndadam_fused::vector_step_", [&] {
    update_rows<scalar_t>(params, grads, exp_avgs, exp_avg_sqs, steps, lr_value, beta1, beta2, eps,
                          resolve_single_pass_limit(max_single_pass_row_length));
  });
}

}  // namespace

}  // namespace ndadam

TORCH_LIBRARY_IMPL(ndadam_fused, CPU, m) { m.impl("vector_step_", &ndadam::vector_step_cpu); }
