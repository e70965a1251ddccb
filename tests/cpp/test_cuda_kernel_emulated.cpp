// The CUDA kernel's own device code (csrc/cuda/ndadam_cuda_kernel.cuh), on its real launch plan
// and table cache (csrc/cuda/ndadam_cuda_plan.h), run on the CPU by the SIMT emulation
// (simt_emulation.h: every thread of a block a CPU thread), checked against an independent
// float64 loop of Algorithm 1. No GPU, no torch.
//
// Covered: the exact path (teams of 1-32 lanes, of whole warps, inactive teams and idle warps,
// 1-, 2-, 4- and 8-wide accesses) and the statistics path; many tensors per launch, tensors of
// 0 rows, tensors over several blocks and blocks over several tensors; the step count over
// several launches (each tensor's step + 1 exactly once per launch, counters back to zero,
// blocks run in shuffled order); fp32, fp64, bf16 and fp16; eps = 0 with zero gradients and with
// a subnormal v̂; length-1 rows; and the table cache (fresh gradients every step build no table;
// a new shape at the same addresses does; a view one element into a buffer gets no wide
// access; a new lr with the same table is used; captured tables are never evicted).
//
// Every shared-memory race, uninitialized shared read, out-of-bounds shared index and
// misaligned access the emulation sees fails the test, as does a write outside a tensor.
//
//   test_cuda_kernel_emulated [name-filter]
#include "simt_emulation.h"  // first: the kernel header takes the CUDA built-ins from it

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "cuda/ndadam_cuda_kernel.cuh"
#include "cuda/ndadam_cuda_plan.h"
#include "emulated_test_harness.h"
#include "guarded_buffer.h"
#include "host_half.h"

namespace {

namespace plan = ndadam::cuda_plan;
namespace kernel = ndadam::cuda_kernel;

using emulated_test::check;
using emulated_test::check_emulation;
using emulated_test::device;
using emulated_test::failures;

// Algorithm 1 for one row in float64, written from the paper and not from the kernel; with
// `round` (a bf16/fp16 run), the new row is rounded to param_t and the state to float, as the
// reference stores them.
template <typename param_t>
void algorithm_1_row(double* w, const double* grad, double* m, double* v, int64_t n, double lr, double beta1,
                     double beta2, double eps, double t, bool round) {
  double a = 0;
  for (int64_t i = 0; i < n; ++i) a += grad[i] * w[i];
  double g_sq = 0;
  std::vector<double> g(n);
  for (int64_t i = 0; i < n; ++i) {
    g[i] = grad[i] - a * w[i];
    g_sq += g[i] * g[i];
    m[i] = beta1 * m[i] + (1 - beta1) * g[i];
  }
  *v = beta2 * *v + (1 - beta2) * g_sq;
  double denominator = std::sqrt(*v / (1 - std::pow(beta2, t))) + eps;
  if (!(denominator > 0)) denominator = 1;
  std::vector<double> w_bar(n);
  double norm = 0;
  for (int64_t i = 0; i < n; ++i) {
    w_bar[i] = w[i] - lr * (m[i] / (1 - std::pow(beta1, t))) / denominator;
    norm += w_bar[i] * w_bar[i];
  }
  norm = std::sqrt(norm);
  for (int64_t i = 0; i < n; ++i) {
    w[i] = w_bar[i] / norm;
    if (round) {
      w[i] = static_cast<float>(static_cast<param_t>(static_cast<float>(w[i])));
      m[i] = static_cast<float>(m[i]);
    }
  }
  if (round) *v = static_cast<float>(*v);
}

struct Shape {
  int64_t rows;
  int64_t row_length;
  size_t offset_elements = 0;  // start this many elements into its buffers (a misaligned view)
};

// One tensor of a test: the kernel's buffers and, beside them, the float64 oracle's state and,
// for bf16/fp16, a float64 run rounded like the reference.
template <typename param_t, typename acc_t>
struct Tensor {
  Shape shape;
  Buffer<param_t> param;
  Buffer<param_t> grad;
  Buffer<acc_t> exp_avg;
  Buffer<acc_t> exp_avg_sq;
  Buffer<float> step;
  std::vector<double> w64, m64, v64;      // exact
  std::vector<double> w_rounded, m_rounded, v_rounded;  // rounded to the stored types every step
  double step64;

  Tensor(const Shape& s, std::mt19937_64& rng)
      : shape(s), param(count(s), s.offset_elements), grad(count(s), s.offset_elements),
        exp_avg(count(s), s.offset_elements), exp_avg_sq(static_cast<size_t>(s.rows), 0), step(1, 0) {
    std::normal_distribution<double> normal;
    const size_t n = count(s);
    w64.resize(n);
    m64.resize(n);
    v64.resize(static_cast<size_t>(s.rows));
    for (int64_t r = 0; r < s.rows; ++r) {
      double sq = 0;
      for (int64_t i = 0; i < s.row_length; ++i) {
        const double x = normal(rng);
        w64[r * s.row_length + i] = x;
        sq += x * x;
      }
      for (int64_t i = 0; i < s.row_length; ++i) {
        w64[r * s.row_length + i] /= std::sqrt(sq);
      }
      v64[r] = 1e-4 * std::abs(normal(rng));
    }
    for (size_t i = 0; i < n; ++i) m64[i] = 0.01 * normal(rng);
    // The kernel starts from the stored values; so does the oracle.
    for (size_t i = 0; i < n; ++i) {
      param[i] = static_cast<param_t>(static_cast<acc_t>(w64[i]));
      w64[i] = static_cast<double>(static_cast<acc_t>(param[i]));
      exp_avg[i] = static_cast<acc_t>(m64[i]);
      m64[i] = static_cast<double>(exp_avg[i]);
    }
    for (int64_t r = 0; r < s.rows; ++r) {
      exp_avg_sq[r] = static_cast<acc_t>(v64[r]);
      v64[r] = static_cast<double>(exp_avg_sq[r]);
    }
    step[0] = 3.0f;
    step64 = 3.0;
    w_rounded = w64;
    m_rounded = m64;
    v_rounded = v64;
  }

  static size_t count(const Shape& s) { return static_cast<size_t>(s.rows * s.row_length); }

  plan::TensorArguments arguments() {
    return plan::TensorArguments{param.data(), grad.data(), exp_avg.data(), exp_avg_sq.data(), step.data(),
                                 shape.rows, shape.row_length};
  }

  // A fresh gradient in this tensor's grad buffer (scale 10^-2..10^0, as tests/backend_cases.py).
  void new_gradient(std::mt19937_64& rng, double scale) {
    std::normal_distribution<double> normal;
    for (size_t i = 0; i < grad.size(); ++i) {
      grad[i] = static_cast<param_t>(static_cast<acc_t>(scale * normal(rng)));
    }
  }

