// Shared pieces of the CUDA kernels in csrc/cuda: argument checks, dtype
// dispatch, activations, the dropout mask, block reductions and the launch helper.
//
// Layout every kernel relies on: row-major (B, N) matrices, B = batch rows,
// N = features. Per-feature reductions (BatchNorm statistics, bias gradients)
// are column reductions; a "column tile" block owns kTileN whole columns, so
// one block can reduce a column and then reuse the result without a second
// launch or any atomics (deterministic results, nothing to zero first).
//
// The kernels compile as plain C++ too (FASTGAN_CUDA_EMULATE, see emulate.cuh):
// tests/test_cuda_backend.py runs them on the CPU that way, so their indexing
// and reductions are checked on machines without a GPU.
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

// fp32, fp16, bf16; float64 is rejected before dispatch (check_input_dtype).
#define FASTGAN_DISPATCH_FLOATING(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                   \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// ------------------------------------------------------------ argument checks
// Every entry point checks everything a kernel indexes with, so no input can
// make a kernel read or write out of bounds; messages name the argument.
inline void check_device(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device().type() == kDeviceType, name, " must be a ",
              c10::DeviceTypeName(kDeviceType), " tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
}

inline void check_input_dtype(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() != at::kDouble, name,
              ": the cuda backend supports float32, float16 and bfloat16, not float64 "
              "(use the reference backend, e.g. for gradcheck)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              name, " must be float32, float16 or bfloat16, got ", x.scalar_type());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

// A 1-element int64 tensor on x's device (dropout seed/offset, num_batches_tracked).
inline void check_counter(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_device(t, name, x);
  check_dtype(t, name, at::kLong);
  TORCH_CHECK(t.numel() == 1, name, " must have exactly 1 element, got shape ", t.sizes());
}

// A per-feature fp32 vector updated or read in place: must be contiguous.
inline void check_feature_vector(const at::Tensor& t, const char* name, const at::Tensor& x,
                                 int64_t n) {
  check_device(t, name, x);
  check_dtype(t, name, at::kFloat);
  check_shape(t, name, {n});
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_hyper(int64_t activation, double negative_slope, double p) {
  TORCH_CHECK(activation >= 0 && activation <= 3,
              "activation must be a code of fastgan/spec.py (0 identity, 1 relu, "
              "2 leaky_relu, 3 tanh), got ", activation);
  TORCH_CHECK(std::isfinite(negative_slope) && negative_slope >= 0.0,
              "negative_slope must be finite and >= 0, got ", negative_slope);
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout p must be in [0, 1), got ", p);
}

// x (B, K), weight (N, K), bias (N) or none; returns N. Also bounds B * N, the
// dropout counter, to 32 bits as the reference does.
inline int64_t check_linear(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().type() == kDeviceType, "x must be a ",
              c10::DeviceTypeName(kDeviceType), " tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 2, "x must be 2-D, got shape ", x.sizes());
  check_input_dtype(x, "x");
  check_device(weight, "weight", x);
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D, got shape ", weight.sizes());
  check_dtype(weight, "weight", x.scalar_type());
  TORCH_CHECK(weight.size(1) == x.size(1), "weight has in_features=", weight.size(1),
              " but x has ", x.size(1), " columns (K mismatch)");
  const int64_t n = weight.size(0);
  if (bias.has_value()) {
    check_device(*bias, "bias", x);
    check_dtype(*bias, "bias", x.scalar_type());
    check_shape(*bias, "bias", {n});
  }
  TORCH_CHECK(x.size(0) * n < (int64_t(1) << 32), "batch * out_features must be below 2**32, got ",
              x.size(0), " * ", n);
  return n;
}

// ---------------------------------------------------------------- numerics
// Activation codes of fastgan/spec.py.
enum Activation : int { kIdentity = 0, kRelu = 1, kLeakyRelu = 2, kTanh = 3 };

// The activation code is a kernel argument (uniform branch), not a template
// parameter: four times fewer instantiations, and so a shorter build.
__device__ __forceinline__ float activate(float z, int act, float slope) {
  switch (act) {
    case kRelu: return (z > 0.f || z != z) ? z : 0.f;  // NaN passes, like torch.relu
    case kLeakyRelu: return z > 0.f ? z : z * slope;
    case kTanh: return tanhf(z);
    default: return z;
  }
}

// d act / dz from the pre-activation z (reference.act_grad).
__device__ __forceinline__ float activate_grad(float z, int act, float slope) {
  switch (act) {
    case kRelu: return z > 0.f ? 1.f : 0.f;
    case kLeakyRelu: return z > 0.f ? 1.f : slope;
    case kTanh: {
      const float t = tanhf(z);
      return 1.f - t * t;
    }
    default: return 1.f;
  }
}

// d act / dz from the output a = act(z) (reference.act_grad_from_output).
__device__ __forceinline__ float activate_grad_from_output(float a, int act, float slope) {
  switch (act) {
    case kRelu: return a > 0.f ? 1.f : 0.f;
    case kLeakyRelu: return a > 0.f ? 1.f : slope;
    case kTanh: return 1.f - a * a;
    default: return 1.f;
  }
}

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
                     static_cast<float>(1.0 / (1.0 - p)), p > 0.0};
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
