// The C++ CPU kernel of ndadam_fused::scalar_step_ (scalar_step_op.h): Adam with L2 weight decay,
// ε added after bias correction, over every element of every tensor of the call, as torch's
// fused Adam computes it (bias corrections and step size in float64 from the float32 step
// count, elementwise math in the param's opmath type, state in the param's dtype, the unscaled
// gradient written back where a GradScaler's scale is given):
//   g  = grad / grad_scale (stored back into grad) + weight_decay * p
//   m  = β1 m + (1-β1) g;   v = β2 v + (1-β2) g²
//   p -= (lr / (1-β1^t)) m / (sqrt(v) / sqrt(1-β2^t) + ε)
// Scalars are small (norm gains and biases: thousands of elements a model), so a call runs on
// the calling thread unless it holds enough elements to pay for waking the other threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "../ndadam_op.h"
#include "../scalar_step_op.h"
#include "instruction_set.h"

namespace ndadam {

namespace {

// Elements are handed out in pieces of this many; calls of fewer than two pieces' worth run on
// the calling thread. One fp32 tensor through the op (call included), two cores: 4,096 elements
// took 8.0 µs inline and 11.9 µs through at::parallel_for; 32,768 took 26.7 µs on one thread and
// 19.0 µs on two.
constexpr int64_t kElementsPerPiece = 1 << 14;
constexpr int64_t kParallelElements = 2 * kElementsPerPiece;

struct Piece {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// One tensor's coefficients, in float64 as torch's fused Adam computes them.
struct AdamCoefficients {
  double step_size;             // lr / (1 - β1^t)
  double bias_correction2_sqrt;  // sqrt(1 - β2^t)
};

template <typename param_t, bool kUnscale>
struct ScalarPieces {
  using acc_t = at::opmath_type<param_t>;
  std::vector<param_t*> params;
  std::vector<param_t*> grads;
  std::vector<param_t*> exp_avgs;
  std::vector<param_t*> exp_avg_sqs;
  std::vector<AdamCoefficients> coefficients;
  std::vector<Piece> pieces;
  acc_t beta1, beta2, eps, weight_decay, grad_scale;

  NDADAM_ALWAYS_INLINE void operator()(int64_t first_piece, int64_t end_piece) const {
    const acc_t one_minus_beta1 = acc_t(1) - beta1;
    const acc_t one_minus_beta2 = acc_t(1) - beta2;
    for (int64_t k = first_piece; k < end_piece; ++k) {
      const Piece& piece = pieces[k];
      param_t* __restrict__ p = params[piece.tensor];
      param_t* __restrict__ g = grads[piece.tensor];
      param_t* __restrict__ m = exp_avgs[piece.tensor];
      param_t* __restrict__ v = exp_avg_sqs[piece.tensor];
      const acc_t step_size = static_cast<acc_t>(coefficients[piece.tensor].step_size);
      const acc_t bias_correction2_sqrt = static_cast<acc_t>(coefficients[piece.tensor].bias_correction2_sqrt);
#pragma omp simd
      for (int64_t i = piece.begin; i < piece.end; ++i) {
        acc_t grad = static_cast<acc_t>(g[i]);
        if constexpr (kUnscale) {
          grad = grad / grad_scale;
          g[i] = static_cast<param_t>(grad);
        }
        const acc_t w = static_cast<acc_t>(p[i]);
        grad = grad + weight_decay * w;
        const acc_t m_new = beta1 * static_cast<acc_t>(m[i]) + one_minus_beta1 * grad;
        const acc_t v_new = beta2 * static_cast<acc_t>(v[i]) + one_minus_beta2 * grad * grad;
        m[i] = static_cast<param_t>(m_new);
        v[i] = static_cast<param_t>(v_new);
        const acc_t denom = std::sqrt(v_new) / bias_correction2_sqrt + eps;
        p[i] = static_cast<param_t>(w - step_size * m_new / denom);
      }
    }
  }
};

template <typename param_t, bool kUnscale>
void step_scalars(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  const std::vector<float>& steps, const HostHyperparameters& h, double weight_decay,
                  double grad_scale, cpu::InstructionSet instruction_set) {
  using acc_t = at::opmath_type<param_t>;
  ScalarPieces<param_t, kUnscale> work;
  work.beta1 = static_cast<acc_t>(h.beta1);
  work.beta2 = static_cast<acc_t>(h.beta2);
  work.eps = static_cast<acc_t>(h.eps);
  work.weight_decay = static_cast<acc_t>(weight_decay);
  work.grad_scale = static_cast<acc_t>(grad_scale);
  int64_t elements = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    work.params.push_back(params[i].data_ptr<param_t>());
    work.grads.push_back(grads[i].data_ptr<param_t>());
    work.exp_avgs.push_back(exp_avgs[i].data_ptr<param_t>());
    work.exp_avg_sqs.push_back(exp_avg_sqs[i].data_ptr<param_t>());
    const double step = static_cast<double>(steps[i]);
    work.coefficients.push_back(
        {h.lr / (1.0 - std::pow(h.beta1, step)), std::sqrt(1.0 - std::pow(h.beta2, step))});
    const int64_t numel = params[i].numel();
    for (int64_t begin = 0; begin < numel; begin += kElementsPerPiece) {
      work.pieces.push_back({static_cast<int64_t>(i), begin, std::min(numel, begin + kElementsPerPiece)});
    }
    elements += numel;
  }
  const int64_t pieces = static_cast<int64_t>(work.pieces.size());
  if (elements < kParallelElements) {
    cpu::run_with(instruction_set, work, 0, pieces);
    return;
  }
  at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) { cpu::run_with(instruction_set, work, begin, end); });
}

void scalar_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList state_steps, const at::Tensor& hyper, double weight_decay,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* kOp = "ndadam_fused::scalar_step_";
  check_scalar_step_arguments(params, grads, exp_avgs, exp_avg_sqs, state_steps, hyper, weight_decay, grad_scale,
                              found_inf, c10::DeviceType::CPU);
  const HostHyperparameters h = read_and_check_hyperparameters(kOp, hyper);
  if (params.empty()) {
    return;
  }
  const cpu::InstructionSet instruction_set = cpu::chosen_instruction_set(kOp);
  // GradScaler found an inf or a NaN: nothing changes, step counts included (as torch's fused
  // Adam leaves them, which counts the step and takes it back).
  if (cpu_found_inf(found_inf)) {
    return;
  }
  // Everything is checked: from here on the op runs to the end.
  const std::vector<float> steps = increment_cpu_steps(state_steps);
  const double scale = grad_scale.has_value() ? static_cast<double>(*grad_scale->const_data_ptr<float>()) : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), kOp, [&] {
    if (grad_scale.has_value()) {
      step_scalars<scalar_t, true>(params, grads, exp_avgs, exp_avg_sqs, steps, h, weight_decay, scale, instruction_set);
    } else {
      step_scalars<scalar_t, false>(params, grads, exp_avgs, exp_avg_sqs, steps, h, weight_decay, scale, instruction_set);
    }
  });
}

}  // namespace

}  // namespace ndadam

TORCH_LIBRARY_IMPL(ndadam_fused, CPU, m) { m.impl("scalar_step_", &ndadam::scalar_step_cpu); }
