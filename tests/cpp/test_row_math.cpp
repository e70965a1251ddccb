// C++ unit test of the row math (csrc/ndadam_row_math.h) and the CPU row loops
// (csrc/cpu/ndadam_cpu_rows.h), without torch: run it with ctest (see CMakeLists.txt).
//
// Checks that the exact single-pass form and the two-pass statistics form agree with each other
// and with a plain float64 transcription of Algorithm 1, that a length-1 row stays exactly ±1
// on both forms, and that eps = 0 with a zero gradient makes no step (no NaN).
// Exits with status 1 and a message per failed check.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cpu/ndadam_cpu_rows.h"
#include "ndadam_row_math.h"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

struct Row {
  std::vector<double> w, grad, m;
  double v;
};

Row random_row(int64_t length, std::mt19937_64& rng, double grad_scale) {
  std::normal_distribution<double> normal;
  Row row{std::vector<double>(length), std::vector<double>(length), std::vector<double>(length), 0.0};
  double sq = 0;
  for (int64_t i = 0; i < length; ++i) {
    row.w[i] = normal(rng);
    sq += row.w[i] * row.w[i];
  }
  for (int64_t i = 0; i < length; ++i) {
    row.w[i] /= std::sqrt(sq);
    row.grad[i] = grad_scale * normal(rng);
    row.m[i] = 0.01 * normal(rng);
  }
  row.v = 1e-4 * std::abs(normal(rng));
  return row;
}

// Algorithm 1 for one row, in float64, written from the paper and not from the header.
void algorithm_1(Row& row, double lr, double beta1, double beta2, double eps, double t) {
  const size_t n = row.w.size();
  double a = 0;
  for (size_t i = 0; i < n; ++i) a += row.grad[i] * row.w[i];
  double g_sq = 0;
  std::vector<double> g(n);
  for (size_t i = 0; i < n; ++i) {
    g[i] = row.grad[i] - a * row.w[i];
    g_sq += g[i] * g[i];
    row.m[i] = beta1 * row.m[i] + (1 - beta1) * g[i];
  }
  row.v = beta2 * row.v + (1 - beta2) * g_sq;
  double denominator = std::sqrt(row.v / (1 - std::pow(beta2, t))) + eps;
  if (!(denominator > 0)) denominator = 1;
  double norm = 0;
  std::vector<double> w_bar(n);
  for (size_t i = 0; i < n; ++i) {
    w_bar[i] = row.w[i] - lr * (row.m[i] / (1 - std::pow(beta1, t))) / denominator;
    norm += w_bar[i] * w_bar[i];
  }
  norm = std::sqrt(norm);
  for (size_t i = 0; i < n; ++i) row.w[i] = w_bar[i] / norm;
}

template <typename T>
struct TypedRow {
  std::vector<T> w, grad, m;
  T v;
  explicit TypedRow(const Row& row)
      : w(row.w.begin(), row.w.end()), grad(row.grad.begin(), row.grad.end()), m(row.m.begin(), row.m.end()),
        v(static_cast<T>(row.v)) {}
};

template <typename T>
double max_difference(const std::vector<T>& a, const std::vector<double>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(static_cast<double>(a[i]) - b[i]));
  return worst;
}

// Both forms, `steps` steps each, against Algorithm 1 in float64.
template <typename T>
void check_forms_agree(int64_t length, double tolerance, const char* type_name) {
  std::mt19937_64 rng(1234 + length);
  const double lr = 0.05, beta1 = 0.9, beta2 = 0.99, eps = 1e-8;
  const int steps = 25;
  Row oracle = random_row(length, rng, 1.0);
  TypedRow<T> exact(oracle), statistics(oracle);
  for (int t = 1; t <= steps; ++t) {
    const Row fresh = random_row(length, rng, std::pow(10.0, (t % 5) - 2.0));
    oracle.grad = fresh.grad;
    std::vector<T> grad(fresh.grad.begin(), fresh.grad.end());
    const auto k = ndadam::make_step_scalars<T>(lr, beta1, beta2, eps, t);
    ndadam::cpu::exact_row_step<T, T>(exact.w.data(), grad.data(), exact.m.data(), &exact.v, length, k);
    ndadam::cpu::statistics_row_step<T, T>(statistics.w.data(), grad.data(), statistics.m.data(), &statistics.v,
                                           length, k);
    algorithm_1(oracle, lr, beta1, beta2, eps, t);
  }
  const std::string where = std::string(type_name) + " row of length " + std::to_string(length);
  const double v_scale = std::max(1.0, oracle.v);
  check(max_difference(exact.w, oracle.w) <= tolerance, "exact form, w, " + where);
  check(max_difference(statistics.w, oracle.w) <= tolerance, "statistics form, w, " + where);
  // State relative to its own size, as tests/backend_cases.py compares it.
  double m_scale = 1.0;
  for (const double value : oracle.m) m_scale = std::max(m_scale, std::abs(value));
  check(max_difference(exact.m, oracle.m) <= tolerance * m_scale, "exact form, m, " + where);
  check(max_difference(statistics.m, oracle.m) <= tolerance * m_scale, "statistics form, m, " + where);
  check(std::abs(exact.v - oracle.v) <= tolerance * v_scale, "exact form, v, " + where);
  check(std::abs(statistics.v - oracle.v) <= tolerance * v_scale, "statistics form, v, " + where);
  // And with each other, closer than either is to float64 when T is float64.
  double forms_apart = 0;
  for (int64_t i = 0; i < length; ++i) {
    forms_apart = std::max(forms_apart, std::abs(static_cast<double>(exact.w[i]) - statistics.w[i]));
  }
  check(forms_apart <= tolerance, "exact and statistics forms agree, " + where);
}

