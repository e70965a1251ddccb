// The CUDA kernels of the rows-split ops (csrc/cuda/split_rows_cuda_kernel.cuh) on their real
// launch plan and table cache, run on the CPU by the SIMT emulation (simt_emulation.h), as
// csrc/cuda/split_rows_cuda.cu launches them. No GPU, no torch.
//
// Each test cuts every row of a few tensors into column pieces, as tensor parallelism leaves
// them on its ranks (a piece may hold no column of a row), takes phase 1 on each piece, sums the
// statistics over the pieces (what the all-reduce does), takes phase 2 on each piece, and checks
// the rows put back together against an independent float64 loop of Algorithm 1 on the whole
// rows; every piece must get the same second moments, bit for bit. Then the options: GradScaler
// (a run with a scale equals, bit for bit, a run on pre-divided gradients; found_inf changes
// nothing), master copies, stochastic rounding (bit for bit rounding.py's specification, written
// again here), and a zero update (lr = 0) that must keep every param bit.
//
//   test_split_rows_emulated [name-filter]
#include "simt_emulation.h"  // first: the kernel header takes the CUDA built-ins from it

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cuda/ndadam_cuda_plan.h"
#include "cuda/split_rows_cuda_kernel.cuh"
#include "emulated_test_harness.h"
#include "guarded_buffer.h"
#include "host_half.h"

namespace {

namespace plan = ndadam::cuda_plan;
namespace kernel = ndadam::cuda_kernel;
using ndadam::RowWrite;

using emulated_test::check;
using emulated_test::check_emulation;
using emulated_test::device;
using emulated_test::failures;

struct Hyper {
  double lr = 0.05;
  double beta1 = 0.9;
  double beta2 = 0.99;
  double eps = 1e-8;
};

// One tensor cut into column pieces: the full rows in float64 (the oracle's state) and each
// piece's own buffers, as a rank holds them (rows contiguous, `lengths[k]` columns each).
template <typename param_t, typename acc_t>
struct SplitTensor {
  int64_t rows;
  std::vector<int64_t> lengths;  // columns of each piece
  std::vector<std::unique_ptr<Buffer<param_t>>> param, grad;
  std::vector<std::unique_ptr<Buffer<acc_t>>> exp_avg;
  std::vector<std::unique_ptr<Buffer<float>>> master;        // fp32 master copies (filled on demand)
  std::vector<std::unique_ptr<Buffer<acc_t>>> exp_avg_sq;    // every piece its replica of v
  std::vector<std::unique_ptr<Buffer<float>>> step;          // every piece its replica of the step
  std::vector<double> w64, m64, v64;                          // the whole rows, float64
  double step64 = 3.0;

  int64_t length() const {
    int64_t total = 0;
    for (const int64_t l : lengths) total += l;
    return total;
  }
  int64_t first_column(size_t piece) const {
    int64_t first = 0;
    for (size_t k = 0; k < piece; ++k) first += lengths[k];
    return first;
  }

  SplitTensor(int64_t rows_, int64_t length, size_t pieces, std::mt19937_64& rng) : rows(rows_) {
    // Columns as torch.chunk cuts a Shard(1) DTensor: ceil(length / pieces) each, the last ones
    // shorter or empty.
    const int64_t chunk = (length + int64_t(pieces) - 1) / int64_t(pieces);
    for (size_t k = 0; k < pieces; ++k) {
      lengths.push_back(std::max<int64_t>(0, std::min(chunk, length - int64_t(k) * chunk)));
    }
    std::normal_distribution<double> normal;
    w64.resize(static_cast<size_t>(rows * length));
    m64.resize(w64.size());
    v64.resize(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) {
      double sq = 0;
      for (int64_t i = 0; i < length; ++i) sq += (w64[r * length + i] = normal(rng)) * w64[r * length + i];
      for (int64_t i = 0; i < length; ++i) w64[r * length + i] /= std::sqrt(sq);
      v64[r] = 1e-4 * std::abs(normal(rng));
    }
    for (double& m : m64) m = 0.01 * normal(rng);
    for (size_t k = 0; k < pieces; ++k) {
      const size_t n = static_cast<size_t>(rows * lengths[k]);
      param.push_back(std::make_unique<Buffer<param_t>>(n, 0));
      grad.push_back(std::make_unique<Buffer<param_t>>(n, 0));
      exp_avg.push_back(std::make_unique<Buffer<acc_t>>(n, 0));
      master.push_back(std::make_unique<Buffer<float>>(n, 0));
      exp_avg_sq.push_back(std::make_unique<Buffer<acc_t>>(static_cast<size_t>(rows), 0));
      step.push_back(std::make_unique<Buffer<float>>(1, 0));
      (*step[k])[0] = 3.0f;
    }
    // The pieces start from the stored values; so does the oracle.
    for_each_element([&](size_t k, size_t local, size_t full) {
      (*param[k])[local] = static_cast<param_t>(static_cast<acc_t>(w64[full]));
      w64[full] = static_cast<double>(static_cast<acc_t>((*param[k])[local]));
      (*exp_avg[k])[local] = static_cast<acc_t>(m64[full]);
      m64[full] = static_cast<double>((*exp_avg[k])[local]);
    });
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t v = static_cast<acc_t>(v64[r]);
      v64[r] = static_cast<double>(v);
      for (size_t k = 0; k < pieces; ++k) (*exp_avg_sq[k])[r] = v;
    }
  }

