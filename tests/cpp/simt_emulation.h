// A small emulation of the CUDA execution model on the CPU, for running the device code of
// csrc/cuda/ndadam_cuda_kernel.cuh in C++ tests.
//
// Every thread of a block is a CPU thread (std::thread), with its own threadIdx and blockIdx.
// __syncthreads is a barrier of the block's threads; __syncwarp a barrier of the warp's 32.
// Warp shuffles go through a per-warp exchange: each lane writes its value to its slot, the
// warp meets at a barrier, each lane reads its partner's slot (two sets of slots, used in turn,
// so that the next shuffle may write while a slow lane still reads). atomicAdd is std::atomic_ref,
// __threadfence a sequentially consistent fence. Blocks run one after another, in an order the
// caller picks.
//
// Within a block, warps take turns, as one warp scheduler might run them: the 32 lanes of the
// warp whose turn it is run (concurrently), and the turn passes to the next warp, in an order
// the caller picks, when all its lanes wait at __syncthreads or have returned. So a warp that
// has no barrier before a global write runs that write before the next warp has started: a
// missing barrier between one warp's reads and another's writes shows deterministically.
//
// Shared memory (BlockShared) is checked as the kernel uses it: every element remembers which
// thread wrote it and read it last, and in which "epoch" (barriers passed). Two threads touching
// the same element between the same two barriers, one of them writing, is a race; reading an
// element nobody wrote since the block started is a read of uninitialized memory; an index
// outside the array is out of bounds. Wide global accesses check their alignment (the GPU faults
// on a misaligned one). Each finding is recorded in problems(), which the test reports; a block
// whose threads do not all finish (a barrier or shuffle not reached by every thread) stops the
// process with a message after a timeout.
//
// Written for this project's tests; it emulates only what the kernel uses.
#pragma once

#define NDADAM_SIMT_EMULATION 1

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace simt {

struct Index3 {
  unsigned x = 0;
  unsigned y = 0;
  unsigned z = 0;
};

constexpr int kWarpSize = 32;

// What the emulation found wrong in the kernel, in the order found.
class Problems {
 public:
  void add(const std::string& what) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (list_.size() < 64) {
      list_.push_back(what);
    }
    ++count_;
  }
  int64_t count() {
    std::lock_guard<std::mutex> lock(mutex_);
    return count_;
  }
  std::vector<std::string> take() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::string> out;
    out.swap(list_);
    count_ = 0;
    return out;
  }

 private:
  std::mutex mutex_;
  std::vector<std::string> list_;
  int64_t count_ = 0;
};

inline Problems& problems() {
  static Problems instance;
  return instance;
}

// A reusable barrier: the last of `participants` to arrive releases the others.
class Barrier {
 public:
  explicit Barrier(int participants) : participants_(participants) {}

  void arrive_and_wait() {
    const uint32_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == participants_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_acq_rel);
      generation_.notify_all();
      return;
    }
    while (generation_.load(std::memory_order_acquire) == generation) {
      generation_.wait(generation, std::memory_order_acquire);
    }
  }

 private:
  const int participants_;
  std::atomic<int> arrived_{0};
  std::atomic<uint32_t> generation_{0};
};

struct Warp {
  Barrier barrier{kWarpSize};
  uint64_t slots[2][kWarpSize] = {};
};

// One emulated thread: where it is and how many barriers it has passed.
class WarpScheduler;

struct ThreadState {
  Warp* warps = nullptr;
  WarpScheduler* scheduler = nullptr;
  int thread = 0;
  int64_t block_epoch = 0;  // __syncthreads passed in this block
  int64_t warp_epoch = 0;   // __syncwarp passed in this block
  int64_t shuffles = 0;
  int warp() const { return thread / kWarpSize; }
  int lane() const { return thread % kWarpSize; }
};

inline thread_local ThreadState this_thread;

// The turns of a block's warps (see the top of this file).
class WarpScheduler {
 public:
  explicit WarpScheduler(std::vector<int> order)
      : order_(std::move(order)), at_barrier_(order_.size(), 0), returned_(order_.size(), 0),
        turn_(order_.size()) {
    running_ = order_.front();
  }

  // A lane starts: it waits for its warp's turn.
  void enter(int warp) {
    std::unique_lock<std::mutex> lock(mutex_);
    turn_[warp].wait(lock, [&] { return running_ == warp; });
  }