  void oracle_step(const param_t* gradient, double lr, double beta1, double beta2, double eps) {
    step64 += 1;
    const int64_t n = shape.row_length;
    std::vector<double> g(static_cast<size_t>(n));
    for (int64_t r = 0; r < shape.rows; ++r) {
      for (int64_t i = 0; i < n; ++i) g[i] = static_cast<double>(static_cast<acc_t>(gradient[r * n + i]));
      algorithm_1_row<param_t>(&w64[r * n], g.data(), &m64[r * n], &v64[r], n, lr, beta1, beta2, eps, step64, false);
      algorithm_1_row<param_t>(&w_rounded[r * n], g.data(), &m_rounded[r * n], &v_rounded[r], n, lr, beta1, beta2,
                               eps, step64, true);
    }
  }
};

// Largest differences of a run from the oracle: params (absolute, rows are unit), state relative
// to its own size, as tests/backend_cases.py compares them.
struct Errors {
  double w = 0, m = 0, v = 0;
  void add(const Errors& e) {
    w = std::max(w, e.w);
    m = std::max(m, e.m);
    v = std::max(v, e.v);
  }
};

template <typename param_t, typename acc_t>
Errors errors_of_kernel(Tensor<param_t, acc_t>& t) {
  Errors e;
  double m_scale = 1, v_scale = 1;
  for (const double x : t.m64) m_scale = std::max(m_scale, std::abs(x));
  for (const double x : t.v64) v_scale = std::max(v_scale, std::abs(x));
  for (size_t i = 0; i < t.w64.size(); ++i) {
    e.w = std::max(e.w, std::abs(static_cast<double>(static_cast<acc_t>(t.param[i])) - t.w64[i]));
    e.m = std::max(e.m, std::abs(static_cast<double>(t.exp_avg[i]) - t.m64[i]) / m_scale);
  }
  for (int64_t r = 0; r < t.shape.rows; ++r) {
    e.v = std::max(e.v, std::abs(static_cast<double>(t.exp_avg_sq[r]) - t.v64[r]) / v_scale);
  }
  return e;
}

// The float64 oracle's distance from the run rounded like the reference: the reference's own error.
template <typename param_t, typename acc_t>
Errors errors_of_rounded_reference(Tensor<param_t, acc_t>& t) {
  Errors e;
  double m_scale = 1, v_scale = 1;
  for (const double x : t.m64) m_scale = std::max(m_scale, std::abs(x));
  for (const double x : t.v64) v_scale = std::max(v_scale, std::abs(x));
  for (size_t i = 0; i < t.w64.size(); ++i) {
    e.w = std::max(e.w, std::abs(t.w_rounded[i] - t.w64[i]));
    e.m = std::max(e.m, std::abs(t.m_rounded[i] - t.m64[i]) / m_scale);
  }
  for (int64_t r = 0; r < t.shape.rows; ++r) e.v = std::max(e.v, std::abs(t.v_rounded[r] - t.v64[r]) / v_scale);
  return e;
}

// A device table as the C++ tests keep it: host memory (the kernel writes its counters).
struct HostTable {
  std::vector<uint8_t> bytes;
};

struct Hyper {
  double lr = 0.05;
  double beta1 = 0.9;
  double beta2 = 0.99;
  double eps = 1e-8;
};

// GradScaler's tensors as the kernel reads them (null: none).
struct Scaler {
  const float* grad_scale = nullptr;
  const float* found_inf = nullptr;
};

// Launches the kernel as vector_step_cuda.cu does: the real plan, the real cache, this launch's
// gradients in the table's order, blocks in a shuffled order; the hyperparameters in a float64
// array of 4 that the kernel reads (as it reads the hyper tensor on the GPU).
template <typename param_t, typename acc_t, ndadam::RowWrite kWrite = ndadam::RowWrite::kParam>
class Launcher {
 public:
  explicit Launcher(size_t tables_kept = 16) : cache_(tables_kept) {}

  // One launch over `tensors` with the gradients now in their grad buffers (or `grads`).
  plan::LaunchPlan launch(std::vector<plan::TensorArguments> arguments, const Hyper& h, int64_t limit,
                          const std::string& what, bool capturing = false, const Scaler& scaler = {}) {
    plan::LaunchPlan p = plan::make_launch_plan(arguments, sizeof(param_t), sizeof(acc_t), limit);
    const auto found = cache_.find_or_build(p.table, 0, 0, capturing,
                                            [](const std::vector<uint8_t>& bytes) { return HostTable{bytes}; });
    last_table_ = found.storage;
    std::vector<const void*> grads(arguments.size());
    for (size_t i = 0; i < grads.size(); ++i) grads[i] = arguments[p.order[i]].grad;
    auto* table = const_cast<uint8_t*>(found.storage->bytes.data());
    hyper_[0] = h.lr;
    hyper_[1] = h.beta1;
    hyper_[2] = h.beta2;
    hyper_[3] = h.eps;
    kernel::LaunchArguments args{};
    args.entries = reinterpret_cast<const plan::TensorEntry*>(table);
    args.first_warp = reinterpret_cast<const int64_t*>(table + p.first_warp_offset);
    args.arrivals = reinterpret_cast<int32_t*>(table + p.arrivals_offset);
    args.grads = grads.data();
    args.hyper = hyper_;
    args.grad_scale = scaler.grad_scale;
    args.found_inf = scaler.found_inf;
    args.tensors = p.tensors();

    std::vector<int64_t> order(static_cast<size_t>(p.blocks));
    for (int64_t b = 0; b < p.blocks; ++b) order[b] = b;
    std::shuffle(order.begin(), order.end(), std::mt19937_64(++launches_));
    std::unique_ptr<kernel::SharedStorage<param_t, acc_t, kWrite>> shared;
    // Warps take turns in ascending order, or descending every other launch.
    device().run(
        order, [&](int64_t) { shared = std::make_unique<kernel::SharedStorage<param_t, acc_t, kWrite>>(); },
        [&](int64_t) { kernel::vector_step_block<param_t, acc_t, kWrite>(args, *shared); }, launches_ % 2 == 0);
    check_emulation(what);
    const int32_t* arrivals = args.arrivals;
    for (int32_t i = 0; i < p.tensors(); ++i) {
      check(arrivals[i] == 0, what + ": arrival counter of entry " + std::to_string(i) + " is " +
                                  std::to_string(arrivals[i]) + " after the launch, not 0");
    }
    return p;
  }

  plan::TableCache<HostTable>& cache() { return cache_; }
  const HostTable* last_table() const { return last_table_; }

