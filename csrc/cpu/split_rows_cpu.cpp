// The C++ CPU kernels of the rows-split ops (split_rows_op.h): every row of every tensor of a
// call, spread over the intra-op threads (at::parallel_for), with the per-row math of
// ndadam_row_math.h. Phase 1 reads (w, ḡ, m) once; phase 2 reads them once more and writes
// (w, m): 32 bytes per fp32 element, like the single-process statistics path.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../ndadam_row_math.h"
#include "../split_rows_op.h"
#include "ndadam_cpu_rows.h"

namespace ndadam {

namespace {

// Rows are handed to threads in ranges of about this many elements (at least one row).
constexpr int64_t kElementsPerRange = 1 << 16;

struct RowRange {
  int64_t tensor;
  int64_t first_row;
  int64_t end_row;
};

int64_t local_row_length(const at::Tensor& param) {
  int64_t length = 1;
  for (int64_t d = 1; d < param.dim(); ++d) {
    length *= param.size(d);
  }
  return length;
}

// Every row of every tensor, cut into ranges; a row of length 0 (a rank that holds no column of
// it) is still a row: its statistics are 0, and its second moment is updated.
std::vector<RowRange> row_ranges(at::TensorList params) {
  std::vector<RowRange> ranges;
  for (int64_t i = 0; i < static_cast<int64_t>(params.size()); ++i) {
    const int64_t rows = params[i].size(0);
    const int64_t rows_per_range = std::max<int64_t>(1, kElementsPerRange / std::max<int64_t>(1, local_row_length(params[i])));
    for (int64_t first = 0; first < rows; first += rows_per_range) {
      ranges.push_back({i, first, std::min(rows, first + rows_per_range)});
    }
  }
  return ranges;
}

std::vector<int64_t> first_rows(at::TensorList params) {
  std::vector<int64_t> offsets(params.size(), 0);
  int64_t rows = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    offsets[i] = rows;
    rows += params[i].size(0);
  }
  return offsets;
}

// [ḡ·w, ḡ·ḡ, w·w, m·w, m·m, m·ḡ] over one row's local elements, summed in blocks of
// cpu::kSumBlock (the rounding error grows with the block, not with the row).
template <typename param_t, typename acc_t>
void local_row_statistics(const param_t* __restrict__ w, const param_t* __restrict__ grad, const acc_t* __restrict__ m,
                          int64_t length, acc_t* __restrict__ out) {
  acc_t sums[kRowStatisticsPerRow] = {0, 0, 0, 0, 0, 0};
  for (int64_t start = 0; start < length; start += cpu::kSumBlock) {
    const int64_t end = std::min(start + cpu::kSumBlock, length);
    acc_t gw = 0, gg = 0, ww = 0, mw = 0, mm = 0, mg = 0;
#pragma omp simd reduction(+ : gw, gg, ww, mw, mm, mg)
    for (int64_t i = start; i < end; ++i) {
      const acc_t wi = cpu::load<param_t, acc_t>(w, i);
      const acc_t gi = cpu::load<param_t, acc_t>(grad, i);
      const acc_t mi = m[i];
      gw += gi * wi;
      gg += gi * gi;
      ww += wi * wi;
      mw += mi * wi;
      mm += mi * mi;
      mg += mi * gi;
    }
    sums[0] += gw;
    sums[1] += gg;
    sums[2] += ww;
    sums[3] += mw;
    sums[4] += mm;
    sums[5] += mg;
  }
  std::copy(sums, sums + kRowStatisticsPerRow, out);
}

// One row from its full statistics: (v', s, 1/||w̄||) by the closed forms, then
// m' = β1 m + (1-β1)(ḡ - a w) and w' = (w - s m') / ||w̄|| on the local elements.
template <typename param_t, typename acc_t>
void apply_row(param_t* __restrict__ w, const param_t* __restrict__ grad, acc_t* __restrict__ m, acc_t* v,
               int64_t length, const acc_t* statistics, const StepScalars<acc_t>& k) {
  const RowStatistics<acc_t> st{statistics[0], statistics[1], statistics[2],
                                statistics[3], statistics[4], statistics[5]};
  const RowUpdate<acc_t> update = update_from_statistics(st, *v, k);
  const acc_t a = st.grad_dot_w;
#pragma omp simd
  for (int64_t i = 0; i < length; ++i) {
    const acc_t wi = cpu::load<param_t, acc_t>(w, i);
    const acc_t g = projected_gradient(cpu::load<param_t, acc_t>(grad, i), wi, a);
    const acc_t m_new = first_moment_update(m[i], g, k);
    m[i] = m_new;
    w[i] = static_cast<param_t>(unnormalized_weight(wi, m_new, update.step_size) * update.inverse_norm);
  }
  *v = update.exp_avg_sq;
}

template <typename param_t>
void statistics_of_rows(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::Tensor& statistics) {
  using acc_t = at::opmath_type<param_t>;
  const std::vector<RowRange> ranges = row_ranges(params);
  const std::vector<int64_t> offsets = first_rows(params);
  acc_t* out = statistics.data_ptr<acc_t>();
  at::parallel_for(0, static_cast<int64_t>(ranges.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowRange& range = ranges[r];
      const int64_t length = local_row_length(params[range.tensor]);
      const param_t* w = params[range.tensor].const_data_ptr<param_t>();
      const param_t* grad = grads[range.tensor].const_data_ptr<param_t>();
      const acc_t* m = exp_avgs[range.tensor].const_data_ptr<acc_t>();
      for (int64_t row = range.first_row; row < range.end_row; ++row) {
        local_row_statistics<param_t, acc_t>(w + row * length, grad + row * length, m + row * length, length,
                                             out + (offsets[range.tensor] + row) * kRowStatisticsPerRow);
      }
    }
  });
}

