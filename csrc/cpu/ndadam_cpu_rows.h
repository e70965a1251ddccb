// One row of the ND-Adam vector step on the CPU: the exact form and the statistics form of
// DESIGN.md section 4, built from the formulas of ndadam_row_math.h. In a run of rows of one
// tensor, each row's last sweep also takes the next row's sums, so that each row is read from
// memory once whatever its length.
//
// Torch-free (param_t is float, double, or any type that converts to and from acc_t, such as
// c10::BFloat16 and c10::Half), so that tests/cpp/test_row_math.cpp checks the very loops the
// C++ kernel runs. The inner loops are `#pragma omp simd` loops over plain arrays with no
// temporaries: the step is memory bound, and each row is read from memory once.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../ndadam_rounding.h"
#include "../ndadam_row_math.h"

namespace ndadam::cpu {

// The row functions are inlined into the kernel's loops, which are compiled once per
// instruction set (vector_step_cpu.cpp): only an inlined body gets the caller's wider vectors.
#if defined(__GNUC__)
#define NDADAM_ALWAYS_INLINE inline __attribute__((always_inline))
#define NDADAM_PREFETCH_TO_L1(address) __builtin_prefetch((address), 0, 3)
#define NDADAM_PREFETCH_TO_L2(address) __builtin_prefetch((address), 0, 2)
#else
#define NDADAM_ALWAYS_INLINE inline
#define NDADAM_PREFETCH_TO_L1(address) ((void)(address))
#define NDADAM_PREFETCH_TO_L2(address) ((void)(address))
#endif

// Sums are taken in blocks of this many elements, each block a vectorized reduction, then
// added up: the rounding error grows with the block length, not with the row length. Prefetches
// are issued per block too (a block is 16 cache lines of fp32).
constexpr int64_t kSumBlock = 256;

template <typename param_t, typename acc_t>
NDADAM_ALWAYS_INLINE acc_t load(const param_t* data, int64_t i) {
  return static_cast<acc_t>(data[i]);
}

// ḡ of a row as the kernel reads it: the stored gradient, or (kUnscale) the stored gradient
// divided by GradScaler's scale, per element in acc_t as the reference divides it. A compile-time
// choice: a division in every inner loop would cost the unscaled steps too.
template <typename grad_t, typename acc_t, bool kUnscale>
struct Gradient {
  const grad_t* __restrict__ data;
  acc_t scale;  // used with kUnscale only

  NDADAM_ALWAYS_INLINE acc_t operator()(int64_t i) const {
    if constexpr (kUnscale) {
      return static_cast<acc_t>(data[i]) / scale;
    } else {
      return static_cast<acc_t>(data[i]);
    }
  }
};

using ndadam::RowWrite;

// Where a row's new values go (the last sweep of either path calls it once per element), as
// kWrite says (ndadam_row_math.h); for kStochasticParam the random bits are drawn for element
// `first_index + i` of the tensor with this step's `key`.

template <typename param_t, typename acc_t, RowWrite kWrite>
struct RowWriter {
  param_t* param;
  acc_t* master = nullptr;
  uint32_t key = 0;
  int64_t first_index = 0;

