// The two ops of the step for rows split across ranks (tensor parallelism, DESIGN.md section 6):
//
//   ndadam_fused::row_statistics_(params, grads, exp_avgs, statistics!)
//       statistics[r] = [ḡ·w, ḡ·ḡ, w·w, m·w, m·m, m·ḡ] over the LOCAL elements of row r
//   ndadam_fused::apply_row_statistics_(params!, grads, exp_avgs!, exp_avg_sqs!, state_steps!,
//                                       statistics, lr, beta1, beta2, eps)
//       from the statistics summed over all ranks: the closed forms of update_from_statistics
//       (ndadam_row_math.h), then m' and w' elementwise on the local elements.
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

namespace ndadam {

constexpr int64_t kRowStatisticsPerRow = 6;

// Raise an error naming the argument unless the arguments of row_statistics_ are valid.
void check_row_statistics_arguments(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                    const at::Tensor& statistics, c10::DeviceType device_type);

// The same for apply_row_statistics_.
void check_apply_row_statistics_arguments(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                          at::TensorList exp_avg_sqs, at::TensorList state_steps,
                                          const at::Tensor& statistics, const at::Tensor& lr, double beta1,
                                          double beta2, double eps, c10::DeviceType device_type);

}  // namespace ndadam
