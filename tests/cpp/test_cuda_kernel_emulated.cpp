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
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "cuda/ndadam_cuda_kernel.cuh"
#include "cuda/ndadam_cuda_plan.h"
#include "host_half.h"

namespace {

namespace plan = ndadam::cuda_plan;
namespace kernel = ndadam::cuda_kernel;

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

// Every problem the emulation recorded since the last call fails the test under `what`.
void check_emulation(const std::string& what) {
  for (const std::string& problem : simt::problems().take()) {
    check(false, what + ": " + problem);
  }
}

simt::Device& device() {
  static simt::Device instance(plan::kThreadsPerBlock);
  return instance;
}

template <typename T>
constexpr const char* type_name() {
  if constexpr (std::is_same_v<T, float>) {
    return "float32";
  } else if constexpr (std::is_same_v<T, double>) {
    return "float64";
  } else if constexpr (std::is_same_v<T, HostBFloat16>) {
    return "bfloat16";
  } else {
    return "float16";
  }
}

// Memory for one array of a tensor: 256-byte aligned (as the caching allocators align), starting
// `offset_elements` in (a view into a larger buffer), with guard bytes on both sides that must
// survive every launch.
template <typename T>
class Buffer {
 public:
  Buffer(size_t elements, size_t offset_elements)
      : elements_(elements), offset_bytes_(offset_elements * sizeof(T)),
        storage_((kGuard * 2 + offset_bytes_ + elements * sizeof(T) + 255) / 256 * 256 + 256) {
    const uintptr_t start = (reinterpret_cast<uintptr_t>(storage_.data()) + kGuard + 255) / 256 * 256;
    data_ = reinterpret_cast<T*>(start + offset_bytes_);
    std::fill(storage_.begin(), storage_.end(), kPattern);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  T* data() { return data_; }
  T& operator[](size_t i) { return data_[i]; }
  size_t size() const { return elements_; }

  bool guards_intact() const {
    const auto* begin = reinterpret_cast<const uint8_t*>(data_);
    const auto* end = begin + elements_ * sizeof(T);
    for (const uint8_t* p = storage_.data(); p < begin; ++p) {
      if (*p != kPattern) return false;
    }
    for (const uint8_t* p = end; p < storage_.data() + storage_.size(); ++p) {
      if (*p != kPattern) return false;
    }
    return true;
  }

 private:
  static constexpr size_t kGuard = 64;
  static constexpr uint8_t kPattern = 0xa5;
  size_t elements_;
  size_t offset_bytes_;
  std::vector<uint8_t> storage_;
  T* data_;
};

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
  const std::string filter = argc > 1 ? argv[1] : "";
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
  };
  int ran = 0;
  for (const auto& [name, test] : tests) {
    if (name.find(filter) == std::string::npos) continue;
    const int before = failures;
    const auto started = std::chrono::steady_clock::now();
    test();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    std::printf("%s %s (%.1f s)\n", failures == before ? "ok    " : "FAILED", name.c_str(), seconds);
    ++ran;
  }
  if (ran == 0) {
    std::printf("no test matches '%s'\n", filter.c_str());
    return 1;
  }
  if (failures > 0) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("emulated CUDA kernel: all checks passed\n");
  return 0;
}
