// Adam over fp32 master weights of bf16/fp16 parameters, in one pass
// (fastgan.train.precision.MasterWeightAdam on the CPU); and the fp32 fused
// step of fastgan.train.FusedAdam (cpu_fused_adam_, at the end).
//
// The unfused step reads each bf16 gradient into an fp32 buffer, runs torch's
// fused Adam on the masters and copies the masters back into the parameters:
// three passes over memory that, inside a training step, is cold (the GEMMs
// evicted it). Profiled in a batch-64 seed-GAN bf16 step: 4.3 ms of 14 went
// to the optimizer, 1.2 ms of them to the two copies. Here every element is
// read once (gradient, master, both moments) and written once (master,
// moments, parameter).
//
// The arithmetic is torch's fused CPU Adam on fp32 (ATen's FusedAdamKernel):
// bias corrections in double, the first moment as lerp(exp_avg, grad, 1 -
// beta1) with one FMA, then the second moment, the denominator and the
// update with separate roundings; the masters equal what torch's fused Adam
// makes of fp32 copies fed the same gradients (tests/train/test_bf16_training.py
// checks it bit for bit), and each parameter is its master rounded to nearest
// even, as copy_ rounds.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "cpu_common.h"

namespace fastgan {
namespace cpu {
namespace {

struct AdamCoefficients {
  float lerp_weight;   // 1 - beta1
  bool lerp_small;     // |1 - beta1| < 0.5: lerp from exp_avg, else from grad
  float beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size, weight_decay;
  bool maximize;
};

// Elements [0, n): as the vector body of torch's kernel computes them, three
// fused multiply-adds (weight decay, the first moment's lerp, the second
// moment), the rest rounded step by step. Written without branches so that
// it vectorizes: maximize multiplies by -1 or 1 (both exact), the lerp picks
// its base and weight per element as torch's blend does.
template <bool kDecay, typename scalar_t>
FASTGAN_ISA_CLONES void adam_range(scalar_t* __restrict__ param, const scalar_t* __restrict__ grad,
                                   float* __restrict__ master, float* __restrict__ exp_avg,
                                   float* __restrict__ exp_avg_sq, int64_t n,
                                   const AdamCoefficients c) {
  // (every coefficient in a local: GCC does not vectorize loads from the struct)
  const float sign = c.maximize ? -1.0f : 1.0f, decay = c.weight_decay;
  const float coeff = c.lerp_small ? c.lerp_weight : c.lerp_weight - 1.0f;
  const float beta2 = c.beta2, one_minus_beta2 = c.one_minus_beta2;
  const float bc2 = c.bias_correction2_sqrt, eps = c.eps, neg_step = c.neg_step_size;
  const bool from_avg = c.lerp_small;
  // Tiles of 1024: the masters first, then the parameters from the masters
  // still in L1. (One loop doing both does not vectorize: GCC picks 16-bit
  // lanes for the bf16 load and store and then finds no vector type for the
  // float work.)
  for (int64_t t0 = 0; t0 < n; t0 += 1024) {
    const int64_t t1 = std::min<int64_t>(n, t0 + 1024);
    for (int64_t j = t0; j < t1; ++j) {
      float g = widen<float>(grad[j]) * sign;
      const float p = master[j];
      if constexpr (kDecay) g = std::fma(p, decay, g);
      const float m0 = exp_avg[j], v0 = exp_avg_sq[j];
      const float m = std::fma(coeff, g - m0, from_avg ? m0 : g);
      const float v = std::fma(one_minus_beta2 * g, g, v0 * beta2);
      exp_avg[j] = m;
      exp_avg_sq[j] = v;
      const float denom = std::sqrt(v) / bc2 + eps;
      master[j] = p + neg_step * m / denom;
    }
    for (int64_t j = t0; j < t1; ++j) param[j] = narrow<scalar_t>(master[j]);
  }
}

void cpu_master_adam_(at::TensorList params, at::TensorList grads, at::TensorList masters,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps,
                      double lr, double beta1, double beta2, double weight_decay, double eps,
                      bool maximize) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && masters.size() == count && exp_avgs.size() == count &&
                  exp_avg_sqs.size() == count && steps.size() == count,
              "cpu_master_adam_: the six tensor lists must have one entry per parameter");
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor &p = params[i], &g = grads[i], &m = masters[i];
    FASTGAN_CHECK_DEVICE_TYPE(p, c10::DeviceType::CPU);
    TORCH_CHECK(p.scalar_type() == at::kBFloat16 || p.scalar_type() == at::kHalf,
                "cpu_master_adam_: parameter ", i, " must be bfloat16 or float16, got ",
                p.scalar_type());
    TORCH_CHECK(g.scalar_type() == p.scalar_type() && g.sizes() == p.sizes() &&
                    g.is_contiguous() && g.device() == p.device(),
                "cpu_master_adam_: gradient ", i, " must be a contiguous ", p.scalar_type(),
                " tensor of the parameter's shape");
    for (const at::Tensor* t : {&m, &exp_avgs[i], &exp_avg_sqs[i]}) {
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->sizes() == p.sizes() &&
                      t->is_contiguous() && t->device() == p.device(),
                  "cpu_master_adam_: master and moments of parameter ", i,
                  " must be contiguous float32 tensors of its shape");
    }
    TORCH_CHECK(p.is_contiguous(), "cpu_master_adam_: parameter ", i, " must be contiguous");
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat &&
                    steps[i].device() == p.device(),
                "cpu_master_adam_: step ", i, " must be a float32 scalar tensor");
  }
  for (size_t i = 0; i < count; ++i) {
    // torch's _fused_adam: the step counts first, then the kernel reads it.
    float* step_ptr = steps[i].data_ptr<float>();
    *step_ptr += 1.0f;
    const double step = *step_ptr;
    const double bias_correction1 = 1 - std::pow(beta1, step);
    const double bias_correction2 = 1 - std::pow(beta2, step);
    const double step_size = lr / bias_correction1;
    AdamCoefficients c;
    c.lerp_weight = static_cast<float>(1 - beta1);
    c.lerp_small = std::abs(c.lerp_weight) < 0.5f;
    c.beta2 = static_cast<float>(beta2);
    c.one_minus_beta2 = static_cast<float>(1 - beta2);
    c.bias_correction2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
    c.eps = static_cast<float>(eps);
    c.neg_step_size = static_cast<float>(-step_size);
    c.weight_decay = static_cast<float>(weight_decay);
    c.maximize = maximize;
    const int64_t n = params[i].numel();
    float* master = masters[i].data_ptr<float>();
    float* m = exp_avgs[i].data_ptr<float>();
    float* v = exp_avg_sqs[i].data_ptr<float>();
    AT_DISPATCH_REDUCED_FLOATING_TYPES(params[i].scalar_type(), "cpu_master_adam_", [&] {
      scalar_t* p = params[i].data_ptr<scalar_t>();
      const scalar_t* g = grads[i].data_ptr<scalar_t>();
      const int64_t body = n - n % 16;
      at::parallel_for(0, body, int64_t(1) << 14, [&](int64_t a, int64_t b) {
        if (weight_decay != 0.0) {
          adam_range<true>(p + a, g + a, master + a, m + a, v + a, b - a, c);
        } else {
          adam_range<false>(p + a, g + a, master + a, m + a, v + a, b - a, c);
        }
      });
      if (body < n) {
        // The last numel % 16 elements: torch's kernel runs them in its scalar
        // loop, whose roundings its build decides; so they go to that very
        // kernel (the same elements, the step already counted), with the
        // gradient widened first: 15 elements at most.
        const at::Tensor tail = grads[i].reshape(-1).narrow(0, body, n - body).to(at::kFloat);
        at::_fused_adam_({masters[i].reshape(-1).narrow(0, body, n - body)}, {tail},
                         {exp_avgs[i].reshape(-1).narrow(0, body, n - body)},
                         {exp_avg_sqs[i].reshape(-1).narrow(0, body, n - body)}, {}, {steps[i]},
                         lr, beta1, beta2, weight_decay, eps, false, maximize);
        for (int64_t j = body; j < n; ++j) p[j] = narrow<scalar_t>(master[j]);
      }
    });
  }
}