  // __syncthreads by a lane: when every lane of every warp still running waits here, all go on
  // (the first warp in order first).
  void barrier(int warp) {
    std::unique_lock<std::mutex> lock(mutex_);
    const int64_t generation = generation_;
    ++at_barrier_[warp];
    if (blocked(warp)) {
      pass_turn();
    }
    turn_[warp].wait(lock, [&] { return generation_ != generation && running_ == warp; });
  }

  // A lane returns from the kernel.
  void leave(int warp) {
    std::lock_guard<std::mutex> lock(mutex_);
    ++returned_[warp];
    if (blocked(warp)) {
      pass_turn();
    }
  }

 private:
  bool blocked(int warp) const { return at_barrier_[warp] + returned_[warp] == kWarpSize; }

  void pass_turn() {
    for (const int w : order_) {
      if (!blocked(w)) {
        give_turn(w);
        return;
      }
    }
    // Every warp waits at the barrier or has returned: release the barrier.
    bool any_waiting = false;
    for (const int w : order_) {
      if (at_barrier_[w] > 0 && (returned_[w] > 0 || any_returned())) {
        problems().add("__syncthreads not reached by every thread of the block (warp " + std::to_string(w) +
                       " waits while other threads have returned)");
      }
      any_waiting = any_waiting || at_barrier_[w] > 0;
    }
    if (!any_waiting) {
      return;  // the block is done
    }
    ++generation_;
    for (const int w : order_) {
      at_barrier_[w] = 0;
    }
    for (const int w : order_) {
      if (returned_[w] < kWarpSize) {
        give_turn(w);
        break;
      }
    }
  }

  // Only the lanes of the warp whose turn it is are woken.
  void give_turn(int warp) {
    running_ = warp;
    turn_[warp].notify_all();
  }

  bool any_returned() const {
    for (const int r : returned_) {
      if (r > 0) return true;
    }
    return false;
  }

  std::vector<int> order_;
  std::vector<int> at_barrier_;
  std::vector<int> returned_;
  int running_;
  int64_t generation_ = 0;
  std::mutex mutex_;
  std::vector<std::condition_variable> turn_;
};


inline std::string where() {
  return "thread " + std::to_string(this_thread.thread) + " after " + std::to_string(this_thread.block_epoch) +
         " barriers";
}

template <typename T>
void check_aligned(const T* pointer, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(pointer) % bytes != 0) {
    problems().add(std::string("misaligned ") + std::to_string(bytes) + "-byte access to " + what + " at " +
                   std::to_string(reinterpret_cast<uintptr_t>(pointer)) + " by " + where());
  }
}

template <typename T>
T exchange(T value, int source_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffles move up to 8 bytes");
  Warp& warp = this_thread.warps[this_thread.warp()];
  const int set = static_cast<int>(this_thread.shuffles++ & 1);
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  warp.slots[set][this_thread.lane()] = bits;
  warp.barrier.arrive_and_wait();
  const uint64_t received = warp.slots[set][source_lane % kWarpSize];
  T result;
  std::memcpy(&result, &received, sizeof(T));
  return result;
}

inline void check_full_mask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu) {
    problems().add(std::string(what) + " with a partial mask: the emulation has every lane of a warp take part");
  }
}

// Shared memory of one block, checked as described at the top of this file.
template <typename T, int N>
class BlockShared {
 public:
  BlockShared() {
    // Uninitialized on the GPU: filled with a pattern here, and every read before a write is reported.
    std::memset(static_cast<void*>(values_), 0xff, sizeof(values_));
  }
  BlockShared(const BlockShared&) = delete;
  BlockShared& operator=(const BlockShared&) = delete;

  class Reference {
   public:
    Reference(BlockShared& owner, int index) : owner_(owner), index_(index) {}
    operator T() const { return owner_.read(index_); }
    Reference& operator=(const T& value) {
      owner_.write(index_, value);
      return *this;
    }

   private:
    BlockShared& owner_;
    int index_;
  };

  Reference operator[](int index) { return Reference(*this, index); }
  T operator[](int index) const { return const_cast<BlockShared*>(this)->read(index); }