 private:
  plan::TableCache<HostTable> cache_;
  const HostTable* last_table_ = nullptr;
  double hyper_[4] = {0, 0, 0, 0};
  uint64_t launches_ = 0;
};

// What a launch plan exercises, to make sure a test covers every path it claims to.
struct Coverage {
  std::set<std::string> seen;
  void add(const plan::LaunchPlan& p) {
    std::map<int64_t, int> entries_per_block;
    for (int32_t i = 0; i < p.tensors(); ++i) {
      const plan::TensorEntry& e = p.entries()[i];
      const int64_t first = p.first_warp()[i], end = p.first_warp()[i + 1];
      for (int64_t b = first / plan::kWarpsPerBlock; b <= (end - 1) / plan::kWarpsPerBlock; ++b) {
        ++entries_per_block[b];
      }
      if (e.rows == 0) seen.insert("tensor of 0 rows");
      if (e.blocks_touched > 1) seen.insert("tensor over several blocks");
      if (e.path == plan::kStatisticsRows) {
        seen.insert("statistics path");
        seen.insert("statistics vector width " + std::to_string(e.vector_width));
        continue;
      }
      if (e.rows == 0) continue;
      seen.insert("vector width " + std::to_string(e.vector_width));
      if (e.team_size < plan::kWarpSize) seen.insert("team < 32");
      if (e.team_size == plan::kWarpSize) seen.insert("team = 32");
      if (e.team_size > plan::kWarpSize) {
        seen.insert("team > 32");
        const int warps = e.team_size / plan::kWarpSize;
        if ((warps & (warps - 1)) != 0) seen.insert("team of a non-power-of-two number of warps");
        if (plan::kWarpsPerBlock % warps != 0) seen.insert("idle warps in a block");
        const int64_t rows_per_block = plan::kWarpsPerBlock / warps;
        if (e.rows % rows_per_block != 0) seen.insert("inactive teams");
      } else if (e.rows % (plan::kWarpSize / e.team_size) != 0) {
        seen.insert("inactive teams");
      }
    }
    for (const auto& [block, count] : entries_per_block) {
      if (count > 1) seen.insert("block over several tensors");
    }
  }
  void require(const std::vector<std::string>& wanted, const std::string& what) {
    for (const std::string& w : wanted) {
      check(seen.count(w) == 1, what + " does not cover: " + w);
    }
  }
};

// Runs `launches` steps of the kernel and of the oracle on `shapes`; returns the errors.
template <typename param_t, typename acc_t>
void run_and_compare(const std::vector<Shape>& shapes, int64_t limit, int launches, const std::string& name,
                     const std::vector<std::string>& must_cover, const Hyper& h = Hyper{}) {
  const std::string what = std::string(type_name<param_t>()) + " " + name;
  std::mt19937_64 rng(42);
  std::vector<std::unique_ptr<Tensor<param_t, acc_t>>> tensors;
  for (const Shape& s : shapes) tensors.push_back(std::make_unique<Tensor<param_t, acc_t>>(s, rng));
  Launcher<param_t, acc_t> launcher;
  Coverage coverage;
  for (int step = 0; step < launches; ++step) {
    std::vector<plan::TensorArguments> arguments;
    for (auto& t : tensors) {
      t->new_gradient(rng, std::pow(10.0, (step % 3) - 2.0));
      arguments.push_back(t->arguments());
    }
    coverage.add(launcher.launch(arguments, h, limit, what + ", launch " + std::to_string(step + 1)));
    for (auto& t : tensors) t->oracle_step(t->grad.data(), h.lr, h.beta1, h.beta2, h.eps);
  }
  coverage.require(must_cover, what);

  Errors kernel_errors, reference_errors;
  for (auto& t : tensors) {
    kernel_errors.add(errors_of_kernel(*t));
    reference_errors.add(errors_of_rounded_reference(*t));
    check(t->step[0] == 3.0f + launches, what + ": a step count is " + std::to_string(t->step[0]) + " after " +
                                              std::to_string(launches) + " launches from 3");
    check(t->param.guards_intact() && t->grad.guards_intact() && t->exp_avg.guards_intact() &&
              t->exp_avg_sq.guards_intact() && t->step.guards_intact(),
          what + ": a write outside the tensor of " + std::to_string(t->shape.rows) + " x " +
              std::to_string(t->shape.row_length));
  }
  if constexpr (std::is_same_v<param_t, acc_t>) {
    // DESIGN.md section 7: fp64 1e-10, fp32 1e-5 (max abs on the unit rows; state relative).
    const double tolerance = std::is_same_v<param_t, double> ? 1e-10 : 1e-5;
    check(kernel_errors.w <= tolerance, what + ": params off by " + std::to_string(kernel_errors.w));
    check(kernel_errors.m <= tolerance, what + ": exp_avg off by " + std::to_string(kernel_errors.m));
    check(kernel_errors.v <= tolerance, what + ": exp_avg_sq off by " + std::to_string(kernel_errors.v));
  } else {
    // bf16/fp16 params: at most twice the error the reference itself makes in that dtype.
    check(kernel_errors.w <= 2 * reference_errors.w,
          what + ": params off by " + std::to_string(kernel_errors.w) + ", the reference's own error is " +
              std::to_string(reference_errors.w));
    check(kernel_errors.m <= 2 * reference_errors.m + 1e-6,
          what + ": exp_avg off by " + std::to_string(kernel_errors.m));
    check(kernel_errors.v <= 2 * reference_errors.v + 1e-6,
          what + ": exp_avg_sq off by " + std::to_string(kernel_errors.v));
  }
  std::printf("%-60s params %.2e (reference in its dtype %.2e), m %.2e, v %.2e\n", what.c_str(), kernel_errors.w,
              reference_errors.w, kernel_errors.m, kernel_errors.v);
}

// Shapes that reach every path of the plan in one launch (see Coverage).
// The first warp-rows tensor (40 x 64: ten warps) starts at warp 0 of the block that packs the
// short tensors, so that block is its only block: its step is written there.
const std::vector<Shape> kMixedShapes = {
    {40, 64}, {5, 1},  {7, 2},  {4, 27},  {3, 160}, {6, 20},  {9, 33},   {50, 3},   {17, 36}, {0, 16},
    {10, 640}, {3, 1440}, {2, 1000}, {1, 5760}, {2, 8192}, {1, 9000}, {4, 768}, {2, 64, 3}};
const std::vector<std::string> kMixedCoverage = {
    "team < 32", "team = 32", "team > 32", "team of a non-power-of-two number of warps", "idle warps in a block",
    "inactive teams", "tensor of 0 rows", "tensor over several blocks", "block over several tensors",
    "statistics path", "vector width 1", "vector width 2", "vector width 4"};

void test_mixed_launch_float32() {
  run_and_compare<float, float>(kMixedShapes, ndadam::kSinglePassMaxRowLength, 2, "mixed shapes, default cut-over",
                                kMixedCoverage);
}

void test_mixed_launch_float64() {
  const std::vector<Shape> shapes = {{5, 1},   {4, 27},  {3, 160},  {40, 64}, {0, 16},
                                     {9, 33},  {10, 640}, {2, 8192}, {1, 9000}};
  run_and_compare<double, double>(shapes, ndadam::kSinglePassMaxRowLength, 2, "mixed shapes, default cut-over",
                                  {"team < 32", "team = 32", "team > 32", "statistics path", "vector width 1",
                                   "vector width 2", "tensor of 0 rows", "block over several tensors",
                                   "tensor over several blocks"});
}

const std::vector<Shape> kHalfShapes = {{5, 1}, {4, 27}, {3, 160}, {40, 64}, {2, 1000}, {2, 4096}, {1, 9000}, {7, 24}};

void test_half_types() {
  const std::vector<std::string> coverage = {"team < 32", "team > 32", "statistics path", "vector width 8"};
  run_and_compare<HostBFloat16, float>(kHalfShapes, ndadam::kSinglePassMaxRowLength, 2, "half shapes", coverage);
#ifdef NDADAM_HOST_HALF
  run_and_compare<HostHalf, float>(kHalfShapes, ndadam::kSinglePassMaxRowLength, 2, "half shapes", coverage);
#endif
}

// Cut-over 0: every row on the statistics path, one block per row.
void test_statistics_path_forced() {
  const std::vector<Shape> shapes = {{1, 1}, {2, 27}, {1, 1000}, {1, 33}};
  run_and_compare<float, float>(shapes, 0, 2, "statistics path forced", {"statistics path", "statistics vector width 4"});
  run_and_compare<double, double>(shapes, 0, 1, "statistics path forced", {"statistics path", "statistics vector width 2"});
  run_and_compare<HostBFloat16, float>(shapes, 0, 1, "statistics path forced", {"statistics path", "statistics vector width 8"});
}

// A length-1 row has no tangent space: it stays exactly ±1 on both paths, with m = 0 (40 rows:
// two warps of 32 one-lane teams, the second mostly inactive; the statistics path: a block per row).
void test_length_one_rows_stay_unit() {
  for (const int64_t limit : {ndadam::kSinglePassMaxRowLength, int64_t(0)}) {
    const int64_t rows = limit == 0 ? 4 : 40;
    std::mt19937_64 rng(5);
    Tensor<float, float> t(Shape{rows, 1}, rng);
    for (int64_t r = 0; r < rows; ++r) t.param[r] = r % 2 ? 1.0f : -1.0f;
    for (int64_t r = 0; r < rows; ++r) t.exp_avg[r] = 0.0f;
    Launcher<float, float> launcher;
    for (int step = 0; step < 3; ++step) {
      t.new_gradient(rng, 10.0);
      launcher.launch({t.arguments()}, Hyper{0.5, 0.9, 0.99, 1e-8}, limit, "length-1 rows");
    }
    bool unit = true, zero_m = true;
    for (int64_t r = 0; r < rows; ++r) {
      unit = unit && t.param[r] == (r % 2 ? 1.0f : -1.0f);
      zero_m = zero_m && t.exp_avg[r] == 0.0f;
    }
    const std::string path = limit == 0 ? "statistics" : "exact";
    check(unit, "length-1 rows left ±1 on the " + path + " path");
    check(zero_m, "length-1 rows got a nonzero exp_avg on the " + path + " path");
  }
}

// eps = 0 and a gradient that is always 0: v̂ = 0, the denominator is 0 and the reference divides
// by 1 (no step). Without the guard the row becomes NaN.
void test_eps_zero_zero_gradient() {
  for (const int64_t limit : {ndadam::kSinglePassMaxRowLength, int64_t(0)}) {
    std::mt19937_64 rng(7);
    Tensor<float, float> t(Shape{2, 300}, rng);
    std::fill(t.exp_avg.data(), t.exp_avg.data() + t.exp_avg.size(), 0.0f);
    std::fill(t.exp_avg_sq.data(), t.exp_avg_sq.data() + 2, 0.0f);
    const std::vector<float> start(t.param.data(), t.param.data() + t.param.size());
    std::fill(t.grad.data(), t.grad.data() + t.grad.size(), 0.0f);
    Launcher<float, float> launcher;
    for (int step = 0; step < 2; ++step) {
      launcher.launch({t.arguments()}, Hyper{0.1, 0.9, 0.99, 0.0}, limit, "eps = 0, zero gradient");
    }
    bool finite = true;
    double moved = 0;
    for (size_t i = 0; i < start.size(); ++i) {
      finite = finite && std::isfinite(t.param[i]);
      moved = std::max(moved, double(std::abs(t.param[i] - start[i])));
    }
    const std::string path = limit == 0 ? "statistics" : "exact";
    check(finite, "eps = 0, zero gradient: a NaN on the " + path + " path");
    check(moved <= 1e-6, "eps = 0, zero gradient: the row moved by " + std::to_string(moved) + " on the " + path + " path");
    check(t.exp_avg_sq[0] == 0.0f, "eps = 0, zero gradient: v left 0 on the " + path + " path");
  }
}

// eps = 0 and v̂ subnormal in fp32 (||g||² about 1e-37, v' about 1e-39 at step 1): the reference takes a full
// step (Adam is scale-free); a flush to zero would make v̂ = 0 and no step at all.
void test_eps_zero_subnormal_second_moment() {
  for (const int64_t limit : {ndadam::kSinglePassMaxRowLength, int64_t(0)}) {
    std::mt19937_64 rng(11);
    Tensor<float, float> t(Shape{3, 64}, rng);
    std::fill(t.exp_avg.data(), t.exp_avg.data() + t.exp_avg.size(), 0.0f);
    for (int r = 0; r < 3; ++r) t.exp_avg_sq[r] = 0.0f;
    t.step[0] = 0.0f;
    t.step64 = 0.0;
    t.m64.assign(t.m64.size(), 0.0);
    t.v64.assign(t.v64.size(), 0.0);
    t.new_gradient(rng, 4e-20);
    Launcher<float, float> launcher;
    const Hyper h{0.05, 0.9, 0.99, 0.0};
    launcher.launch({t.arguments()}, h, limit, "eps = 0, subnormal v");
    t.oracle_step(t.grad.data(), h.lr, h.beta1, h.beta2, h.eps);
    const std::string path = limit == 0 ? "statistics" : "exact";
    bool subnormal = true;
    for (int r = 0; r < 3; ++r) subnormal = subnormal && t.exp_avg_sq[r] > 0.0f && t.exp_avg_sq[r] < 1.17549435e-38f;
    check(subnormal, "eps = 0: the test's v' is not subnormal on the " + path + " path");
    const Errors e = errors_of_kernel(t);
    check(e.w <= 1e-5, "eps = 0, subnormal v̂: params off the reference's step by " + std::to_string(e.w) + " on the " +
                           path + " path");
  }
}

// ---- Issue 12: GradScaler, master copies, stochastic rounding; issue 9: zero updates ----------

template <typename T>
bool same_bits(const T* a, const T* b, size_t n) {
  return std::memcmp(a, b, n * sizeof(T)) == 0;
}

// Whether two runs left a tensor's param, moments and step bit for bit the same.
template <typename param_t, typename acc_t>
bool same_state(Tensor<param_t, acc_t>& a, Tensor<param_t, acc_t>& b) {
  const size_t n = a.param.size();
  const size_t rows = static_cast<size_t>(a.shape.rows);
  return same_bits(a.param.data(), b.param.data(), n) && same_bits(a.exp_avg.data(), b.exp_avg.data(), n) &&
         same_bits(a.exp_avg_sq.data(), b.exp_avg_sq.data(), rows) && same_bits(a.step.data(), b.step.data(), 1);
}

std::string path_name(int64_t limit) { return limit == 0 ? "statistics path" : "exact path"; }

// Shapes for the option tests: on the exact path, teams of a lane, of a warp and of several
// warps, a long row past the cut-over (statistics path) and a length-1 row; with the statistics
// path forced (a block per row, which the emulation runs slowly), fewer rows.
std::vector<Shape> option_shapes(int64_t limit) {
  if (limit == 0) {
    return {{1, 1}, {2, 27}, {1, 1000}, {1, 9000}};
  }
  return {{5, 1}, {4, 27}, {3, 160}, {40, 64}, {2, 1000}, {1, 9000}};
}

// The kernel's ḡ = grad / scale (unscale in the kernel header): fp32 through the float64
// reciprocal equals the fp32 division for every scale, subnormal quotients included; fp64 times
// the reciprocal equals the division for power-of-two scales.
void test_unscaling_equals_division() {
  std::mt19937_64 rng(21);
  int64_t wrong = 0, checked = 0;
  for (int trial = 0; trial < 10000000; ++trial) {
    uint32_t bits = static_cast<uint32_t>(rng());
    float g;
    std::memcpy(&g, &bits, sizeof(g));
    float scale;
    if (trial % 3 == 0) {
      const uint32_t scale_bits = static_cast<uint32_t>(rng()) & 0x7fffffffu;  // any positive float
      std::memcpy(&scale, &scale_bits, sizeof(scale));
    } else if (trial % 3 == 1) {
      scale = static_cast<float>(1 + rng() % 100000);  // whole numbers
    } else {
      scale = std::ldexp(1.0f, static_cast<int>(rng() % 64) - 16);  // GradScaler's powers of two
    }
    if (!std::isfinite(g) || !std::isfinite(scale) || scale == 0.0f) continue;
    const float kernel = kernel::scaled_down(g, static_cast<double>(scale), 1.0 / static_cast<double>(scale));
    const float division = g / scale;
    ++checked;
    wrong += std::memcmp(&kernel, &division, sizeof(float)) != 0;
  }
  check(wrong == 0 && checked > 9000000, "fp32 unscaling differs from the division in " + std::to_string(wrong) +
                                             " of " + std::to_string(checked) + " pairs");
  wrong = 0;
  std::uniform_real_distribution<double> uniform(-1, 1);
  for (int trial = 0; trial < 1000000; ++trial) {
    const double g = uniform(rng) * std::ldexp(1.0, static_cast<int>(rng() % 2000) - 1000);
    const double scale = std::ldexp(1.0, static_cast<int>(rng() % 64) - 16);
    const double kernel = kernel::scaled_down(g, scale, 1.0 / scale);
    wrong += std::memcmp(&kernel, &(const double&)(g / scale), sizeof(double)) != 0;
  }
  check(wrong == 0, "fp64 unscaling by a power of two differs from the division in " + std::to_string(wrong) + " cases");
}

// A launch with GradScaler's scale on grads that hold scale x ḡ equals, bit for bit, a launch
// without a scale on grads that hold ḡ (the quotient the reference computes), wherever the kernel
// unscales each element (exact path; statistics path with a power-of-two scale, whose sums are
// scaled after the sweep); within DESIGN.md's tolerances where it scales the sums.
template <typename param_t, typename acc_t>
void check_unscaling(const std::vector<Shape>& shapes, int64_t limit, float scale, bool bit_exact) {
  const std::string what = std::string(type_name<param_t>()) + " grad_scale " + std::to_string(scale) + ", " +
                           path_name(limit);
  std::mt19937_64 rng_scaled(31), rng_plain(31), rng_grads(32);
  std::vector<std::unique_ptr<Tensor<param_t, acc_t>>> scaled, plain;
  for (const Shape& s : shapes) {
    scaled.push_back(std::make_unique<Tensor<param_t, acc_t>>(s, rng_scaled));
    plain.push_back(std::make_unique<Tensor<param_t, acc_t>>(s, rng_plain));
  }
  Launcher<param_t, acc_t> scaled_launcher, plain_launcher;
  const Hyper h;
  for (int step = 0; step < 2; ++step) {
    std::vector<plan::TensorArguments> scaled_arguments, plain_arguments;
    for (size_t i = 0; i < shapes.size(); ++i) {
      std::normal_distribution<double> normal;
      for (size_t e = 0; e < scaled[i]->grad.size(); ++e) {
        // The scaled gradient as autocast leaves it; the plain run gets the quotient, rounded once.
        const param_t stored = static_cast<param_t>(static_cast<float>(scale * 0.1 * normal(rng_grads)));
        scaled[i]->grad[e] = stored;
        plain[i]->grad[e] = static_cast<param_t>(static_cast<acc_t>(stored) / static_cast<acc_t>(scale));
      }
      scaled_arguments.push_back(scaled[i]->arguments());
      plain_arguments.push_back(plain[i]->arguments());
    }
    scaled_launcher.launch(scaled_arguments, h, limit, what, false, Scaler{&scale, nullptr});
    plain_launcher.launch(plain_arguments, h, limit, what + " (pre-divided)");
  }
  double worst = 0;
  bool identical = true;
  for (size_t i = 0; i < shapes.size(); ++i) {
    identical = identical && same_state(*scaled[i], *plain[i]);
    for (size_t e = 0; e < scaled[i]->param.size(); ++e) {
      worst = std::max(worst, std::abs(double(static_cast<acc_t>(scaled[i]->param[e])) -
                                       double(static_cast<acc_t>(plain[i]->param[e]))));
    }
  }
  if (bit_exact) {
    check(identical, what + ": differs from the pre-divided run (params by " + std::to_string(worst) + ")");
  } else {
    check(worst <= 1e-5, what + ": params off the pre-divided run by " + std::to_string(worst));
  }
}

void test_grad_scale_unscales_on_the_fly() {
  const float power_of_two = 4096.0f, other = 1000.0f;
  for (const int64_t limit : {ndadam::kSinglePassMaxRowLength, int64_t(0)}) {
    const std::vector<Shape> shapes = option_shapes(limit);
    check_unscaling<float, float>(shapes, limit, power_of_two, true);
    check_unscaling<double, double>(shapes, limit, power_of_two, true);
    check_unscaling<HostBFloat16, float>(shapes, limit, power_of_two, true);
    // Any scale: the exact path divides each element as the reference does; the statistics path
    // (every row with the cut-over 0, rows past 8192 elements otherwise) scales its sums, which is
    // within rounding of the per-element quotients.
    std::vector<Shape> exact_rows;
    for (const Shape& s : shapes) {
      if (s.row_length <= limit) exact_rows.push_back(s);
    }
    if (limit != 0) {
      check_unscaling<float, float>(exact_rows, limit, other, true);
    }
    check_unscaling<float, float>(shapes, limit, other, false);
  }
}

// GradScaler found an inf: the launch changes nothing (params, moments, steps, counters), and the
// next launch steps from there.
void test_found_inf_changes_nothing() {
  for (const int64_t limit : {ndadam::kSinglePassMaxRowLength, int64_t(0)}) {
    for (const float flag : {1.0f, std::numeric_limits<float>::quiet_NaN()}) {
      std::mt19937_64 rng(41), twin_rng(41);
      const std::vector<Shape> shapes = option_shapes(limit);
      std::vector<std::unique_ptr<Tensor<float, float>>> tensors, untouched;
      for (const Shape& s : shapes) {
        tensors.push_back(std::make_unique<Tensor<float, float>>(s, rng));
        untouched.push_back(std::make_unique<Tensor<float, float>>(s, twin_rng));
      }
      Launcher<float, float> launcher;
      std::vector<plan::TensorArguments> arguments;
      for (size_t i = 0; i < tensors.size(); ++i) {
        tensors[i]->new_gradient(rng, 0.1);
        arguments.push_back(tensors[i]->arguments());
      }
      const float scale = 1024.0f;
      const std::string what = "found_inf " + std::to_string(flag) + ", " + path_name(limit);
      launcher.launch(arguments, Hyper{}, limit, what, false, Scaler{&scale, &flag});
      bool unchanged = true;
      for (size_t i = 0; i < tensors.size(); ++i) {
        unchanged = unchanged && same_state(*tensors[i], *untouched[i]);
      }
      check(unchanged, what + ": the skipped step changed a param, a moment or a step count");
      const float clear = 0.0f;
      launcher.launch(arguments, Hyper{}, limit, what + ", then a step", false, Scaler{&scale, &clear});
      bool stepped = true;
      for (size_t i = 0; i < tensors.size(); ++i) {
        const bool moved = tensors[i]->shape.row_length == 1 ||
                           !same_bits(tensors[i]->param.data(), untouched[i]->param.data(), tensors[i]->param.size());
        stepped = stepped && tensors[i]->step[0] == 4.0f && moved;
      }
      check(stepped, what + ": the step after a skipped one did not count from the unchanged state");
    }
  }
}

// Master copies: rows are read from the fp32 master, the master gets w' and the param (bf16,
// fp16) w' rounded to nearest. The master follows an fp32 run of Algorithm 1 within fp32's
// tolerance, which reading the rounded param instead would miss by far.
template <typename param_t>
void check_master_copies(int64_t limit) {
  const std::string what = std::string(type_name<param_t>()) + " master copies, " + path_name(limit);
  const std::vector<Shape> shapes = option_shapes(limit);
  std::mt19937_64 rng(51), shadow_rng(51);
  std::vector<std::unique_ptr<Tensor<param_t, float>>> tensors;
  std::vector<std::unique_ptr<Tensor<float, float>>> shadows;  // the fp32 truth, from the masters
  std::vector<std::unique_ptr<Buffer<float>>> masters;
  for (const Shape& s : shapes) {
    tensors.push_back(std::make_unique<Tensor<param_t, float>>(s, rng));
    shadows.push_back(std::make_unique<Tensor<float, float>>(s, shadow_rng));
    masters.push_back(std::make_unique<Buffer<float>>(tensors.back()->param.size(), 0));
    Tensor<param_t, float>& t = *tensors.back();
    Tensor<float, float>& shadow = *shadows.back();
    for (size_t i = 0; i < t.param.size(); ++i) {
      // The master keeps fp32 digits the param cannot hold.
      (*masters.back())[i] = shadow.param[i];
      t.param[i] = static_cast<param_t>(shadow.param[i]);
      t.exp_avg[i] = shadow.exp_avg[i];
    }
    for (int64_t r = 0; r < s.rows; ++r) t.exp_avg_sq[r] = shadow.exp_avg_sq[r];
  }
  Launcher<param_t, float, ndadam::RowWrite::kMasterAndParam> launcher;
  const Hyper h;
  for (int step = 0; step < 2; ++step) {
    std::vector<plan::TensorArguments> arguments;
    for (size_t i = 0; i < tensors.size(); ++i) {
      tensors[i]->new_gradient(rng, 0.1);
      plan::TensorArguments a = tensors[i]->arguments();
      a.master = masters[i]->data();
      arguments.push_back(a);
      std::vector<float> grad(tensors[i]->grad.size());
      for (size_t e = 0; e < grad.size(); ++e) grad[e] = static_cast<float>(tensors[i]->grad[e]);
      shadows[i]->oracle_step(grad.data(), h.lr, h.beta1, h.beta2, h.eps);
    }
    launcher.launch(arguments, h, limit, what);
  }
  double worst = 0;
  bool rounded = true;
  for (size_t i = 0; i < tensors.size(); ++i) {
    for (size_t e = 0; e < tensors[i]->param.size(); ++e) {
      const float master = (*masters[i])[e];
      worst = std::max(worst, std::abs(double(master) - shadows[i]->w64[e]));
      const param_t nearest = static_cast<param_t>(master);
      rounded = rounded && std::memcmp(&nearest, &tensors[i]->param[e], sizeof(param_t)) == 0;
    }
    check(tensors[i]->step[0] == 5.0f && masters[i]->guards_intact(), what + ": step count or master guards");
  }
  check(worst <= 1e-5, what + ": master copies off the fp32 run by " + std::to_string(worst));
  check(rounded, what + ": a param is not its master rounded to nearest");
}

void test_master_copies() {
  for (const int64_t limit : {ndadam::kSinglePassMaxRowLength, int64_t(0)}) {
    check_master_copies<HostBFloat16>(limit);
#ifdef NDADAM_HOST_HALF
    check_master_copies<HostHalf>(limit);
#endif
  }
}

// ndadam_fused/rounding.py, written again from its docstring with its own int64 arithmetic and
// masks (not from the kernels' header): the bf16 bits of x rounded stochastically.
uint16_t specified_stochastic_bf16(float x, int64_t seed, float step, int64_t index) {
  constexpr uint64_t kMask = 0xFFFFFFFFull;
  auto mul32 = [](uint64_t a, uint64_t b) { return (a * b) & kMask; };  // a, b < 2^32: no overflow
  auto fmix32 = [&](uint64_t v) {
    v ^= v >> 16;
    v = mul32(v, 0x85EBCA6Bull);
    v ^= v >> 13;
    v = mul32(v, 0xC2B2AE35ull);
    return v ^ (v >> 16);
  };
  const uint64_t t = static_cast<uint64_t>(static_cast<int64_t>(step)) & kMask;
  const uint64_t key = fmix32((static_cast<uint64_t>(seed) & kMask) ^ mul32(t, 0x85EBCA77ull));
  const uint64_t random = fmix32(mul32(static_cast<uint64_t>(index) & kMask, 0x9E3779B1ull) ^ key) & 0xFFFFull;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return static_cast<uint16_t>(((static_cast<uint64_t>(bits) + random) & 0xFFFF0000ull) >> 16);
}

// Stochastic rounding: a bf16 param gets w' rounded with the hash of (its seed, the step after
// the increment, the element's row-major index), bit for bit the specification. w' itself is
// what the master-copy kernel writes to its master when it starts from the same values (the same
// plan and sums: both kernels step bf16 params), so the expected bits follow from that run.
void test_stochastic_rounding_is_the_specification() {
  for (const int64_t limit : {ndadam::kSinglePassMaxRowLength, int64_t(0)}) {
    const std::string what = "stochastic rounding, " + path_name(limit);
    const std::vector<Shape> shapes = option_shapes(limit);
    std::mt19937_64 rng(61), twin_rng(61), seed_rng(62);
    std::vector<std::unique_ptr<Tensor<HostBFloat16, float>>> rounded, twins;
    std::vector<std::unique_ptr<Buffer<float>>> masters;
    std::vector<int64_t> seeds;
    for (const Shape& s : shapes) {
      rounded.push_back(std::make_unique<Tensor<HostBFloat16, float>>(s, rng));
      twins.push_back(std::make_unique<Tensor<HostBFloat16, float>>(s, twin_rng));
      masters.push_back(std::make_unique<Buffer<float>>(rounded.back()->param.size(), 0));
      // Seeds past 32 bits and negative ones: only the low 32 bits count.
      seeds.push_back(static_cast<int64_t>(seed_rng()) >> (seeds.size() % 2 ? 0 : 20));
    }
    Launcher<HostBFloat16, float, ndadam::RowWrite::kStochasticParam> launcher;
    Launcher<HostBFloat16, float, ndadam::RowWrite::kMasterAndParam> twin_launcher;
    int64_t differ = 0, rounded_up = 0, rounded_down = 0, elements = 0;
    for (int step = 0; step < 2; ++step) {
      std::vector<plan::TensorArguments> arguments, twin_arguments;
      for (size_t i = 0; i < shapes.size(); ++i) {
        rounded[i]->new_gradient(rng, 0.1);
        Tensor<HostBFloat16, float>& twin = *twins[i];
        for (size_t e = 0; e < twin.param.size(); ++e) {
          twin.grad[e] = rounded[i]->grad[e];
          twin.param[e] = rounded[i]->param[e];
          (*masters[i])[e] = static_cast<float>(rounded[i]->param[e]);
        }
        plan::TensorArguments a = rounded[i]->arguments();
        a.rounding_seed = &seeds[i];
        arguments.push_back(a);
        plan::TensorArguments b = twin.arguments();
        b.master = masters[i]->data();
        twin_arguments.push_back(b);
      }
      launcher.launch(arguments, Hyper{}, limit, what);
      twin_launcher.launch(twin_arguments, Hyper{}, limit, what + " (twin with master copies)");
      for (size_t i = 0; i < shapes.size(); ++i) {
        Tensor<HostBFloat16, float>& t = *rounded[i];
        check(same_bits(t.exp_avg.data(), twins[i]->exp_avg.data(), t.exp_avg.size()) &&
                  same_bits(t.exp_avg_sq.data(), twins[i]->exp_avg_sq.data(), t.exp_avg_sq.size()),
              what + ": the moments differ from the twin's");
        for (size_t e = 0; e < t.param.size(); ++e) {
          const float w_new = (*masters[i])[e];
          const uint16_t expected = specified_stochastic_bf16(w_new, seeds[i], t.step[0], static_cast<int64_t>(e));
          differ += t.param[e].bits != expected;
          const HostBFloat16 nearest(w_new);
          rounded_up += static_cast<float>(t.param[e]) > static_cast<float>(nearest);
          rounded_down += static_cast<float>(t.param[e]) < static_cast<float>(nearest);
          ++elements;
        }
      }
    }
    check(differ == 0, what + ": " + std::to_string(differ) + " of " + std::to_string(elements) +
                           " params differ from rounding.py's specification");
    // Not round to nearest: many elements go the other way.
    check(rounded_up > elements / 20 && rounded_down > elements / 20,
          what + ": rounded away from nearest " + std::to_string(rounded_up) + " up and " +
              std::to_string(rounded_down) + " down of " + std::to_string(elements));
  }
}

// Issue 9 item 9: a step whose update is exactly zero (lr = 0; or m' = 0 on a row: zero
// gradients from fresh state, the step distributed checkpointing runs to create state) leaves
// every param bit as it was. The rows are unit only to fp32 rounding, so dividing them by their
// norm again would move bits.
template <typename param_t, typename acc_t>
void check_zero_update(int64_t limit, bool zero_lr) {
  const std::string what = std::string(type_name<param_t>()) + (zero_lr ? " lr = 0, " : " zero gradients, fresh state, ") +
                           path_name(limit);
  const std::vector<Shape> shapes = option_shapes(limit);
  std::mt19937_64 rng(71);
  std::vector<std::unique_ptr<Tensor<param_t, acc_t>>> tensors;
  std::vector<std::vector<param_t>> before;
  std::vector<plan::TensorArguments> arguments;
  int64_t moved_rows_if_renormalized = 0;
  for (const Shape& s : shapes) {
    tensors.push_back(std::make_unique<Tensor<param_t, acc_t>>(s, rng));
    Tensor<param_t, acc_t>& t = *tensors.back();
    if (zero_lr) {
      t.new_gradient(rng, 0.5);
    } else {
      std::fill(t.grad.data(), t.grad.data() + t.grad.size(), static_cast<param_t>(0.0f));
      std::fill(t.exp_avg.data(), t.exp_avg.data() + t.exp_avg.size(), acc_t(0));
      std::fill(t.exp_avg_sq.data(), t.exp_avg_sq.data() + s.rows, acc_t(0));
      t.step[0] = 0.0f;
    }
    before.emplace_back(t.param.data(), t.param.data() + t.param.size());
    for (int64_t r = 0; r < s.rows; ++r) {
      acc_t sq = 0;
      for (int64_t i = 0; i < s.row_length; ++i) sq += acc_t(t.param[r * s.row_length + i]) * acc_t(t.param[r * s.row_length + i]);
      moved_rows_if_renormalized += sq != acc_t(1);
    }
    arguments.push_back(t.arguments());
  }
  check(moved_rows_if_renormalized > 0, what + ": every row is exactly unit, the test shows nothing");
  Launcher<param_t, acc_t> launcher;
  launcher.launch(arguments, Hyper{zero_lr ? 0.0 : 0.05, 0.9, 0.99, 1e-8}, limit, what);
  int64_t moved = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    for (size_t e = 0; e < before[i].size(); ++e) {
      moved += std::memcmp(&before[i][e], &tensors[i]->param[e], sizeof(param_t)) != 0;
    }
    check(tensors[i]->step[0] == (zero_lr ? 4.0f : 1.0f), what + ": the step did not count");
  }
  check(moved == 0, what + ": " + std::to_string(moved) + " param elements changed");
}