  // fn(piece, index in the piece, index in the whole tensor) for every element.
  template <typename Fn>
  void for_each_element(Fn&& fn) {
    const int64_t length = this->length();
    for (size_t k = 0; k < lengths.size(); ++k) {
      const int64_t first = first_column(k);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < lengths[k]; ++i) {
          fn(k, static_cast<size_t>(r * lengths[k] + i), static_cast<size_t>(r * length + first + i));
        }
      }
    }
  }

  // A fresh gradient in every piece (values held exactly by param_t), `scale` times it in `scaled`
  // when given; returns the whole rows' ḡ in float64 for the oracle.
  std::vector<double> new_gradient(std::mt19937_64& rng, double size) {
    std::normal_distribution<double> normal;
    std::vector<double> g(w64.size());
    for_each_element([&](size_t k, size_t local, size_t full) {
      (*grad[k])[local] = static_cast<param_t>(static_cast<acc_t>(size * normal(rng)));
      g[full] = static_cast<double>(static_cast<acc_t>((*grad[k])[local]));
    });
    return g;
  }

  plan::TensorArguments arguments(size_t k) {
    return plan::TensorArguments{param[k]->data(), grad[k]->data(), exp_avg[k]->data(), exp_avg_sq[k]->data(),
                                 step[k]->data(), rows, lengths[k]};
  }

  // Algorithm 1 on the whole rows, in float64, written from the paper (not from the kernels).
  void oracle_step(const std::vector<double>& grad_full, const Hyper& h) {
    step64 += 1;
    const int64_t n = length();
    for (int64_t r = 0; r < rows; ++r) {
      double* w = &w64[r * n];
      double* m = &m64[r * n];
      const double* gb = &grad_full[r * n];
      double a = 0;
      for (int64_t i = 0; i < n; ++i) a += gb[i] * w[i];
      double g_sq = 0;
      for (int64_t i = 0; i < n; ++i) {
        const double g = gb[i] - a * w[i];
        g_sq += g * g;
        m[i] = h.beta1 * m[i] + (1 - h.beta1) * g;
      }
      v64[r] = h.beta2 * v64[r] + (1 - h.beta2) * g_sq;
      double denominator = std::sqrt(v64[r] / (1 - std::pow(h.beta2, step64))) + h.eps;
      if (!(denominator > 0)) denominator = 1;
      double norm = 0;
      for (int64_t i = 0; i < n; ++i) {
        w[i] = w[i] - h.lr * (m[i] / (1 - std::pow(h.beta1, step64))) / denominator;
        norm += w[i] * w[i];
      }
      for (int64_t i = 0; i < n; ++i) w[i] /= std::sqrt(norm);
    }
  }
};

struct HostTable {
  std::vector<uint8_t> bytes;
};

// GradScaler's tensors (null: none).
struct Scaler {
  const float* grad_scale = nullptr;
  const float* found_inf = nullptr;
};