  T read(int index) {
    if (!in_bounds(index)) {
      return T{};
    }
    std::lock_guard<std::mutex> lock(mutexes_[index % kStripes]);
    Access& a = access_[index];
    const ThreadState& me = this_thread;
    if (a.writer < 0) {
      problems().add("read of uninitialized shared memory [" + std::to_string(index) + "] by " + where());
    } else if (conflicts(a.writer, a.write_block_epoch, a.write_warp_epoch, me)) {
      problems().add("race: shared [" + std::to_string(index) + "] written by thread " + std::to_string(a.writer) +
                     " and read by " + where() + " with no barrier between");
    }
    if (a.read_block_epoch != me.block_epoch) {
      a.read_block_epoch = me.block_epoch;
      a.reader = me.thread;
      a.read_warp_epoch = me.warp_epoch;
    } else if (a.reader != me.thread) {
      a.reader = kManyReaders;
    }
    return values_[index];
  }

  void write(int index, const T& value) {
    if (!in_bounds(index)) {
      return;
    }
    std::lock_guard<std::mutex> lock(mutexes_[index % kStripes]);
    Access& a = access_[index];
    const ThreadState& me = this_thread;
    if (a.writer >= 0 && conflicts(a.writer, a.write_block_epoch, a.write_warp_epoch, me)) {
      problems().add("race: shared [" + std::to_string(index) + "] written by thread " + std::to_string(a.writer) +
                     " and by " + where() + " with no barrier between");
    }
    if (a.read_block_epoch == me.block_epoch &&
        (a.reader == kManyReaders || (a.reader >= 0 && conflicts(a.reader, a.read_block_epoch, a.read_warp_epoch, me)))) {
      problems().add("race: shared [" + std::to_string(index) + "] read by another thread and written by " + where() +
                     " with no barrier between");
    }
    a.writer = me.thread;
    a.write_block_epoch = me.block_epoch;
    a.write_warp_epoch = me.warp_epoch;
    values_[index] = value;
  }

 private:
  static constexpr int kManyReaders = -2;
  struct Access {
    int writer = -1;
    int reader = -1;
    int64_t write_block_epoch = -1;
    int64_t write_warp_epoch = -1;
    int64_t read_block_epoch = -1;
    int64_t read_warp_epoch = -1;
  };

  // Whether an access by `other` at (block_epoch, warp_epoch) and one by this thread now may run
  // at the same time: different threads between the same two barriers, unless both are lanes of
  // one warp with a __syncwarp between them.
  static bool conflicts(int other, int64_t block_epoch, int64_t warp_epoch, const ThreadState& me) {
    if (other == me.thread || block_epoch != me.block_epoch) {
      return false;
    }
    const bool same_warp = other / kWarpSize == me.warp();
    return !(same_warp && warp_epoch != me.warp_epoch);
  }

  bool in_bounds(int index) {
    if (index >= 0 && index < N) {
      return true;
    }
    problems().add("shared memory index " + std::to_string(index) + " outside [0, " + std::to_string(N) + ") by " +
                   where());
    return false;
  }

  // Elements are independent: a lock per stripe of them.
  static constexpr int kStripes = 64;
  T values_[N];
  Access access_[N];
  std::mutex mutexes_[kStripes];
};

// The GPU versions are in ndadam_cuda_kernel.cuh: an asynchronous copy (cp.async) of VEC
// elements into shared memory, its wait, a read of VEC staged elements, an element read in place.
template <int VEC, typename T, int N>
void stage_async(BlockShared<T, N>& array, int index, const T* source) {
  constexpr size_t kPiece = VEC * sizeof(T) > 16 ? 16 : VEC * sizeof(T);
  check_aligned(source, kPiece, "a staged row");
  if ((index * sizeof(T)) % kPiece != 0) {
    problems().add("misaligned staging slot " + std::to_string(index) + " by " + where());
  }
  for (int j = 0; j < VEC; ++j) {
    array.write(index + j, source[j]);
  }
}

inline void wait_staged() {}

template <int VEC, typename T, int N, typename acc_t>
void read_staged(BlockShared<T, N>& array, int index, acc_t* out) {
  for (int j = 0; j < VEC; ++j) {
    out[j] = static_cast<acc_t>(array.read(index + j));
  }
}

// Records the read now; the kernel reads the fields later, before the next barrier.
template <typename T, int N>
const T& shared_element(BlockShared<T, N>& array, int index) {
  static thread_local T copy;
  copy = array.read(index);
  return copy;
}

template <typename T>
T* recomputed(T* pointer) {
  return pointer;
}

}  // namespace simt

// The CUDA built-ins the kernel uses.
inline thread_local simt::Index3 threadIdx;
inline thread_local simt::Index3 blockIdx;