void test_zero_update_keeps_every_bit() {
  for (const int64_t limit : {ndadam::kSinglePassMaxRowLength, int64_t(0)}) {
    for (const bool zero_lr : {true, false}) {
      check_zero_update<float, float>(limit, zero_lr);
      check_zero_update<double, double>(limit, zero_lr);
      check_zero_update<HostBFloat16, float>(limit, zero_lr);
    }
  }
}

// ---- The table cache, as vector_step_cuda.cu uses it -----------------------------------------

// Steady state with fresh gradient tensors every step (zero_grad(set_to_none=True), FSDP2): no
// table is built after the first step, and every step uses that step's gradients.
void test_fresh_gradients_build_no_table() {
  std::mt19937_64 rng(3);
  std::vector<Shape> shapes = {{6, 20}, {3, 1000}, {40, 64}};
  std::vector<std::unique_ptr<Tensor<float, float>>> tensors;
  for (const Shape& s : shapes) tensors.push_back(std::make_unique<Tensor<float, float>>(s, rng));
  Launcher<float, float> launcher;
  const Hyper h;
  for (int step = 0; step < 4; ++step) {
    // New gradient buffers at new addresses (aligned as the allocator aligns).
    std::vector<std::unique_ptr<Buffer<float>>> fresh;
    std::vector<plan::TensorArguments> arguments;
    for (auto& t : tensors) {
      fresh.push_back(std::make_unique<Buffer<float>>(t->grad.size(), 0));
      t->new_gradient(rng, 0.1);
      std::copy(t->grad.data(), t->grad.data() + t->grad.size(), fresh.back()->data());
      // Poison the tensor's own grad buffer: a stale gradient address would read it.
      std::fill(t->grad.data(), t->grad.data() + t->grad.size(), 1e6f);
      plan::TensorArguments a = t->arguments();
      a.grad = fresh.back()->data();
      arguments.push_back(a);
    }
    launcher.launch(arguments, h, ndadam::kSinglePassMaxRowLength, "fresh gradients, step " + std::to_string(step + 1));
    for (size_t i = 0; i < tensors.size(); ++i) tensors[i]->oracle_step(fresh[i]->data(), h.lr, h.beta1, h.beta2, h.eps);
  }
  check(launcher.cache().builds() == 1,
        "fresh gradients every step built " + std::to_string(launcher.cache().builds()) + " tables in 4 steps, not 1");
  Errors e;
  for (auto& t : tensors) e.add(errors_of_kernel(*t));
  check(e.w <= 1e-5 && e.m <= 1e-5, "fresh gradients: params off by " + std::to_string(e.w));
}

