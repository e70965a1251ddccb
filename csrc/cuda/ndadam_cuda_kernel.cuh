// The device code of the CUDA kernel of ndadam_fused::vector_step_: what one thread block does.
//
// vector_step_cuda.cu wraps vector_step_block in a __global__ function and launches it; the C++
// tests run the very same code on the CPU through tests/cpp/simt_emulation.h (every thread of a
// block a CPU thread). So this header uses only what both provide: threadIdx, blockIdx,
// __syncthreads, __syncwarp, __shfl_sync, __shfl_xor_sync, atomicAdd, __threadfence, shared
// memory through BlockShared and the few helpers defined just below for the GPU (asynchronous
// copies into shared memory and their reads), and NDADAM_CHECK_ALIGNED before each wide access
// (a no-op on the GPU, which faults on a misaligned access by itself).
//
// The plan (ndadam_cuda_plan.h) says which warps step which rows. Per warp:
//
//   1. find its tensor (binary search over the warps' prefix sum) and its rows, read the step;
//   2. exact path: start copying its elements of w, ḡ and m into shared memory (cp.async: all of
//      them in flight at once, none held in registers; in fp64 ḡ goes to registers after 3.);
//   3. meanwhile compute the step's scalars: β1^t and β2^t in two lanes at once (fp64 pow),
//      lr / (1 - β1^t) and so on, into the warp's slot of shared memory. Every warp does this
//      for itself: no thread waits at a barrier for another's pow;
//   4. the row math of ndadam_row_math.h with team sums (warp shuffles; shared memory for teams
//      of several warps); m', v', w' stored once. Statistics path: scalars, then two sweeps.
//
// Options (LaunchArguments): the hyperparameters (lr, β1, β2, ε) are read from their float64
// tensor on the device, GradScaler's scale and found_inf from theirs (a CUDA graph that captured
// a launch sees new values at every replay). found_inf nonzero: every thread returns at once,
// nothing is written, no step is counted. With a scale, ḡ = grad / scale per element in acc_t.
// How rows are written is a template parameter (RowWrite, ndadam_row_math.h): the param; or the
// fp32 master copy, which is also where rows are read from, and the param rounded to nearest; or
// the param rounded stochastically (ndadam_rounding.h) with the tensor's seed and step.
//
// Step counts: every warp reads its tensor's float32 step (t = step + 1 for the bias
// corrections). At the end of the block, after a barrier (so that every warp of the block has
// read it), one thread per tensor present in the block counts the block in, and the last block
// of a tensor to be counted writes step + 1 and resets the counter for the next launch.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../ndadam_rounding.h"
#include "../ndadam_row_math.h"
#include "ndadam_cuda_plan.h"

namespace ndadam::cuda_kernel {
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T value[N];
};

// Elements per piece of a VEC-element access to T: at most 16 bytes at a time.
template <int VEC, typename T>
constexpr int kPieceElements = VEC * sizeof(T) > 16 ? int(16 / sizeof(T)) : VEC;
template <int VEC, typename T>
constexpr int kPieceBytes = kPieceElements<VEC, T> * int(sizeof(T));
}  // namespace ndadam::cuda_kernel

#if defined(__CUDACC__)
#define NDADAM_DEVICE_INLINE __device__ __forceinline__
#define NDADAM_CHECK_ALIGNED(pointer, bytes) ((void)0)
namespace ndadam::cuda_kernel {

template <typename T, int N>
using BlockShared = T[N];

// array[index, index + VEC) = source[0, VEC), asynchronously (cp.async, sm_80 and newer: from
// memory to shared memory without a register), visible to this thread after wait_staged().
// Pieces of at most 16 bytes, each aligned to its size at both ends. cp.async moves 4, 8 or 16
// bytes: a single 2-byte element is copied through a register.
template <int VEC, typename T, int N>
__device__ __forceinline__ void stage_async(T (&array)[N], int index, const T* source) {
  constexpr int kBytes = int(VEC * sizeof(T));
  constexpr int kPiece = kBytes > 16 ? 16 : kBytes;
#if __CUDA_ARCH__ >= 800
  constexpr bool kAsync = kPiece >= 4;
#else
  constexpr bool kAsync = false;
#endif
  if constexpr (kAsync) {
    const unsigned destination = static_cast<unsigned>(__cvta_generic_to_shared(&array[index]));
    const char* bytes = reinterpret_cast<const char*>(source);
#pragma unroll
    for (int offset = 0; offset < kBytes; offset += kPiece) {
      if constexpr (kPiece == 16) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(destination + offset), "l"(bytes + offset));
      } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(destination + offset), "l"(bytes + offset),
                     "n"(kPiece));
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      array[index + j] = source[j];
    }
  }
}

// This thread's stage_async copies are done and visible to it.
__device__ __forceinline__ void wait_staged() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// out[0, VEC) = array[index, index + VEC) as acc_t, in accesses of up to 16 bytes (a thread's
// chunk is contiguous, and consecutive threads' chunks are consecutive: no bank conflicts).
template <int VEC, typename T, int N, typename acc_t>
__device__ __forceinline__ void read_staged(const T (&array)[N], int index, acc_t* out) {
  constexpr int kPiece = kPieceElements<VEC, T>;
#pragma unroll
  for (int p = 0; p < VEC; p += kPiece) {
    const Pack<T, kPiece> pack = *reinterpret_cast<const Pack<T, kPiece>*>(&array[index + p]);
#pragma unroll
    for (int j = 0; j < kPiece; ++j) {
      out[p + j] = static_cast<acc_t>(pack.value[j]);
    }
  }
}

