// The launch plan of the CUDA kernel: which threads step which rows, and the device table that
// tells them. Torch-free and CUDA-free on purpose: vector_step_cuda.cu builds its tables with it,
// the C++ tests (tests/cpp) run the emulated kernel on the very same plan, and ndadam_fused._C
// exposes its lane counts to the Python tests (cuda_plan_lanes).
//
// Work split (DESIGN.md section 4). A block has kThreadsPerBlock threads, in warps of 32. Each
// tensor takes one of three paths:
//
// - warp rows (exact path, rows up to 256 elements): a team of 1-32 threads (a power of two) per
//   row, 32 / team rows per warp. Every warp of such a tensor works on its own: sums are warp
//   shuffles, no barrier. Their warps are packed back to back across tensors, so a block may
//   hold warps of up to 32 tensors (a launch of 2,000 small tensors needs no block per tensor).
// - block rows (exact path, rows of 257 to kOnChipRowCapacity elements): a team of k whole
//   warps per row (k = 2..32, not only powers of two), 32 / k rows per block; sums go through
//   shared memory. Such a tensor owns whole blocks.
// - statistics rows (rows longer than the cut-over): one row per block, two sweeps.
//
// A thread holds up to kMaxElementsPerThread elements of its row per array (w, ḡ, m) in
// registers; the plan picks the team size and the access width per tensor so that few thread
// slots stay idle (threads x elements they could hold; see choose_layout).
//
// The device table (cached while params, state and shapes stay the same, see TableCache) holds
// a TensorEntry per tensor, the prefix sum of warps per tensor (a warp finds its tensor by a
// binary search) and one arrival counter per tensor for the step count. Gradients are not in
// it: their addresses change from step to step (zero_grad(set_to_none=True), FSDP2), so they
// travel in a small array of their own with each launch.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <list>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace ndadam::cuda_plan {

constexpr int kThreadsPerBlock = 1024;
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = kThreadsPerBlock / kWarpSize;
// Elements of a row one thread holds per array on the exact path (registers; 64 per thread at
// 1024 threads per block).
constexpr int kMaxElementsPerThread = 8;
// The longest row the exact path holds on chip.
constexpr int64_t kOnChipRowCapacity = int64_t(kThreadsPerBlock) * kMaxElementsPerThread;
// The widest global access (bytes) a thread issues: 128-bit loads and stores.
constexpr int kWidestAccessBytes = 16;
// A plan may take up to 1/8 more thread slots than the fewest if that buys wider accesses:
// one 16-byte access does the work of two to eight narrower ones.
constexpr int64_t kWiderAccessSlackNumerator = 9;
constexpr int64_t kWiderAccessSlackDenominator = 8;

enum RowPath : int32_t {
  kWarpRows = 0,
  kBlockRows = 1,
  kStatisticsRows = 2,
};

// One tensor of a launch, as the device reads it.
struct TensorEntry {
  void* param;
  void* exp_avg;
  void* exp_avg_sq;
  float* step;
  void* master;                 // its fp32 master copy (kernels that write master copies), else null
  const int64_t* rounding_seed;  // its stochastic-rounding seed (kernels that round so), else null
  int64_t rows;        // 0: nothing to update (its step still counts)
  int64_t row_length;
  int32_t path;        // RowPath
  int32_t team_size;   // threads per row: 1-32 (warp rows), 64-1024 in whole warps (block rows)
  int32_t vector_width;  // elements per access: 1, 2, 4 or 8, dividing row_length
  int32_t blocks_touched;  // blocks holding a warp of this tensor: arrivals before the step is written
};
static_assert(sizeof(TensorEntry) == 80, "the table layout below assumes 80-byte entries");

// What the plan needs to know of one tensor of the call.
struct TensorArguments {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  float* step;
  int64_t rows;
  int64_t row_length;
  void* master = nullptr;
  const int64_t* rounding_seed = nullptr;
};

// Thread slots of a plan (threads launched x elements each could hold): idle = 1 - elements / slots.
struct LaneCount {
  int64_t elements = 0;
  int64_t slots = 0;
};

