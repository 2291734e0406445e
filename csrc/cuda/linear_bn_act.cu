// linear_bn_act on CUDA: y = dropout(act(BN(x @ W.T + b))), forward and backward.
// The spec is fastgan/impl/reference.py (linear_bn_act_forward / _backward).
//
// Forward = the GEMM from cuBLAS through ATen (at::linear, the call the
// reference makes, so h is bit-identical) + one fused epilogue kernel:
//   training: column-tile blocks own whole columns of h, so a block computes
//             the batch mean and biased variance of its columns (two passes,
//             the second over deviations, for accuracy), updates the running
//             statistics, and then normalizes, activates and drops out the
//             same columns. num_batches_tracked is incremented on the device
//             by a one-thread kernel launched just before (momentum=None reads
//             the incremented count; a block cannot see another's write).
//             A large batch over few columns goes in row chunks instead (see
//             row_chunks): per-chunk sums and sums of squares, a per-column
//             pass that combines them (Chan), then an elementwise pass for y.
//   eval:     an elementwise kernel with the running statistics.
// Backward = one column-tile kernel (recomputes xhat, the activation
// derivative and the dropout mask; reduces dgamma, dbeta; writes dh and
// reduces db from it) + the two GEMMs dx = dh @ W, dW = dh.T @ x.
#include "common.cuh"

#include <algorithm>

#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>

namespace fastgan {
namespace cuda {
namespace {

__global__ void increment_kernel(int64_t* counter) { counter[0] += 1; }

// Training forward. One block = kTileN columns, all B rows.
template <typename T>
__global__ void __launch_bounds__(kTileN * kTileRows)
    bn_train_forward_kernel(const T* __restrict__ h, T* __restrict__ y, float* __restrict__ mean_out,
                            float* __restrict__ rstd_out, float* __restrict__ running_mean,
                            float* __restrict__ running_var, const int64_t* __restrict__ nbt,
                            const float* __restrict__ gamma, const float* __restrict__ beta,
                            int64_t B, int64_t N, float momentum, bool cumulative, float eps,
                            float unbias, int act, float slope, DropoutArgs drop) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTileN + threadIdx.x;
  const bool valid = j < N;  // threads past N still take part in the reductions

  float s[1] = {0.f};
  if (valid)
    for (int64_t i = threadIdx.y; i < B; i += kTileRows) s[0] += load(h, i * N + j);
  column_sum(s);
  const float mean = s[0] / static_cast<float>(B);

  float q[1] = {0.f};
  if (valid)
    for (int64_t i = threadIdx.y; i < B; i += kTileRows) {
      const float d = load(h, i * N + j) - mean;
      q[0] += d * d;
    }
  column_sum(q);
  const float var = q[0] / static_cast<float>(B);  // biased, normalizes the batch
  const float rstd = rsqrtf(var + eps);

  if (valid && threadIdx.y == 0) {
    mean_out[j] = mean;
    rstd_out[j] = rstd;
    // nn.BatchNorm1d: factor = momentum, or 1 / num_batches_tracked (already
    // incremented) for the cumulative average; running_var is unbiased.
    const float f = cumulative ? 1.f / static_cast<float>(nbt[0]) : momentum;
    running_mean[j] = f * mean + (1.f - f) * running_mean[j];
    running_var[j] = f * (var * unbias) + (1.f - f) * running_var[j];
  }
  if (!valid) return;  // no barriers below

