// The C++ CPU kernels of the rows-split ops (split_rows_op.h): every row of every tensor of a
// call, spread over the intra-op threads (at::parallel_for), with the per-row math of
// ndadam_row_math.h. Phase 1 reads (w, ḡ, m) once; phase 2 reads them once more and writes
// (w, m): 32 bytes per fp32 element (the all-reduce between the phases keeps a rank from
// carrying one row's sums into the next row's sweep, as the single-process kernel does).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "../ndadam_op.h"
#include "../ndadam_rounding.h"
#include "../ndadam_row_math.h"
#include "../split_rows_op.h"
#include "instruction_set.h"
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

// Master copies exist for bf16/fp16 params, stochastic rounding for bf16 (the argument checks
// refused the rest): fn(write) with the call's cpu::RowWrite as a compile-time constant, only for
// the kernels that can occur.
template <typename param_t, typename Fn>
void with_row_write(at::TensorList master_params, at::TensorList rounding_seeds, Fn&& fn) {
  using Write = cpu::RowWrite;
  if constexpr (std::is_same_v<param_t, at::BFloat16> || std::is_same_v<param_t, at::Half>) {
    if (!master_params.empty()) {
      return fn(std::integral_constant<Write, Write::kMasterAndParam>{});
    }
  }
  if constexpr (std::is_same_v<param_t, at::BFloat16>) {
    if (!rounding_seeds.empty()) {
      return fn(std::integral_constant<Write, Write::kStochasticParam>{});
    }
  }
  fn(std::integral_constant<Write, Write::kParam>{});
}

