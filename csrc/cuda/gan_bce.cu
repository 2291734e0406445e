// gan_bce on CUDA: the BCE-with-logits losses of a GAN, loss, gradient and the
// mean sigmoid diagnostics in one kernel. The spec is fastgan/impl/reference.py
// (gan_bce_forward).
//
// One block walks both logit tensors: it writes each element's gradient
// (sigmoid(z) - target) / numel and reduces four sums (loss and sigmoid of a
// and of b) in a fixed order, so results are deterministic and nothing has to
// be zeroed first. GAN logits are (B, 1), a few thousand values at most, so a
// single block is plenty and saves a second reduction launch.
#include "common.cuh"

namespace fastgan {
namespace cuda {
namespace {

constexpr int kBceThreads = 512;

// Adds the loss and sigmoid of logits[0..n) to loss_sum/prob_sum and writes the
// gradient of mean BCE(logits, target).
template <typename T>
__device__ __forceinline__ void bce_term(const T* __restrict__ logits, T* __restrict__ grad,
                                         int64_t n, float target, float& loss_sum,
                                         float& prob_sum) {
  // PyTorch's CUDA division by a scalar multiplies by the fp32 reciprocal.
  const float inv_n = 1.f / static_cast<float>(n);
  for (int64_t i = threadIdx.x; i < n; i += kBceThreads) {
    const float z = load(logits, i);
    // softplus(z) - target * z, in the form where exp never overflows; at an
    // infinite logit its limit (inf, or 0 where the target matches it), not nan
    float term = fmaxf(z, 0.f) - z * target + log1pf(expf(-fabsf(z)));
    if (fabsf(z) == INFINITY) term = (z > 0.f ? target < 1.f : target > 0.f) ? INFINITY : 0.f;
    loss_sum += term;
    const float prob = 1.f / (1.f + expf(-z));
    prob_sum += prob;
    grad[i] = static_cast<T>((prob - target) * inv_n);
  }
}

template <typename T>
__global__ void __launch_bounds__(kBceThreads)
    gan_bce_kernel(const T* __restrict__ a, T* __restrict__ grad_a, int64_t na, float target_a,
                   const T* __restrict__ b, T* __restrict__ grad_b, int64_t nb, float target_b,
                   float* __restrict__ loss, float* __restrict__ mean_prob_a,
                   float* __restrict__ mean_prob_b) {
  float sums[4] = {0.f, 0.f, 0.f, 0.f};  // loss a, sigmoid a, loss b, sigmoid b
  bce_term(a, grad_a, na, target_a, sums[0], sums[1]);
  if (b != nullptr) bce_term(b, grad_b, nb, target_b, sums[2], sums[3]);
  block_sum<4, kBceThreads>(sums);
  if (threadIdx.x == 0) {
    // torch's mean multiplies the fp32 sum by the fp32 1/numel
    const float inv_na = 1.f / static_cast<float>(na);
    const float inv_nb = b != nullptr ? 1.f / static_cast<float>(nb) : 0.f;
    loss[0] = sums[0] * inv_na + sums[2] * inv_nb;
    mean_prob_a[0] = sums[1] * inv_na;
    mean_prob_b[0] = sums[3] * inv_nb;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gan_bce_forward(
    const at::Tensor& logits_a, const std::optional<at::Tensor>& logits_b, double target_a,
    double target_b) {
  check_gan_bce(kBackend, logits_a, logits_b);

  const DeviceScope device_scope(logits_a.device());
  const Stream stream = current_stream();
  const at::Tensor a = logits_a.contiguous();
  const bool has_b = logits_b.has_value() && logits_b->defined();
  const at::Tensor b = has_b ? logits_b->contiguous() : at::Tensor();

  const auto scalar_opts = a.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, scalar_opts);
  at::Tensor mean_prob_a = at::empty({}, scalar_opts);
  at::Tensor mean_prob_b = at::empty({}, scalar_opts);
  at::Tensor grad_a = at::empty(a.sizes(), a.options());
  at::Tensor grad_b = has_b ? at::empty(b.sizes(), b.options()) : at::empty({0}, a.options());
  FASTGAN_DISPATCH_FLOATING(a.scalar_type(), "gan_bce_forward", [&] {
    launch(gan_bce_kernel<scalar_t>, dim3(1), dim3(kBceThreads), stream, a.data_ptr<scalar_t>(),
           grad_a.data_ptr<scalar_t>(), a.numel(), static_cast<float>(target_a),
           has_b ? b.data_ptr<scalar_t>() : nullptr,
           has_b ? grad_b.data_ptr<scalar_t>() : nullptr, has_b ? b.numel() : int64_t(0),
           static_cast<float>(target_b), loss.data_ptr<float>(), mean_prob_a.data_ptr<float>(),
           mean_prob_b.data_ptr<float>());
  });
  return {loss, mean_prob_a, mean_prob_b, grad_a, grad_b};
}

}  // namespace cuda
}  // namespace fastgan

#ifndef FASTGAN_CUDA_EMULATE
TORCH_LIBRARY_IMPL(fastgan_C, CUDA, m) {
  m.impl("gan_bce_forward", &fastgan::cuda::gan_bce_forward);
}
#endif
