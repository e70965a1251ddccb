// The device code of the CUDA kernels of the rows-split ops (split_rows_op.h): what one thread
// block does in ndadam_fused::row_statistics_ and in ndadam_fused::apply_row_statistics_.
//
// Each op is ONE launch over every row of every tensor of the call, on the vector step's launch
// plan (ndadam_cuda_plan.h: teams of 1-32 lanes for rows up to 256 elements, of whole warps up to
// 8192, a block per longer row; rows of no local element kept, one lane each) and with its
// building blocks (ndadam_cuda_kernel.cuh: team sums, wide loads and stores, the step scalars,
// the unscaling, the row writes, the step counting). A team sweeps its row in strides of
// team x VEC elements: a rank's piece of a row may be of any length, and each element is read
// once per op, so nothing is staged.
//
//   row_statistics: statistics[first_row + r] = [ḡ·w, ḡ·ḡ, w·w, m·w, m·m, m·ḡ] over the local
//     elements of row r (w from the master copy for kFromMaster; ḡ = grad / scale with a scale);
//   apply_row_statistics: from the row's reduced statistics, update_from_statistics
//     (ndadam_row_math.h) gives (v', s, r); the team writes m' = β1 m + (1-β1)(ḡ - a w) and
//     w' = (w - s m') r as kWrite says; lane 0 writes v'. found_inf nonzero: nothing changes.
//
// The C++ tests run this header on the CPU through tests/cpp/simt_emulation.h, as the vector
// step's.
#pragma once

#include <cstdint>

#include "../ndadam_row_math.h"
#include "ndadam_cuda_kernel.cuh"
#include "ndadam_cuda_plan.h"

namespace ndadam::cuda_kernel {

constexpr int kRowStatistics = 6;

// What the rows-split kernels add to the vector step's arguments. Per launch (with the
// gradients, in `args.grads`): where each entry's rows start in `statistics`.
struct SplitLaunchArguments {
  LaunchArguments args;
  void* statistics;            // [Σ rows, 6] acc_t
  const int64_t* first_rows;   // [tensors], in the table's order
};

// The rows-split kernels' shared memory (a few KiB: nothing is staged).
template <typename acc_t>
struct SplitShared {
  BlockShared<acc_t, kSumSlots * kWarpsPerBlock> warp_partials;
  BlockShared<StepScalars<acc_t>, kWarpsPerBlock> warp_scalars;
  BlockShared<double, kWarpsPerBlock> warp_grad_scale;
  BlockShared<double, kWarpsPerBlock> warp_grad_scale_reciprocal;
  BlockShared<uint32_t, kWarpsPerBlock> warp_rounding_key;
  BlockShared<int32_t, kWarpsPerBlock> warp_entry;
  BlockShared<float, kWarpsPerBlock> warp_step;
};

// GradScaler's scale and its reciprocal for this warp (1 without one), into its slots of shared
// memory: what unscale reads. Called by all 32 lanes.
template <typename acc_t>
NDADAM_DEVICE_INLINE void publish_grad_scale(const LaunchArguments& args, SplitShared<acc_t>& shared) {
  if (threadIdx.x % kWarpSize == 0) {
    const double scale = args.grad_scale != nullptr ? static_cast<double>(*args.grad_scale) : 1.0;
    shared.warp_grad_scale[threadIdx.x / kWarpSize] = scale;
    shared.warp_grad_scale_reciprocal[threadIdx.x / kWarpSize] = 1.0 / scale;
  }
  __syncwarp();
}

// Phase 1 for the team's row.
template <int VEC, bool kFromMaster, typename param_t, typename acc_t>
NDADAM_DEVICE_INLINE void row_statistics_team(const SplitLaunchArguments& split, const TensorEntry& e,
                                              const param_t* grad, int64_t first_row, const TeamPlace& place,
                                              SplitShared<acc_t>& shared) {
  using source_t = std::conditional_t<kFromMaster, acc_t, param_t>;
  const int64_t length = place.active ? e.row_length : 0;
  const int64_t offset = place.active ? place.row * e.row_length : 0;
  const source_t* __restrict__ w_row =
      static_cast<const source_t*>(kFromMaster ? e.master : static_cast<const void*>(e.param)) + offset;
  const param_t* __restrict__ grad_row = grad + offset;
  const acc_t* __restrict__ m_row = static_cast<const acc_t*>(e.exp_avg) + offset;
  const bool scaled = split.args.grad_scale != nullptr;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;

  acc_t sums[kRowStatistics] = {0, 0, 0, 0, 0, 0};  // ḡ·w, ḡ·ḡ, w·w, m·w, m·m, m·ḡ
  const int64_t stride = int64_t(e.team_size) * VEC;
#pragma unroll 1
  for (int64_t start = int64_t(place.lane_in_team) * VEC; start < length; start += stride) {
    acc_t w[VEC], g[VEC], m[VEC];
    load_elements<VEC>(w_row, start, w);
    load_elements<VEC>(grad_row, start, g);
    unscale<VEC>(g, scaled, shared_element(shared.warp_grad_scale, warp),
                 shared_element(shared.warp_grad_scale_reciprocal, warp));
    load_elements<VEC>(m_row, start, m);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      sums[0] += g[j] * w[j];
      sums[1] += g[j] * g[j];
      sums[2] += w[j] * w[j];
      sums[3] += m[j] * w[j];
      sums[4] += m[j] * m[j];
      sums[5] += m[j] * g[j];
    }
  }
  TeamSum<acc_t, SplitShared<acc_t>> team_sum{shared, e.team_size, place.first_warp, place.active, 0};
  acc_t totals[kRowStatistics];
#pragma unroll
  for (int k = 0; k < kRowStatistics; ++k) {
    totals[k] = team_sum(sums[k]);
  }
  if (place.active && place.lane_in_team == 0) {
    acc_t* out = static_cast<acc_t*>(split.statistics) + (first_row + place.row) * kRowStatistics;
#pragma unroll
    for (int k = 0; k < kRowStatistics; ++k) {
      out[k] = totals[k];
    }
  }
}

