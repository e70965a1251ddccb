// The CUDA kernel of ndadam_fused::vector_step_: ONE launch updates every row of every tensor
// of the call (DESIGN.md section 4), with the formulas of ndadam_row_math.h.
//
// Work split. Every thread block has kThreads threads and works on ONE tensor; a device table
// (TensorEntry per tensor, plus a prefix sum of blocks per tensor) tells a block its tensor by a
// binary search, so the launch takes any number of tensors. Within a tensor:
//
// - Exact path (rows up to the cut-over, default kSinglePassMaxRowLength): a "team" of
//   threads per row, the smallest power of two with team * kElementsPerThread >= row length,
//   so a block holds kThreads / team rows (1024 rows of length <= 8, one row of 8192). The row
//   is loaded once into registers; sums are warp shuffles (plus shared memory for teams wider
//   than a warp); g and ||w̄|| are explicit; m' and w' are stored once. 20 bytes per fp32
//   element.
// - Statistics path (longer rows): one row per block; one sweep for the six statistics, the
//   closed forms, one sweep writing m' and w'. 32 bytes per fp32 element.
//
// Loads and stores are 4 elements wide where every row start of param, grad and exp_avg is
// aligned for it (row length divisible by 4, aligned bases), one element otherwise.
//
// Step counts: each tensor's float32 step tensor is read by every block of that tensor (t =
// step + 1 for the bias corrections) and written once, step + 1, by the last of those blocks to
// finish reading (a per-tensor arrival counter in the table, reset by that block), so the
// increment needs no second launch.
//
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers that a plain
// CUDA toolkit install may lack (BUILD-NOTES.md).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <list>
#include <mutex>
#include <vector>

#include "../ndadam_op.h"
#include "../ndadam_row_math.h"

namespace ndadam {
namespace cuda_kernel {

// 1024 threads x 8 elements, rather than 512 x 16: at 1024 threads a block may use 64 registers
// per thread, which ptxas (CUDA 13.0, sm_90) meets with every load of the 4-wide exact path in
// flight; the 1-wide exact path (rows whose length is not a multiple of 4) spills 24-44 bytes
// in fp32, more in fp64. 512 x 16 took 128 registers and spilled on every path.
constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
// Elements of a row each thread holds in registers on the exact path.
constexpr int kElementsPerThread = 8;
// The longest row the exact path can hold on chip; the cut-over may not exceed it.
constexpr int64_t kOnChipRowCapacity = int64_t(kThreads) * kElementsPerThread;
static_assert(kOnChipRowCapacity >= kSinglePassMaxRowLength, "the default cut-over must fit on chip");

struct TensorEntry {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  float* step;
  int64_t rows;        // 0 for a tensor with nothing to update (its step still counts)
  int64_t row_length;
  int32_t team_size;   // threads per row on the exact path; 0: statistics path, one row per block
  int32_t vector_width;  // 4: every row start is aligned for 4-element loads; 1 otherwise
};
static_assert(sizeof(TensorEntry) % alignof(int64_t) == 0, "the block prefix sum follows the entries");

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T value[N];
};

// Elements [start, start + VEC) of a row of `length`, as acc_t; zeros past the end. With VEC > 1
// the caller guarantees that length and start are multiples of VEC, so a chunk is whole or absent.
template <int VEC, typename T, typename acc_t, typename index_t>
__device__ __forceinline__ void load_elements(const T* __restrict__ row, index_t start, index_t length,
                                              acc_t* out) {
  if (start < length) {
    if constexpr (VEC == 1) {
      out[0] = static_cast<acc_t>(row[start]);
    } else {
      const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(row + start);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        out[j] = static_cast<acc_t>(pack.value[j]);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      out[j] = acc_t(0);
    }
  }
}

template <int VEC, typename T, typename acc_t, typename index_t>
__device__ __forceinline__ void store_elements(T* __restrict__ row, index_t start, index_t length,
                                               const acc_t* values) {
  if (start >= length) {
    return;
  }
  if constexpr (VEC == 1) {
    row[start] = static_cast<T>(values[0]);
  } else {
    Pack<T, VEC> pack;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      pack.value[j] = static_cast<T>(values[j]);
    }
    *reinterpret_cast<Pack<T, VEC>*>(row + start) = pack;
  }
}

