// The cpu backend's fused ops with their autograd in C++ (autograd.cpp): what
// fastgan/ops/registry.py's autograd Functions do for the cpu backend, in one
// call from Python (csrc/module.cpp exposes them as fastgan._C.cpu_*).
// Arguments are the ops' (csrc/ops.cpp schemas), checked by Python first.
#pragma once

#include <Python.h>

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace fastgan {
namespace cpu {

enum AutogradOp { kLinearAct = 0, kLinearBNAct = 1, kAutogradOps = 2 };

// y of fastgan::linear_act; records a backward node when an input needs a gradient.
at::Tensor linear_act(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, int64_t activation,
                      double negative_slope, double p, const at::Tensor& seed,
                      const at::Tensor& offset);

// y of fastgan::linear_bn_act (the statistics updated in place, as the op does).
at::Tensor linear_bn_act(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& bn_weight,
                         const at::Tensor& bn_bias, at::Tensor& running_mean,
                         at::Tensor& running_var, at::Tensor& num_batches_tracked, bool training,
                         std::optional<double> momentum, double eps, int64_t activation,
                         double negative_slope, double p, const at::Tensor& seed,
                         const at::Tensor& offset);

// The Python callable a node calls for a differentiable backward (create_graph):
// the backward's arguments of fastgan/ops/registry.py's `<op>_double`, with the
// activation as its integer code and no `backend` (this is the cpu backend).
void set_double_backward(AutogradOp op, PyObject* fn);

// How many times the nodes of `op` ran its backward kernel (first order).
int64_t backward_calls(AutogradOp op);

// (seed, offset) of the dropout stream state ([seed, counter]), then counter += 1
// (csrc/cpu/dropout.cpp).
std::tuple<at::Tensor, at::Tensor> cpu_next_key(const at::Tensor& state);

}  // namespace cpu
}  // namespace fastgan
