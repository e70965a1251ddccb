// The two ops of the step for rows split across ranks (tensor parallelism, DESIGN.md section 6):
//
//   ndadam_fused::row_statistics_(params, grads, exp_avgs, statistics!, grad_scale?, master_params)
//       statistics[r] = [ḡ·w, ḡ·ḡ, w·w, m·w, m·m, m·ḡ] over the LOCAL elements of row r
//       (ḡ = grad / grad_scale; w from the master copy where master_params are given)
//   ndadam_fused::apply_row_statistics_(params!, grads, exp_avgs!, exp_avg_sqs!, state_steps!,
//                                       statistics, hyper, grad_scale?, found_inf?,
//                                       master_params!, rounding_seeds)
//       from the statistics summed over all ranks: the closed forms of update_from_statistics
//       (ndadam_row_math.h), then m' and w' elementwise on the local elements; the options as
//       vector_step_ has them (ndadam_op.cpp), stochastic rounding indexing the LOCAL piece.
//
// Between the two, the caller (ndadam_fused/distributed.py) sums `statistics` over the ranks
// that hold pieces of the same rows: one all-reduce of 6 numbers per row. Schemas are defined
// in split_rows_op.cpp; each device registers its kernels (cpu/split_rows_cpu.cpp).
//
// Tensors: params[i], grads[i] ([rows_i, ...], the param dtype) and exp_avgs[i] (same shape, the
// state dtype: fp32, fp64 for fp64 params) contiguous, so that row r is elements
// [r * L_i, (r+1) * L_i) with L_i = numel / rows_i (L_i = 0 is allowed: a rank holding no column
// of the rows); exp_avg_sqs[i]: [rows_i]; statistics: [Σ rows_i, 6] in the state dtype, tensor i's
// rows after those of tensors 0 .. i-1.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "ndadam_op.h"

namespace ndadam {

constexpr int64_t kRowStatisticsPerRow = 6;

// Raise an error naming the argument unless the arguments of row_statistics_ are valid.
void check_row_statistics_arguments(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                    const at::Tensor& statistics, const std::optional<at::Tensor>& grad_scale,
                                    at::TensorList master_params, c10::DeviceType device_type);

// The same for apply_row_statistics_ (call.exp_avg_sqs and call.state_steps one per param).
void check_apply_row_statistics_arguments(const VectorStepTensors& call, const at::Tensor& statistics,
                                          const at::Tensor& hyper, const std::optional<at::Tensor>& grad_scale,
                                          const std::optional<at::Tensor>& found_inf, c10::DeviceType device_type);

// Where each tensor's rows start in `statistics`: the prefix sum of the params' row counts.
std::vector<int64_t> statistics_first_rows(at::TensorList params);

}  // namespace ndadam