template <typename Fn>
void with_unscale(bool unscale, Fn&& fn) {
  if (unscale) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// Each tensor's w (the param or its master copy), ḡ and m base pointers and row length, read
// once per call: the loops over rows touch no Tensor.
template <typename source_t, typename param_t, typename acc_t>
struct TensorRows {
  std::vector<const source_t*> w;
  std::vector<const param_t*> grad;
  std::vector<const acc_t*> m;
  std::vector<int64_t> length;

  TensorRows(at::TensorList sources, at::TensorList grads, at::TensorList exp_avgs) {
    for (size_t i = 0; i < sources.size(); ++i) {
      w.push_back(sources[i].const_data_ptr<source_t>());
      grad.push_back(grads[i].const_data_ptr<param_t>());
      m.push_back(exp_avgs[i].const_data_ptr<acc_t>());
      length.push_back(local_row_length(sources[i]));
    }
  }

  cpu::RowPointers<source_t, param_t, acc_t> at(int64_t tensor, int64_t row) const {
    const int64_t offset = row * length[tensor];
    return {w[tensor] + offset, grad[tensor] + offset, m[tensor] + offset};
  }

  // The row a thread steps after `row` of ranges[r] (its ranges are [r, end)): none after the last.
  cpu::RowPointers<source_t, param_t, acc_t> after(const std::vector<RowRange>& ranges, int64_t r, int64_t end,
                                               int64_t row) const {
    if (row + 1 < ranges[r].end_row) {
      return at(ranges[r].tensor, row + 1);
    }
    if (r + 1 < end) {
      return at(ranges[r + 1].tensor, ranges[r + 1].first_row);
    }
    return {};
  }
};

// Phase 1 over the rows of ranges [begin, end): w from the param, or from its master copy
// (kFromMaster). Inlined into one copy per instruction set (cpu::run_with).
template <typename param_t, bool kFromMaster, bool kUnscale>
struct StatisticsOfRanges {
  using acc_t = at::opmath_type<param_t>;
  using source_t = std::conditional_t<kFromMaster, acc_t, param_t>;
  const TensorRows<source_t, param_t, acc_t>& rows;
  const std::vector<RowRange>& ranges;
  const std::vector<int64_t>& offsets;
  acc_t* out;
  double grad_scale;

  NDADAM_ALWAYS_INLINE void operator()(int64_t begin, int64_t end) const {
    for (int64_t r = begin; r < end; ++r) {
      const RowRange& range = ranges[r];
      const int64_t length = rows.length[range.tensor];
      for (int64_t row = range.first_row; row < range.end_row; ++row) {
        const cpu::RowPointers<source_t, param_t, acc_t> here = rows.at(range.tensor, row);
        const cpu::Gradient<param_t, acc_t, kUnscale> g{here.grad, static_cast<acc_t>(grad_scale)};
        const RowStatistics<acc_t> st =
            cpu::row_statistics(here.w, g, here.m, length, rows.after(ranges, r, end, row));
        acc_t* row_out = out + (offsets[range.tensor] + row) * kRowStatisticsPerRow;
        row_out[0] = st.grad_dot_w;
        row_out[1] = st.grad_dot_grad;
        row_out[2] = st.w_dot_w;
        row_out[3] = st.m_dot_w;
        row_out[4] = st.m_dot_m;
        row_out[5] = st.m_dot_grad;
      }
    }
  }
};

template <typename param_t, bool kFromMaster, bool kUnscale>
void statistics_of_rows(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList master_params, at::Tensor& statistics, double grad_scale,
                        cpu::InstructionSet instruction_set) {
  using acc_t = at::opmath_type<param_t>;
  const std::vector<RowRange> ranges = row_ranges(params);
  const std::vector<int64_t> offsets = statistics_first_rows(params);
  using source_t = std::conditional_t<kFromMaster, acc_t, param_t>;
  const TensorRows<source_t, param_t, acc_t> rows(kFromMaster ? master_params : params, grads, exp_avgs);
  const StatisticsOfRanges<param_t, kFromMaster, kUnscale> body{rows, ranges, offsets, statistics.data_ptr<acc_t>(),
                                                                grad_scale};
  at::parallel_for(0, static_cast<int64_t>(ranges.size()), 1, [&](int64_t begin, int64_t end) {
    cpu::run_with(instruction_set, body, begin, end);
  });
}

// Phase 2 over the rows of ranges [begin, end): (v', s, r) from the row's full statistics, then
// m' and w' on the local elements, written as kWrite says. Inlined into one copy per
// instruction set (cpu::run_with).
template <typename param_t, cpu::RowWrite kWrite, bool kUnscale>
struct ApplyToRanges {
  using acc_t = at::opmath_type<param_t>;
  using source_t = std::conditional_t<kWrite == cpu::RowWrite::kMasterAndParam, acc_t, param_t>;
  const VectorStepTensors& call;
  const TensorRows<source_t, param_t, acc_t>& rows;
  const std::vector<RowRange>& ranges;
  const std::vector<int64_t>& offsets;
  const std::vector<StepScalars<acc_t>>& scalars;
  const std::vector<uint32_t>& keys;
  const acc_t* reduced;
  double grad_scale;

  NDADAM_ALWAYS_INLINE void operator()(int64_t begin, int64_t end) const {
    for (int64_t r = begin; r < end; ++r) {
      const RowRange& range = ranges[r];
      const int64_t tensor = range.tensor;
      const int64_t length = rows.length[tensor];
      // Rows are read through `rows` (the master copy or the param, as for phase 1) and written
      // through these.
      param_t* w = call.params[tensor].data_ptr<param_t>();
      acc_t* master = nullptr;
      if constexpr (kWrite == cpu::RowWrite::kMasterAndParam) {
        master = call.master_params[tensor].data_ptr<acc_t>();
      }
      acc_t* m = call.exp_avgs[tensor].data_ptr<acc_t>();
      acc_t* v = call.exp_avg_sqs[tensor].data_ptr<acc_t>();
      for (int64_t row = range.first_row; row < range.end_row; ++row) {
        const int64_t offset = row * length;
        const acc_t* st = reduced + (offsets[tensor] + row) * kRowStatisticsPerRow;
        const RowStatistics<acc_t> stats{st[0], st[1], st[2], st[3], st[4], st[5]};
        const RowUpdate<acc_t> update = update_from_statistics(stats, v[row], scalars[tensor]);
        cpu::RowWriter<param_t, acc_t, kWrite> write{w + offset};
        if constexpr (kWrite == cpu::RowWrite::kMasterAndParam) {
          write.master = master + offset;
        } else if constexpr (kWrite == cpu::RowWrite::kStochasticParam) {
          write.key = keys[tensor];
          write.first_index = offset;
        }
        const cpu::RowPointers<source_t, param_t, acc_t> here = rows.at(tensor, row);
        const cpu::Gradient<param_t, acc_t, kUnscale> g{here.grad, static_cast<acc_t>(grad_scale)};
        cpu::apply_row_update(here.w, g, m + offset, length, stats.grad_dot_w, update, scalars[tensor], write,
                              rows.after(ranges, r, end, row));
        v[row] = update.exp_avg_sq;
      }
    }
  }
};

template <typename param_t, cpu::RowWrite kWrite, bool kUnscale>
void apply_to_rows(const VectorStepTensors& call, const std::vector<float>& steps, const at::Tensor& statistics,
                   const HostHyperparameters& h, double grad_scale, cpu::InstructionSet instruction_set) {
  using acc_t = at::opmath_type<param_t>;
  const at::TensorList params = call.params;
  const std::vector<RowRange> ranges = row_ranges(params);
  const std::vector<int64_t> offsets = statistics_first_rows(params);
  std::vector<StepScalars<acc_t>> scalars;
  std::vector<uint32_t> keys(params.size(), 0);
  for (size_t i = 0; i < params.size(); ++i) {
    scalars.push_back(make_step_scalars<acc_t>(h.lr, h.beta1, h.beta2, h.eps, steps[i]));
    if constexpr (kWrite == cpu::RowWrite::kStochasticParam) {
      keys[i] = rounding::step_key(*call.rounding_seeds[i].const_data_ptr<int64_t>(), steps[i]);
    }
  }
  using source_t = std::conditional_t<kWrite == cpu::RowWrite::kMasterAndParam, acc_t, param_t>;
  const TensorRows<source_t, param_t, acc_t> rows(
      kWrite == cpu::RowWrite::kMasterAndParam ? call.master_params : call.params, call.grads, call.exp_avgs);
  const ApplyToRanges<param_t, kWrite, kUnscale> body{
      call, rows, ranges, offsets, scalars, keys, statistics.const_data_ptr<acc_t>(), grad_scale};
  at::parallel_for(0, static_cast<int64_t>(ranges.size()), 1, [&](int64_t begin, int64_t end) {
    cpu::run_with(instruction_set, body, begin, end);
  });
}

void row_statistics_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::Tensor statistics,
                        const std::optional<at::Tensor>& grad_scale, at::TensorList master_params) {
  check_row_statistics_arguments(params, grads, exp_avgs, statistics, grad_scale, master_params, c10::DeviceType::CPU);
  if (params.empty()) {
    return;
  }
  const cpu::InstructionSet instruction_set = cpu::chosen_instruction_set("ndadam_fused::row_statistics_");
  const double scale = grad_scale.has_value() ? static_cast<double>(*grad_scale->const_data_ptr<float>()) : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "ndadam_fused::row_statistics_", [&] {
    with_unscale(grad_scale.has_value(), [&](auto unscale) {
      if (!master_params.empty()) {
        statistics_of_rows<scalar_t, true, decltype(unscale)::value>(params, grads, exp_avgs, master_params, statistics,
                                                                    scale, instruction_set);
      } else {
        statistics_of_rows<scalar_t, false, decltype(unscale)::value>(params, grads, exp_avgs, master_params,
                                                                     statistics, scale, instruction_set);
      }
    });
  });
}