// The two launches of split_rows_cuda.cu over one rank's pieces: the plan (rows of no element
// kept), the cache, the gradients and first rows per launch in the table's order, blocks in a
// shuffled order, warps taking turns in either order.
template <typename param_t, typename acc_t>
class SplitLauncher {
 public:
  // Phase 1 into `statistics` ([Σ rows, 6]).
  template <bool kFromMaster>
  void row_statistics(const std::vector<plan::TensorArguments>& tensors, acc_t* statistics, const Scaler& scaler,
                      const std::string& what) {
    run(tensors, statistics, nullptr, scaler, what, [&](const kernel::SplitLaunchArguments& split) {
      std::unique_ptr<kernel::SplitShared<acc_t>> shared;
      blocks(split, [&](int64_t) { shared = std::make_unique<kernel::SplitShared<acc_t>>(); },
             [&](int64_t) { kernel::row_statistics_block<param_t, acc_t, kFromMaster>(split, *shared); });
    });
  }

  // Phase 2 from the reduced `statistics`.
  template <RowWrite kWrite>
  void apply(const std::vector<plan::TensorArguments>& tensors, acc_t* statistics, const Hyper& h, const Scaler& scaler,
             const std::string& what) {
    const double hyper[4] = {h.lr, h.beta1, h.beta2, h.eps};
    run(tensors, statistics, hyper, scaler, what, [&](const kernel::SplitLaunchArguments& split) {
      std::unique_ptr<kernel::SplitShared<acc_t>> shared;
      blocks(split, [&](int64_t) { shared = std::make_unique<kernel::SplitShared<acc_t>>(); },
             [&](int64_t) { kernel::apply_row_statistics_block<param_t, acc_t, kWrite>(split, *shared); });
    });
  }

 private:
  template <typename Launch>
  void run(const std::vector<plan::TensorArguments>& tensors, acc_t* statistics, const double* hyper,
           const Scaler& scaler, const std::string& what, Launch&& launch) {
    plan_ = plan::make_launch_plan(tensors, sizeof(param_t), sizeof(acc_t), plan::kOnChipRowCapacity, true);
    const auto found = cache_.find_or_build(plan_.table, 0, 0, false,
                                            [](const std::vector<uint8_t>& bytes) { return HostTable{bytes}; });
    auto* table = const_cast<uint8_t*>(found.storage->bytes.data());
    const size_t n = tensors.size();
    std::vector<int64_t> first_rows(n);
    int64_t rows = 0;
    for (size_t i = 0; i < n; ++i) {
      first_rows[i] = rows;
      rows += tensors[i].rows;
    }
    per_launch_.assign(2 * n, 0);
    for (size_t i = 0; i < n; ++i) {
      per_launch_[i] = reinterpret_cast<int64_t>(tensors[plan_.order[i]].grad);
      per_launch_[n + i] = first_rows[plan_.order[i]];
    }
    kernel::SplitLaunchArguments split{};
    split.args.entries = reinterpret_cast<const plan::TensorEntry*>(table);
    split.args.first_warp = reinterpret_cast<const int64_t*>(table + plan_.first_warp_offset);
    split.args.arrivals = reinterpret_cast<int32_t*>(table + plan_.arrivals_offset);
    split.args.grads = reinterpret_cast<const void* const*>(per_launch_.data());
    split.args.hyper = hyper;
    split.args.grad_scale = scaler.grad_scale;
    split.args.found_inf = scaler.found_inf;
    split.args.tensors = plan_.tensors();
    split.statistics = statistics;
    split.first_rows = per_launch_.data() + n;
    launch(split);
    check_emulation(what);
    for (int32_t i = 0; i < plan_.tensors(); ++i) {
      check(split.args.arrivals[i] == 0, what + ": an arrival counter is not 0 after the launch");
    }
  }

  template <typename Prepare, typename Body>
  void blocks(const kernel::SplitLaunchArguments&, Prepare&& prepare, Body&& body) {
    std::vector<int64_t> order(static_cast<size_t>(plan_.blocks));
    for (int64_t b = 0; b < plan_.blocks; ++b) order[b] = b;
    std::shuffle(order.begin(), order.end(), std::mt19937_64(++launches_));
    device().run(order, prepare, body, launches_ % 2 == 0);
  }

  plan::TableCache<HostTable> cache_{16};
  plan::LaunchPlan plan_;
  std::vector<int64_t> per_launch_;
  uint64_t launches_ = 0;
};

// Rows of every path of the plan: a lane per row (up to 8 elements), teams of lanes and of
// warps, a block per row past 8192 elements; with 2 or 3 pieces some pieces of the length-2 and
// length-1 rows are empty.
struct SplitShape {
  int64_t rows;
  int64_t length;
};
const std::vector<SplitShape> kSplitShapes = {{5, 1}, {7, 2}, {3, 54}, {40, 64}, {2, 1000}, {1, 9000}};