// What block blockIdx.x does in row_statistics_. Block-rows and long-row entries own whole
// blocks, so every thread of a block reaches the same barriers of the team sums.
template <typename param_t, typename acc_t, bool kFromMaster>
NDADAM_DEVICE_INLINE void row_statistics_block(const SplitLaunchArguments& split, SplitShared<acc_t>& shared) {
  const LaunchArguments& args = split.args;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t global_warp = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  const int32_t tensor = entry_of_warp(args.first_warp, args.tensors, global_warp);
  const TensorEntry& e = args.entries[tensor];
  const TeamPlace place = team_place(e, global_warp - args.first_warp[tensor]);
  publish_grad_scale(args, shared);
  const param_t* grad = static_cast<const param_t*>(args.grads[tensor]);
  with_vector_width<param_t>(e.vector_width, [&](auto vec) {
    row_statistics_team<decltype(vec)::value, kFromMaster, param_t, acc_t>(split, e, grad, split.first_rows[tensor],
                                                                          place, shared);
  });
}

// Phase 2 for the team's row; returns v', which lane 0 of the team writes once every lane of the
// team has read v (after the block's barrier: a team may span warps).
template <int VEC, RowWrite kWrite, typename param_t, typename acc_t>
NDADAM_DEVICE_INLINE acc_t apply_row_statistics_team(const SplitLaunchArguments& split, const TensorEntry& e,
                                                     const param_t* grad, int64_t first_row, const TeamPlace& place,
                                                     SplitShared<acc_t>& shared) {
  using source_t = RowSource<param_t, acc_t, kWrite>;
  if (!place.active) {
    return acc_t(0);
  }
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t length = e.row_length;
  const int64_t offset = place.row * length;
  const RowMemory<param_t, acc_t, kWrite> memory = row_memory<kWrite, param_t, acc_t>(e, grad, offset);
  param_t* __restrict__ w_row = memory.param;
  acc_t* __restrict__ master_row = memory.master;
  const source_t* __restrict__ source_row = memory.source;
  const param_t* __restrict__ grad_row = memory.grad;
  acc_t* __restrict__ m_row = memory.m;
  const acc_t* v_row = static_cast<const acc_t*>(e.exp_avg_sq) + place.row;

  const acc_t* reduced = static_cast<const acc_t*>(split.statistics) + (first_row + place.row) * kRowStatistics;
  const RowStatistics<acc_t> stats{reduced[0], reduced[1], reduced[2], reduced[3], reduced[4], reduced[5]};
  const StepScalars<acc_t>& k = shared_element(shared.warp_scalars, warp);
  const RowUpdate<acc_t> update = update_from_statistics(stats, *v_row, k);
  const bool scaled = split.args.grad_scale != nullptr;
  const uint32_t rounding_key =
      kWrite == RowWrite::kStochasticParam ? uint32_t(shared_element(shared.warp_rounding_key, warp)) : 0u;
  statistics_update_sweep<VEC, kWrite>(source_row, grad_row, m_row, w_row, master_row,
                                       int64_t(place.lane_in_team) * VEC, int64_t(e.team_size) * VEC, length,
                                       stats.grad_dot_w, update, k, scaled, shared_element(shared.warp_grad_scale, warp),
                                       shared_element(shared.warp_grad_scale_reciprocal, warp), rounding_key, offset);
  return update.exp_avg_sq;
}

// What block blockIdx.x does in apply_row_statistics_; the step counts as in the vector step.
template <typename param_t, typename acc_t, RowWrite kWrite>
NDADAM_DEVICE_INLINE void apply_row_statistics_block(const SplitLaunchArguments& split, SplitShared<acc_t>& shared) {
  const LaunchArguments& args = split.args;
  if (step_is_skipped(args)) {
    return;
  }
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t global_warp = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  const int32_t tensor = entry_of_warp(args.first_warp, args.tensors, global_warp);
  const TensorEntry& e = args.entries[tensor];
  const TeamPlace place = team_place(e, global_warp - args.first_warp[tensor]);
  const float step = *e.step;
  if (lane == 0) {
    shared.warp_entry[warp] = tensor;
    shared.warp_step[warp] = step;
  }
  // The step scalars, GradScaler's scale and the rounding key.
  publish_step_scalars<acc_t, kWrite>(args, e, step, shared);
  const param_t* grad = static_cast<const param_t*>(args.grads[tensor]);
  acc_t v_new = 0;
  // Master copies and stochastic rounding of 16-bit params: at most 4 elements per access
  // (8 bytes of the param), which keeps the elementwise sweep within 64 registers (8 spill).
  constexpr int kMostElements = kWrite == RowWrite::kParam ? 8 : 4;
  with_vector_width<param_t, kMostElements>(e.vector_width, [&](auto vec) {
    v_new = apply_row_statistics_team<decltype(vec)::value, kWrite, param_t, acc_t>(
        split, e, grad, split.first_rows[tensor], place, shared);
  });
  // Every warp of the block has read its step count and every lane its row's v before this barrier.
  __syncthreads();
  if (place.active && place.lane_in_team == 0) {
    static_cast<acc_t*>(e.exp_avg_sq)[place.row] = v_new;
  }
  if (lane == 0) {
    count_block_in(args.entries, args.first_warp, args.arrivals, shared_element(shared.warp_entry, warp),
                   shared_element(shared.warp_step, warp));
  }
}

}  // namespace ndadam::cuda_kernel