// array[index], read in place (the compiler loads the fields where they are used).
template <typename T, int N>
__device__ __forceinline__ const T& shared_element(const T (&array)[N], int index) {
  return array[index];
}

// The same pointer, as a value the compiler cannot tie to its earlier uses: store addresses
// computed from it are computed again (two instructions per chunk) instead of being kept in
// registers since the loads (two registers per chunk for the whole row).
template <typename T>
__device__ __forceinline__ T* recomputed(T* pointer) {
  asm("mov.b64 %0, %0;" : "+l"(pointer));
  return pointer;
}

}  // namespace ndadam::cuda_kernel
#elif defined(NDADAM_SIMT_EMULATION)
#define NDADAM_DEVICE_INLINE inline
namespace ndadam::cuda_kernel {
template <typename T, int N>
using BlockShared = simt::BlockShared<T, N>;
using simt::read_staged;
using simt::recomputed;
using simt::shared_element;
using simt::stage_async;
using simt::wait_staged;
}  // namespace ndadam::cuda_kernel
#else
#error "ndadam_cuda_kernel.cuh is device code: compile it with nvcc, or include tests/cpp/simt_emulation.h first"
#endif

namespace ndadam::cuda_kernel {

using cuda_plan::kMaxElementsPerThread;
using cuda_plan::kThreadsPerBlock;
using cuda_plan::kWarpSize;
using cuda_plan::kWarpsPerBlock;
using cuda_plan::TensorEntry;

constexpr unsigned kFullWarp = 0xffffffffu;
// Statistics rows reduce six sums at once, block rows three one after another; each sum has a
// slot per warp, used once per block, so a slot is never rewritten before it has been read.
constexpr int kSumSlots = 6;
// Elements a block stages per array on the exact path.
constexpr int kStagedElements = kMaxElementsPerThread * kThreadsPerBlock;

// Whether the exact path keeps ḡ in registers rather than in shared memory: in fp64, where three
// staged arrays (192 KiB) would not fit an A100's 163 KiB per block; its 8 elements take the
// 16 registers m' takes after them.
template <typename acc_t>
constexpr bool kGradInRegisters = sizeof(acc_t) == 8;

// x / scale as unscale (below) computes it, from scale and its float64 reciprocal.
NDADAM_DEVICE_INLINE float scaled_down(float x, double /*scale*/, double reciprocal) {
  return static_cast<float>(static_cast<double>(x) * reciprocal);
}
NDADAM_DEVICE_INLINE double scaled_down(double x, double /*scale*/, double reciprocal) { return x * reciprocal; }

// A sum over a row's gradient as stored, times 1/scale (or 1/scale²): the sum over ḡ.
template <typename acc_t>
NDADAM_DEVICE_INLINE acc_t unscaled_sum(acc_t sum, double factor) {
  return static_cast<acc_t>(static_cast<double>(sum) * factor);
}

// Where rows are read from: the master copy (acc_t) when the kernel writes master copies, else
// the param.
template <typename param_t, typename acc_t, RowWrite kWrite>
using RowSource = std::conditional_t<kWrite == RowWrite::kMasterAndParam, acc_t, param_t>;

// A row's memory: w is read from `source` (the param, or its fp32 master copy), w' goes to
// `param` (and `master`), m' to `m`.
template <typename param_t, typename acc_t, RowWrite kWrite>
struct RowMemory {
  param_t* param;
  acc_t* master;  // kMasterAndParam only
  const RowSource<param_t, acc_t, kWrite>* source;
  const param_t* grad;
  acc_t* m;
};

// Row `offset / row_length` of entry e (offset: the row's first element in the tensor).
template <RowWrite kWrite, typename param_t, typename acc_t>
NDADAM_DEVICE_INLINE RowMemory<param_t, acc_t, kWrite> row_memory(const TensorEntry& e, const param_t* grad,
                                                                  int64_t offset) {
  RowMemory<param_t, acc_t, kWrite> row;
  row.param = static_cast<param_t*>(e.param) + offset;
  row.master = kWrite == RowWrite::kMasterAndParam ? static_cast<acc_t*>(e.master) + offset : nullptr;
  if constexpr (kWrite == RowWrite::kMasterAndParam) {
    row.source = row.master;
  } else {
    row.source = row.param;
  }
  row.grad = grad + offset;
  row.m = static_cast<acc_t*>(e.exp_avg) + offset;
  return row;
}

// The block's shared memory (dynamic): 98 KiB in fp32, 66 KiB in bf16 and fp16 (82 KiB with master
// copies, whose rows are staged in fp32), 131 KiB in fp64.
template <typename param_t, typename acc_t, RowWrite kWrite = RowWrite::kParam>
struct SharedStorage {
  using source_t = RowSource<param_t, acc_t, kWrite>;
  // Exact path: w (from its source), ḡ (not in fp64) and m, each thread's chunk c at staged_index(c).
  alignas(16) BlockShared<source_t, kStagedElements> staged_w;
  alignas(16) BlockShared<param_t, kGradInRegisters<acc_t> ? 1 : kStagedElements> staged_grad;
  alignas(16) BlockShared<acc_t, kStagedElements> staged_m;
  BlockShared<acc_t, kSumSlots * kWarpsPerBlock> warp_partials;
  BlockShared<StepScalars<acc_t>, kWarpsPerBlock> warp_scalars;
  // GradScaler's scale of this step (1 without one) and its reciprocal in float64 (see unscale),
  // and the stochastic-rounding key of each warp's tensor at this step, published with the step
  // scalars.
  BlockShared<double, kWarpsPerBlock> warp_grad_scale;
  BlockShared<double, kWarpsPerBlock> warp_grad_scale_reciprocal;
  BlockShared<uint32_t, kWarpsPerBlock> warp_rounding_key;
  // What lane 0 of each warp needs again at the end of the block (the step count), kept here
  // rather than in registers across the row math.
  BlockShared<int32_t, kWarpsPerBlock> warp_entry;
  BlockShared<float, kWarpsPerBlock> warp_step;
};

// Where chunk c (VEC elements) of this thread's row elements is staged: each warp has its own
// kMaxElementsPerThread * 32 elements (the warps of a block may step tensors of different vector
// widths), and within them chunk c of consecutive lanes is consecutive, so the reads back are
// free of bank conflicts.
template <int VEC>
NDADAM_DEVICE_INLINE int staged_index(int chunk) {
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  return warp * (kMaxElementsPerThread * kWarpSize) + (chunk * kWarpSize + lane) * VEC;
}

// The kernel's arguments: the cached table's parts, this launch's gradients, the options.
struct LaunchArguments {
  const TensorEntry* entries;
  const int64_t* first_warp;   // [tensors + 1]: prefix sum of warps per entry
  int32_t* arrivals;           // [tensors]: blocks counted in so far; zero between launches
  const void* const* grads;    // [tensors]: this launch's gradient of each entry
  const double* hyper;         // [4] on the device: lr, β1, β2, ε
  const float* grad_scale;     // GradScaler's scale on the device, or null
  const float* found_inf;      // GradScaler's flag on the device, or null
  int32_t tensors;
};

// Whether GradScaler found an inf or a NaN in this step's gradients: then nothing changes.
NDADAM_DEVICE_INLINE bool step_is_skipped(const LaunchArguments& args) {
  return args.found_inf != nullptr && *args.found_inf != 0.0f;
}

// Elements [start, start + VEC) of a row, as acc_t (the statistics path's sweeps; start is a
// multiple of VEC, which divides the row length, so the chunk is whole).
template <int VEC, typename T, typename acc_t>
NDADAM_DEVICE_INLINE void load_elements(const T* __restrict__ row, int64_t start, acc_t* out) {
  constexpr int kPiece = kPieceElements<VEC, T>;
#pragma unroll
  for (int p = 0; p < VEC; p += kPiece) {
    NDADAM_CHECK_ALIGNED(row + start + p, sizeof(T) * kPiece);
    const Pack<T, kPiece> pack = *reinterpret_cast<const Pack<T, kPiece>*>(row + start + p);
#pragma unroll
    for (int j = 0; j < kPiece; ++j) {
      out[p + j] = static_cast<acc_t>(pack.value[j]);
    }
  }
}

template <int VEC, typename T, typename acc_t>
NDADAM_DEVICE_INLINE void store_elements(T* __restrict__ row, int64_t start, const acc_t* values) {
  constexpr int kPiece = kPieceElements<VEC, T>;
#pragma unroll
  for (int p = 0; p < VEC; p += kPiece) {
    Pack<T, kPiece> pack;
#pragma unroll
    for (int j = 0; j < kPiece; ++j) {
      pack.value[j] = static_cast<T>(values[p + j]);
    }
    NDADAM_CHECK_ALIGNED(row + start + p, sizeof(T) * kPiece);
    *reinterpret_cast<Pack<T, kPiece>*>(row + start + p) = pack;
  }
}

// Elements [start, start + VEC) of a bf16 row, rounded stochastically (ndadam_rounding.h): element
// k of the row is element first_index + k of the tensor. The hash takes the index mod 2^32, so it
// is counted in 32 bits; the rounded value's upper 16 bits are the bf16's bits.
template <int VEC, typename T, typename acc_t>
NDADAM_DEVICE_INLINE void store_stochastically_rounded(T* __restrict__ row, int64_t start, const acc_t* values,
                                                       uint32_t key, int64_t first_index) {
  static_assert(sizeof(T) == 2, "stochastic rounding writes bf16 params");
  constexpr int kPiece = kPieceElements<VEC, T>;
  const uint32_t index = static_cast<uint32_t>(first_index) + static_cast<uint32_t>(start);
#pragma unroll
  for (int p = 0; p < VEC; p += kPiece) {
    Pack<T, kPiece> pack;
#pragma unroll
    for (int j = 0; j < kPiece; ++j) {
      const float x = static_cast<float>(values[p + j]);
      const uint32_t random = rounding::random_bits(key, index + static_cast<uint32_t>(p + j));
      const uint16_t bits = static_cast<uint16_t>(rounding::bits_of(rounding::stochastically_rounded(x, random)) >> 16);
      memcpy(&pack.value[j], &bits, sizeof(bits));
    }
    NDADAM_CHECK_ALIGNED(row + start + p, sizeof(T) * kPiece);
    *reinterpret_cast<Pack<T, kPiece>*>(row + start + p) = pack;
  }
}

// Where a row's new values go, as kWrite says (master copy and param: the param gets them rounded
// to nearest by store_elements' conversion).
template <RowWrite kWrite, int VEC, typename param_t, typename acc_t>
NDADAM_DEVICE_INLINE void write_row_elements(param_t* __restrict__ param_row,
                                             acc_t* __restrict__ master_row, int64_t start, const acc_t* values,
                                             uint32_t rounding_key, int64_t first_index) {
  if constexpr (kWrite == RowWrite::kMasterAndParam) {
    store_elements<VEC>(master_row, start, values);
    store_elements<VEC>(param_row, start, values);
  } else if constexpr (kWrite == RowWrite::kStochasticParam) {
    store_stochastically_rounded<VEC>(param_row, start, values, rounding_key, first_index);
  } else {
    store_elements<VEC>(param_row, start, values);
  }
}

// The step's scalars for this warp's tensor, into the warp's slot of shared memory (read where
// the row math needs them, so that they hold no registers meanwhile). β1^t and β2^t are two
// fp64 pows: lane parity picks the base, so the warp pays for one pow, not two in a row.
// Called by all 32 lanes.
// `Shared`: the kernel's shared storage (SharedStorage here, the rows-split kernels' own), which
// has these per-warp arrays.
template <typename acc_t, RowWrite kWrite, typename Shared>
NDADAM_DEVICE_INLINE void publish_step_scalars(const LaunchArguments& args, const TensorEntry& e, float step,
                                               Shared& shared) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  // float32 step + 1, as the reference increments its float32 step tensor.
  const float t = step + 1.0f;
  const double power = pow(args.hyper[(lane & 1) ? 2 : 1], static_cast<double>(t));
  const double beta1_power = __shfl_sync(kFullWarp, power, 0);
  const double beta2_power = __shfl_sync(kFullWarp, power, 1);
  if (lane == 0) {
    const double* h = args.hyper;
    shared.warp_scalars[warp] = make_step_scalars_from_powers<acc_t>(h[0], h[1], h[2], h[3], beta1_power, beta2_power);
    const double scale = args.grad_scale != nullptr ? static_cast<double>(*args.grad_scale) : 1.0;
    shared.warp_grad_scale[warp] = scale;
    shared.warp_grad_scale_reciprocal[warp] = 1.0 / scale;
    if constexpr (kWrite == RowWrite::kStochasticParam) {
      shared.warp_rounding_key[warp] = e.rounding_seed != nullptr ? rounding::step_key(*e.rounding_seed, t) : 0u;
    }
  }
  __syncwarp();
}

