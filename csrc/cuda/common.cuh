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

// Row chunks of the column-tile kernels. ceil(N / kTileN) blocks alone leave a
// large GPU idle when N is small (8-32 blocks on 132 SMs), each thread walking
// B / kTileRows rows. So B is split across grid.y: a block reduces its chunk of
// rows to partial sums in a float scratch buffer (values x chunks x N), and a
// second pass (chunk_sum_kernel) adds the chunks in a fixed order: still
// deterministic, no atomics. One chunk (small B, or enough column blocks)
// keeps the single-pass kernels.
constexpr int64_t kGpuChunkTargetBlocks = 2 * 132;  // two blocks per SM of an H100/H200
constexpr int64_t kGpuChunkMinRows = 256;  // >= 16 rows per thread: a chunk earns its extra pass
#ifdef FASTGAN_CUDA_EMULATE
// Tests choose (set_row_chunking): by default never split, so the single-pass
// kernels are what the other emulated tests check.
inline int64_t row_chunk_target_blocks = 1;
inline int64_t row_chunk_min_rows = int64_t(1) << 40;
inline void set_row_chunking(int64_t target_blocks, int64_t min_rows) {
  row_chunk_target_blocks = target_blocks;
  row_chunk_min_rows = min_rows;
}
#else
constexpr int64_t row_chunk_target_blocks = kGpuChunkTargetBlocks;
constexpr int64_t row_chunk_min_rows = kGpuChunkMinRows;
#endif
constexpr int64_t kMaxGridY = 65535;

struct RowChunks {
  int64_t count;  // grid.y
  int64_t rows;   // rows per chunk (the last one may have fewer, none is empty)
};
inline RowChunks row_chunks(int64_t b, int64_t n) {
  const int64_t cols = (n + kTileN - 1) / kTileN;
  const int64_t want = (row_chunk_target_blocks + cols - 1) / (cols < 1 ? 1 : cols);
  const int64_t most = b / row_chunk_min_rows;  // every chunk gets at least min_rows rows
  int64_t count = want < most ? want : most;
  count = count < 1 ? 1 : (count > kMaxGridY ? kMaxGridY : count);
  const int64_t rows = b < 1 ? 1 : (b + count - 1) / count;
  return {b < 1 ? 1 : (b + rows - 1) / rows, rows};
}
inline dim3 column_grid(int64_t n, const RowChunks& chunks) {
  return dim3(static_cast<unsigned>((n + kTileN - 1) / kTileN), static_cast<unsigned>(chunks.count));
}
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

// out[j] = sum over chunks c of part[c * N + j], in chunk order, rounded once to T.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    chunk_sum_kernel(const float* __restrict__ part, T* __restrict__ out, int64_t chunks, int64_t N) {
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = start; j < N; j += stride) {
    float s = 0.f;
    for (int64_t c = 0; c < chunks; ++c) s += part[c * N + j];
    out[j] = static_cast<T>(s);
  }
}

// The partial sums of value v of a (values, chunks, N) float scratch buffer into out.
template <typename T>
void sum_chunks(const at::Tensor& part, int64_t v, T* out, Stream stream) {
  const int64_t chunks = part.size(1), n = part.size(2);
  launch(chunk_sum_kernel<T>, elementwise_grid(n), dim3(kThreads), stream,
         part.data_ptr<float>() + v * chunks * n, out, chunks, n);
}

// Rows [first, last) of chunk blockIdx.y of a column-tile launch.
struct ChunkRows {
  int64_t first, last;
  __device__ __forceinline__ ChunkRows(int64_t B, int64_t rows)
      : first(static_cast<int64_t>(blockIdx.y) * rows),
        last(first + rows < B ? first + rows : B) {}
};

// Column j's sums v[0..count) of chunk blockIdx.y into a (values, chunks, N) scratch buffer.
template <int NV>
__device__ __forceinline__ void store_chunk(float* partial, int64_t N, int64_t j,
                                            const float (&v)[NV], int count = NV) {
  const int64_t chunks = gridDim.y, c = blockIdx.y;
  for (int k = 0; k < count; ++k) partial[(k * chunks + c) * N + j] = v[k];
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
  static_assert(kBlock > 0 && (kBlock & (kBlock - 1)) == 0, "the tree halves: a power of two");
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