template <typename param_t>
void apply_to_rows(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   const std::vector<double>& steps, const at::Tensor& statistics, double lr, double beta1,
                   double beta2, double eps) {
  using acc_t = at::opmath_type<param_t>;
  const std::vector<RowRange> ranges = row_ranges(params);
  const std::vector<int64_t> offsets = first_rows(params);
  std::vector<StepScalars<acc_t>> scalars;
  for (double step : steps) {
    scalars.push_back(make_step_scalars<acc_t>(lr, beta1, beta2, eps, step));
  }
  const acc_t* reduced = statistics.const_data_ptr<acc_t>();
  at::parallel_for(0, static_cast<int64_t>(ranges.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowRange& range = ranges[r];
      const int64_t length = local_row_length(params[range.tensor]);
      param_t* w = params[range.tensor].data_ptr<param_t>();
      const param_t* grad = grads[range.tensor].const_data_ptr<param_t>();
      acc_t* m = exp_avgs[range.tensor].data_ptr<acc_t>();
      acc_t* v = exp_avg_sqs[range.tensor].data_ptr<acc_t>();
      for (int64_t row = range.first_row; row < range.end_row; ++row) {
        apply_row<param_t, acc_t>(w + row * length, grad + row * length, m + row * length, v + row, length,
                                  reduced + (offsets[range.tensor] + row) * kRowStatisticsPerRow,
                                  scalars[range.tensor]);
      }
    }
  });
}

void row_statistics_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::Tensor statistics) {
  check_row_statistics_arguments(params, grads, exp_avgs, statistics, c10::DeviceType::CPU);
  if (params.empty()) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "ndadam_fused::row_statistics_",
                                  [&] { statistics_of_rows<scalar_t>(params, grads, exp_avgs, statistics); });
}

void apply_row_statistics_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList state_steps, const at::Tensor& statistics,
                              const at::Tensor& lr, double beta1, double beta2, double eps) {
  check_apply_row_statistics_arguments(params, grads, exp_avgs, exp_avg_sqs, state_steps, statistics, lr, beta1, beta2,
                                       eps, c10::DeviceType::CPU);
  if (params.empty()) {
    return;
  }
  const double lr_value = lr.item<double>();
  // Everything is checked: from here on the op runs to the end.
  std::vector<double> steps(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    float* step = state_steps[i].data_ptr<float>();
    *step = *step + 1.0f;  // in float32, as the reference increments its float32 step tensor
    steps[i] = static_cast<double>(*step);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "ndadam_fused::apply_row_statistics_", [&] {
                                    apply_to_rows<scalar_t>(params, grads, exp_avgs, exp_avg_sqs, steps, statistics,
                                                            lr_value, beta1, beta2, eps);
                                  });
}

}  // namespace

}  // namespace ndadam

TORCH_LIBRARY_IMPL(ndadam_fused, CPU, m) {
  m.impl("row_statistics_", &ndadam::row_statistics_cpu);
  m.impl("apply_row_statistics_", &ndadam::apply_row_statistics_cpu);
}
