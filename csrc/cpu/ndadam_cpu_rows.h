// One row of the ND-Adam vector step on the CPU: the exact single-pass form and the two-pass
// statistics form of DESIGN.md section 4, built from the formulas of ndadam_row_math.h.
//
// Torch-free (param_t is float, double, or any type that converts to and from acc_t, such as
// c10::BFloat16 and c10::Half), so that tests/cpp/test_row_math.cpp checks the very loops the
// C++ kernel runs. The inner loops are `#pragma omp simd` loops over plain arrays with no
// temporaries: the step is memory bound, and each row is read from memory once.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../ndadam_row_math.h"

namespace ndadam::cpu {

// Sums are taken in blocks of this many elements, each block a vectorized reduction, then
// added up: the rounding error grows with the block length, not with the row length.
constexpr int64_t kSumBlock = 1024;

template <typename param_t, typename acc_t>
inline acc_t load(const param_t* data, int64_t i) {
  return static_cast<acc_t>(data[i]);
}

// The exact form, for rows that stay in cache while they are swept: four sweeps over the row,
// but only the first touch of w, ḡ and m reaches memory, so the traffic is 20 bytes per fp32
// element (read w, ḡ, m; write w, m).
//   1. a = ḡ·w
//   2. g = ḡ - a w (never stored); ||g||²; m' = β1 m + (1-β1) g, stored
//   3. ||w̄||² with w̄ = w - s m' (recomputed rather than stored: it is in cache)
//   4. w' = w̄ / ||w̄||
template <typename param_t, typename acc_t>
void exact_row_step(param_t* __restrict__ w, const param_t* __restrict__ grad, acc_t* __restrict__ m,
                    acc_t* __restrict__ v, int64_t row_length, const StepScalars<acc_t>& k) {
  acc_t grad_dot_w = 0;
  for (int64_t start = 0; start < row_length; start += kSumBlock) {
    const int64_t end = std::min(start + kSumBlock, row_length);
    acc_t partial = 0;
#pragma omp simd reduction(+ : partial)
    for (int64_t i = start; i < end; ++i) {
      partial += load<param_t, acc_t>(grad, i) * load<param_t, acc_t>(w, i);
    }
    grad_dot_w += partial;
  }

  acc_t grad_sq_norm = 0;
  for (int64_t start = 0; start < row_length; start += kSumBlock) {
    const int64_t end = std::min(start + kSumBlock, row_length);
    acc_t partial = 0;
#pragma omp simd reduction(+ : partial)
    for (int64_t i = start; i < end; ++i) {
      const acc_t g = projected_gradient(load<param_t, acc_t>(grad, i), load<param_t, acc_t>(w, i), grad_dot_w);
      partial += g * g;
      m[i] = first_moment_update(m[i], g, k);
    }
    grad_sq_norm += partial;
  }

  const acc_t v_new = second_moment_update(*v, grad_sq_norm, k);
  const acc_t s = step_size(v_new, k);

  acc_t w_bar_sq_norm = 0;
  for (int64_t start = 0; start < row_length; start += kSumBlock) {
    const int64_t end = std::min(start + kSumBlock, row_length);
    acc_t partial = 0;
#pragma omp simd reduction(+ : partial)
    for (int64_t i = start; i < end; ++i) {
      const acc_t w_bar = unnormalized_weight(load<param_t, acc_t>(w, i), m[i], s);
      partial += w_bar * w_bar;
    }
    w_bar_sq_norm += partial;
  }

  const acc_t scale = inverse_norm(w_bar_sq_norm);
#pragma omp simd
  for (int64_t i = 0; i < row_length; ++i) {
    w[i] = static_cast<param_t>(unnormalized_weight(load<param_t, acc_t>(w, i), m[i], s) * scale);
  }
  *v = v_new;
}

// The statistics form, for rows too long to stay in cache: one sweep reads (w, ḡ, m) for the
// six statistics, the closed forms give (v', s, 1/||w̄||), one sweep writes m' and w'.
// 32 bytes per fp32 element, and never a third sweep.
template <typename param_t, typename acc_t>
void statistics_row_step(param_t* __restrict__ w, const param_t* __restrict__ grad, acc_t* __restrict__ m,
                         acc_t* __restrict__ v, int64_t row_length, const StepScalars<acc_t>& k) {
  RowStatistics<acc_t> stats{0, 0, 0, 0, 0, 0};
  for (int64_t start = 0; start < row_length; start += kSumBlock) {
    const int64_t end = std::min(start + kSumBlock, row_length);
    acc_t gw = 0, gg = 0, ww = 0, mw = 0, mm = 0, mg = 0;
#pragma omp simd reduction(+ : gw, gg, ww, mw, mm, mg)
    for (int64_t i = start; i < end; ++i) {
      const acc_t wi = load<param_t, acc_t>(w, i);
      const acc_t gi = load<param_t, acc_t>(grad, i);
      const acc_t mi = m[i];
      gw += gi * wi;
      gg += gi * gi;
      ww += wi * wi;
      mw += mi * wi;
      mm += mi * mi;
      mg += mi * gi;
    }
    stats.grad_dot_w += gw;
    stats.grad_dot_grad += gg;
    stats.w_dot_w += ww;
    stats.m_dot_w += mw;
    stats.m_dot_m += mm;
    stats.m_dot_grad += mg;
  }

  const RowUpdate<acc_t> update = update_from_statistics(stats, *v, k);
  const acc_t a = stats.grad_dot_w;
#pragma omp simd
  for (int64_t i = 0; i < row_length; ++i) {
    const acc_t wi = load<param_t, acc_t>(w, i);
    const acc_t g = projected_gradient(load<param_t, acc_t>(grad, i), wi, a);
    const acc_t m_new = first_moment_update(m[i], g, k);
    m[i] = m_new;
    w[i] = static_cast<param_t>(unnormalized_weight(wi, m_new, update.step_size) * update.inverse_norm);
  }
  *v = update.exp_avg_sq;
}

// The path a row of this length takes: exact when it fits under the cut-over.
template <typename param_t, typename acc_t>
inline void row_step(param_t* w, const param_t* grad, acc_t* m, acc_t* v, int64_t row_length,
                     int64_t max_single_pass_row_length, const StepScalars<acc_t>& k) {
  if (row_length <= max_single_pass_row_length) {
    exact_row_step(w, grad, m, v, row_length, k);
  } else {
    statistics_row_step(w, grad, m, v, row_length, k);
  }
}

}  // namespace ndadam::cpu