template <typename param_t, typename acc_t>
using Tensors = std::vector<std::unique_ptr<SplitTensor<param_t, acc_t>>>;

template <typename param_t, typename acc_t>
Tensors<param_t, acc_t> make_tensors(size_t pieces, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Tensors<param_t, acc_t> tensors;
  for (const SplitShape& s : kSplitShapes) {
    tensors.push_back(std::make_unique<SplitTensor<param_t, acc_t>>(s.rows, s.length, pieces, rng));
  }
  return tensors;
}

// One step of the two phases on every piece, as the ranks take it: phase 1 per piece, the sum of
// the statistics, phase 2 per piece; returns the summed statistics.
template <typename param_t, typename acc_t, RowWrite kWrite = RowWrite::kParam>
void split_step(Tensors<param_t, acc_t>& tensors, SplitLauncher<param_t, acc_t>& launcher, const Hyper& h,
                const Scaler& scaler, const std::string& what,
                const std::vector<std::vector<const int64_t*>>* seeds = nullptr) {
  const size_t pieces = tensors[0]->lengths.size();
  int64_t rows = 0;
  for (auto& t : tensors) rows += t->rows;
  std::vector<acc_t> summed(static_cast<size_t>(rows * kernel::kRowStatistics), acc_t(0));
  constexpr bool kFromMaster = kWrite == RowWrite::kMasterAndParam;
  auto piece_arguments = [&](size_t k) {
    std::vector<plan::TensorArguments> arguments;
    for (size_t i = 0; i < tensors.size(); ++i) {
      plan::TensorArguments a = tensors[i]->arguments(k);
      if (kFromMaster) a.master = tensors[i]->master[k]->data();
      if (seeds != nullptr) a.rounding_seed = (*seeds)[i][k];
      arguments.push_back(a);
    }
    return arguments;
  };
  for (size_t k = 0; k < pieces; ++k) {
    // Poisoned: phase 1 must write every row's statistics.
    std::vector<acc_t> statistics(summed.size(), std::numeric_limits<acc_t>::quiet_NaN());
    launcher.template row_statistics<kFromMaster>(piece_arguments(k), statistics.data(), scaler,
                                                  what + ", phase 1 of piece " + std::to_string(k));
    for (size_t j = 0; j < summed.size(); ++j) summed[j] += statistics[j];
  }
  for (size_t k = 0; k < pieces; ++k) {
    launcher.template apply<kWrite>(piece_arguments(k), summed.data(), h, scaler,
                                    what + ", phase 2 of piece " + std::to_string(k));
  }
}

// The whole rows put back together from the pieces, against the float64 oracle (max abs on the
// unit rows; moments relative to their size), every piece's v and step the same bits.
template <typename param_t, typename acc_t>
void compare_with_oracle(Tensors<param_t, acc_t>& tensors, double tolerance, const std::string& what,
                         bool from_master = false) {
  double w_error = 0, m_error = 0, v_error = 0;
  bool replicas_agree = true, guards = true;
  for (auto& t : tensors) {
    double m_scale = 1, v_scale = 1;
    for (const double x : t->m64) m_scale = std::max(m_scale, std::abs(x));
    for (const double x : t->v64) v_scale = std::max(v_scale, std::abs(x));
    t->for_each_element([&](size_t k, size_t local, size_t full) {
      const double w = from_master ? double((*t->master[k])[local]) : double(static_cast<acc_t>((*t->param[k])[local]));
      w_error = std::max(w_error, std::abs(w - t->w64[full]));
      m_error = std::max(m_error, std::abs(double((*t->exp_avg[k])[local]) - t->m64[full]) / m_scale);
    });
    for (size_t k = 0; k < t->lengths.size(); ++k) {
      replicas_agree = replicas_agree && std::memcmp(t->exp_avg_sq[k]->data(), t->exp_avg_sq[0]->data(),
                                                     sizeof(acc_t) * size_t(t->rows)) == 0 &&
                       (*t->step[k])[0] == float(t->step64);
      guards = guards && t->param[k]->guards_intact() && t->exp_avg[k]->guards_intact() &&
               t->exp_avg_sq[k]->guards_intact() && t->master[k]->guards_intact() && t->grad[k]->guards_intact();
    }
    for (int64_t r = 0; r < t->rows; ++r) {
      v_error = std::max(v_error, std::abs(double((*t->exp_avg_sq[0])[r]) - t->v64[r]) / v_scale);
    }
  }
  check(w_error <= tolerance, what + ": params off Algorithm 1 by " + std::to_string(w_error));
  check(m_error <= tolerance, what + ": exp_avg off by " + std::to_string(m_error));
  check(v_error <= tolerance, what + ": exp_avg_sq off by " + std::to_string(v_error));
  check(replicas_agree, what + ": the pieces disagree on a second moment or a step count");
  check(guards, what + ": a write outside a piece");
  std::printf("%-52s params %.2e, m %.2e, v %.2e\n", what.c_str(), w_error, m_error, v_error);
}

