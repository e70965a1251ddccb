// The per-row math of ND-Adam (DESIGN.md sections 1 and 4), written once for every kernel.
//
// Torch-free on purpose: the CUDA kernel (csrc/cuda), the C++ CPU kernel (csrc/cpu) and the
// C++ unit test (tests/cpp) all include this header, so the formulas cannot drift apart.
// Everything here is a scalar function; the kernels own the loops and the reductions.
//
// Notation (per row): w the unit weight row, ḡ its raw gradient, m its first moment (one per
// element), v its second moment (ONE per row), t the step after incrementing, α the lr.
//
//   g  = ḡ - (ḡ·w) w                m' = β1 m + (1-β1) g          v' = β2 v + (1-β2) ||g||²
//   s  = α / (1-β1^t) / (sqrt(v' / (1-β2^t)) + ε)                 w̄ = w - s m'
//   w' = w̄ / ||w̄||
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define NDADAM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NDADAM_HOST_DEVICE inline
#endif

namespace ndadam {

// Rows up to this length take the exact single-pass path: the row is loaded once, kept on
// chip (CUDA: registers, 1024 threads x 8 elements; CPU: three 8192-element fp32 rows are
// 96 KiB, which stay in a core's L2 while the row is swept), and g and ||w̄|| are computed
// explicitly. Longer rows take the two-pass statistics path. The kernels take the cut-over as
// an argument so that tests can force either path; this is its default.
constexpr int64_t kSinglePassMaxRowLength = 8192;

// Where a step's new rows go, a choice every kernel compiles in:
//  - kParam: w' into the param (rounded to nearest in its dtype);
//  - kMasterAndParam: rows are read from the param's fp32 master copy; w' goes into the master
//    and, rounded to nearest, into the param (bf16/fp16 params);
//  - kStochasticParam: w' rounded stochastically into the param (bf16 params; ndadam_rounding.h).
enum class RowWrite { kParam, kMasterAndParam, kStochasticParam };

// Per-step scalars shared by every row of one tensor (one tensor: one step count t).
template <typename acc_t>
struct StepScalars {
  acc_t beta1;
  acc_t one_minus_beta1;
  acc_t beta2;
  acc_t one_minus_beta2;
  acc_t lr_over_bias_correction1;  // α / (1 - β1^t): m̂ = m / (1 - β1^t) folded into the lr
  acc_t bias_correction2;          // 1 - β2^t
  acc_t eps;
};

// Bias corrections are taken in double whatever acc_t is: β^t for t in the thousands loses
// digits in fp32, and this runs once per tensor (CPU) or per warp (CUDA). The CUDA kernel takes
// the two powers in two lanes at once and builds the scalars from them.
template <typename acc_t>
NDADAM_HOST_DEVICE StepScalars<acc_t> make_step_scalars_from_powers(double lr, double beta1, double beta2,
                                                                    double eps, double beta1_power,
                                                                    double beta2_power) {
  StepScalars<acc_t> k;
  k.beta1 = static_cast<acc_t>(beta1);
  k.one_minus_beta1 = static_cast<acc_t>(1.0 - beta1);
  k.beta2 = static_cast<acc_t>(beta2);
  k.one_minus_beta2 = static_cast<acc_t>(1.0 - beta2);
  k.lr_over_bias_correction1 = static_cast<acc_t>(lr / (1.0 - beta1_power));
  k.bias_correction2 = static_cast<acc_t>(1.0 - beta2_power);
  k.eps = static_cast<acc_t>(eps);
  return k;
}

template <typename acc_t>
NDADAM_HOST_DEVICE StepScalars<acc_t> make_step_scalars(double lr, double beta1, double beta2, double eps,
                                                        double step) {
  return make_step_scalars_from_powers<acc_t>(lr, beta1, beta2, eps, pow(beta1, step), pow(beta2, step));
}

NDADAM_HOST_DEVICE float square_root(float x) { return sqrtf(x); }
NDADAM_HOST_DEVICE double square_root(double x) { return sqrt(x); }

// x*y rounded on its own, never fused into a neighbouring add. The closed forms below subtract
// nearly equal products (||g||² = b - 2a² + a²c with a² ≈ b on a row of length 1); with both
// products rounded the same way such a difference is exactly 0, which keeps a length-1 row at
// exactly ±1 on the statistics path too. Compilers contract a*b+c into an FMA (nvcc by
// default, GCC where the target has FMA), hence the intrinsics on the device and, on the host,
// a volatile store the compiler must round to: these run a few times per row, never per element,
// so the inner loops keep their FMAs.
NDADAM_HOST_DEVICE float product_without_fma(float x, float y) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(x, y);
#else
  const volatile float product = x * y;
  return product;
#endif
}
NDADAM_HOST_DEVICE double product_without_fma(double x, double y) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(x, y);
#else
  const volatile double product = x * y;
  return product;
#endif
}

// ---- Elementwise pieces (both paths) ------------------------------------------------------

// g = ḡ - (ḡ·w) w: the gradient with its radial component removed.
template <typename acc_t>
NDADAM_HOST_DEVICE acc_t projected_gradient(acc_t grad, acc_t w, acc_t grad_dot_w) {
  return grad - grad_dot_w * w;
}

// m' = β1 m + (1-β1) g
template <typename acc_t>
NDADAM_HOST_DEVICE acc_t first_moment_update(acc_t m, acc_t g, const StepScalars<acc_t>& k) {
  return k.beta1 * m + k.one_minus_beta1 * g;
}