  const float g = gamma[j], b = beta[j];
  const DropoutMask mask(drop);
  for (int64_t i = threadIdx.y; i < B; i += kTileRows) {
    const int64_t idx = i * N + j;
    const float z = (load(h, idx) - mean) * rstd * g + b;
    y[idx] = static_cast<T>(mask.apply(activate(z, act, slope), idx));
  }
}

// Training forward of a large batch over few columns, in row chunks (see
// row_chunks): pass 1 per chunk, the sum and the sum of squares about the
// chunk's own mean (two passes over the chunk: no cancellation) ...
template <typename T>
__global__ void __launch_bounds__(kTileN * kTileRows)
    bn_chunk_stats_kernel(const T* __restrict__ h, float* __restrict__ partial, int64_t B,
                          int64_t N, int64_t rows) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTileN + threadIdx.x;
  const bool valid = j < N;
  const ChunkRows chunk(B, rows);
  float s[1] = {0.f};
  if (valid)
    for (int64_t i = chunk.first + threadIdx.y; i < chunk.last; i += kTileRows) s[0] += load(h, i * N + j);
  column_sum(s);
  const float chunk_mean = s[0] / static_cast<float>(chunk.last - chunk.first);
  float q[1] = {0.f};
  if (valid)
    for (int64_t i = chunk.first + threadIdx.y; i < chunk.last; i += kTileRows) {
      const float d = load(h, i * N + j) - chunk_mean;
      q[0] += d * d;
    }
  column_sum(q);
  const float sq[2] = {s[0], q[0]};
  if (valid && threadIdx.y == 0) store_chunk(partial, N, j, sq);
}

// ... pass 2 per column, the chunks combined in order (Chan et al.: the sum of
// squares about the batch mean = sum over chunks of theirs plus
// rows * (chunk mean - batch mean)^2), the statistics stored and the running
// ones updated as bn_train_forward_kernel does ...
__global__ void __launch_bounds__(kThreads)
    bn_chunk_finish_kernel(const float* __restrict__ partial, int64_t chunks, int64_t rows,
                           float* __restrict__ mean_out, float* __restrict__ rstd_out,
                           float* __restrict__ running_mean, float* __restrict__ running_var,
                           const int64_t* __restrict__ nbt, int64_t B, int64_t N, float momentum,
                           bool cumulative, float eps, float unbias) {
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = start; j < N; j += stride) {
    float total = 0.f;
    for (int64_t c = 0; c < chunks; ++c) total += partial[c * N + j];
    const float mean = total / static_cast<float>(B);
    float m2 = 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t first = c * rows, last = first + rows < B ? first + rows : B;
      const float count = static_cast<float>(last - first);
      const float d = partial[c * N + j] / count - mean;
      m2 += partial[(chunks + c) * N + j] + count * d * d;
    }
    const float var = m2 / static_cast<float>(B);
    const float rstd = rsqrtf(var + eps);
    mean_out[j] = mean;
    rstd_out[j] = rstd;
    const float f = cumulative ? 1.f / static_cast<float>(nbt[0]) : momentum;
    running_mean[j] = f * mean + (1.f - f) * running_mean[j];
    running_var[j] = f * (var * unbias) + (1.f - f) * running_var[j];
  }
}

// ... and pass 3, elementwise: y from h and the batch statistics.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    bn_apply_kernel(const T* __restrict__ h, T* __restrict__ y, const float* __restrict__ mean,
                    const float* __restrict__ rstd, const float* __restrict__ gamma,
                    const float* __restrict__ beta, int64_t B, int64_t N, int act, float slope,
                    DropoutArgs drop) {
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const DropoutMask mask(drop);
  for (int64_t idx = start; idx < B * N; idx += stride) {
    const int64_t j = idx % N;
    const float z = (load(h, idx) - mean[j]) * rstd[j] * gamma[j] + beta[j];
    y[idx] = static_cast<T>(mask.apply(activate(z, act, slope), idx));
  }
}

// Eval forward: normalize with the running statistics; also writes the
// (mean, rstd) pair the op returns.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    bn_eval_forward_kernel(const T* __restrict__ h, T* __restrict__ y, float* __restrict__ mean_out,
                           float* __restrict__ rstd_out, const float* __restrict__ running_mean,
                           const float* __restrict__ running_var, const float* __restrict__ gamma,
                           const float* __restrict__ beta, int64_t B, int64_t N, float eps, int act,
                           float slope, DropoutArgs drop) {
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = start; j < N; j += stride) {
    mean_out[j] = running_mean[j];
    rstd_out[j] = rsqrtf(running_var[j] + eps);
  }
  const DropoutMask mask(drop);
  for (int64_t idx = start; idx < B * N; idx += stride) {
    const int64_t j = idx % N;
    const float rstd = rsqrtf(running_var[j] + eps);
    const float z = (load(h, idx) - running_mean[j]) * rstd * gamma[j] + beta[j];
    y[idx] = static_cast<T>(mask.apply(activate(z, act, slope), idx));
  }
}