// ḡ = grad / scale from the gradient as stored, when there is a GradScaler (a branch the whole
// grid takes alike: no extra work without one). The reference divides; an IEEE division per
// element would cost this kernel its registers (ptxas spills the division's slow path), so:
// - fp32 (acc_t of fp32, bf16 and fp16 params): grad times the float64 reciprocal 1/scale,
//   rounded to fp32. That product is within 2^-52 of grad / scale, closer than any quotient of two
//   fp32 numbers comes to an fp32 rounding midpoint, so it rounds to the same fp32 as the
//   division, subnormal results included (tests/cpp checks it on 10^7 pairs);
// - fp64: grad · (1/scale), the division's result for a power-of-two scale (GradScaler's: 2^16 at
//   first, then doubled or halved), within one ulp of it for other scales (the reference's fp64
//   tolerance is 1e-10); the correctly rounded quotient would spill here too.
template <int VEC, typename acc_t>
NDADAM_DEVICE_INLINE void unscale(acc_t* g, bool scaled, double scale, double reciprocal) {
  if (scaled) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      g[j] = scaled_down(g[j], scale, reciprocal);
    }
  }
}

// Sum over a team of threads; every thread of the team ends with the same bits.
//
// A team of up to 32 lanes (a power of two) lies in one warp: a butterfly of shuffles, in which
// partners add the same two values. A team of `team / 32` whole warps starting at warp
// `first_warp` adds its warps' sums through shared memory: every thread of the block then calls
// it the same number of times (it holds a barrier), threads of idle warps (active false) get 0,
// and each call uses its own slot of shared memory, so no second barrier guards its reuse.
// Which of the two is the same for every warp of a block (block-rows entries own whole blocks).
template <typename acc_t, typename Shared>
struct TeamSum {
  Shared& shared;  // a kernel's shared storage with kSumSlots * kWarpsPerBlock warp_partials
  int team;
  int first_warp;
  bool active;
  int slot;