// The same addresses with a new shape (a buffer reused by a tensor of another shape) must get a
// table of its own: a table keyed without the shape steps the old rows.
void test_new_shape_same_addresses_gets_new_table() {
  std::mt19937_64 rng(4);
  Tensor<float, float> big(Shape{16, 64}, rng);  // buffers large enough for both shapes
  Launcher<float, float> launcher;
  const Hyper h;
  for (const Shape s : {Shape{4, 256}, Shape{16, 64}}) {
    // A tensor of shape s over big's buffers, with its own start values.
    Tensor<float, float> fresh(s, rng);
    std::copy(fresh.param.data(), fresh.param.data() + fresh.param.size(), big.param.data());
    std::copy(fresh.exp_avg.data(), fresh.exp_avg.data() + fresh.exp_avg.size(), big.exp_avg.data());
    std::copy(fresh.exp_avg_sq.data(), fresh.exp_avg_sq.data() + s.rows, big.exp_avg_sq.data());
    big.step[0] = fresh.step[0];
    fresh.new_gradient(rng, 0.3);
    std::copy(fresh.grad.data(), fresh.grad.data() + fresh.grad.size(), big.grad.data());
    plan::TensorArguments a = big.arguments();
    a.rows = s.rows;
    a.row_length = s.row_length;
    launcher.launch({a}, h, ndadam::kSinglePassMaxRowLength,
                    "shape " + std::to_string(s.rows) + " x " + std::to_string(s.row_length));
    fresh.oracle_step(fresh.grad.data(), h.lr, h.beta1, h.beta2, h.eps);
    double worst = 0;
    for (size_t i = 0; i < fresh.w64.size(); ++i) worst = std::max(worst, std::abs(double(big.param[i]) - fresh.w64[i]));
    check(worst <= 1e-5, "same addresses, shape " + std::to_string(s.rows) + " x " + std::to_string(s.row_length) +
                             ": params off by " + std::to_string(worst) + " (a stale table?)");
  }
  check(launcher.cache().builds() == 2, "a new shape at the same addresses built " +
                                            std::to_string(launcher.cache().builds()) + " tables, not 2");
}