// Team size and access width of one tensor.
struct Layout {
  int32_t path;
  int32_t team_size;
  int32_t vector_width;
  int32_t elements_per_thread;  // elements a thread of the team holds (a multiple of vector_width)
  int64_t warps;                // warps this tensor occupies, idle ones included
  int64_t slots;                // warps * 32 * elements_per_thread
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned_to(const void* pointer, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % static_cast<uintptr_t>(bytes) == 0;
}

// The widest access (in elements) every row of the tensor allows: the row length a multiple of
// it, every base address aligned to it, at most 16 bytes of the param type. exp_avg and the
// master copy (acc_t) are read in pieces of at most 16 bytes, so they need only
// min(16, width * acc_size) alignment.
inline int32_t widest_vector_width(const TensorArguments& t, int param_size, int acc_size) {
  int32_t width = 1;
  for (int32_t candidate = 2; candidate <= 8; candidate *= 2) {
    const int64_t param_bytes = int64_t(candidate) * param_size;
    const int64_t acc_bytes = std::min<int64_t>(kWidestAccessBytes, int64_t(candidate) * acc_size);
    if (param_bytes > kWidestAccessBytes || t.row_length % candidate != 0 || !aligned_to(t.param, param_bytes) ||
        !aligned_to(t.grad, param_bytes) || !aligned_to(t.exp_avg, acc_bytes) ||
        (t.master != nullptr && !aligned_to(t.master, acc_bytes))) {
      break;
    }
    width = candidate;
  }
  return width;
}

// The layout of a tensor of `rows` rows of `length` elements whose accesses may be up to
// `max_width` elements wide. Exact-path rows: every team size (1-32 threads, or 2-32 whole
// warps) and access width that holds the row in at most kMaxElementsPerThread elements per
// thread; the fewest slots wins, except that a wider access within 1/8 more slots is preferred;
// then the fewest slots; then the smaller team (more rows per warp or block, cheaper sums).
inline Layout choose_layout(int64_t rows, int64_t length, int32_t max_width, int64_t single_pass_limit) {
  if (rows == 0 || length == 0) {
    // Nothing to read: teams of one lane, a warp per 32 rows (the rows-split ops still write each
    // row's statistics and second moment), and one warp where there are no rows, which still
    // counts the step.
    const int64_t warps = std::max<int64_t>(1, ceil_div(rows, kWarpSize));
    return Layout{kWarpRows, 1, 1, 1, warps, warps * kWarpSize};
  }
  if (length > single_pass_limit) {
    const int64_t per_sweep = int64_t(kThreadsPerBlock) * max_width;
    const int64_t elements_per_thread = ceil_div(length, per_sweep) * max_width;
    return Layout{kStatisticsRows, kThreadsPerBlock, max_width,
                  static_cast<int32_t>(std::min<int64_t>(elements_per_thread, std::numeric_limits<int32_t>::max())),
                  rows * kWarpsPerBlock, rows * kThreadsPerBlock * elements_per_thread};
  }
  // Every candidate, in two passes (no allocation: this runs for every tensor of every step).
  auto for_each_candidate = [&](auto&& visit) {
    for (int32_t width = 1; width <= max_width; width *= 2) {
      // 1, 2, 4, ..., 32 lanes; then 2, 3, ..., 32 whole warps. Teams too small to hold the row
      // are skipped; past the first team whose threads hold one access each, a larger team only
      // adds threads (the same elements per thread, more warps per row), so the search stops there.
      for (int32_t team = 1; team <= kThreadsPerBlock; team = team < kWarpSize ? team * 2 : team + kWarpSize) {
        if (int64_t(team) * kMaxElementsPerThread < length) {
          continue;
        }
        const int64_t elements_per_thread = ceil_div(length, int64_t(team) * width) * width;
        if (elements_per_thread > kMaxElementsPerThread) {
          continue;
        }
        const bool last = elements_per_thread == width;
        Layout layout{};
        layout.team_size = team;
        layout.vector_width = width;
        layout.elements_per_thread = static_cast<int32_t>(elements_per_thread);
        if (team <= kWarpSize) {
          layout.path = kWarpRows;
          layout.warps = ceil_div(rows, kWarpSize / team);
        } else {
          const int64_t rows_per_block = kWarpsPerBlock / (team / kWarpSize);
          layout.path = kBlockRows;
          layout.warps = ceil_div(rows, rows_per_block) * kWarpsPerBlock;
        }
        layout.slots = layout.warps * kWarpSize * elements_per_thread;
        visit(layout);
        if (last) {
          break;
        }
      }
    }
  };
  int64_t fewest = std::numeric_limits<int64_t>::max();
  for_each_candidate([&](const Layout& c) { fewest = std::min(fewest, c.slots); });
  if (fewest == std::numeric_limits<int64_t>::max()) {
    throw std::invalid_argument("ndadam_fused CUDA plan: a row of " + std::to_string(length) +
                                " elements does not fit on chip; the cut-over must be at most " +
                                std::to_string(kOnChipRowCapacity));
  }
  Layout best{};
  bool found = false;
  for_each_candidate([&](const Layout& c) {
    if (c.slots * kWiderAccessSlackDenominator > fewest * kWiderAccessSlackNumerator) {
      return;
    }
    if (!found || c.vector_width > best.vector_width ||
        (c.vector_width == best.vector_width &&
         (c.slots < best.slots || (c.slots == best.slots && c.team_size < best.team_size)))) {
      best = c;
      found = true;
    }
  });
  return best;
}

// The bytes of a launch's device table and where its parts start. Layout: n TensorEntry, then
// n + 1 int64 first warps (prefix sum of warps per tensor), then n int32 arrival counters
// (zero; each launch leaves them zero again).
struct LaunchPlan {
  std::vector<uint8_t> table;
  // order[i]: the caller's index of the tensor in entry i (warp-row tensors go last, so that the
  // tensors owning whole blocks start at block boundaries without padding).
  std::vector<int32_t> order;
  int64_t blocks = 0;
  size_t first_warp_offset = 0;
  size_t arrivals_offset = 0;
  LaneCount lanes;