// Backward through dropout, activation and BN, for kTileN columns per block.
// dz = dropout(grad_y) * act'(z) with z, xhat recomputed from h. Training:
//   dh = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dz * gamma,
// where mean(dxhat) = gamma * dbeta / B and mean(dxhat * xhat) = gamma * dgamma / B,
// so a first pass reduces dbeta and dgamma and a second writes dh. Eval:
// dh = dxhat * rstd in a single pass. db = column sums of dh as stored (x.dtype).
//
// In row chunks (grid.y > 1, `partial` set): training runs bn_backward_sums_kernel
// first (its chunks summed into dbeta, dgamma, which this kernel then reads),
// and this kernel leaves its column sums in `partial` (db; in eval also dbeta,
// dgamma) as (values, chunks, N) for chunk_sum_kernel.
template <typename T>
struct GradZ {  // dz = dropout(grad_y) * act'(z) of column j, and xhat
  const T* grad_y;
  const T* h;
  float m, r, g, b;
  int act;
  float slope;
  DropoutMask mask;
  __device__ __forceinline__ float operator()(int64_t idx, float& xhat) const {
    xhat = (load(h, idx) - m) * r;
    const float z = xhat * g + b;
    return mask.apply(load(grad_y, idx), idx) * activate_grad(z, act, slope);
  }
};

template <typename T>
__device__ __forceinline__ GradZ<T> grad_z_of(const T* grad_y, const T* h, const float* mean,
                                               const float* rstd, const float* gamma,
                                               const float* beta, int64_t j, bool valid, int act,
                                               float slope, const DropoutArgs& drop) {
  return GradZ<T>{grad_y, h, valid ? mean[j] : 0.f, valid ? rstd[j] : 0.f,
                  valid ? gamma[j] : 0.f, valid ? beta[j] : 0.f, act, slope, DropoutMask(drop)};
}

// Training, in row chunks: per chunk the column sums of dz and dz * xhat.
template <typename T>
__global__ void __launch_bounds__(kTileN * kTileRows)
    bn_backward_sums_kernel(const T* __restrict__ grad_y, const T* __restrict__ h,
                            const float* __restrict__ mean, const float* __restrict__ rstd,
                            const float* __restrict__ gamma, const float* __restrict__ beta,
                            float* __restrict__ partial, int64_t B, int64_t N, int64_t rows,
                            int act, float slope, DropoutArgs drop) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTileN + threadIdx.x;
  const bool valid = j < N;
  const ChunkRows chunk(B, rows);
  const GradZ<T> grad_z = grad_z_of(grad_y, h, mean, rstd, gamma, beta, j, valid, act, slope, drop);
  float sums[2] = {0.f, 0.f};
  if (valid)
    for (int64_t i = chunk.first + threadIdx.y; i < chunk.last; i += kTileRows) {
      float xhat;
      const float dz = grad_z(i * N + j, xhat);
      sums[0] += dz;
      sums[1] += dz * xhat;
    }
  column_sum(sums);
  if (valid && threadIdx.y == 0) store_chunk(partial, N, j, sums);
}