// A view one element into a flat buffer is 4 bytes off 16: its plan must not use wide accesses
// (the emulation reports a misaligned one, as the GPU would fault on it), and the step is right.
void test_misaligned_view_gets_narrow_accesses() {
  std::mt19937_64 rng(6);
  const std::vector<Shape> shapes = {{3, 64, 1}, {2, 1000, 1}, {5, 8, 1}};
  run_and_compare<float, float>(shapes, ndadam::kSinglePassMaxRowLength, 2, "views one element into their buffers",
                                {"vector width 1"});
  for (const Shape& s : shapes) {
    Tensor<float, float> t(s, rng);
    const plan::LaunchPlan p = plan::make_launch_plan({t.arguments()}, 4, 4, ndadam::kSinglePassMaxRowLength);
    check(p.entries()[0].vector_width == 1, "a view one element into its buffer got vector width " +
                                                std::to_string(p.entries()[0].vector_width));
  }
}

// The lr (and betas, eps) of each launch are used, also when the table comes from the cache:
// gradients updated in place under an lr schedule.
void test_hyperparameters_of_each_launch_are_used() {
  std::mt19937_64 rng(8);
  Tensor<float, float> t(Shape{6, 96}, rng);
  Launcher<float, float> launcher;
  for (const Hyper h : {Hyper{0.1, 0.9, 0.99, 1e-8}, Hyper{0.01, 0.9, 0.99, 1e-8}, Hyper{0.001, 0.8, 0.9, 1e-6}}) {
    t.new_gradient(rng, 0.1);  // in place: same addresses, same table
    launcher.launch({t.arguments()}, h, ndadam::kSinglePassMaxRowLength, "lr " + std::to_string(h.lr));
    t.oracle_step(t.grad.data(), h.lr, h.beta1, h.beta2, h.eps);
  }
  check(launcher.cache().builds() == 1, "gradients updated in place built more than one table");
  const Errors e = errors_of_kernel(t);
  check(e.w <= 1e-5, "changing lr, betas and eps with a cached table: params off by " + std::to_string(e.w));
}