  NDADAM_DEVICE_INLINE acc_t operator()(acc_t x) {
    const int width = team < kWarpSize ? team : kWarpSize;
    for (int offset = width / 2; offset > 0; offset /= 2) {
      x += __shfl_xor_sync(kFullWarp, x, offset);
    }
    if (team <= kWarpSize) {
      return x;
    }
    const int base = slot * kWarpsPerBlock;
    ++slot;
    if (threadIdx.x % kWarpSize == 0) {
      shared.warp_partials[base + threadIdx.x / kWarpSize] = x;
    }
    __syncthreads();
    acc_t total = 0;
    if (active) {
      for (int i = 0; i < team / kWarpSize; ++i) {
        total += shared.warp_partials[base + first_warp + i];
      }
    }
    return total;
  }
};

// The exact path: the team's row on chip, kMaxElementsPerThread / VEC chunks of VEC elements
// per thread; element (c * team + lane_in_team) * VEC + j of the row is chunk c, element j of
// that lane (consecutive lanes read consecutive addresses). Each thread copies its chunks of w,
// ḡ and m into its own slots of shared memory (ḡ into registers in fp64), all copies in flight
// at once, and reads them back as the math needs them; registers hold m' (then w̄) only. An
// inactive team (past the tensor's last row) sees a row of length 0: it loads and stores
// nothing but joins the sums.
template <int VEC, RowWrite kWrite, typename param_t, typename acc_t>
NDADAM_DEVICE_INLINE void exact_row(const TensorEntry& e, const param_t* grad, int64_t row, bool active,
                                    int32_t lane_in_team, int32_t first_warp, const LaunchArguments& args, float step,
                                    SharedStorage<param_t, acc_t, kWrite>& shared) {
  using source_t = RowSource<param_t, acc_t, kWrite>;
  constexpr int kChunks = kMaxElementsPerThread / VEC;
  constexpr bool kGradHeld = kGradInRegisters<acc_t>;
  const int32_t team = e.team_size;
  // 32-bit offsets within the row: exact-path rows are at most kOnChipRowCapacity long.
  const int32_t length = active ? static_cast<int32_t>(e.row_length) : 0;
  const int64_t offset = active ? row * e.row_length : 0;
  const RowMemory<param_t, acc_t, kWrite> memory = row_memory<kWrite, param_t, acc_t>(e, grad, offset);
  param_t* __restrict__ w_row = memory.param;
  acc_t* __restrict__ master_row = memory.master;
  const source_t* __restrict__ source_row = memory.source;
  const param_t* __restrict__ grad_row = memory.grad;
  acc_t* __restrict__ m_row = memory.m;
  acc_t* v_row = static_cast<acc_t*>(e.exp_avg_sq) + (active ? row : 0);
  const bool scaled = args.grad_scale != nullptr;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;

  acc_t values[kMaxElementsPerThread];  // ḡ (fp64 only), then m', then w̄, then w'
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int32_t start = (c * team + lane_in_team) * VEC;
    if (start < length) {
      NDADAM_CHECK_ALIGNED(source_row + start, (kPieceBytes<VEC, source_t>));
      NDADAM_CHECK_ALIGNED(m_row + start, (kPieceBytes<VEC, acc_t>));
      stage_async<VEC>(shared.staged_w, staged_index<VEC>(c), source_row + start);
      stage_async<VEC>(shared.staged_m, staged_index<VEC>(c), m_row + start);
      if constexpr (!kGradHeld) {
        NDADAM_CHECK_ALIGNED(grad_row + start, (kPieceBytes<VEC, param_t>));
        stage_async<VEC>(shared.staged_grad, staged_index<VEC>(c), grad_row + start);
      }
    }
  }
  // The step's scalars while the row is on its way (the copies hold no registers; in fp64, ḡ is
  // loaded into registers after the pow, which would otherwise have to keep them).
  publish_step_scalars<acc_t, kWrite>(args, e, step, shared);
  if constexpr (kGradHeld) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int32_t start = (c * team + lane_in_team) * VEC;
      if (start < length) {
        load_elements<VEC>(grad_row, start, &values[c * VEC]);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          values[c * VEC + j] = acc_t(0);
        }
      }
    }
  }
  wait_staged();
  // Chunks past the row's end are absent: they were not staged and count as zeros.
  auto present = [&](int c) { return (c * team + lane_in_team) * VEC < length; };
  // fp32 params: ḡ is fp32 too, so each thread unscales its staged chunks in place, once (its own
  // slots: no other thread touches them), and the sweeps below read ḡ as staged.
  constexpr bool kUnscaleStaged = !kGradHeld && std::is_same_v<param_t, acc_t>;
  if constexpr (kGradHeld) {
    unscale<kMaxElementsPerThread>(values, scaled, shared_element(shared.warp_grad_scale, warp),
                                   shared_element(shared.warp_grad_scale_reciprocal, warp));
  }
  if constexpr (kUnscaleStaged) {
    if (scaled) {
      const double grad_scale = shared_element(shared.warp_grad_scale, warp);
      const double reciprocal = shared_element(shared.warp_grad_scale_reciprocal, warp);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        if (present(c)) {
          acc_t g[VEC];
          read_staged<VEC>(shared.staged_grad, staged_index<VEC>(c), g);
          unscale<VEC>(g, true, grad_scale, reciprocal);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            shared.staged_grad[staged_index<VEC>(c) + j] = g[j];
          }
        }
      }
    }
  }
  // Chunk c of ḡ, from registers (already divided) or shared memory.
  auto read_grad = [&](int c, acc_t* g) {
    if constexpr (kGradHeld) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        g[j] = values[c * VEC + j];
      }
    } else {
      read_staged<VEC>(shared.staged_grad, staged_index<VEC>(c), g);
      if constexpr (!kUnscaleStaged) {
        unscale<VEC>(g, scaled, shared_element(shared.warp_grad_scale, warp),
                     shared_element(shared.warp_grad_scale_reciprocal, warp));
      }
    }
  };

  TeamSum<acc_t, SharedStorage<param_t, acc_t, kWrite>> team_sum{shared, team, first_warp, active, 0};
  acc_t partial = 0;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    if (present(c)) {
      acc_t w[VEC], g[VEC];
      read_staged<VEC>(shared.staged_w, staged_index<VEC>(c), w);
      read_grad(c, g);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        partial += g[j] * w[j];
      }
    }
  }
  const acc_t grad_dot_w = team_sum(partial);
  const StepScalars<acc_t>& k = shared_element(shared.warp_scalars, warp);

  partial = 0;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    acc_t w[VEC], g[VEC], m[VEC];
    if (present(c)) {
      read_staged<VEC>(shared.staged_w, staged_index<VEC>(c), w);
      read_grad(c, g);
      read_staged<VEC>(shared.staged_m, staged_index<VEC>(c), m);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        w[j] = g[j] = m[j] = acc_t(0);
      }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t projected = projected_gradient(g[j], w[j], grad_dot_w);
      partial += projected * projected;
      values[c * VEC + j] = first_moment_update(m[j], projected, k);
    }
  }
  acc_t* m_store = recomputed(m_row);
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    if (present(c)) {
      store_elements<VEC>(m_store, (c * team + lane_in_team) * VEC, &values[c * VEC]);
    }
  }
  const acc_t grad_sq_norm = team_sum(partial);
  // Read only now, to hold no register across the row; every lane of the team reads it before
  // the last sum, and one lane writes it after that sum.
  const acc_t v = active ? *v_row : acc_t(0);
  const acc_t v_new = second_moment_update(v, grad_sq_norm, k);
  const acc_t s = step_size(v_new, k);

  partial = 0;
  acc_t magnitude = 0;  // Σ|m'|: 0 exactly when the update is (see row_scale)
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    acc_t w[VEC];
    if (present(c)) {
      read_staged<VEC>(shared.staged_w, staged_index<VEC>(c), w);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        w[j] = acc_t(0);
      }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t m_new = values[c * VEC + j];
      magnitude += m_new < acc_t(0) ? -m_new : m_new;
      values[c * VEC + j] = unnormalized_weight(w[j], m_new, s);
      partial += values[c * VEC + j] * values[c * VEC + j];
    }
  }
  const acc_t w_bar_sq_norm = team_sum(partial);
  const acc_t scale = row_scale(w_bar_sq_norm, team_sum(magnitude), k);
  // Every lane of the team read v before the last sum, so one may overwrite it now (before the
  // stores of the row: v' then holds no registers across them).
  if (active && lane_in_team == 0) {
    *v_row = v_new;
  }
  param_t* w_store = recomputed(w_row);
  acc_t* master_store = recomputed(master_row);
  const uint32_t rounding_key =
      kWrite == RowWrite::kStochasticParam ? uint32_t(shared_element(shared.warp_rounding_key, warp)) : 0u;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    if (present(c)) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        values[c * VEC + j] *= scale;
      }
      write_row_elements<kWrite, VEC>(w_store, master_store, (c * team + lane_in_team) * VEC, &values[c * VEC],
                                      rounding_key, offset);
    }
  }
}