template <typename T>
__global__ void __launch_bounds__(kTileN * kTileRows)
    bn_backward_kernel(const T* __restrict__ grad_y, const T* __restrict__ h,
                       const float* __restrict__ mean, const float* __restrict__ rstd,
                       const float* __restrict__ gamma, const float* __restrict__ beta,
                       T* __restrict__ dh, float* __restrict__ dgamma, float* __restrict__ dbeta,
                       T* __restrict__ dbias, float* __restrict__ partial, int64_t B, int64_t N,
                       int64_t rows, bool training, int act, float slope, DropoutArgs drop) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTileN + threadIdx.x;
  const bool valid = j < N;
  const ChunkRows chunk(B, rows);
  const float g = valid ? gamma[j] : 0.f, r = valid ? rstd[j] : 0.f;
  const GradZ<T> grad_z = grad_z_of(grad_y, h, mean, rstd, gamma, beta, j, valid, act, slope, drop);

  float sums[2] = {0.f, 0.f};  // dbeta, dgamma
  if (training && partial != nullptr) {  // chunked: bn_backward_sums_kernel's totals
    sums[0] = valid ? dbeta[j] : 0.f;
    sums[1] = valid ? dgamma[j] : 0.f;
  } else if (training) {
    if (valid)
      for (int64_t i = threadIdx.y; i < B; i += kTileRows) {
        float xhat;
        const float dz = grad_z(i * N + j, xhat);
        sums[0] += dz;
        sums[1] += dz * xhat;
      }
    column_sum(sums);
  }
  const float inv_b = 1.f / static_cast<float>(B);
  const float mean_dxhat = g * sums[0] * inv_b;
  const float mean_dxhat_xhat = g * sums[1] * inv_b;

  float acc[3] = {0.f, 0.f, 0.f};  // db; in eval also dbeta, dgamma
  if (valid)
    for (int64_t i = chunk.first + threadIdx.y; i < chunk.last; i += kTileRows) {
      const int64_t idx = i * N + j;
      float xhat;
      const float dz = grad_z(idx, xhat);
      const float dxhat = dz * g;
      const float dh_f = training ? r * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat) : dxhat * r;
      const T dh_t = static_cast<T>(dh_f);
      dh[idx] = dh_t;
      acc[0] += static_cast<float>(dh_t);
      if (!training) {
        acc[1] += dz;
        acc[2] += dz * xhat;
      }
    }
  column_sum(acc);
  if (valid && threadIdx.y == 0) {
    if (partial != nullptr) {
      store_chunk(partial, N, j, acc, training ? 1 : 3);
    } else {
      dbias[j] = static_cast<T>(acc[0]);
      dbeta[j] = training ? sums[0] : acc[1];
      dgamma[j] = training ? sums[1] : acc[2];
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_act_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, at::Tensor& running_mean,
    at::Tensor& running_var, at::Tensor& num_batches_tracked, bool training,
    std::optional<double> momentum, double eps, int64_t activation, double negative_slope,
    double p, const at::Tensor& seed, const at::Tensor& offset) {
  const int64_t n =
      check_linear_bn_act_forward(kBackend, x, weight, bias, bn_weight, bn_bias, running_mean,
                                  running_var, num_batches_tracked, training, seed, offset);
  // The kernels index these by feature (the running ones in place).
  FASTGAN_CHECK_CONTIGUOUS(bn_weight, bn_bias, running_mean, running_var);
  const int64_t batch = x.size(0);

  const DeviceScope device_scope(x.device());
  const Stream stream = current_stream();
  const at::Tensor h =  // (B, N) in x.dtype
      at::linear(x.contiguous(), weight.contiguous(), contiguous(bias)).contiguous();
  at::Tensor y = at::empty_like(h);
  at::Tensor mean = at::empty({n}, bn_weight.options());
  at::Tensor rstd = at::empty({n}, bn_weight.options());
  const DropoutArgs drop = dropout_args(seed, offset, p);
  const int act = static_cast<int>(activation);
  const float slope = static_cast<float>(negative_slope);

  if (training) launch(increment_kernel, dim3(1), dim3(1), stream, num_batches_tracked.data_ptr<int64_t>());
  if (n == 0) return {y, h, mean, rstd};
  FASTGAN_DISPATCH_FLOATING(x.scalar_type(), "linear_bn_act_forward", [&] {
    const RowChunks chunks = row_chunks(batch, n);
    const float unbias =  // (training has batch > 1)
        training ? static_cast<float>(static_cast<double>(batch) / static_cast<double>(batch - 1))
                 : 1.f;
    if (training && chunks.count > 1) {
      const at::Tensor part = at::empty({2, chunks.count, n}, bn_weight.options());
      launch(bn_chunk_stats_kernel<scalar_t>, column_grid(n, chunks), column_block(), stream,
             h.data_ptr<scalar_t>(), part.data_ptr<float>(), batch, n, chunks.rows);
      launch(bn_chunk_finish_kernel, elementwise_grid(n), dim3(kThreads), stream,
             part.data_ptr<float>(), chunks.count, chunks.rows, mean.data_ptr<float>(),
             rstd.data_ptr<float>(), running_mean.data_ptr<float>(),
             running_var.data_ptr<float>(), num_batches_tracked.data_ptr<int64_t>(), batch, n,
             static_cast<float>(momentum.value_or(0.0)), !momentum.has_value(),
             static_cast<float>(eps), unbias);
      launch(bn_apply_kernel<scalar_t>, elementwise_grid(batch * n), dim3(kThreads), stream,
             h.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), mean.data_ptr<float>(),
             rstd.data_ptr<float>(), bn_weight.data_ptr<float>(), bn_bias.data_ptr<float>(),
             batch, n, act, slope, drop);
    } else if (training) {
      launch(bn_train_forward_kernel<scalar_t>, column_grid(n), column_block(), stream,
             h.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), mean.data_ptr<float>(),
             rstd.data_ptr<float>(), running_mean.data_ptr<float>(),
             running_var.data_ptr<float>(), num_batches_tracked.data_ptr<int64_t>(),
             bn_weight.data_ptr<float>(), bn_bias.data_ptr<float>(), batch, n,
             static_cast<float>(momentum.value_or(0.0)), !momentum.has_value(),
             static_cast<float>(eps), unbias, act, slope, drop);
    } else {
      launch(bn_eval_forward_kernel<scalar_t>, elementwise_grid(std::max(batch * n, n)),
             dim3(kThreads), stream, h.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
             mean.data_ptr<float>(), rstd.data_ptr<float>(), running_mean.data_ptr<float>(),
             running_var.data_ptr<float>(), bn_weight.data_ptr<float>(),
             bn_bias.data_ptr<float>(), batch, n, static_cast<float>(eps), act, slope, drop);
    }
  });
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_act_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& h,
    const at::Tensor& mean, const at::Tensor& rstd, bool training, int64_t activation,
    double negative_slope, double p, const at::Tensor& seed, const at::Tensor& offset,
    bool compute_dx, bool compute_dw) {
  const int64_t n = check_linear_bn_act_backward(kBackend, grad_y, x, weight, bn_weight, bn_bias,
                                                 h, mean, rstd, seed, offset);
  FASTGAN_CHECK_CONTIGUOUS(bn_weight, bn_bias, mean, rstd);  // indexed by feature
  const int64_t batch = x.size(0);

  const DeviceScope device_scope(x.device());
  const Stream stream = current_stream();
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor gyc = grad_y.contiguous(), hc = h.contiguous();

  at::Tensor dh = at::empty({batch, n}, x.options());
  at::Tensor dbias = at::empty({n}, x.options());
  at::Tensor dgamma = at::empty({n}, bn_weight.options());
  at::Tensor dbeta = at::empty({n}, bn_weight.options());
  if (n > 0) {
    const RowChunks chunks = row_chunks(batch, n);
    const at::Tensor part = chunks.count > 1
        ? at::empty({training ? 2 : 3, chunks.count, n}, bn_weight.options()) : at::Tensor();
    float* part_ptr = part.defined() ? part.data_ptr<float>() : nullptr;
    const int act = static_cast<int>(activation);
    const float slope = static_cast<float>(negative_slope);
    const DropoutArgs drop = dropout_args(seed, offset, p);
    FASTGAN_DISPATCH_FLOATING(x.scalar_type(), "linear_bn_act_backward", [&] {
      const scalar_t* gy = gyc.data_ptr<scalar_t>();
      const scalar_t* hp = hc.data_ptr<scalar_t>();
      if (part.defined() && training) {  // dbeta, dgamma first: dh needs them
        launch(bn_backward_sums_kernel<scalar_t>, column_grid(n, chunks), column_block(), stream,
               gy, hp, mean.data_ptr<float>(), rstd.data_ptr<float>(),
               bn_weight.data_ptr<float>(), bn_bias.data_ptr<float>(), part_ptr, batch, n,
               chunks.rows, act, slope, drop);
        sum_chunks(part, 0, dbeta.data_ptr<float>(), stream);
        sum_chunks(part, 1, dgamma.data_ptr<float>(), stream);
      }
      launch(bn_backward_kernel<scalar_t>, column_grid(n, chunks), column_block(), stream, gy, hp,
             mean.data_ptr<float>(), rstd.data_ptr<float>(), bn_weight.data_ptr<float>(),
             bn_bias.data_ptr<float>(), dh.data_ptr<scalar_t>(), dgamma.data_ptr<float>(),
             dbeta.data_ptr<float>(), dbias.data_ptr<scalar_t>(), part_ptr, batch, n,
             chunks.rows, training, act, slope, drop);
      if (part.defined()) {  // (the sums pass's partials are spent: reuse the buffer)
        sum_chunks(part, 0, dbias.data_ptr<scalar_t>(), stream);
        if (!training) {
          sum_chunks(part, 1, dbeta.data_ptr<float>(), stream);
          sum_chunks(part, 2, dgamma.data_ptr<float>(), stream);
        }
      }
    });
  }
  at::Tensor dx = compute_dx ? at::mm(dh, wc) : at::empty({0}, x.options());
  at::Tensor dweight = compute_dw ? at::mm(dh.t(), xc) : at::empty({0}, wc.options());
  return {dx, dweight, dbias, dgamma, dbeta};
}

}  // namespace cuda
}  // namespace fastgan

#ifndef FASTGAN_CUDA_EMULATE
TORCH_LIBRARY_IMPL(fastgan_C, CUDA, m) {
  m.impl("linear_bn_act_forward", &fastgan::cuda::linear_bn_act_forward);
  m.impl("linear_bn_act_backward", &fastgan::cuda::linear_bn_act_backward);
}
#endif
