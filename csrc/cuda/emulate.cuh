// A CPU emulator for the kernels of csrc/cuda, for tests on machines without a
// GPU (tests/impl/test_cuda_backend.py, the test_emulated_* tests).
// Compiling a .cu file as plain C++ with -DFASTGAN_CUDA_EMULATE makes common.cuh
// include this file instead of the CUDA headers. Then:
//   * a "launch" runs the blocks of the grid one after another, each block as
//     blockDim std::threads that really run concurrently;
//   * __syncthreads() is a barrier across the threads of the block;
//   * __shared__ variables become function statics: one copy, shared by the
//     threads of the running block, exactly the CUDA semantics;
//   * tensors are CPU tensors and the GEMMs are ATen's CPU ones.
// It checks indexing, bounds, reductions, barriers and numerics of the kernel
// code; it cannot check GPU-only behavior (warp scheduling, memory model,
// launch limits, performance).
#pragma once

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

inline float rsqrtf(float v) { return 1.f / std::sqrt(v); }

namespace fastgan {
namespace cuda {
namespace emulate {

// A reusable barrier for the threads of one block (C++17 has no std::barrier).
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  const int count_;
  int waiting_ = 0;
  uint64_t generation_ = 0;
};

inline thread_local Barrier* block_barrier = nullptr;

}  // namespace emulate

template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, int /*stream*/,
            Args&&... args) {
  const std::tuple<KernelArgs...> kernel_args(std::forward<Args>(args)...);
  const unsigned threads = block.x * block.y * block.z;
  // The hardware's launch limits (every CUDA GPU since sm_30): a launch the
  // GPU would refuse fails here too, so the CPU tests catch host-side grids
  // that outgrow them.
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > 2147483647u || grid.y > 65535u ||
      grid.z > 65535u || block.x < 1 || block.y < 1 || block.z < 1 || block.x > 1024u ||
      block.y > 1024u || block.z > 64u || threads > 1024u)
    throw std::invalid_argument("emulated launch: grid (" + std::to_string(grid.x) + ", " +
                                std::to_string(grid.y) + ", " + std::to_string(grid.z) +
                                ") x block (" + std::to_string(block.x) + ", " +
                                std::to_string(block.y) + ", " + std::to_string(block.z) +
                                ") exceeds the CUDA launch limits");
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        emulate::Barrier barrier(static_cast<int>(threads));
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            blockIdx = dim3(bx, by, bz);
            blockDim = block;
            gridDim = grid;
            emulate::block_barrier = &barrier;
            std::apply(kernel, kernel_args);
          });
        for (auto& th : pool) th.join();
      }
}

}  // namespace cuda
}  // namespace fastgan

inline void __syncthreads() { fastgan::cuda::emulate::block_barrier->wait(); }