// The statistics form's elementwise sweep (the vector step's statistics path and the rows-split
// apply phase): for this thread's pieces of VEC elements from `first`, `stride` apart,
// m' = β1 m + (1-β1)(ḡ - a w), stored, and w' = (w - s m') · r, written. GradScaler's scale and
// its reciprocal by value (tests/cpp's emulated shared_element gives each thread one slot).
template <int VEC, RowWrite kWrite, typename param_t, typename acc_t>
NDADAM_DEVICE_INLINE void statistics_update_sweep(const RowSource<param_t, acc_t, kWrite>* __restrict__ source_row,
                                                  const param_t* __restrict__ grad_row, acc_t* __restrict__ m_row,
                                                  param_t* __restrict__ w_row, acc_t* __restrict__ master_row,
                                                  int64_t first, int64_t stride, int64_t length, acc_t grad_dot_w,
                                                  const RowUpdate<acc_t>& update, const StepScalars<acc_t>& k,
                                                  bool scaled, double grad_scale, double reciprocal,
                                                  uint32_t rounding_key, int64_t offset) {
#pragma unroll 1
  for (int64_t start = first; start < length; start += stride) {
    acc_t w[VEC], g[VEC], m[VEC];
    load_elements<VEC>(source_row, start, w);
    load_elements<VEC>(grad_row, start, g);
    unscale<VEC>(g, scaled, grad_scale, reciprocal);
    load_elements<VEC>(m_row, start, m);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      m[j] = first_moment_update(m[j], projected_gradient(g[j], w[j], grad_dot_w), k);
      w[j] = unnormalized_weight(w[j], m[j], update.step_size) * update.inverse_norm;
    }
    store_elements<VEC>(m_row, start, m);
    write_row_elements<kWrite, VEC>(w_row, master_row, start, w, rounding_key, offset);
  }
}