  int32_t tensors() const { return static_cast<int32_t>(order.size()); }
  const TensorEntry* entries() const { return reinterpret_cast<const TensorEntry*>(table.data()); }
  const int64_t* first_warp() const { return reinterpret_cast<const int64_t*>(table.data() + first_warp_offset); }
};

// The plan of one launch over `tensors`, whose params have `param_size`-byte elements and whose
// state has `acc_size`-byte elements; rows longer than `single_pass_limit` take the statistics path.
// Rows of no elements are kept (`rows_without_elements`: the rows-split ops, whose rank may hold
// no column of a row but still steps its second moment) or dropped (the vector step: such a
// tensor has nothing to update but its step count).
inline LaunchPlan make_launch_plan(const std::vector<TensorArguments>& tensors, int param_size, int acc_size,
                                   int64_t single_pass_limit, bool rows_without_elements = false) {
  if (single_pass_limit > kOnChipRowCapacity) {
    throw std::invalid_argument("ndadam_fused CUDA plan: single_pass_limit " + std::to_string(single_pass_limit) +
                                " exceeds the on-chip capacity " + std::to_string(kOnChipRowCapacity));
  }
  const size_t n = tensors.size();
  LaunchPlan plan;
  plan.first_warp_offset = n * sizeof(TensorEntry);
  plan.arrivals_offset = plan.first_warp_offset + (n + 1) * sizeof(int64_t);
  // Zero-filled: padding bytes too, since the cache compares tables byte by byte.
  plan.table.assign(plan.arrivals_offset + n * sizeof(int32_t), 0);

  std::vector<Layout> layouts(n);
  for (size_t i = 0; i < n; ++i) {
    const TensorArguments& t = tensors[i];
    const int64_t rows = t.row_length == 0 && !rows_without_elements ? 0 : t.rows;
    layouts[i] = choose_layout(rows, t.row_length, widest_vector_width(t, param_size, acc_size), single_pass_limit);
  }
  for (size_t i = 0; i < n; ++i) {
    if (layouts[i].path != kWarpRows) {
      plan.order.push_back(static_cast<int32_t>(i));
    }
  }
  for (size_t i = 0; i < n; ++i) {
    if (layouts[i].path == kWarpRows) {
      plan.order.push_back(static_cast<int32_t>(i));
    }
  }

  auto* entries = reinterpret_cast<TensorEntry*>(plan.table.data());
  auto* first_warp = reinterpret_cast<int64_t*>(plan.table.data() + plan.first_warp_offset);
  int64_t warps = 0;
  for (size_t slot = 0; slot < n; ++slot) {
    const TensorArguments& t = tensors[plan.order[slot]];
    const Layout& layout = layouts[plan.order[slot]];
    TensorEntry& e = entries[slot];
    e.param = t.param;
    e.exp_avg = t.exp_avg;
    e.exp_avg_sq = t.exp_avg_sq;
    e.step = t.step;
    e.master = t.master;
    e.rounding_seed = t.rounding_seed;
    e.rows = t.row_length == 0 && !rows_without_elements ? 0 : t.rows;
    e.row_length = t.row_length;
    e.path = layout.path;
    e.team_size = layout.team_size;
    e.vector_width = layout.vector_width;
    first_warp[slot] = warps;
    warps += layout.warps;
    const int64_t blocks_touched = (warps - 1) / kWarpsPerBlock - first_warp[slot] / kWarpsPerBlock + 1;
    e.blocks_touched = static_cast<int32_t>(blocks_touched);
    plan.lanes.elements += e.rows * e.row_length;
    plan.lanes.slots += layout.slots;
  }
  first_warp[n] = warps;
  plan.blocks = ceil_div(warps, kWarpsPerBlock);
  // The grid's last block may end in warps that hold no tensor: idle, at the most elements a
  // thread can hold.
  plan.lanes.slots += (plan.blocks * kWarpsPerBlock - warps) * kWarpSize * kMaxElementsPerThread;
  return plan;
}

// Device copies of launch tables, kept while the same tensors come back. `Storage` holds one
// table on the device (vector_step_cuda.cu: a CUDA tensor; the C++ tests: host memory) and
// `upload(bytes)` makes one.
//
// Keyed by the table's bytes (params, state, steps, shapes and the plan; a gradient enters only
// through the access width its alignment allows), the device and the stream: the arrival
// counters in a table must not be shared by launches that may run at the same time.
//
// CUDA graphs: a captured launch reads its table whenever the graph replays, so a table made
// during capture is never evicted or reused by eager launches (captured_for_ever), and eager
// tables are never handed to a capture (the graph and eager launches would share counters).
template <typename Storage>
class TableCache {
 public:
  explicit TableCache(size_t eager_tables_kept) : eager_tables_kept_(eager_tables_kept) {}

