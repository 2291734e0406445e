// The cpu backend's fused ops with their autograd in C++: one call from Python
// runs the forward kernel and, where an input needs a gradient, records a C++
// autograd node whose backward runs the backward kernel (csrc/cpu/autograd.h).
//
// Why: on the CPU a small fused layer's kernels take a few microseconds, and
// the Python autograd.Function around them (Function.apply, saving for
// backward, the backward's Python, the dispatcher's boxing on each side) took
// as long again. These nodes do what fastgan/ops/registry.py's Functions do,
// in the same order and through the same kernels (op_handles.h), so the
// numbers are the same bits:
// - forward: inputs made contiguous as fastgan/impl/cpu.py makes them, the
//   forward kernel, and what the Function saves (inputs, outputs, the key);
// - backward: compute_dx / compute_dw from which inputs need a gradient, the
//   backward kernel, one gradient per input that needs one;
// - double backward: when autograd builds a graph of the backward itself
//   (create_graph=True, grad mode on in backward), the node calls back into
//   Python for the op's differentiable formulas (registry.py: the op's
//   `double`, registered with set_double_backward), as the Function does.
// The Python side decides when to take this path (plain eager CPU tensors on
// the cpu backend, outside torch.compile) and checks every argument first
// (fastgan/ops/checks.py); the kernel entries check memory safety again.
#include "autograd.h"

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>

#include <atomic>

#include "op_handles.h"

namespace fastgan {
namespace cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Backward kernel runs per op, counted here because no Python sees them
// (fastgan.ops.dispatch.calls folds them in).
std::atomic<int64_t> backward_runs[kAutogradOps];

// The op's differentiable backward in Python, per op (set_double_backward).
PyObject* double_backward[kAutogradOps] = {};

// Raises the Python exception that is set as a C++ one the autograd engine
// carries back to the caller of backward (as torch's own Python nodes do).
[[noreturn]] void throw_python_error() {
  python_error err;
  err.persist();
  throw std::move(err);
}

// The GIL for the current scope: autograd runs backward with it released.
struct Gil {
  PyGILState_STATE state = PyGILState_Ensure();
  ~Gil() { PyGILState_Release(state); }
};

// Arguments of a Python call, built in order (each a new reference).
struct PyArgs {
  explicit PyArgs(Py_ssize_t n) : tuple(PyTuple_New(n)) {
    if (tuple == nullptr) throw_python_error();
  }
  ~PyArgs() { Py_XDECREF(tuple); }
  PyArgs& operator<<(PyObject* o) {
    if (o == nullptr) throw_python_error();
    PyTuple_SET_ITEM(tuple, i++, o);  // steals o
    return *this;
  }
  PyArgs& operator<<(const at::Tensor& t) { return *this << THPVariable_Wrap(t); }
  PyArgs& operator<<(double v) { return *this << PyFloat_FromDouble(v); }
  PyArgs& operator<<(int64_t v) { return *this << PyLong_FromLongLong(v); }
  PyArgs& operator<<(bool v) { return *this << PyBool_FromLong(v); }
  PyObject* tuple;
  Py_ssize_t i = 0;
};

// Calls the op's double backward with `args`; returns its gradients (a tuple
// of tensors, in the op's `grads` order).
variable_list call_double(AutogradOp op, PyArgs& args) {
  PyObject* fn = double_backward[op];
  TORCH_CHECK(fn != nullptr, "fastgan: no double backward registered for op ", int(op),
              " (fastgan.ops.registry registers them at import)");
  PyObject* out = PyObject_CallObject(fn, args.tuple);
  if (out == nullptr) throw_python_error();
  variable_list grads;
  const Py_ssize_t n = PyTuple_Check(out) ? PyTuple_GET_SIZE(out) : -1;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* g = PyTuple_GET_ITEM(out, i);
    grads.push_back(THPVariable_Check(g) ? THPVariable_Unpack(g) : at::Tensor());
  }
  Py_DECREF(out);
  TORCH_CHECK(n >= 0, "fastgan: the double backward must return a tuple of tensors");
  return grads;
}