// The statistics path: the block's one row, in two sweeps, the six sums reduced together.
template <int VEC, RowWrite kWrite, typename param_t, typename acc_t>
NDADAM_DEVICE_INLINE void statistics_row(const TensorEntry& e, const param_t* grad, int64_t row,
                                         const LaunchArguments& args, float step,
                                         SharedStorage<param_t, acc_t, kWrite>& shared) {
  using source_t = RowSource<param_t, acc_t, kWrite>;
  publish_step_scalars<acc_t, kWrite>(args, e, step, shared);
  const int64_t length = e.row_length;
  const int64_t offset = row * length;
  const RowMemory<param_t, acc_t, kWrite> memory = row_memory<kWrite, param_t, acc_t>(e, grad, offset);
  param_t* __restrict__ w_row = memory.param;
  acc_t* __restrict__ master_row = memory.master;
  const source_t* __restrict__ source_row = memory.source;
  const param_t* __restrict__ grad_row = memory.grad;
  acc_t* __restrict__ m_row = memory.m;
  acc_t* v_row = static_cast<acc_t*>(e.exp_avg_sq) + row;
  const acc_t v = *v_row;
  const bool scaled = args.grad_scale != nullptr;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;

  acc_t sums[kSumSlots] = {0, 0, 0, 0, 0, 0};  // ḡ·w, ḡ·ḡ, w·w, m·w, m·m, m·ḡ
#pragma unroll 1
  for (int64_t start = int64_t(threadIdx.x) * VEC; start < length; start += int64_t(kThreadsPerBlock) * VEC) {
    acc_t w[VEC], g[VEC], m[VEC];
    load_elements<VEC>(source_row, start, w);
    load_elements<VEC>(grad_row, start, g);
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
#pragma unroll
  for (int s = 0; s < kSumSlots; ++s) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      sums[s] += __shfl_xor_sync(kFullWarp, sums[s], offset);
    }
    if (threadIdx.x % kWarpSize == 0) {
      shared.warp_partials[s * kWarpsPerBlock + threadIdx.x / kWarpSize] = sums[s];
    }
  }
  __syncthreads();
