// Shared pieces of the CUDA kernels in csrc/cuda: the launch helper, dtype
// dispatch, the dropout mask and block reductions. The activations are
// csrc/activation.h and the entries' argument checks csrc/checks.h, both shared
// with the CPU kernels.
//
// Layout every kernel relies on: row-major (B, N) matrices, B = batch rows,
// N = features. Per-feature reductions (BatchNorm statistics, bias gradients)
// are column reductions; a "column tile" block owns kTileN whole columns, so
// one block can reduce a column and then reuse the result without a second
// launch or any atomics (deterministic results, nothing to zero first).
//
// The kernels compile as plain C++ too (FASTGAN_CUDA_EMULATE, see emulate.cuh):
// tests/impl/test_cuda_backend.py runs them on the CPU that way, so their
// indexing and reductions are checked on machines without a GPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#ifdef FASTGAN_CUDA_EMULATE
#include "emulate.cuh"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "activation.h"
#include "checks.h"
#include "philox.h"

namespace fastgan {
namespace cuda {

// ----------------------------------------------------------------- launching
#ifdef FASTGAN_CUDA_EMULATE
using Stream = int;
inline Stream current_stream() { return 0; }
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
struct DeviceScope {
  explicit DeviceScope(c10::Device) {}
};
#else
using Stream = cudaStream_t;
// Kernels run on PyTorch's current stream, so they order with the GEMMs around
// them and are captured by torch.cuda.graph.
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
using DeviceScope = c10::cuda::CUDAGuard;  // launches go to the inputs' GPU

template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, Stream stream,
            Args&&... args) {
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

// Column tiles: kTileN columns (one warp-wide row segment, coalesced loads)
// by kTileRows threads walking down the batch.
constexpr int kTileN = 32;
constexpr int kTileRows = 16;
// Elementwise kernels: a grid-stride loop, so the grid size is only a hint.
constexpr int kThreads = 256;
#ifdef FASTGAN_CUDA_EMULATE
constexpr int64_t kMaxBlocks = 3;  // emulated threads are OS threads; the loop still strides
#else
constexpr int64_t kMaxBlocks = 4096;
#endif

inline dim3 column_grid(int64_t n) { return dim3(static_cast<unsigned>((n + kTileN - 1) / kTileN)); }
inline dim3 column_block() { return dim3(kTileN, kTileRows); }
inline dim3 elementwise_grid(int64_t numel) {
  const int64_t blocks = (numel + kThreads - 1) / kThreads;
  return dim3(static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks)));
}

// fp32, fp16, bf16; float64 is rejected before dispatch (kBackend.float64).
#define FASTGAN_DISPATCH_FLOATING(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                   \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// A contiguous copy of an optional tensor (the Linear's bias); none stays none.
inline std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  if (t.has_value() && t->defined()) return t->contiguous();
  return std::nullopt;
}

// What the entries take: tensors of kDeviceType (CPU ones when emulated),
// no float64 (there are no float64 kernels).
constexpr Backend kBackend{"cuda", kDeviceType, /*float64=*/false};

// ---------------------------------------------------------------- dropout
// Dropout as plain kernel arguments. seed/offset stay device pointers: they are
// read inside the kernel, so a CUDA graph replay sees the values of that replay.
struct DropoutArgs {
  const int64_t* seed;
  const int64_t* offset;
  float p;      // keep iff u >= float(p)
  float scale;  // float(1 / (1 - p)), computed in double like the reference
  bool on;      // p > 0; p == 0 skips dropout (and never reads seed/offset)
};

inline DropoutArgs dropout_args(const at::Tensor& seed, const at::Tensor& offset, double p) {
  return DropoutArgs{seed.data_ptr<int64_t>(), offset.data_ptr<int64_t>(), static_cast<float>(p),
                     dropout_scale(p), p > 0.0};
}

// Device side: the Philox key is derived once per thread; the mask of element
// (i, j) of a (B, N) output is a pure function of idx = i * N + j.
struct DropoutMask {
  DropoutKey key;
  float p, scale;
  bool on;
  __device__ __forceinline__ explicit DropoutMask(const DropoutArgs& d)
      : key(d.on ? d.seed[0] : 0, d.on ? d.offset[0] : 0), p(d.p), scale(d.scale), on(d.on) {}
  __device__ __forceinline__ bool keep(int64_t idx) const {
    return key.uniform(static_cast<uint32_t>(idx)) >= p;
  }
  // where(keep, v * scale, 0): a select, so a dropped inf/NaN still gives 0.
  __device__ __forceinline__ float apply(float v, int64_t idx) const {
    if (!on) return v;
    return keep(idx) ? v * scale : 0.f;
  }
};

template <typename T>
__device__ __forceinline__ float load(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// ------------------------------------------------------------ reductions
// Column sums inside a column-tile block: every thread passes its partial sums
// v[0..NV) for column threadIdx.x and gets back the totals over the kTileRows
// threads of that column. Deterministic (fixed order), no atomics. Every
// thread of the block must call it (it synchronizes).
template <int NV>
__device__ __forceinline__ void column_sum(float (&v)[NV]) {
  static_assert(NV <= kTileRows, "one summing row per value");
  __shared__ float part[NV][kTileRows][kTileN];
  __shared__ float total[NV][kTileN];
  for (int k = 0; k < NV; ++k) part[k][threadIdx.y][threadIdx.x] = v[k];
  __syncthreads();
  if (threadIdx.y < NV) {
    float s = 0.f;
    for (int r = 0; r < kTileRows; ++r) s += part[threadIdx.y][r][threadIdx.x];
    total[threadIdx.y][threadIdx.x] = s;
  }
  __syncthreads();
  // A second call writes `part` before its first barrier and `total` only after
  // it, so no thread can overwrite `total` while another still reads it here.
  for (int k = 0; k < NV; ++k) v[k] = total[k][threadIdx.x];
}

// Sums of v[0..NV) over a 1-D block of kBlock threads (a power of two); the
// totals are valid in thread 0. Fixed tree order: deterministic.
template <int NV, int kBlock>
__device__ __forceinline__ void block_sum(float (&v)[NV]) {
  __shared__ float buf[NV][kBlock];
  for (int k = 0; k < NV; ++k) buf[k][threadIdx.x] = v[k];
  __syncthreads();
  for (int s = kBlock / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) {
      for (int k = 0; k < NV; ++k) buf[k][threadIdx.x] += buf[k][threadIdx.x + s];
    }
    __syncthreads();
  }
  for (int k = 0; k < NV; ++k) v[k] = buf[k][0];
}

}  // namespace cuda
}  // namespace fastgan