// torch.optim.Adam(fused=True)'s CPU step as torch makes it, the step counts
// first (its _foreach_add_(steps, 1)), then _fused_adam_; here the counts are
// one add of 1 each (the same float32 sums) instead of a foreach over 0-dim
// tensors, which ATen runs as one dispatched add_ per tensor (~45 us for the
// 11 parameters of a seed-GAN network).
void cpu_fused_adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1,
                     double beta2, double weight_decay, double eps, bool maximize) {
  TORCH_CHECK(steps.size() == params.size(),
              "cpu_fused_adam_: one step tensor per parameter is needed");
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat &&
                    steps[i].device().is_cpu(),
                "cpu_fused_adam_: step ", i, " must be a float32 CPU scalar tensor");
  }
  for (const at::Tensor& t : steps) *t.data_ptr<float>() += 1.0f;
  at::_fused_adam_(params, grads, exp_avgs, exp_avg_sqs, {}, steps, lr, beta1, beta2,
                   weight_decay, eps, /*amsgrad=*/false, maximize);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastgan_C, m) {
  m.def(
      "cpu_fused_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, float lr, float beta1, float beta2, "
      "float weight_decay, float eps, bool maximize) -> ()",
      &cpu_fused_adam_);
  m.def(
      "cpu_master_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] masters, "
      "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] steps, float lr, "
      "float beta1, float beta2, float weight_decay, float eps, bool maximize) -> ()",
      &cpu_master_adam_);
}

}  // namespace cpu
}  // namespace fastgan