// The gradient of a forward input where it needs one, else undefined (what
// autograd expects for an input that does not).
at::Tensor if_needed(bool needed, const at::Tensor& g) { return needed ? g : at::Tensor(); }

}  // namespace

// Named as fastgan/ops/registry.py's Functions (a node's name() in autograd's
// errors and the profiler: torch::autograd::CppNode<fastgan::cpu::LinearActFunction>).
// ------------------------------------------------------------------ linear_act
struct LinearActFunction : public torch::autograd::Function<LinearActFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const OptT& bias, int64_t activation, double negative_slope, double p,
                            const at::Tensor& seed, const at::Tensor& offset) {
    const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
    const OptT bc = contiguous(bias);
    at::Tensor y = la_forward().call(xc, wc, bc, activation, negative_slope, p, seed, offset);
    ctx->save_for_backward({xc, wc, bc.value_or(at::Tensor()), y, seed, offset});
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["p"] = p;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &weight = s[1], &bias = s[2], &y = s[3], &seed = s[4],
                     &offset = s[5];
    const int64_t act = ctx->saved_data["activation"].toInt();
    const double slope = ctx->saved_data["negative_slope"].toDouble();
    const double p = ctx->saved_data["p"].toDouble();
    // autograd's edges: one per tensor input (x, weight, [bias,] seed, offset)
    const bool dx = ctx->needs_input_grad(0), dw = ctx->needs_input_grad(1);
    const bool db = bias.defined() && ctx->needs_input_grad(2);
    at::Tensor gx, gw, gb;
    if (at::GradMode::is_enabled()) {  // create_graph: differentiable formulas
      Gil gil;
      PyArgs args(11);
      args << grads[0] << x << weight << bias << act << slope << p << seed << offset << dx << dw;
      const variable_list g = call_double(kLinearAct, args);
      TORCH_CHECK(g.size() == 3, "fastgan: linear_act's double backward returned ", g.size(),
                  " gradients, expected 3");
      gx = g[0], gw = g[1], gb = g[2];
    } else {
      std::tie(gx, gw, gb) = la_backward().call(grads[0].contiguous(), x, weight, y, act, slope,
                                                p, seed, offset, dx, dw);
      backward_runs[kLinearAct].fetch_add(1, std::memory_order_relaxed);
    }
    // one entry per forward argument; none for the non-tensor ones and the key
    return {if_needed(dx, gx), if_needed(dw, gw), if_needed(db, gb), at::Tensor(),
            at::Tensor(),      at::Tensor(),      at::Tensor(),      at::Tensor()};
  }
};