// Sum of x over a team of `team` consecutive threads (a power of two, the same for the whole
// block); every thread of the team gets the same bits. Called by every thread of the block.
template <typename acc_t>
__device__ __forceinline__ acc_t team_sum(acc_t x, int team, acc_t* scratch) {
  const int width = team < 32 ? team : 32;
  // Butterfly: partners add the same two values, so all lanes end with identical sums.
  for (int offset = width / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  if (team <= 32) {
    return x;
  }
  const int warp = threadIdx.x / 32;
  if ((threadIdx.x & 31) == 0) {
    scratch[warp] = x;
  }
  __syncthreads();
  const int warps_per_team = team / 32;
  const int first_warp = warp - warp % warps_per_team;
  acc_t total = 0;
  for (int i = 0; i < warps_per_team; ++i) {
    total += scratch[first_warp + i];
  }
  __syncthreads();  // scratch is reused by the next sum
  return total;
}

// The exact path: kThreads / team rows per block, each held in its team's registers.
template <int VEC, typename param_t, typename acc_t>
__device__ void exact_rows(const TensorEntry& e, int64_t block_in_tensor, const StepScalars<acc_t>& k,
                           acc_t* scratch) {
  constexpr int kChunks = kElementsPerThread / VEC;
  const int team = e.team_size;
  const int lane = threadIdx.x & (team - 1);
  const int64_t row = block_in_tensor * (kThreads / team) + threadIdx.x / team;
  const bool active = row < e.rows;
  // An inactive team (past the tensor's last row) sees a row of length 0: it loads and stores
  // nothing but still joins the block-wide sums.
  // 32-bit offsets within the row: exact-path rows are at most kOnChipRowCapacity long.
  const int32_t length = active ? static_cast<int32_t>(e.row_length) : 0;
  const int64_t offset = active ? row * e.row_length : 0;
  param_t* __restrict__ w_row = static_cast<param_t*>(e.param) + offset;
  const param_t* __restrict__ grad_row = static_cast<const param_t*>(e.grad) + offset;
  acc_t* __restrict__ m_row = static_cast<acc_t*>(e.exp_avg) + offset;
  acc_t* v_row = static_cast<acc_t*>(e.exp_avg_sq) + (active ? row : 0);

  // With 4-wide loads every load is issued before the first sum (6 loads, 24 elements in
  // flight). With 1-wide loads, 24 addresses would not fit in 64 registers next to the values,
  // so m is loaded after the first sum.
  constexpr bool kLoadMomentEarly = VEC > 1;
  acc_t w[kElementsPerThread];
  acc_t grad[kElementsPerThread];  // ḡ, then m'
  acc_t m[kElementsPerThread];
  const acc_t v = active ? *v_row : acc_t(0);
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int32_t start = (c * team + lane) * VEC;
    load_elements<VEC>(w_row, start, length, &w[c * VEC]);
    load_elements<VEC>(grad_row, start, length, &grad[c * VEC]);
    if constexpr (kLoadMomentEarly) {
      load_elements<VEC>(m_row, start, length, &m[c * VEC]);
    }
  }

  acc_t partial = 0;
#pragma unroll
  for (int i = 0; i < kElementsPerThread; ++i) {
    partial += grad[i] * w[i];
  }
  const acc_t grad_dot_w = team_sum(partial, team, scratch);
  if constexpr (!kLoadMomentEarly) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      load_elements<VEC>(m_row, (c * team + lane) * VEC, length, &m[c * VEC]);
    }
  }

  partial = 0;
#pragma unroll
  for (int i = 0; i < kElementsPerThread; ++i) {
    const acc_t g = projected_gradient(grad[i], w[i], grad_dot_w);
    partial += g * g;
    grad[i] = first_moment_update(m[i], g, k);
  }
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    store_elements<VEC>(m_row, (c * team + lane) * VEC, length, &grad[c * VEC]);
  }
  const acc_t grad_sq_norm = team_sum(partial, team, scratch);
  const acc_t v_new = second_moment_update(v, grad_sq_norm, k);
  const acc_t s = step_size(v_new, k);

  partial = 0;