// A length-1 row has no tangent space: both forms keep it exactly ±1.
template <typename T>
void check_length_one_row_stays_unit(const char* type_name) {
  for (const double start : {1.0, -1.0}) {
    T w_exact = static_cast<T>(start), w_statistics = static_cast<T>(start);
    T m_exact = 0, m_statistics = 0, v_exact = 0, v_statistics = 0;
    for (int t = 1; t <= 25; ++t) {
      const T grad = static_cast<T>(0.37 * t - 3.1);
      const auto k = ndadam::make_step_scalars<T>(0.5, 0.9, 0.99, 1e-8, t);
      ndadam::cpu::exact_row_step<T, T>(&w_exact, &grad, &m_exact, &v_exact, 1, k);
      ndadam::cpu::statistics_row_step<T, T>(&w_statistics, &grad, &m_statistics, &v_statistics, 1, k);
    }
    const std::string where = std::string(type_name) + ", start " + std::to_string(start);
    check(w_exact == static_cast<T>(start), "exact form keeps a length-1 row at exactly ±1, " + where);
    check(w_statistics == static_cast<T>(start), "statistics form keeps a length-1 row at exactly ±1, " + where);
  }
}

// eps = 0, zero gradient, zero state: the denominator is 0 and the reference divides by 1.
template <typename T>
void check_eps_zero_zero_gradient(const char* type_name) {
  std::mt19937_64 rng(7);
  const int64_t length = 300;
  Row row = random_row(length, rng, 0.0);
  std::fill(row.m.begin(), row.m.end(), 0.0);
  row.v = 0.0;
  TypedRow<T> exact(row), statistics(row);
  const std::vector<T> zero(length, T(0));
  const auto k = ndadam::make_step_scalars<T>(0.1, 0.9, 0.99, 0.0, 1);
  ndadam::cpu::exact_row_step<T, T>(exact.w.data(), zero.data(), exact.m.data(), &exact.v, length, k);
  ndadam::cpu::statistics_row_step<T, T>(statistics.w.data(), zero.data(), statistics.m.data(), &statistics.v,
                                         length, k);
  const std::string where = std::string(type_name);
  check(max_difference(exact.w, row.w) <= 1e-6, "eps=0, zero gradient: exact form does not move, " + where);
  check(max_difference(statistics.w, row.w) <= 1e-6, "eps=0, zero gradient: statistics form does not move, " + where);
  check(exact.v == T(0) && statistics.v == T(0), "eps=0, zero gradient: v stays 0, " + where);
}

// The closed forms of section 4 against the same quantities computed from explicit vectors.
void check_closed_forms() {
  std::mt19937_64 rng(99);
  const int64_t length = 777;
  const Row row = random_row(length, rng, 0.3);
  const auto k = ndadam::make_step_scalars<double>(0.05, 0.9, 0.99, 1e-8, 4);
  ndadam::RowStatistics<double> st{0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < length; ++i) {
    st.grad_dot_w += row.grad[i] * row.w[i];
    st.grad_dot_grad += row.grad[i] * row.grad[i];
    st.w_dot_w += row.w[i] * row.w[i];
    st.m_dot_w += row.m[i] * row.w[i];
    st.m_dot_m += row.m[i] * row.m[i];
    st.m_dot_grad += row.m[i] * row.grad[i];
  }
  const auto update = ndadam::update_from_statistics(st, row.v, k);
  double g_sq = 0, w_bar_sq = 0;
  std::vector<double> m_new(length);
  for (int64_t i = 0; i < length; ++i) {
    const double g = row.grad[i] - st.grad_dot_w * row.w[i];
    g_sq += g * g;
    m_new[i] = 0.9 * row.m[i] + 0.1 * g;
  }
  const double v_new = 0.99 * row.v + 0.01 * g_sq;
  const double s = 0.05 / (1 - std::pow(0.9, 4)) / (std::sqrt(v_new / (1 - std::pow(0.99, 4))) + 1e-8);
  for (int64_t i = 0; i < length; ++i) {
    const double w_bar = row.w[i] - s * m_new[i];
    w_bar_sq += w_bar * w_bar;
  }
  check(std::abs(update.exp_avg_sq - v_new) <= 1e-14 * std::max(1.0, v_new), "closed form: v'");
  check(std::abs(update.step_size - s) <= 1e-12 * s, "closed form: s");
  check(std::abs(update.inverse_norm - 1 / std::sqrt(w_bar_sq)) <= 1e-12, "closed form: 1/||w̄||");
}

}  // namespace

int main() {
  for (const int64_t length : {1, 2, 27, 1000, 4096, 9000}) {
    check_forms_agree<double>(length, 1e-10, "float64");
    check_forms_agree<float>(length, 1e-5, "float32");
  }
  check_length_one_row_stays_unit<double>("float64");
  check_length_one_row_stays_unit<float>("float32");
  check_eps_zero_zero_gradient<double>("float64");
  check_eps_zero_zero_gradient<float>("float32");
  check_closed_forms();
  if (failures > 0) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("row math: all checks passed\n");
  return 0;
}