#pragma unroll
  for (int s = 0; s < kSumSlots; ++s) {
    acc_t total = 0;
    for (int i = 0; i < kWarpsPerBlock; ++i) {
      total += shared.warp_partials[s * kWarpsPerBlock + i];
    }
    sums[s] = total;
  }
  // The sums of the first sweep are of the gradient as stored (the sweep holds no registers for
  // unscaling): ḡ·w, ḡ·ḡ and m·ḡ are those sums over scale, scale² and scale, exactly the sums of
  // the per-element quotients for a power-of-two scale (GradScaler's), within rounding for others.
  const double reciprocal = scaled ? shared_element(shared.warp_grad_scale_reciprocal, warp) : 1.0;
  const RowStatistics<acc_t> stats{unscaled_sum(sums[0], reciprocal), unscaled_sum(sums[1], reciprocal * reciprocal),
                                   sums[2], sums[3], sums[4], unscaled_sum(sums[5], reciprocal)};
  const StepScalars<acc_t>& k = shared_element(shared.warp_scalars, warp);
  const RowUpdate<acc_t> update = update_from_statistics(stats, v, k);
  const uint32_t rounding_key =
      kWrite == RowWrite::kStochasticParam ? uint32_t(shared_element(shared.warp_rounding_key, warp)) : 0u;
  statistics_update_sweep<VEC, kWrite>(source_row, grad_row, m_row, w_row, master_row, int64_t(threadIdx.x) * VEC,
                                       int64_t(kThreadsPerBlock) * VEC, length, stats.grad_dot_w, update, k, scaled,
                                       shared_element(shared.warp_grad_scale, warp),
                                       shared_element(shared.warp_grad_scale_reciprocal, warp), rounding_key, offset);
  // Every thread read v before the barrier above.
  if (threadIdx.x == 0) {
    *v_row = update.exp_avg_sq;
  }
}

// Calls fn(std::integral_constant<int, VEC>) for the entry's vector width (1, 2, 4, or 8 where
// 8 elements of param_t fit in 16 bytes), or for kMostElements where the entry's is wider (a
// narrower access is valid wherever a wider one is: the row length and the alignments are
// multiples of it).
template <typename param_t, int kMostElements = 8, typename Fn>
NDADAM_DEVICE_INLINE void with_vector_width(int32_t width, Fn&& fn) {
  constexpr int kFits = int(cuda_plan::kWidestAccessBytes / sizeof(param_t));
  constexpr int kWidest = kFits < kMostElements ? kFits : kMostElements;
  if (kWidest >= 8 && width >= 8) {
    fn(std::integral_constant<int, kWidest >= 8 ? 8 : 1>{});
  } else if (kWidest >= 4 && width >= 4) {
    fn(std::integral_constant<int, kWidest >= 4 ? 4 : 1>{});
  } else if (width >= 2) {
    fn(std::integral_constant<int, 2>{});
  } else {
    fn(std::integral_constant<int, 1>{});
  }
}