template <typename param_t, typename acc_t>
void check_matches_algorithm_1(size_t pieces, double tolerance) {
  const std::string what = std::string(type_name<param_t>()) + ", " + std::to_string(pieces) + " pieces";
  Tensors<param_t, acc_t> tensors = make_tensors<param_t, acc_t>(pieces, 7);
  SplitLauncher<param_t, acc_t> launcher;
  std::mt19937_64 rng(8);
  const Hyper h;
  for (int step = 0; step < 2; ++step) {
    std::vector<std::vector<double>> grads;
    for (auto& t : tensors) grads.push_back(t->new_gradient(rng, std::pow(10.0, step - 1.0)));
    split_step(tensors, launcher, h, Scaler{}, what);
    for (size_t i = 0; i < tensors.size(); ++i) tensors[i]->oracle_step(grads[i], h);
  }
  compare_with_oracle(tensors, tolerance, what);
}

void test_pieces_match_algorithm_1() {
  for (const size_t pieces : {size_t(1), size_t(2), size_t(3)}) {
    check_matches_algorithm_1<float, float>(pieces, 1e-5);
  }
  check_matches_algorithm_1<double, double>(2, 1e-10);
}

template <typename param_t, typename acc_t>
bool same_pieces(Tensors<param_t, acc_t>& a, Tensors<param_t, acc_t>& b) {
  bool same = true;
  for (size_t i = 0; i < a.size(); ++i) {
    for (size_t k = 0; k < a[i]->lengths.size(); ++k) {
      const size_t n = a[i]->param[k]->size();
      same = same && std::memcmp(a[i]->param[k]->data(), b[i]->param[k]->data(), n * sizeof(param_t)) == 0 &&
             std::memcmp(a[i]->exp_avg[k]->data(), b[i]->exp_avg[k]->data(), n * sizeof(acc_t)) == 0 &&
             std::memcmp(a[i]->exp_avg_sq[k]->data(), b[i]->exp_avg_sq[k]->data(), a[i]->rows * sizeof(acc_t)) == 0 &&
             (*a[i]->step[k])[0] == (*b[i]->step[k])[0];
    }
  }
  return same;
}

// GradScaler: grads holding scale x ḡ with the scale give, bit for bit, what grads holding ḡ
// (the quotient, rounded once) give without one, in both phases, for any scale (each element is
// unscaled as it is read); found_inf set changes nothing at all.
template <typename param_t, typename acc_t>
void check_grad_scale(float scale) {
  const std::string what = std::string(type_name<param_t>()) + " grad_scale " + std::to_string(scale);
  Tensors<param_t, acc_t> scaled = make_tensors<param_t, acc_t>(2, 17), plain = make_tensors<param_t, acc_t>(2, 17);
  SplitLauncher<param_t, acc_t> scaled_launcher, plain_launcher;
  std::mt19937_64 rng(18);
  for (int step = 0; step < 2; ++step) {
    for (size_t i = 0; i < scaled.size(); ++i) {
      std::normal_distribution<double> normal;
      scaled[i]->for_each_element([&](size_t k, size_t local, size_t) {
        const param_t stored = static_cast<param_t>(static_cast<float>(scale * 0.1 * normal(rng)));
        (*scaled[i]->grad[k])[local] = stored;
        (*plain[i]->grad[k])[local] = static_cast<param_t>(static_cast<acc_t>(stored) / static_cast<acc_t>(scale));
      });
    }
    split_step(scaled, scaled_launcher, Hyper{}, Scaler{&scale, nullptr}, what);
    split_step(plain, plain_launcher, Hyper{}, Scaler{}, what + " (pre-divided)");
  }
  check(same_pieces(scaled, plain), what + ": differs from the run on pre-divided gradients");

  Tensors<param_t, acc_t> untouched = make_tensors<param_t, acc_t>(2, 17);
  Tensors<param_t, acc_t> skipped = make_tensors<param_t, acc_t>(2, 17);
  for (auto& t : skipped) t->new_gradient(rng, 0.1);
  for (size_t i = 0; i < skipped.size(); ++i) {
    for (size_t k = 0; k < skipped[i]->lengths.size(); ++k) {
      std::copy(skipped[i]->grad[k]->data(), skipped[i]->grad[k]->data() + skipped[i]->grad[k]->size(),
                untouched[i]->grad[k]->data());
    }
  }
  const float flag = 1.0f;
  SplitLauncher<param_t, acc_t> skipped_launcher;
  split_step(skipped, skipped_launcher, Hyper{}, Scaler{&scale, &flag}, what + ", found_inf");
  check(same_pieces(skipped, untouched), what + ": found_inf set, but the step changed something");
}

