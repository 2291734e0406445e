// gan_bce on the CPU: mean BCE-with-logits of one or two logit tensors, their
// gradients and mean sigmoid, in one pass over each tensor.
// Spec: fastgan/impl/reference.py (gan_bce_forward, _bce_term).
//
// Per element, in the accumulation dtype (fp32, fp64 for fp64 logits):
//   loss term = max(z, 0) - z * t + log1p(exp(-|z|))   (never overflows;
//               at z = +-inf its limit, inf or 0, not inf - inf = nan)
//   prob      = 1 / (1 + exp(-z))
//   grad      = (prob - t) / numel, rounded to the logits' dtype
// The sums of loss terms and probabilities are taken over fixed chunks in
// double, then added in chunk order: the result does not depend on the
// number of threads.
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu_common.h"

namespace fastgan {
namespace cpu {
namespace {

constexpr const char* kForward = "gan_bce_forward";
constexpr int64_t kChunk = 16384;
template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

// Returns (mean loss, mean prob) of one logits tensor; its gradient goes to
// `grad` (contiguous, as many elements).
std::tuple<at::Tensor, at::Tensor> bce_term(const at::Tensor& logits, double target,
                                            const at::Tensor& grad) {
  const at::Tensor z = logits.contiguous();
  const int64_t n = z.numel();
  const auto sdt = stat_dtype(z.scalar_type());
  at::Tensor loss = at::empty({}, z.options().dtype(sdt));
  at::Tensor prob = at::empty({}, z.options().dtype(sdt));
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> loss_part(chunks), prob_part(chunks);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), kForward, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* gp = grad.data_ptr<scalar_t>();
    const acc_t t = static_cast<acc_t>(target);
    const acc_t count = static_cast<acc_t>(n);
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t e1 = std::min(n, (k + 1) * kChunk);
        double ls = 0.0, ps = 0.0;
        for (int64_t e = k * kChunk; e < e1; ++e) {
          const acc_t v = static_cast<acc_t>(zp[e]);
          acc_t term = (v > acc_t(0) ? v : acc_t(0)) - v * t + std::log1p(std::exp(-std::abs(v)));
          // An infinite logit: the limit (1 - t) * inf for +inf, t * inf for -inf,
          // that is inf, or 0 where the target matches it.
          if (std::isinf(v)) {
            term = (v > acc_t(0) ? t < acc_t(1) : t > acc_t(0)) ? kInf<acc_t> : acc_t(0);
          }
          const acc_t pr = acc_t(1) / (acc_t(1) + std::exp(-v));
          gp[e] = static_cast<scalar_t>((pr - t) / count);
          ls += static_cast<double>(term);
          ps += static_cast<double>(pr);
        }
        loss_part[k] = ls;
        prob_part[k] = ps;
      }
    });
    double ls = 0.0, ps = 0.0;
    for (int64_t k = 0; k < chunks; ++k) {
      ls += loss_part[k];
      ps += prob_part[k];
    }
    *loss.data_ptr<acc_t>() = static_cast<acc_t>(ls / n);
    *prob.data_ptr<acc_t>() = static_cast<acc_t>(ps / n);
  });
  return {loss, prob};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bce_term(const at::Tensor& logits, double target) {
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  auto [loss, prob] = bce_term(logits, target, grad);
  return {loss, prob, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gan_bce_forward(
    const at::Tensor& logits_a, const std::optional<at::Tensor>& logits_b, double target_a,
    double target_b) {
  check_gan_bce(kBackend, logits_a, logits_b);
  const bool has_b = logits_b.has_value() && logits_b->defined();

  auto [loss_a, prob_a, grad_a] = bce_term(logits_a, target_a);
  if (!has_b) {
    return {loss_a, prob_a, at::zeros_like(prob_a), grad_a, at::empty({0}, logits_a.options())};
  }
  auto [loss_b, prob_b, grad_b] = bce_term(*logits_b, target_b);
  return {loss_a + loss_b, prob_a, prob_b, grad_a, grad_b};
}

// The taped GAN step's losses (fastgan.train.tape, on this backend): what
// gan_bce_forward(logits[:split], logits[split:] or None, target_first,
// target_second) returns, but with both gradients in one tensor shaped as
// logits, which is what the step backpropagates (the autograd step cats
// them). Every value is gan_bce_forward's bit for bit: the same terms over
// the same elements, the loss the same sum (the autograd step's gradient of
// the loss, 1, multiplies them exactly).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_gan_bce_rows(
    const at::Tensor& logits, int64_t split, double target_first, double target_second) {
  TORCH_CHECK(logits.dim() >= 1 && split >= 1 && split <= logits.size(0),
              "cpu_gan_bce_rows: split must be in [1, ", logits.dim() ? logits.size(0) : 0,
              "], got ", split);
  const at::Tensor z = logits.contiguous();
  const bool has_second = split < z.size(0);
  check_gan_bce(kBackend, z.narrow(0, 0, split),
                has_second ? std::optional<at::Tensor>(z.narrow(0, split, z.size(0) - split))
                           : std::nullopt);
  at::Tensor grad = at::empty(z.sizes(), z.options());
  auto [loss_a, prob_a] = bce_term(z.narrow(0, 0, split), target_first, grad.narrow(0, 0, split));
  if (!has_second) return {loss_a, prob_a, at::zeros_like(prob_a), grad};
  const int64_t rest = z.size(0) - split;
  auto [loss_b, prob_b] = bce_term(z.narrow(0, split, rest), target_second,
                                   grad.narrow(0, split, rest));
  return {loss_a + loss_b, prob_a, prob_b, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgan_C, CPU, m) {
  m.impl("gan_bce_forward", &gan_bce_forward);
}

TORCH_LIBRARY_FRAGMENT(fastgan_C, m) {
  m.def(
      "cpu_gan_bce_rows(Tensor logits, int split, float target_first, float target_second) "
      "-> (Tensor, Tensor, Tensor, Tensor)",
      &cpu_gan_bce_rows);
}

}  // namespace cpu
}  // namespace fastgan