// The entry whose warps include `warp`: the last one whose first warp is <= warp. Warps past
// the last entry's (the grid's last block) get the last entry, past its rows.
NDADAM_DEVICE_INLINE int32_t entry_of_warp(const int64_t* __restrict__ first_warp, int32_t tensors, int64_t warp) {
  int32_t low = 0, high = tensors - 1;
  while (low < high) {
    const int32_t middle = (low + high + 1) / 2;
    if (first_warp[middle] <= warp) {
      low = middle;
    } else {
      high = middle - 1;
    }
  }
  return low;
}

// Counts this block in for `tensor` if this warp is the tensor's first in the block (lane 0,
// after the block's last barrier). The last block counted writes step + 1 (the value every
// block read) and resets the counter for the next launch.
NDADAM_DEVICE_INLINE void count_block_in(const TensorEntry* entries, const int64_t* first_warp, int32_t* arrivals,
                                         int32_t tensor, float step) {
  const int warp = threadIdx.x / kWarpSize;
  const int64_t global_warp = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (warp != 0 && first_warp[tensor] != global_warp) {
    return;
  }
  const TensorEntry& e = entries[tensor];
  // The step reads of this block are done (barrier) before it is counted: the last block
  // counted overwrites the step.
  __threadfence();
  if (atomicAdd(&arrivals[tensor], 1) == e.blocks_touched - 1) {
    *e.step = step + 1.0f;  // float32, as the reference increments its float32 step
    arrivals[tensor] = 0;  // ready for the next launch
  }
}

// Which row of its tensor a thread works on, on the exact path's layouts (and the rows-split
// kernels'): warp rows, 32 / team rows per warp; block rows, 32 / (team / 32) rows per block.
struct TeamPlace {
  int64_t row;
  bool active;           // false: past the tensor's last row (or an idle warp of the block)
  int32_t lane_in_team;
  int32_t first_warp;    // the team's first warp in the block
};

NDADAM_DEVICE_INLINE TeamPlace team_place(const TensorEntry& e, int64_t warp_in_entry) {
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int32_t team = e.team_size;
  TeamPlace place;
  if (team <= kWarpSize) {
    place.row = warp_in_entry * (kWarpSize / team) + lane / team;
    place.active = place.row < e.rows;
    place.lane_in_team = lane % team;
    place.first_warp = warp;
  } else {
    const int32_t warps_per_team = team / kWarpSize;
    const int32_t rows_per_block = kWarpsPerBlock / warps_per_team;
    const int32_t team_in_block = warp / warps_per_team;
    place.row = (warp_in_entry / kWarpsPerBlock) * rows_per_block + team_in_block;
    place.active = team_in_block < rows_per_block && place.row < e.rows;
    place.lane_in_team = (warp % warps_per_team) * kWarpSize + lane;
    place.first_warp = team_in_block * warps_per_team;
  }
  return place;
}

// What block blockIdx.x does. Every thread of the block reaches the same barriers: a block-rows
// or statistics entry owns whole blocks, so every warp of such a block takes the same path, and
// warp-rows sums hold no barrier. A skipped step (found_inf) returns from every thread at once.
template <typename param_t, typename acc_t, RowWrite kWrite = RowWrite::kParam>
NDADAM_DEVICE_INLINE void vector_step_block(const LaunchArguments& args, SharedStorage<param_t, acc_t, kWrite>& shared) {
  if (step_is_skipped(args)) {
    return;
  }
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t global_warp = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  const int32_t tensor = entry_of_warp(args.first_warp, args.tensors, global_warp);
  const TensorEntry& e = args.entries[tensor];
  const int64_t warp_in_entry = global_warp - args.first_warp[tensor];
  const param_t* grad = static_cast<const param_t*>(args.grads[tensor]);
  const float step = *e.step;
  if (lane == 0) {
    shared.warp_entry[warp] = tensor;
    shared.warp_step[warp] = step;
  }

  if (e.path != cuda_plan::kStatisticsRows) {
    const TeamPlace place = team_place(e, warp_in_entry);
    with_vector_width<param_t>(e.vector_width, [&](auto vec) {
      exact_row<decltype(vec)::value, kWrite, param_t, acc_t>(e, grad, place.row, place.active, place.lane_in_team,
                                                              place.first_warp, args, step, shared);
    });
  } else {
    const int64_t row = warp_in_entry / kWarpsPerBlock;
    // Stochastic rounding and master copies: at most 4 elements per access on this path (8 bytes
    // of a 16-bit param, 16 of the fp32 arrays): the hashes of 8 elements would not fit 64
    // registers on sm_80, and both kernels sum a row alike (the C++ tests compare them bit for bit).
    constexpr int kMostElements = kWrite == RowWrite::kParam ? 8 : 4;
    with_vector_width<param_t, kMostElements>(e.vector_width, [&](auto vec) {
      statistics_row<decltype(vec)::value, kWrite, param_t, acc_t>(e, grad, row, args, step, shared);
    });
  }

  // Every warp of the block has read its step count before this barrier; then the first warp
  // of each entry in the block counts the block in for that entry.
  __syncthreads();
  if (lane == 0) {
    count_block_in(args.entries, args.first_warp, args.arrivals, shared_element(shared.warp_entry, warp),
                   shared_element(shared.warp_step, warp));
  }
}

}  // namespace ndadam::cuda_kernel