// w̄ = w - s m'
template <typename acc_t>
NDADAM_HOST_DEVICE acc_t unnormalized_weight(acc_t w, acc_t m_new, acc_t step_size) {
  return w - step_size * m_new;
}

// ---- Per-row scalars -------------------------------------------------------------------------

// v' = β2 v + (1-β2) ||g||²
template <typename acc_t>
NDADAM_HOST_DEVICE acc_t second_moment_update(acc_t v, acc_t grad_sq_norm, const StepScalars<acc_t>& k) {
  return k.beta2 * v + k.one_minus_beta2 * grad_sq_norm;
}

// s = α / (1-β1^t) / (sqrt(v' / (1-β2^t)) + ε). Where the denominator is 0 (eps = 0 and every
// projected gradient so far was 0, so m' = 0 too) the reference divides by 1: the step is 0.
template <typename acc_t>
NDADAM_HOST_DEVICE acc_t step_size(acc_t v_new, const StepScalars<acc_t>& k) {
  acc_t denominator = square_root(v_new / k.bias_correction2) + k.eps;
  if (!(denominator > acc_t(0))) {
    denominator = acc_t(1);
  }
  return k.lr_over_bias_correction1 / denominator;
}

// 1 / ||w̄||: the new row is w̄ times this.
template <typename acc_t>
NDADAM_HOST_DEVICE acc_t inverse_norm(acc_t sq_norm) {
  return acc_t(1) / square_root(sq_norm);
}

// What the new row is w̄ times: 1 / ||w̄||, or exactly 1 where the update is exactly zero (lr = 0,
// or m' = 0 on the whole row, e.g. a step with zero gradients from fresh state, which
// distributed checkpointing runs to create state). There w̄ = w, and dividing it by its norm would
// only move rounding bits of a row that did not change. `m_new_magnitude` is any sum that is 0
// exactly when every element of m' is (Σ|m'|, or ||m'||² from the closed form).
template <typename acc_t>
NDADAM_HOST_DEVICE acc_t row_scale(acc_t w_bar_sq_norm, acc_t m_new_magnitude, const StepScalars<acc_t>& k) {
  if (k.lr_over_bias_correction1 == acc_t(0) || !(m_new_magnitude > acc_t(0))) {
    return acc_t(1);
  }
  return inverse_norm(w_bar_sq_norm);
}

// ---- The statistics path (long rows): section 4's closed forms -----------------------------

// The six dot products one read of (w, ḡ, m) gives.
template <typename acc_t>
struct RowStatistics {
  acc_t grad_dot_w;     // a = ḡ·w
  acc_t grad_dot_grad;  // b = ḡ·ḡ
  acc_t w_dot_w;        // c = w·w
  acc_t m_dot_w;        // d = m·w
  acc_t m_dot_m;        // e = m·m
  acc_t m_dot_grad;     // f = m·ḡ
};

// What the second, elementwise pass needs for a row, plus the row's new second moment.
template <typename acc_t>
struct RowUpdate {
  acc_t exp_avg_sq;    // v'
  acc_t step_size;     // s
  acc_t inverse_norm;  // 1 / ||w̄|| (1 where the update is exactly zero: see row_scale)
};

// From the six statistics to (v', s, 1/||w̄||) without a second look at the row:
//   ||g||² = b - 2a² + a²c      m·g = f - a·d      w·g = a - a·c
//   ||m'||² = β1² e + 2β1(1-β1)(m·g) + (1-β1)² ||g||²
//   w·m'   = β1 d + (1-β1)(w·g)
//   ||w̄||² = c - 2s (w·m') + s² ||m'||²
// The pass that writes the row then computes m' = β1 m + (1-β1)(ḡ - a w), w' = (w - s m')/||w̄||.
template <typename acc_t>
NDADAM_HOST_DEVICE RowUpdate<acc_t> update_from_statistics(const RowStatistics<acc_t>& st, acc_t exp_avg_sq,
                                                           const StepScalars<acc_t>& k) {
  const acc_t a = st.grad_dot_w;
  const acc_t a_sq = product_without_fma(a, a);
  acc_t grad_sq_norm = (st.grad_dot_grad - acc_t(2) * a_sq) + product_without_fma(a_sq, st.w_dot_w);
  // Rounding can leave a tiny negative where the exact value is 0 (ḡ parallel to w).
  grad_sq_norm = grad_sq_norm > acc_t(0) ? grad_sq_norm : acc_t(0);
  const acc_t m_dot_g = st.m_dot_grad - product_without_fma(a, st.m_dot_w);
  const acc_t w_dot_g = a - product_without_fma(a, st.w_dot_w);

  RowUpdate<acc_t> update;
  update.exp_avg_sq = second_moment_update(exp_avg_sq, grad_sq_norm, k);
  update.step_size = step_size(update.exp_avg_sq, k);

  acc_t m_new_sq_norm = k.beta1 * k.beta1 * st.m_dot_m + acc_t(2) * k.beta1 * k.one_minus_beta1 * m_dot_g +
                        k.one_minus_beta1 * k.one_minus_beta1 * grad_sq_norm;
  m_new_sq_norm = m_new_sq_norm > acc_t(0) ? m_new_sq_norm : acc_t(0);
  const acc_t w_dot_m_new = k.beta1 * st.m_dot_w + k.one_minus_beta1 * w_dot_g;
  const acc_t s = update.step_size;
  const acc_t w_bar_sq_norm = st.w_dot_w - acc_t(2) * s * w_dot_m_new + s * s * m_new_sq_norm;
  update.inverse_norm = row_scale(w_bar_sq_norm, m_new_sq_norm, k);
  return update;
}

}  // namespace ndadam