void test_grad_scale_and_found_inf() {
  check_grad_scale<float, float>(1000.0f);
  check_grad_scale<float, float>(4096.0f);
  // bf16: a power of two, so that the pre-divided gradients hold the quotients exactly.
  check_grad_scale<HostBFloat16, float>(4096.0f);
}

// Master copies: phase 1 reads w from the masters and phase 2 writes w' to them and w' rounded to
// nearest to the params; the masters follow Algorithm 1 within fp32's tolerance.
template <typename param_t>
void check_master_copies() {
  const std::string what = std::string(type_name<param_t>()) + " master copies";
  Tensors<param_t, float> tensors = make_tensors<param_t, float>(2, 27);
  Tensors<float, float> shadows = make_tensors<float, float>(2, 27);  // the same values in fp32
  for (size_t i = 0; i < tensors.size(); ++i) {
    tensors[i]->w64 = shadows[i]->w64;
    tensors[i]->for_each_element([&](size_t k, size_t local, size_t) {
      (*tensors[i]->master[k])[local] = (*shadows[i]->param[k])[local];
      (*tensors[i]->param[k])[local] = static_cast<param_t>((*shadows[i]->param[k])[local]);
    });
  }
  SplitLauncher<param_t, float> launcher;
  std::mt19937_64 rng(28);
  const Hyper h;
  for (int step = 0; step < 2; ++step) {
    std::vector<std::vector<double>> grads;
    for (auto& t : tensors) grads.push_back(t->new_gradient(rng, 0.1));
    split_step<param_t, float, RowWrite::kMasterAndParam>(tensors, launcher, h, Scaler{}, what);
    for (size_t i = 0; i < tensors.size(); ++i) tensors[i]->oracle_step(grads[i], h);
  }
  compare_with_oracle(tensors, 1e-5, what, /*from_master=*/true);
  bool rounded = true;
  for (auto& t : tensors) {
    t->for_each_element([&](size_t k, size_t local, size_t) {
      const param_t nearest = static_cast<param_t>((*t->master[k])[local]);
      rounded = rounded && std::memcmp(&nearest, &(*t->param[k])[local], sizeof(param_t)) == 0;
    });
  }
  check(rounded, what + ": a param is not its master rounded to nearest");
}

void test_master_copies() {
  check_master_copies<HostBFloat16>();
#ifdef NDADAM_HOST_HALF
  check_master_copies<HostHalf>();
#endif
}