#pragma unroll
  for (int i = 0; i < kElementsPerThread; ++i) {
    w[i] = unnormalized_weight(w[i], grad[i], s);
    partial += w[i] * w[i];
  }
  // Every lane has used v by now (it went into this sum), so lane 0 may overwrite it below.
  const acc_t scale = inverse_norm(team_sum(partial, team, scratch));
#pragma unroll
  for (int i = 0; i < kElementsPerThread; ++i) {
    w[i] *= scale;
  }
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    store_elements<VEC>(w_row, (c * team + lane) * VEC, length, &w[c * VEC]);
  }
  if (active && lane == 0) {
    *v_row = v_new;
  }
}

// The statistics path: the block's one row, in two sweeps.
template <int VEC, typename param_t, typename acc_t>
__device__ void statistics_row(const TensorEntry& e, int64_t row, const StepScalars<acc_t>& k, acc_t* scratch) {
  const int64_t length = e.row_length;
  param_t* __restrict__ w_row = static_cast<param_t*>(e.param) + row * length;
  const param_t* __restrict__ grad_row = static_cast<const param_t*>(e.grad) + row * length;
  acc_t* __restrict__ m_row = static_cast<acc_t*>(e.exp_avg) + row * length;
  acc_t* v_row = static_cast<acc_t*>(e.exp_avg_sq) + row;
  const acc_t v = *v_row;

  acc_t gw = 0, gg = 0, ww = 0, mw = 0, mm = 0, mg = 0;
  for (int64_t start = int64_t(threadIdx.x) * VEC; start < length; start += int64_t(kThreads) * VEC) {
    acc_t w[VEC], grad[VEC], m[VEC];
    load_elements<VEC>(w_row, start, length, w);
    load_elements<VEC>(grad_row, start, length, grad);
    load_elements<VEC>(m_row, start, length, m);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      gw += grad[j] * w[j];
      gg += grad[j] * grad[j];
      ww += w[j] * w[j];
      mw += m[j] * w[j];
      mm += m[j] * m[j];
      mg += m[j] * grad[j];
    }
  }
  RowStatistics<acc_t> stats;
  stats.grad_dot_w = team_sum(gw, kThreads, scratch);
  stats.grad_dot_grad = team_sum(gg, kThreads, scratch);
  stats.w_dot_w = team_sum(ww, kThreads, scratch);
  stats.m_dot_w = team_sum(mw, kThreads, scratch);
  stats.m_dot_m = team_sum(mm, kThreads, scratch);
  stats.m_dot_grad = team_sum(mg, kThreads, scratch);
  const RowUpdate<acc_t> update = update_from_statistics(stats, v, k);

  for (int64_t start = int64_t(threadIdx.x) * VEC; start < length; start += int64_t(kThreads) * VEC) {
    acc_t w[VEC], grad[VEC], m[VEC];
    load_elements<VEC>(w_row, start, length, w);
    load_elements<VEC>(grad_row, start, length, grad);
    load_elements<VEC>(m_row, start, length, m);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      m[j] = first_moment_update(m[j], projected_gradient(grad[j], w[j], stats.grad_dot_w), k);
      w[j] = unnormalized_weight(w[j], m[j], update.step_size) * update.inverse_norm;
    }
    store_elements<VEC>(m_row, start, length, m);
    store_elements<VEC>(w_row, start, length, w);
  }
  // v was read by every thread before the six sums' barriers; one write suffices.
  if (threadIdx.x == 0) {
    *v_row = update.exp_avg_sq;
  }
}