// ------------------------------------------------------------------ linear_bn_act
struct LinearBNActFunction : public torch::autograd::Function<LinearBNActFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const OptT& bias, const at::Tensor& bn_weight,
                            const at::Tensor& bn_bias, at::Tensor& running_mean,
                            at::Tensor& running_var, at::Tensor& num_batches_tracked,
                            bool training, std::optional<double> momentum, double eps,
                            int64_t activation, double negative_slope, double p,
                            const at::Tensor& seed, const at::Tensor& offset) {
    const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
    const at::Tensor gc = bn_weight.contiguous(), bc2 = bn_bias.contiguous();
    const OptT bc = contiguous(bias);
    auto [y, h, mean, rstd] =
        lbna_forward().call(xc, wc, bc, gc, bc2, running_mean, running_var, num_batches_tracked,
                            training, momentum, eps, activation, negative_slope, p, seed, offset);
    ctx->save_for_backward(
        {xc, wc, bc.value_or(at::Tensor()), gc, bc2, h, mean, rstd, seed, offset});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["p"] = p;
    return y;  // h, mean and rstd are saved for backward only, as the Function's
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &weight = s[1], &bias = s[2], &bn_weight = s[3],
                     &bn_bias = s[4], &h = s[5], &mean = s[6], &rstd = s[7], &seed = s[8],
                     &offset = s[9];
    const bool training = ctx->saved_data["training"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t act = ctx->saved_data["activation"].toInt();
    const double slope = ctx->saved_data["negative_slope"].toDouble();
    const double p = ctx->saved_data["p"].toDouble();
    // autograd's edges: x, weight, [bias,] bn_weight, bn_bias, the statistics, the key
    const size_t g0 = bias.defined() ? 3 : 2;
    const bool dx = ctx->needs_input_grad(0), dw = ctx->needs_input_grad(1);
    const bool db = bias.defined() && ctx->needs_input_grad(2);
    const bool dgamma = ctx->needs_input_grad(g0), dbeta = ctx->needs_input_grad(g0 + 1);
    at::Tensor gx, gw, gb, gg, gbeta;
    if (at::GradMode::is_enabled()) {  // create_graph: differentiable formulas
      Gil gil;
      PyArgs args(17);
      args << grads[0] << x << weight << bias << bn_weight << bn_bias << mean << rstd
           << training << eps << act << slope << p << seed << offset << dx << dw;
      const variable_list g = call_double(kLinearBNAct, args);
      TORCH_CHECK(g.size() == 5, "fastgan: linear_bn_act's double backward returned ",
                  g.size(), " gradients, expected 5");
      gx = g[0], gw = g[1], gb = g[2], gg = g[3], gbeta = g[4];
    } else {
      std::tie(gx, gw, gb, gg, gbeta) =
          lbna_backward().call(grads[0].contiguous(), x, weight, bn_weight, bn_bias, h, mean,
                               rstd, training, act, slope, p, seed, offset, dx, dw);
      backward_runs[kLinearBNAct].fetch_add(1, std::memory_order_relaxed);
    }
    return {if_needed(dx, gx), if_needed(dw, gw), if_needed(db, gb), if_needed(dgamma, gg),
            if_needed(dbeta, gbeta), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

namespace {

bool needs_node(std::initializer_list<const at::Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : inputs) {
    if (t->defined() && t->requires_grad()) return true;
  }
  return false;
}

}  // namespace

at::Tensor linear_act(const at::Tensor& x, const at::Tensor& weight, const OptT& bias,
                      int64_t activation, double negative_slope, double p, const at::Tensor& seed,
                      const at::Tensor& offset) {
  const at::Tensor none;
  if (!needs_node({&x, &weight, bias ? &*bias : &none})) {  // inference: the forward alone
    return la_forward().call(x.contiguous(), weight.contiguous(), contiguous(bias), activation,
                             negative_slope, p, seed, offset);
  }
  return LinearActFunction::apply(x, weight, bias, activation, negative_slope, p, seed, offset);
}

at::Tensor linear_bn_act(const at::Tensor& x, const at::Tensor& weight, const OptT& bias,
                         const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                         at::Tensor& running_mean, at::Tensor& running_var,
                         at::Tensor& num_batches_tracked, bool training,
                         std::optional<double> momentum, double eps, int64_t activation,
                         double negative_slope, double p, const at::Tensor& seed,
                         const at::Tensor& offset) {
  const at::Tensor none;
  if (!needs_node({&x, &weight, bias ? &*bias : &none, &bn_weight, &bn_bias})) {
    return std::get<0>(lbna_forward().call(
        x.contiguous(), weight.contiguous(), contiguous(bias), bn_weight.contiguous(),
        bn_bias.contiguous(), running_mean, running_var, num_batches_tracked, training, momentum,
        eps, activation, negative_slope, p, seed, offset));
  }
  return LinearBNActFunction::apply(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                              num_batches_tracked, training, momentum, eps, activation,
                              negative_slope, p, seed, offset);
}

void set_double_backward(AutogradOp op, PyObject* fn) {
  Py_XINCREF(fn);
  Py_XDECREF(double_backward[op]);
  double_backward[op] = fn;
}

int64_t backward_calls(AutogradOp op) {
  return backward_runs[op].load(std::memory_order_relaxed);
}

}  // namespace cpu
}  // namespace fastgan