inline void __syncthreads() {
  simt::this_thread.scheduler->barrier(simt::this_thread.warp());
  ++simt::this_thread.block_epoch;
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  simt::check_full_mask(mask, "__syncwarp");
  simt::this_thread.warps[simt::this_thread.warp()].barrier.arrive_and_wait();
  ++simt::this_thread.warp_epoch;
}

template <typename T>
T __shfl_sync(unsigned mask, T value, int source_lane) {
  simt::check_full_mask(mask, "__shfl_sync");
  return simt::exchange(value, source_lane);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  simt::check_full_mask(mask, "__shfl_xor_sync");
  return simt::exchange(value, simt::this_thread.lane() ^ lane_mask);
}

inline int atomicAdd(int* address, int value) { return std::atomic_ref<int>(*address).fetch_add(value); }

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

#define NDADAM_CHECK_ALIGNED(pointer, bytes) ::simt::check_aligned((pointer), (bytes), #pointer)

namespace simt {

// Runs kernels block after block on a pool of `threads_per_block` CPU threads (made once).
class Device {
 public:
  explicit Device(int threads_per_block)
      : threads_(threads_per_block), start_(threads_per_block + 1), end_(threads_per_block + 1),
        warps_(std::make_unique<Warp[]>(threads_per_block / kWarpSize)) {
    pool_.reserve(threads_);
    for (int t = 0; t < threads_; ++t) {
      pool_.emplace_back([this, t] { thread_main(t); });
    }
  }

  ~Device() {
    stop_ = true;
    start_.arrive_and_wait();
    for (std::thread& t : pool_) {
      t.join();
    }
  }

  // For each block index in `order`: prepare(block) on this thread, then body(block) by every
  // thread of the block, its warps taking turns in ascending order (descending with
  // `warps_in_reverse`).
  void run(const std::vector<int64_t>& order, const std::function<void(int64_t)>& prepare,
           const std::function<void(int64_t)>& body, bool warps_in_reverse = false) {
    std::vector<int> warp_order(threads_ / kWarpSize);
    for (size_t w = 0; w < warp_order.size(); ++w) {
      warp_order[w] = warps_in_reverse ? static_cast<int>(warp_order.size() - 1 - w) : static_cast<int>(w);
    }
    for (const int64_t block : order) {
      prepare(block);
      block_ = block;
      body_ = &body;
      finished_.store(0);
      // Fresh warp exchanges and turns: a block that broke them must not break the next.
      warps_ = std::make_unique<Warp[]>(threads_ / kWarpSize);
      scheduler_ = std::make_unique<WarpScheduler>(warp_order);
      start_.arrive_and_wait();
      wait_until_finished(block);
      end_.arrive_and_wait();
    }
  }

  int threads() const { return threads_; }

 private:
  void thread_main(int t) {
    for (;;) {
      start_.arrive_and_wait();
      if (stop_) {
        return;
      }
      threadIdx = Index3{static_cast<unsigned>(t), 0, 0};
      blockIdx = Index3{static_cast<unsigned>(block_), 0, 0};
      this_thread = ThreadState{};
      this_thread.warps = warps_.get();
      this_thread.scheduler = scheduler_.get();
      this_thread.thread = t;
      scheduler_->enter(this_thread.warp());
      try {
        (*body_)(block_);
      } catch (const std::exception& error) {
        problems().add(std::string("exception in the kernel: ") + error.what());
      }
      scheduler_->leave(this_thread.warp());
      finished_.fetch_add(1);
      end_.arrive_and_wait();
    }
  }

  void wait_until_finished(int64_t block) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (finished_.load() < threads_) {
      if (std::chrono::steady_clock::now() > deadline) {
        std::fprintf(stderr,
                     "simt emulation: block %lld: %d of %d threads finished after 120 s; a barrier or a shuffle "
                     "was not reached by every thread of the block (or of a warp)\n",
                     static_cast<long long>(block), finished_.load(), threads_);
        std::_Exit(3);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }

  const int threads_;
  Barrier start_;
  Barrier end_;
  std::unique_ptr<Warp[]> warps_;
  std::unique_ptr<WarpScheduler> scheduler_;
  std::vector<std::thread> pool_;
  std::atomic<int> finished_{0};
  int64_t block_ = 0;
  const std::function<void(int64_t)>* body_ = nullptr;
  bool stop_ = false;
};

}  // namespace simt