// A table made during stream capture lives for ever: more eager tables than the cache keeps do
// not evict it, and eager launches never use it (nor captures an eager one).
void test_captured_tables_are_kept() {
  plan::TableCache<HostTable> cache(2);
  auto upload = [](const std::vector<uint8_t>& bytes) { return HostTable{bytes}; };
  const std::vector<uint8_t> captured_bytes(64, 7);
  const auto captured = cache.find_or_build(captured_bytes, 0, 1, true, upload);
  const HostTable* captured_storage = captured.storage;
  const std::vector<uint8_t> eager_copy = captured_bytes;
  const auto eager = cache.find_or_build(eager_copy, 0, 1, false, upload);
  check(eager.built && eager.storage != captured_storage, "an eager launch used a table made during capture");
  const auto recapture = cache.find_or_build(eager_copy, 0, 1, true, upload);
  check(recapture.built && recapture.storage != eager.storage, "a capture used an eager table");
  for (uint8_t i = 0; i < 10; ++i) {
    cache.find_or_build(std::vector<uint8_t>(64, i), 0, 1, false, upload);
  }
  check(cache.eager_tables() == 2, "the cache kept " + std::to_string(cache.eager_tables()) + " eager tables, not 2");
  check(cache.captured_tables() == 2 && captured_storage->bytes == captured_bytes,
        "a table made during capture was evicted or changed");
}