  struct Found {
    const Storage* storage;
    bool built;
  };

  template <typename Upload>
  Found find_or_build(const std::vector<uint8_t>& table, int device, uintptr_t stream, bool capturing, Upload&& upload) {
    if (!capturing) {
      for (auto it = eager_.begin(); it != eager_.end(); ++it) {
        if (it->device == device && it->stream == stream && it->bytes == table) {
          eager_.splice(eager_.begin(), eager_, it);
          return Found{&eager_.front().storage, false};
        }
      }
    }
    ++builds_;
    Entry entry{device, stream, table, upload(table)};
    if (capturing) {
      captured_for_ever_.push_back(std::move(entry));
      return Found{&captured_for_ever_.back().storage, true};
    }
    eager_.push_front(std::move(entry));
    if (eager_.size() > eager_tables_kept_) {
      eager_.pop_back();
    }
    return Found{&eager_.front().storage, true};
  }

  int64_t builds() const { return builds_; }
  size_t eager_tables() const { return eager_.size(); }
  size_t captured_tables() const { return captured_for_ever_.size(); }

 private:
  struct Entry {
    int device;
    uintptr_t stream;
    std::vector<uint8_t> bytes;
    Storage storage;
  };
  size_t eager_tables_kept_;
  int64_t builds_ = 0;
  std::list<Entry> eager_;
  std::list<Entry> captured_for_ever_;
};

}  // namespace ndadam::cuda_plan
