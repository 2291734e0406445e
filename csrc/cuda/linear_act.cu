// linear_act on CUDA: y = dropout(act(x @ W.T + b)), forward and backward.
// The spec is fastgan/impl/reference.py (linear_act_forward / _backward).
//
// Forward = the GEMM from cuBLAS through ATen (at::linear, as the reference)
// + one elementwise epilogue kernel that activates and drops out in place, in
// the GEMM's own output buffer (no second (B, N) allocation).
// Backward = one column-tile kernel that recomputes the dropout mask, takes the
// activation derivative from the saved output y, writes dz and reduces the
// bias gradient from it (a large batch over few columns: in row chunks, then
// chunk_sum_kernel) + the two GEMMs dx = dz @ W, dW = dz.T @ x.
#include "common.cuh"

#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>

namespace fastgan {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads)
    act_forward_kernel(T* __restrict__ zy, int64_t numel, int act, float slope, DropoutArgs drop) {
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const DropoutMask mask(drop);
  // Row-major (B, N): the flat index is i * N + j, the dropout counter.
  for (int64_t idx = start; idx < numel; idx += stride)
    zy[idx] = static_cast<T>(mask.apply(activate(load(zy, idx), act, slope), idx));
}

// dz = dropout(grad_y) * act'(a), a = y / scale recovered from the output
// (dropped elements get no gradient, so their y = 0 does not matter). Rows in
// chunks of `rows` (grid.y); with more than one chunk the bias gradient's
// column sums go to `partial` (chunks x N) for chunk_sum_kernel.
template <typename T>
__global__ void __launch_bounds__(kTileN * kTileRows)
    act_backward_kernel(const T* __restrict__ grad_y, const T* __restrict__ y, T* __restrict__ dz,
                        T* __restrict__ dbias, float* __restrict__ partial, int64_t B, int64_t N,
                        int64_t rows, int act, float slope, DropoutArgs drop) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTileN + threadIdx.x;
  const ChunkRows chunk(B, rows);
  const bool valid = j < N;
  const DropoutMask mask(drop);
  // The reference divides by the Python float scale; PyTorch's CUDA division
  // by a scalar multiplies by its fp32 reciprocal, and so do we.
  const float inv_scale = 1.f / drop.scale;
  float acc[1] = {0.f};
  if (valid)
    for (int64_t i = chunk.first + threadIdx.y; i < chunk.last; i += kTileRows) {
      const int64_t idx = i * N + j;
      float a = load(y, idx);
      float g = load(grad_y, idx);
      if (mask.on) {
        g = mask.keep(idx) ? g * mask.scale : 0.f;
        a = a * inv_scale;
      }
      const T d = static_cast<T>(g * activate_grad_from_output(a, act, slope));
      dz[idx] = d;
      acc[0] += static_cast<float>(d);
    }
  column_sum(acc);
  if (valid && threadIdx.y == 0) {
    if (partial != nullptr)
      store_chunk(partial, N, j, acc);
    else
      dbias[j] = static_cast<T>(acc[0]);
  }
}

}  // namespace

at::Tensor linear_act_forward(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, int64_t activation,
                              double negative_slope, double p, const at::Tensor& seed,
                              const at::Tensor& offset) {
  check_linear(kBackend, x, weight, bias, seed, offset);

  const DeviceScope device_scope(x.device());
  const Stream stream = current_stream();
  // z, then y in place
  at::Tensor y = at::linear(x.contiguous(), weight.contiguous(), contiguous(bias)).contiguous();
  const int64_t numel = y.numel();
  if (numel == 0) return y;
  FASTGAN_DISPATCH_FLOATING(x.scalar_type(), "linear_act_forward", [&] {
    launch(act_forward_kernel<scalar_t>, elementwise_grid(numel), dim3(kThreads), stream,
           y.data_ptr<scalar_t>(), numel, static_cast<int>(activation),
           static_cast<float>(negative_slope), dropout_args(seed, offset, p));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& y,
    int64_t activation, double negative_slope, double p, const at::Tensor& seed,
    const at::Tensor& offset, bool compute_dx, bool compute_dw) {
  const int64_t n = check_linear_act_backward(kBackend, grad_y, x, weight, y, seed, offset);
  const int64_t batch = x.size(0);

  const DeviceScope device_scope(x.device());
  const Stream stream = current_stream();
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor gyc = grad_y.contiguous(), yc = y.contiguous();

  at::Tensor dz = at::empty({batch, n}, xc.options());
  at::Tensor dbias = at::empty({n}, xc.options());
  if (n > 0) {
    const RowChunks chunks = row_chunks(batch, n);
    const at::Tensor part = chunks.count > 1
        ? at::empty({1, chunks.count, n}, xc.options().dtype(at::kFloat)) : at::Tensor();
    FASTGAN_DISPATCH_FLOATING(xc.scalar_type(), "linear_act_backward", [&] {
      launch(act_backward_kernel<scalar_t>, column_grid(n, chunks), column_block(), stream,
             gyc.data_ptr<scalar_t>(), yc.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(),
             dbias.data_ptr<scalar_t>(), part.defined() ? part.data_ptr<float>() : nullptr,
             batch, n, chunks.rows, static_cast<int>(activation),
             static_cast<float>(negative_slope), dropout_args(seed, offset, p));
      if (part.defined()) sum_chunks(part, 0, dbias.data_ptr<scalar_t>(), stream);
    });
  }
  at::Tensor dx = compute_dx ? at::mm(dz, wc) : at::empty({0}, xc.options());
  at::Tensor dweight = compute_dw ? at::mm(dz.t(), xc) : at::empty({0}, wc.options());
  return {dx, dweight, dbias};
}

}  // namespace cuda
}  // namespace fastgan

#ifndef FASTGAN_CUDA_EMULATE
TORCH_LIBRARY_IMPL(fastgan_C, CUDA, m) {
  m.impl("linear_act_forward", &fastgan::cuda::linear_act_forward);
  m.impl("linear_act_backward", &fastgan::cuda::linear_act_backward);
}
#endif
