// Schemas of the kernels in fastgan._C, namespace fastgan_C. Kernels register
// per device: csrc/cpu/<op>.cpp with TORCH_LIBRARY_IMPL(fastgan_C, CPU, m),
// csrc/cuda/<op>.cu with TORCH_LIBRARY_IMPL(fastgan_C, CUDA, m).
// The contract (shapes, dtypes, numerics, the dropout RNG) is the one written
// down in fastgan/impl/reference.py. The ops of fastgan/ops/registry.py check
// every argument first (fastgan/ops/checks.py); a kernel entry checks again
// only what keeps it inside its buffers (csrc/checks.h).
// `activation` is the integer code of fastgan/ops/spec.py's ACTIVATION_TABLE
// (csrc/activation.h). The Python module itself is csrc/module.cpp.
#include <torch/library.h>

TORCH_LIBRARY(fastgan_C, m) {
  m.def(
      "linear_bn_act_forward(Tensor x, Tensor weight, Tensor? bias, Tensor bn_weight, "
      "Tensor bn_bias, Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor(c!) num_batches_tracked, bool training, float? momentum, float eps, "
      "int activation, float negative_slope, float p, Tensor seed, Tensor offset) "
      "-> (Tensor y, Tensor h, Tensor mean, Tensor rstd)");
  m.def(
      "linear_bn_act_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bn_weight, "
      "Tensor bn_bias, Tensor h, Tensor mean, Tensor rstd, bool training, int activation, "
      "float negative_slope, float p, Tensor seed, Tensor offset, bool compute_dx, "
      "bool compute_dw=True) "
      "-> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dbn_weight, Tensor dbn_bias)");
  m.def(
      "linear_act_forward(Tensor x, Tensor weight, Tensor? bias, int activation, "
      "float negative_slope, float p, Tensor seed, Tensor offset) -> Tensor");
  m.def(
      "linear_act_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor y, int activation, "
      "float negative_slope, float p, Tensor seed, Tensor offset, bool compute_dx, "
      "bool compute_dw=True) -> (Tensor dx, Tensor dweight, Tensor dbias)");
  m.def(
      "gan_bce_forward(Tensor logits_a, Tensor? logits_b, float target_a, float target_b) "
      "-> (Tensor loss, Tensor mean_prob_a, Tensor mean_prob_b, Tensor grad_a, Tensor grad_b)");
}
