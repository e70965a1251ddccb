// The C++ CPU kernel of ndadam_fused::vector_step_: every row of every tensor of the call,
// spread over the intra-op threads (at::parallel_for, OpenMP), each row through
// ndadam_cpu_rows.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <type_traits>
#include <vector>

#include "../ndadam_op.h"
#include "../ndadam_rounding.h"
#include "../ndadam_row_math.h"
#include "instruction_set.h"
#include "ndadam_cpu_rows.h"

namespace ndadam {

namespace {

// Work is cut into runs of whole rows of about this many elements: large enough that a run
// costs far more than claiming it, small enough that the threads finish together. Threads claim
// runs one at a time from a shared counter (StepRuns) rather than taking a contiguous range
// each: a run's cost per element depends on its row length (rows past the 48 KiB L1 cost more),
// so equal element counts are unequal work. WRN-28-10 fp32 on two cores, contiguous ranges: the
// thread with the stage-3 rows of 5,760 ran 1.1-1.5 ms (7%) longer than the other, and the step
// was 2-6% slower than with claimed runs.
constexpr int64_t kElementsPerRun = 1 << 16;

struct RowRun {
  int64_t tensor;
  int64_t first_row;
  int64_t end_row;
};

// One call's tensors as raw pointers, for a kernel that writes rows with `kWrite` and unscales
// gradients when `kUnscale`. `sources` are where rows are read from: the params, or their
// master copies (kMasterAndParam).
template <typename param_t, cpu::RowWrite kWrite, bool kUnscale>
struct Work {
  using acc_t = at::opmath_type<param_t>;
  using source_t = std::conditional_t<kWrite == cpu::RowWrite::kMasterAndParam, acc_t, param_t>;
  std::vector<param_t*> params;
  std::vector<const source_t*> sources;
  std::vector<acc_t*> masters;
  std::vector<const param_t*> grads;
  std::vector<acc_t*> exp_avgs;
  std::vector<acc_t*> exp_avg_sqs;
  std::vector<int64_t> row_lengths;
  std::vector<StepScalars<acc_t>> scalars;
  std::vector<uint32_t> rounding_keys;
  std::vector<RowRun> runs;
  int64_t single_pass_limit;
  acc_t grad_scale;
  // The first run no thread has claimed yet.
  std::atomic<int64_t>* unclaimed_run = nullptr;

  cpu::RowPointers<source_t, param_t, acc_t> row_pointers(int64_t tensor, int64_t row) const {
    const int64_t offset = row * row_lengths[tensor];
    return {sources[tensor] + offset, grads[tensor] + offset, exp_avgs[tensor] + offset};
  }
};

// One thread's share of the runs: it claims runs until none is left, whatever slot of
// at::parallel_for it was given (a single caller, as in a nested parallel region, steps them
// all). Each run is claimed before the one in hand is stepped, so that the kernel prefetches its
// first row. Inlined into one copy per instruction set (cpu::run_with, instruction_set.h).
template <typename param_t, cpu::RowWrite kWrite, bool kUnscale>
struct StepRuns {
  const Work<param_t, kWrite, kUnscale>& work;