template <typename param_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    vector_step_kernel(const TensorEntry* __restrict__ entries, const int64_t* __restrict__ first_block,
                       int32_t* __restrict__ blocks_arrived, int32_t tensors, const void* __restrict__ lr,
                       bool lr_is_double, double beta1, double beta2, double eps) {
  __shared__ acc_t scratch[kWarps];
  __shared__ StepScalars<acc_t> block_scalars;

  // This block's tensor: the last one whose first block is <= blockIdx.x.
  const int64_t block = blockIdx.x;
  int32_t low = 0, high = tensors - 1;
  while (low < high) {
    const int32_t middle = (low + high + 1) / 2;
    if (first_block[middle] <= block) {
      low = middle;
    } else {
      high = middle - 1;
    }
  }
  const int32_t tensor = low;
  const TensorEntry& e = entries[tensor];

  // One thread reads the step and lr and computes the bias corrections (double pow) for the
  // block: it keeps registers free for the rows.
  if (threadIdx.x == 0) {
    const float step = *e.step;
    // The read above must be done before this block is counted: the last block counted
    // overwrites the step.
    __threadfence();
    const int64_t blocks_of_tensor = first_block[tensor + 1] - first_block[tensor];
    if (atomicAdd(&blocks_arrived[tensor], 1) == blocks_of_tensor - 1) {
      *e.step = step + 1.0f;  // float32, as the reference increments its float32 step
      blocks_arrived[tensor] = 0;  // ready for the next launch
    }
    const double lr_value =
        lr_is_double ? *static_cast<const double*>(lr) : double(*static_cast<const float*>(lr));
    block_scalars = make_step_scalars<acc_t>(lr_value, beta1, beta2, eps, static_cast<double>(step + 1.0f));
  }
  __syncthreads();
  const StepScalars<acc_t>& k = block_scalars;
  const int64_t block_in_tensor = block - first_block[tensor];
  if (e.rows == 0) {
    return;  // uniform for the block: no barrier is skipped by only some threads
  }
  if (e.team_size == 0) {
    if (e.vector_width == 4) {
      statistics_row<4, param_t, acc_t>(e, block_in_tensor, k, scratch);
    } else {
      statistics_row<1, param_t, acc_t>(e, block_in_tensor, k, scratch);
    }
  } else {
    if (e.vector_width == 4) {
      exact_rows<4, param_t, acc_t>(e, block_in_tensor, k, scratch);
    } else {
      exact_rows<1, param_t, acc_t>(e, block_in_tensor, k, scratch);
    }
  }
}

// ---- Host side ------------------------------------------------------------------------------

int32_t team_size_for(int64_t row_length, int64_t single_pass_limit) {
  if (row_length > single_pass_limit) {
    return 0;
  }
  const int64_t threads_needed = (row_length + kElementsPerThread - 1) / kElementsPerThread;
  int32_t team = 1;
  while (team < threads_needed) {
    team *= 2;
  }
  return team;
}

bool aligned(const void* pointer, size_t bytes) { return reinterpret_cast<uintptr_t>(pointer) % bytes == 0; }

// The device copy of a call's table, cached while the same tensors come back: a training loop
// passes the same params, state and (usually) grads every step, so the table is uploaded once.
// Keyed by the table's bytes, the device and the stream (the arrival counters must not be
// shared by launches that could run concurrently). A few tables are kept: one per param group.
class TableCache {
 public:
  const uint8_t* device_copy(std::vector<uint8_t>&& bytes, const at::Device& device, cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = tables_.begin(); it != tables_.end(); ++it) {
      if (it->device == device && it->stream == stream && it->bytes == bytes) {
        tables_.splice(tables_.begin(), tables_, it);
        return tables_.front().on_device.const_data_ptr<uint8_t>();
      }
    }
    const int64_t size = static_cast<int64_t>(bytes.size());
    at::Tensor pinned = at::empty({size}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(pinned.data_ptr<uint8_t>(), bytes.data(), bytes.size());
    at::Tensor on_device = at::empty({size}, at::TensorOptions().dtype(at::kByte).device(device));
    // Asynchronous on the current stream; the pinned block is not reused before the copy ends
    // (torch's host allocator records the copy).
    on_device.copy_(pinned, /*non_blocking=*/true);
    tables_.push_front(Table{device, stream, std::move(bytes), on_device});
    if (tables_.size() > kTablesKept) {
      tables_.pop_back();  // freed in stream order by the caching allocator
    }
    return tables_.front().on_device.const_data_ptr<uint8_t>();
  }

 private:
  struct Table {
    at::Device device;
    cudaStream_t stream;
    std::vector<uint8_t> bytes;
    at::Tensor on_device;
  };
  static constexpr size_t kTablesKept = 16;
  std::mutex mutex_;
  std::list<Table> tables_;
};