// Plan invariants on many random launches: every row of every tensor is in exactly one team,
// teams fit their blocks, and the lanes add up.
void test_plan_invariants() {
  std::mt19937_64 rng(9);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<plan::TensorArguments> tensors;
    const int n = 1 + static_cast<int>(rng() % 40);
    uintptr_t address = 1 << 20;
    for (int i = 0; i < n; ++i) {
      const int64_t rows = static_cast<int64_t>(rng() % 50);
      const int64_t length = 1 + static_cast<int64_t>(rng() % (trial % 4 == 0 ? 12000 : 300));
      auto at = [&](int k) { return reinterpret_cast<void*>(address + (uintptr_t(k) << 32) + (rng() % 3) * 4); };
      tensors.push_back({at(0), at(1), at(2), at(3), static_cast<float*>(at(4)), rows, length});
      address += 1 << 22;
    }
    const int64_t limit = trial % 3 == 0 ? 0 : ndadam::kSinglePassMaxRowLength;
    const plan::LaunchPlan p = plan::make_launch_plan(tensors, 4, 4, limit);
    int64_t elements = 0;
    for (int32_t i = 0; i < p.tensors(); ++i) {
      const plan::TensorEntry& e = p.entries()[i];
      const plan::TensorArguments& t = tensors[p.order[i]];
      const int64_t warps = p.first_warp()[i + 1] - p.first_warp()[i];
      elements += e.rows * e.row_length;
      bool ok = e.param == t.param && e.rows == (t.row_length == 0 ? 0 : t.rows) && warps >= 1;
      if (e.path == plan::kWarpRows) {
        ok = ok && (e.team_size & (e.team_size - 1)) == 0 && e.team_size <= 32 &&
             int64_t(e.team_size) * plan::kMaxElementsPerThread >= (e.rows ? e.row_length : 0) &&
             warps * (32 / e.team_size) >= e.rows;
      } else {
        ok = ok && p.first_warp()[i] % plan::kWarpsPerBlock == 0 && warps % plan::kWarpsPerBlock == 0;
        if (e.path == plan::kBlockRows) {
          ok = ok && e.team_size % 32 == 0 && int64_t(e.team_size) * plan::kMaxElementsPerThread >= e.row_length &&
               e.row_length <= limit && (warps / 32) * (32 / (e.team_size / 32)) >= e.rows;
        } else {
          ok = ok && e.row_length > limit && warps / 32 == e.rows;
        }
      }
      const bool aligned = reinterpret_cast<uintptr_t>(e.param) % (e.vector_width * 4) == 0 &&
                           reinterpret_cast<uintptr_t>(t.grad) % (e.vector_width * 4) == 0 &&
                           e.row_length % e.vector_width == 0;
      const int64_t expected_blocks =
          (p.first_warp()[i + 1] - 1) / plan::kWarpsPerBlock - p.first_warp()[i] / plan::kWarpsPerBlock + 1;
      ok = ok && aligned && e.blocks_touched == expected_blocks;
      if (!ok) {
        check(false, "plan invariant broken for tensor " + std::to_string(p.order[i]) + " of " +
                         std::to_string(t.rows) + " x " + std::to_string(t.row_length) + " in trial " +
                         std::to_string(trial));
        return;
      }
    }
    check(elements == p.lanes.elements && p.lanes.slots >= elements && p.blocks * 32 >= p.first_warp()[n],
          "plan lane count broken in trial " + std::to_string(trial));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::pair<std::string, void (*)()>> tests = {
      {"plan_invariants", test_plan_invariants},
      {"captured_tables_are_kept", test_captured_tables_are_kept},
      {"mixed_launch_float32", test_mixed_launch_float32},
      {"mixed_launch_float64", test_mixed_launch_float64},
      {"half_types", test_half_types},
      {"statistics_path_forced", test_statistics_path_forced},
      {"length_one_rows_stay_unit", test_length_one_rows_stay_unit},
      {"eps_zero_zero_gradient", test_eps_zero_zero_gradient},
      {"eps_zero_subnormal_second_moment", test_eps_zero_subnormal_second_moment},
      {"fresh_gradients_build_no_table", test_fresh_gradients_build_no_table},
      {"new_shape_same_addresses_gets_new_table", test_new_shape_same_addresses_gets_new_table},
      {"misaligned_view_gets_narrow_accesses", test_misaligned_view_gets_narrow_accesses},
      {"hyperparameters_of_each_launch_are_used", test_hyperparameters_of_each_launch_are_used},
      {"unscaling_equals_division", test_unscaling_equals_division},
      {"grad_scale_unscales_on_the_fly", test_grad_scale_unscales_on_the_fly},
      {"found_inf_changes_nothing", test_found_inf_changes_nothing},
      {"master_copies", test_master_copies},
      {"stochastic_rounding_is_the_specification", test_stochastic_rounding_is_the_specification},
      {"zero_update_keeps_every_bit", test_zero_update_keeps_every_bit},
  };
  return emulated_test::run(argc, argv, tests, "emulated CUDA kernel");
}