// rounding.py's specification, written again with int64 arithmetic and masks.
uint16_t specified_stochastic_bf16(float x, int64_t seed, float step, int64_t index) {
  constexpr uint64_t kMask = 0xFFFFFFFFull;
  auto mul32 = [](uint64_t a, uint64_t b) { return (a * b) & kMask; };
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

// Stochastic rounding: each piece's bf16 params get w' rounded with the hash of (the tensor's
// seed, the step after its increment, the element's row-major index in the PIECE). w' is what the
// master-copy kernels write to the masters of a twin that starts from the same values.
void test_stochastic_rounding_is_the_specification() {
  const std::string what = "stochastic rounding";
  Tensors<HostBFloat16, float> rounded = make_tensors<HostBFloat16, float>(2, 37);
  Tensors<HostBFloat16, float> twins = make_tensors<HostBFloat16, float>(2, 37);
  std::vector<int64_t> seed_values = {12345, -7, int64_t(1) << 40, 0x7FFFFFFF, 99, 3};
  std::vector<std::vector<const int64_t*>> seeds;
  for (size_t i = 0; i < rounded.size(); ++i) seeds.push_back({&seed_values[i], &seed_values[i]});
  SplitLauncher<HostBFloat16, float> launcher, twin_launcher;
  std::mt19937_64 rng(38);
  int64_t differ = 0, elements = 0, not_nearest = 0;
  for (int step = 0; step < 2; ++step) {
    for (size_t i = 0; i < rounded.size(); ++i) {
      rounded[i]->new_gradient(rng, 0.1);
      rounded[i]->for_each_element([&](size_t k, size_t local, size_t) {
        (*twins[i]->grad[k])[local] = (*rounded[i]->grad[k])[local];
        (*twins[i]->param[k])[local] = (*rounded[i]->param[k])[local];
        (*twins[i]->master[k])[local] = static_cast<float>((*rounded[i]->param[k])[local]);
      });
    }
    split_step<HostBFloat16, float, RowWrite::kStochasticParam>(rounded, launcher, Hyper{}, Scaler{}, what, &seeds);
    split_step<HostBFloat16, float, RowWrite::kMasterAndParam>(twins, twin_launcher, Hyper{}, Scaler{},
                                                                what + " (twin with master copies)");
    for (size_t i = 0; i < rounded.size(); ++i) {
      SplitTensor<HostBFloat16, float>& t = *rounded[i];
      for (size_t k = 0; k < t.lengths.size(); ++k) {
        for (size_t e = 0; e < t.param[k]->size(); ++e) {
          const float w_new = (*twins[i]->master[k])[e];
          const uint16_t expected = specified_stochastic_bf16(w_new, seed_values[i], (*t.step[k])[0], int64_t(e));
          differ += (*t.param[k])[e].bits != expected;
          not_nearest += (*t.param[k])[e].bits != HostBFloat16(w_new).bits;
          ++elements;
        }
      }
    }
  }
  check(differ == 0, what + ": " + std::to_string(differ) + " of " + std::to_string(elements) +
                         " params differ from rounding.py's specification");
  check(not_nearest > elements / 10, what + ": only " + std::to_string(not_nearest) + " of " +
                                         std::to_string(elements) + " params differ from round to nearest");
}

// lr = 0: phase 2 keeps every param bit (the closed forms' ||w̄|| of a unit row only to fp32
// rounding is not 1, so dividing by it would move bits), and still updates the moments.
void test_zero_lr_keeps_every_bit() {
  Tensors<float, float> tensors = make_tensors<float, float>(2, 47);
  std::vector<std::vector<std::vector<float>>> before;
  std::mt19937_64 rng(48);
  for (auto& t : tensors) {
    t->new_gradient(rng, 0.5);
    before.emplace_back();
    for (auto& piece : t->param) before.back().emplace_back(piece->data(), piece->data() + piece->size());
  }
  SplitLauncher<float, float> launcher;
  split_step(tensors, launcher, Hyper{0.0, 0.9, 0.99, 1e-8}, Scaler{}, "lr = 0");
  int64_t moved = 0;
  bool moments_moved = false;
  for (size_t i = 0; i < tensors.size(); ++i) {
    for (size_t k = 0; k < tensors[i]->lengths.size(); ++k) {
      for (size_t e = 0; e < before[i][k].size(); ++e) moved += before[i][k][e] != (*tensors[i]->param[k])[e];
      moments_moved = moments_moved || (*tensors[i]->exp_avg_sq[k])[0] != static_cast<float>(tensors[i]->v64[0]);
    }
  }
  check(moved == 0, "lr = 0: " + std::to_string(moved) + " param elements changed");
  check(moments_moved, "lr = 0: the second moments did not move (the step did not run)");
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::pair<std::string, void (*)()>> tests = {
      {"pieces_match_algorithm_1", test_pieces_match_algorithm_1},
      {"grad_scale_and_found_inf", test_grad_scale_and_found_inf},
      {"master_copies", test_master_copies},
      {"stochastic_rounding_is_the_specification", test_stochastic_rounding_is_the_specification},
      {"zero_lr_keeps_every_bit", test_zero_lr_keeps_every_bit},
  };
  return emulated_test::run(argc, argv, tests, "emulated rows-split CUDA kernels");
}