  NDADAM_ALWAYS_INLINE void operator()(int64_t /*first_slot*/, int64_t /*end_slot*/) const {
    using acc_t = at::opmath_type<param_t>;
    using source_t = typename Work<param_t, kWrite, kUnscale>::source_t;
    const int64_t runs = static_cast<int64_t>(work.runs.size());
    std::atomic<int64_t>& unclaimed = *work.unclaimed_run;
    for (int64_t r = unclaimed.fetch_add(1, std::memory_order_relaxed); r < runs;) {
      const int64_t next_run = unclaimed.fetch_add(1, std::memory_order_relaxed);
      const RowRun& run = work.runs[r];
      const int64_t tensor = run.tensor;
      const int64_t length = work.row_lengths[tensor];
      // Sums of the row about to be stepped, when the previous row's last sweep took them.
      cpu::RowCarry<acc_t> carried;
      for (int64_t row = run.first_row; row < run.end_row; ++row) {
        // The next row this thread steps, for the kernel to prefetch.
        cpu::RowPointers<source_t, param_t, acc_t> next;
        if (row + 1 < run.end_row) {
          next = work.row_pointers(tensor, row + 1);
        } else if (next_run < runs) {
          next = work.row_pointers(work.runs[next_run].tensor, work.runs[next_run].first_row);
        }
        const int64_t offset = row * length;
        cpu::RowWriter<param_t, acc_t, kWrite> write{work.params[tensor] + offset};
        if constexpr (kWrite == cpu::RowWrite::kMasterAndParam) {
          write.master = work.masters[tensor] + offset;
        } else if constexpr (kWrite == cpu::RowWrite::kStochasticParam) {
          write.key = work.rounding_keys[tensor];
          write.first_index = offset;
        }
        const cpu::Gradient<param_t, acc_t, kUnscale> grad{work.grads[tensor] + offset, work.grad_scale};
        carried = cpu::row_step(work.sources[tensor] + offset, grad, work.exp_avgs[tensor] + offset,
                                work.exp_avg_sqs[tensor] + row, length, work.single_pass_limit, work.scalars[tensor],
                                write, next, carried, row + 1 < run.end_row);
      }
      r = next_run;
    }
  }
};

// What a call holds besides the tensors: the step's scalars and GradScaler's scale, read on the host.
struct CallScalars {
  double lr, beta1, beta2, eps;
  double grad_scale;  // 1 without a GradScaler
  bool unscale;
};

template <typename param_t, cpu::RowWrite kWrite, bool kUnscale>
void update_rows(const VectorStepTensors& call, const std::vector<float>& steps, const CallScalars& scalars,
                 int64_t single_pass_limit, cpu::InstructionSet instruction_set) {
  using acc_t = at::opmath_type<param_t>;
  const int64_t tensors = static_cast<int64_t>(call.params.size());

  Work<param_t, kWrite, kUnscale> work;
  work.single_pass_limit = single_pass_limit;
  work.grad_scale = static_cast<acc_t>(scalars.grad_scale);
  for (int64_t i = 0; i < tensors; ++i) {
    param_t* param = call.params[i].data_ptr<param_t>();
    work.params.push_back(param);
    if constexpr (kWrite == cpu::RowWrite::kMasterAndParam) {
      acc_t* master = call.master_params[i].data_ptr<acc_t>();
      work.masters.push_back(master);
      work.sources.push_back(master);
    } else {
      work.sources.push_back(param);
    }
    if constexpr (kWrite == cpu::RowWrite::kStochasticParam) {
      work.rounding_keys.push_back(rounding::step_key(*call.rounding_seeds[i].const_data_ptr<int64_t>(), steps[i]));
    }
    work.grads.push_back(call.grads[i].const_data_ptr<param_t>());
    work.exp_avgs.push_back(call.exp_avgs[i].data_ptr<acc_t>());
    work.exp_avg_sqs.push_back(call.exp_avg_sqs[i].data_ptr<acc_t>());
    work.row_lengths.push_back(row_length(call.params[i]));
    work.scalars.push_back(make_step_scalars<acc_t>(scalars.lr, scalars.beta1, scalars.beta2, scalars.eps, steps[i]));
    const int64_t rows = row_count(call.params[i]);
    const int64_t length = row_length(call.params[i]);
    if (rows == 0 || length == 0) {
      continue;
    }
    const int64_t rows_per_run = std::max<int64_t>(1, kElementsPerRun / length);
    for (int64_t first = 0; first < rows; first += rows_per_run) {
      work.runs.push_back({i, first, std::min(rows, first + rows_per_run)});
    }
  }

  std::atomic<int64_t> unclaimed_run{0};
  work.unclaimed_run = &unclaimed_run;
  const StepRuns<param_t, kWrite, kUnscale> step_runs{work};
  // One slot per thread that has a run to claim.
  const int64_t slots = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(work.runs.size()));
  at::parallel_for(0, slots, 1, [&](int64_t begin, int64_t end) {
    cpu::run_with(instruction_set, step_runs, begin, end);
  });
}

// The kernel for this call's way of writing rows and of reading gradients. Master copies exist
// for bf16/fp16 params only and stochastic rounding for bf16 (the argument checks refused the
// rest): only those kernels are compiled.
template <typename param_t>
void update_rows_for_options(const VectorStepTensors& call, const std::vector<float>& steps,
                             const CallScalars& scalars, int64_t single_pass_limit, cpu::InstructionSet instruction_set) {
  auto with_unscale = [&](auto write) {
    constexpr cpu::RowWrite kWrite = decltype(write)::value;
    if (scalars.unscale) {
      update_rows<param_t, kWrite, true>(call, steps, scalars, single_pass_limit, instruction_set);
    } else {
      update_rows<param_t, kWrite, false>(call, steps, scalars, single_pass_limit, instruction_set);
    }
  };
  using Write = cpu::RowWrite;
  if constexpr (std::is_same_v<param_t, at::BFloat16> || std::is_same_v<param_t, at::Half>) {
    if (!call.master_params.empty()) {
      return with_unscale(std::integral_constant<Write, Write::kMasterAndParam>{});
    }
  }
  if constexpr (std::is_same_v<param_t, at::BFloat16>) {
    if (!call.rounding_seeds.empty()) {
      return with_unscale(std::integral_constant<Write, Write::kStochasticParam>{});
    }
  }
  with_unscale(std::integral_constant<Write, Write::kParam>{});
}

void vector_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList state_steps, const at::Tensor& hyper,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                     at::TensorList master_params, at::TensorList rounding_seeds,
                     int64_t max_single_pass_row_length) {
  const VectorStepTensors call{params, grads, exp_avgs, exp_avg_sqs, state_steps, master_params, rounding_seeds};
  check_vector_step_arguments(call, hyper, grad_scale, found_inf, max_single_pass_row_length, c10::DeviceType::CPU);
  // On the CPU the hyperparameters are read here, on the host, and checked like the rest.
  const HostHyperparameters h = read_and_check_hyperparameters(hyper);
  if (params.empty()) {
    return;
  }
  const cpu::InstructionSet instruction_set = cpu::chosen_instruction_set("ndadam_fused::vector_step_");
  // GradScaler found an inf or a NaN: nothing changes, step counts included.
  if (cpu_found_inf(found_inf)) {
    return;
  }
  CallScalars scalars{h.lr, h.beta1, h.beta2, h.eps, 1.0, false};
  if (grad_scale.has_value()) {
    scalars.grad_scale = static_cast<double>(*grad_scale->const_data_ptr<float>());
    scalars.unscale = true;
  }
  // Everything is checked: from here on the op runs to the end.
  const std::vector<float> steps = increment_cpu_steps(state_steps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "ndadam_fused::vector_step_", [&] {
    update_rows_for_options<scalar_t>(call, steps, scalars, resolve_single_pass_limit(max_single_pass_row_length),
                                      instruction_set);
  });
}

}  // namespace

}  // namespace ndadam

TORCH_LIBRARY_IMPL(ndadam_fused, CPU, m) { m.impl("vector_step_", &ndadam::vector_step_cpu); }