void apply_row_statistics_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList state_steps, const at::Tensor& statistics,
                              const at::Tensor& hyper, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf, at::TensorList master_params,
                              at::TensorList rounding_seeds) {
  const VectorStepTensors call{params, grads, exp_avgs, exp_avg_sqs, state_steps, master_params, rounding_seeds};
  check_apply_row_statistics_arguments(call, statistics, hyper, grad_scale, found_inf, c10::DeviceType::CPU);
  const HostHyperparameters h = read_and_check_hyperparameters("ndadam_fused::apply_row_statistics_", hyper);
  if (params.empty()) {
    return;
  }
  const cpu::InstructionSet instruction_set = cpu::chosen_instruction_set("ndadam_fused::apply_row_statistics_");
  // GradScaler found an inf or a NaN: nothing changes, step counts included.
  if (cpu_found_inf(found_inf)) {
    return;
  }
  const double scale = grad_scale.has_value() ? static_cast<double>(*grad_scale->const_data_ptr<float>()) : 1.0;
  // Everything is checked: from here on the op runs to the end.
  const std::vector<float> steps = increment_cpu_steps(state_steps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "ndadam_fused::apply_row_statistics_", [&] {
                                    with_row_write<scalar_t>(master_params, rounding_seeds, [&](auto write) {
                                      with_unscale(grad_scale.has_value(), [&](auto unscale) {
                                        apply_to_rows<scalar_t, decltype(write)::value, decltype(unscale)::value>(
                                            call, steps, statistics, h, scale, instruction_set);
                                      });
                                    });
                                  });
}

}  // namespace

}  // namespace ndadam

TORCH_LIBRARY_IMPL(ndadam_fused, CPU, m) {
  m.impl("row_statistics_", &ndadam::row_statistics_cpu);
  m.impl("apply_row_statistics_", &ndadam::apply_row_statistics_cpu);
}