  NDADAM_ALWAYS_INLINE void operator()(int64_t i, acc_t value) const {
    if constexpr (kWrite == RowWrite::kParam) {
      param[i] = static_cast<param_t>(value);
    } else if constexpr (kWrite == RowWrite::kMasterAndParam) {
      master[i] = value;
      param[i] = static_cast<param_t>(value);
    } else {
      const float x = static_cast<float>(value);
      param[i] = static_cast<param_t>(rounding::stochastically_rounded(x, rounding::random_bits(key, first_index + i)));
    }
  }
};

// Where a row's w, ḡ and m start. The row functions take the row after this one as `next`, to
// prefetch while this one is swept in cache (null pointers: none).
template <typename source_t, typename grad_t, typename acc_t>
struct RowPointers {
  const source_t* w = nullptr;
  const grad_t* grad = nullptr;
  const acc_t* m = nullptr;
};

// Rows up to this length are prefetched into L1 (this row and the next, three arrays each,
// fit in a 48 KiB L1 for fp32), longer ones into L2.
constexpr int64_t kPrefetchToL1MaxRowLength = 1024;

template <typename T>
NDADAM_ALWAYS_INLINE void prefetch_block(const T* data, int64_t start, int64_t end, int64_t row_length) {
  if (data == nullptr) {
    return;
  }
  constexpr int64_t kPerLine = 64 / sizeof(T) > 0 ? 64 / sizeof(T) : 1;
  if (row_length <= kPrefetchToL1MaxRowLength) {
    for (int64_t i = start; i < end; i += kPerLine) {
      NDADAM_PREFETCH_TO_L1(data + i);
    }
  } else {
    for (int64_t i = start; i < end; i += kPerLine) {
      NDADAM_PREFETCH_TO_L2(data + i);
    }
  }
}

// Sums of a row, taken by the previous row's last sweep (known) or not yet: all six for the
// statistics form, ḡ·w and w·w (what its first sweep sums) for the exact form.
template <typename acc_t>
struct RowCarry {
  RowStatistics<acc_t> stats{0, 0, 0, 0, 0, 0};
  bool known = false;
};

// The exact form, for rows that stay in cache while they are swept: three sweeps over the row,
// but only the first touch of w, ḡ and m reaches memory, so the traffic is 20 bytes per fp32
// element (read w, ḡ, m; write w, m).
//   1. a = ḡ·w and c = w·w
//   2. g = ḡ - a w (explicit, never stored); ||g||²; m' = β1 m + (1-β1) g, stored; w·m', ||m'||²
//   3. w' = (w - s m') / ||w̄|| with ||w̄||² = c - 2s (w·m') + s² ||m'||² (w' = w where the
//      update is exactly zero: row_scale)
// g is explicit, so ||g||² has no cancellation (the statistics form's b - 2a² + a²c has, when ḡ is
// nearly radial); ||w̄||² from w·m' and ||m'||² is a sum of a unit c and small terms. Sweeps 2 and
// 3 read this row from cache, so they prefetch the next row (w and ḡ in sweep 2, m in sweep 3):
// the memory system works on row r+1 while the core finishes row r.
//
// `w` is where the row is read from (the param, or its master copy); `write` stores w' (it may
// write through `w`'s memory: w is not restrict).
//
// `carried`: this row's ḡ·w and w·w when known, and the sums of the next row (same length, same
// tensor) are wanted when `carry_next`: sweep 3 then takes the next row's sweep 1 along (its w
// and ḡ are in cache by then, prefetched in sweep 2), so that a run of rows costs two sweeps a
// row after its first. The sums are the same blocks in the same order either way.
template <typename source_t, typename acc_t, typename GradientRow, typename Writer, typename Next>
NDADAM_ALWAYS_INLINE RowCarry<acc_t> exact_row_step(const source_t* w, const GradientRow& grad, acc_t* __restrict__ m,
                                                   acc_t* __restrict__ v, int64_t row_length,
                                                   const StepScalars<acc_t>& k, const Writer& write, const Next& next,
                                                   const RowCarry<acc_t>& carried = {}, bool carry_next = false) {
  acc_t grad_dot_w = carried.stats.grad_dot_w;
  acc_t w_dot_w = carried.stats.w_dot_w;
  for (int64_t start = 0; !carried.known && start < row_length; start += kSumBlock) {
    const int64_t end = std::min(start + kSumBlock, row_length);
    acc_t gw = 0, ww = 0;
#pragma omp simd reduction(+ : gw, ww)
    for (int64_t i = start; i < end; ++i) {
      const acc_t wi = load<source_t, acc_t>(w, i);
      gw += grad(i) * wi;
      ww += wi * wi;
    }
    grad_dot_w += gw;
    w_dot_w += ww;
  }

  acc_t grad_sq_norm = 0;
  acc_t m_new_abs_sum = 0;  // Σ|m'|: 0 exactly when the update is (see row_scale)
  acc_t w_dot_m_new = 0;
  acc_t m_new_sq_norm = 0;
  for (int64_t start = 0; start < row_length; start += kSumBlock) {
    const int64_t end = std::min(start + kSumBlock, row_length);
    prefetch_block(next.w, start, end, row_length);
    prefetch_block(next.grad, start, end, row_length);
    acc_t gg = 0, m_abs = 0, wm = 0, mm = 0;
#pragma omp simd reduction(+ : gg, m_abs, wm, mm)
    for (int64_t i = start; i < end; ++i) {
      const acc_t wi = load<source_t, acc_t>(w, i);
      const acc_t g = projected_gradient(grad(i), wi, grad_dot_w);
      gg += g * g;
      const acc_t m_new = first_moment_update(m[i], g, k);
      m_abs += m_new < acc_t(0) ? -m_new : m_new;
      wm += wi * m_new;
      mm += m_new * m_new;
      m[i] = m_new;
    }
    grad_sq_norm += gg;
    m_new_abs_sum += m_abs;
    w_dot_m_new += wm;
    m_new_sq_norm += mm;
  }

  const acc_t v_new = second_moment_update(*v, grad_sq_norm, k);
  const acc_t s = step_size(v_new, k);
  const acc_t w_bar_sq_norm = w_dot_w - acc_t(2) * s * w_dot_m_new + s * s * m_new_sq_norm;
  const acc_t scale = row_scale(w_bar_sq_norm, m_new_abs_sum, k);
  RowCarry<acc_t> next_carry;
  GradientRow next_grad = grad;
  next_grad.data = next.grad;
  for (int64_t start = 0; start < row_length; start += kSumBlock) {
    const int64_t end = std::min(start + kSumBlock, row_length);
    prefetch_block(next.m, start, end, row_length);
    if (carry_next) {
      acc_t gw = 0, ww = 0;
#pragma omp simd reduction(+ : gw, ww)
      for (int64_t i = start; i < end; ++i) {
        write(i, unnormalized_weight(load<source_t, acc_t>(w, i), m[i], s) * scale);
        const acc_t next_wi = load<source_t, acc_t>(next.w, i);
        gw += next_grad(i) * next_wi;
        ww += next_wi * next_wi;
      }
      next_carry.stats.grad_dot_w += gw;
      next_carry.stats.w_dot_w += ww;
    } else {
#pragma omp simd
      for (int64_t i = start; i < end; ++i) {
        write(i, unnormalized_weight(load<source_t, acc_t>(w, i), m[i], s) * scale);
      }
    }
  }
  next_carry.known = carry_next;
  *v = v_new;
  return next_carry;
}

// The six statistics [ḡ·w, ḡ·ḡ, w·w, m·w, m·m, m·ḡ] of one row (or of a rank's piece of it),
// summed in blocks of kSumBlock, while the row after it (`next`, null pointers: none) is
// prefetched: a sweep that reads from memory without it runs at about 60% of the bandwidth
// (one core, rows-split statistics of WRN-28-10: 38.9 ms against the whole fused step's 39.6).
template <typename source_t, typename acc_t, typename GradientRow, typename Next>
NDADAM_ALWAYS_INLINE RowStatistics<acc_t> row_statistics(const source_t* w, const GradientRow& grad,
                                                         const acc_t* __restrict__ m, int64_t row_length,
                                                         const Next& next) {
  RowStatistics<acc_t> stats{0, 0, 0, 0, 0, 0};
  for (int64_t start = 0; start < row_length; start += kSumBlock) {
    const int64_t end = std::min(start + kSumBlock, row_length);
    prefetch_block(next.w, start, end, row_length);
    prefetch_block(next.grad, start, end, row_length);
    prefetch_block(next.m, start, end, row_length);
    acc_t gw = 0, gg = 0, ww = 0, mw = 0, mm = 0, mg = 0;
#pragma omp simd reduction(+ : gw, gg, ww, mw, mm, mg)
    for (int64_t i = start; i < end; ++i) {
      const acc_t wi = load<source_t, acc_t>(w, i);
      const acc_t gi = grad(i);
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
  return stats;
}

template <typename source_t, typename acc_t, typename GradientRow>
NDADAM_ALWAYS_INLINE RowStatistics<acc_t> row_statistics(const source_t* w, const GradientRow& grad,
                                                         const acc_t* __restrict__ m, int64_t row_length) {
  return row_statistics(w, grad, m, row_length, RowPointers<source_t, source_t, acc_t>{});
}

// One element of the statistics form's update: m' = β1 m + (1-β1)(ḡ - a w), stored, and
// w' = (w - s m') · r, written, with (s, r) from the row's (full) statistics.
template <typename source_t, typename acc_t, typename GradientRow, typename Writer>
NDADAM_ALWAYS_INLINE void update_element(const source_t* w, const GradientRow& grad, acc_t* __restrict__ m, int64_t i,
                                         acc_t grad_dot_w, const RowUpdate<acc_t>& update,
                                         const StepScalars<acc_t>& k, const Writer& write) {
  const acc_t wi = load<source_t, acc_t>(w, i);
  const acc_t m_new = first_moment_update(m[i], projected_gradient(grad(i), wi, grad_dot_w), k);
  m[i] = m_new;
  write(i, unnormalized_weight(wi, m_new, update.step_size) * update.inverse_norm);
}

// The elementwise sweep of the statistics form over elements [start, end) of a row.
template <typename source_t, typename acc_t, typename GradientRow, typename Writer>
NDADAM_ALWAYS_INLINE void apply_row_update(const source_t* w, const GradientRow& grad, acc_t* __restrict__ m,
                                           int64_t start, int64_t end, acc_t grad_dot_w,
                                           const RowUpdate<acc_t>& update, const StepScalars<acc_t>& k,
                                           const Writer& write) {
#pragma omp simd
  for (int64_t i = start; i < end; ++i) {
    update_element(w, grad, m, i, grad_dot_w, update, k, write);
  }
}

// The elementwise sweep of the statistics form over a whole row, prefetching the row after it
// (`next`) block by block.
template <typename source_t, typename acc_t, typename GradientRow, typename Writer, typename Next>
NDADAM_ALWAYS_INLINE void apply_row_update(const source_t* w, const GradientRow& grad, acc_t* __restrict__ m,
                                           int64_t row_length, acc_t grad_dot_w, const RowUpdate<acc_t>& update,
                                           const StepScalars<acc_t>& k, const Writer& write, const Next& next) {
  for (int64_t start = 0; start < row_length; start += kSumBlock) {
    const int64_t end = std::min(start + kSumBlock, row_length);
    prefetch_block(next.w, start, end, row_length);
    prefetch_block(next.grad, start, end, row_length);
    prefetch_block(next.m, start, end, row_length);
    apply_row_update(w, grad, m, start, end, grad_dot_w, update, k, write);
  }
}

// The statistics form, for rows past the exact form's cut-over, one sweep a row after the first
// of a run: the sweep that writes row r (from cache) also sums the six statistics of row r+1
// (same length, same tensor), whose w, ḡ and m then come from memory for the first and only
// time: 20 bytes per fp32 element, as the exact form, and memory is busy during every sweep. (The
// statistics in a sweep of their own, then the update sweep from cache, took 1.5x Adam(fused)'s
// time on llama-7b-mlp.) `carried`: this row's statistics when the previous row's sweep summed
// them; the next row's are returned when `carry_next`. The sums are the same blocks in the same
// order as row_statistics.
template <typename source_t, typename acc_t, typename GradientRow, typename Writer, typename Next>
NDADAM_ALWAYS_INLINE RowCarry<acc_t> carried_statistics_row_step(const source_t* w, const GradientRow& grad,
                                                                 acc_t* __restrict__ m, acc_t* __restrict__ v,
                                                                 int64_t row_length, const StepScalars<acc_t>& k,
                                                                 const Writer& write, const Next& next,
                                                                 const RowCarry<acc_t>& carried, bool carry_next) {
  const RowStatistics<acc_t> stats = carried.known ? carried.stats : row_statistics(w, grad, m, row_length, next);
  const RowUpdate<acc_t> update = update_from_statistics(stats, *v, k);
  if (!carry_next) {
    apply_row_update(w, grad, m, row_length, stats.grad_dot_w, update, k, write, next);
    *v = update.exp_avg_sq;
    return {};
  }
  RowCarry<acc_t> next_carry;
  GradientRow next_grad = grad;
  next_grad.data = next.grad;
  const acc_t* __restrict__ next_m = next.m;
  for (int64_t start = 0; start < row_length; start += kSumBlock) {
    const int64_t end = std::min(start + kSumBlock, row_length);
    // The six sums of row_statistics, written out in the update's own loop: as a second loop
    // over the block (row_statistics' block function) the step was 3-5% slower on rows of 11,008.
    acc_t gw = 0, gg = 0, ww = 0, mw = 0, mm = 0, mg = 0;
#pragma omp simd reduction(+ : gw, gg, ww, mw, mm, mg)
    for (int64_t i = start; i < end; ++i) {
      update_element(w, grad, m, i, stats.grad_dot_w, update, k, write);
      const acc_t next_wi = load<source_t, acc_t>(next.w, i);
      const acc_t next_gi = next_grad(i);
      const acc_t next_mi = next_m[i];
      gw += next_gi * next_wi;
      gg += next_gi * next_gi;
      ww += next_wi * next_wi;
      mw += next_mi * next_wi;
      mm += next_mi * next_mi;
      mg += next_mi * next_gi;
    }
    next_carry.stats.grad_dot_w += gw;
    next_carry.stats.grad_dot_grad += gg;
    next_carry.stats.w_dot_w += ww;
    next_carry.stats.m_dot_w += mw;
    next_carry.stats.m_dot_m += mm;
    next_carry.stats.m_dot_grad += mg;
  }
  next_carry.known = true;
  *v = update.exp_avg_sq;
  return next_carry;
}

// The path a row of this length takes: exact when it fits under the cut-over, else the carried
// statistics form. `carried` and `carry_next` as for the two: the sums of this row when the
// previous row's last sweep took them, and whether this row's last sweep takes the next row's
// (the exact form carries ḡ·w and w·w, the statistics form all six).
template <typename source_t, typename acc_t, typename GradientRow, typename Writer, typename Next>
NDADAM_ALWAYS_INLINE RowCarry<acc_t> row_step(const source_t* w, const GradientRow& grad, acc_t* m, acc_t* v,
                                              int64_t row_length, int64_t max_single_pass_row_length,
                                              const StepScalars<acc_t>& k, const Writer& write, const Next& next,
                                              const RowCarry<acc_t>& carried = {}, bool carry_next = false) {
  if (row_length <= max_single_pass_row_length) {
    return exact_row_step(w, grad, m, v, row_length, k, write, next, carried, carry_next);
  }
  return carried_statistics_row_step(w, grad, m, v, row_length, k, write, next, carried, carry_next);
}

// The plain step of one row in place (no GradScaler, no master copy, round to nearest): what the
// C++ unit test (tests/cpp/test_row_math.cpp) calls.
template <typename param_t, typename acc_t>
NDADAM_ALWAYS_INLINE void exact_row_step(param_t* w, const param_t* grad, acc_t* m, acc_t* v, int64_t row_length,
                                         const StepScalars<acc_t>& k) {
  exact_row_step(w, Gradient<param_t, acc_t, false>{grad, acc_t(1)}, m, v, row_length, k,
                 RowWriter<param_t, acc_t, RowWrite::kParam>{w}, RowPointers<param_t, param_t, acc_t>{});
}

template <typename param_t, typename acc_t>
NDADAM_ALWAYS_INLINE void statistics_row_step(param_t* w, const param_t* grad, acc_t* m, acc_t* v,
                                              int64_t row_length, const StepScalars<acc_t>& k) {
  carried_statistics_row_step(w, Gradient<param_t, acc_t, false>{grad, acc_t(1)}, m, v, row_length, k,
                              RowWriter<param_t, acc_t, RowWrite::kParam>{w}, RowPointers<param_t, param_t, acc_t>{},
                              RowCarry<acc_t>{}, false);
}

}  // namespace ndadam::cpu