TableCache& table_cache() {
  static TableCache* cache = new TableCache();  // never destroyed: CUDA may be gone at exit
  return *cache;
}

template <typename param_t>
void launch(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
            at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2, double eps,
            int64_t single_pass_limit) {
  using acc_t = at::opmath_type<param_t>;
  const size_t n = params.size();
  const size_t entries_bytes = n * sizeof(TensorEntry);
  const size_t prefix_bytes = (n + 1) * sizeof(int64_t);
  const size_t counter_bytes = n * sizeof(int32_t);
  std::vector<uint8_t> bytes(entries_bytes + prefix_bytes + counter_bytes, 0);  // counters start at 0
  auto* entries = reinterpret_cast<TensorEntry*>(bytes.data());
  auto* first_block = reinterpret_cast<int64_t*>(bytes.data() + entries_bytes);

  int64_t blocks = 0;
  for (size_t i = 0; i < n; ++i) {
    TensorEntry& e = entries[i];
    std::memset(&e, 0, sizeof(e));  // padding bytes too: the cache compares bytes
    e.param = params[i].data_ptr();
    e.grad = grads[i].const_data_ptr();
    e.exp_avg = exp_avgs[i].data_ptr();
    e.exp_avg_sq = exp_avg_sqs[i].data_ptr();
    e.step = state_steps[i].data_ptr<float>();
    e.row_length = row_length(params[i]);
    e.rows = e.row_length == 0 ? 0 : row_count(params[i]);
    e.team_size = team_size_for(e.row_length, single_pass_limit);
    const bool vectorizable = e.row_length % 4 == 0 && aligned(e.param, 4 * sizeof(param_t)) &&
                              aligned(e.grad, 4 * sizeof(param_t)) && aligned(e.exp_avg, 4 * sizeof(acc_t));
    e.vector_width = vectorizable ? 4 : 1;
    const int64_t rows_per_block = e.team_size == 0 ? 1 : kThreads / e.team_size;
    // At least one block per tensor, even an empty one: that block increments its step.
    first_block[i] = blocks;
    blocks += std::max<int64_t>(1, (e.rows + rows_per_block - 1) / rows_per_block);
  }
  first_block[n] = blocks;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "ndadam_fused::vector_step_: ", blocks,
              " thread blocks exceed one launch; split the params into several calls");

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params[0].device().index()).stream();
  const uint8_t* table = table_cache().device_copy(std::move(bytes), params[0].device(), stream);
  vector_step_kernel<param_t, acc_t><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      reinterpret_cast<const TensorEntry*>(table), reinterpret_cast<const int64_t*>(table + entries_bytes),
      reinterpret_cast<int32_t*>(const_cast<uint8_t*>(table + entries_bytes + prefix_bytes)),
      static_cast<int32_t>(n), lr.const_data_ptr(), lr.scalar_type() == at::kDouble, beta1, beta2, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void vector_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList state_steps, const at::Tensor& lr, double beta1,
                      double beta2, double eps, int64_t max_single_pass_row_length) {
  check_vector_step_arguments(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
                              max_single_pass_row_length, c10::DeviceType::CUDA);
  const int64_t single_pass_limit = resolve_single_pass_limit(max_single_pass_row_length);
  TORCH_CHECK(single_pass_limit <= kOnChipRowCapacity, "ndadam_fused::vector_step_: max_single_pass_row_length=",
              max_single_pass_row_length, " exceeds the ", kOnChipRowCapacity,
              " elements the CUDA kernel holds on chip per row; longer rows take the statistics path");
  TORCH_CHECK(params.size() <= size_t(std::numeric_limits<int32_t>::max()),
              "ndadam_fused::vector_step_: too many tensors for one call");
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "ndadam_fused::vector_step_",
                                  [&] {
                                    launch<scalar_t>(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1,
                                                     beta2, eps, single_pass_limit);
                                  });
}

}  // namespace cuda_kernel
}  // namespace ndadam

TORCH_LIBRARY_IMPL(ndadam_fused, CUDA, m) { m.impl("vector_step_", &ndadam::cuda_kernel::vector_step_cuda); }
