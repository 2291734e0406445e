// The Python module fastgan._C. Importing it loads the library, which runs the
// kernel registrations (csrc/ops.cpp schemas, torch.ops.fastgan_C.*), and
// gives the few calls that the CPU fast path makes per layer as plain Python
// functions (METH_FASTCALL): a torch.ops call boxes its arguments through the
// dispatcher, ~2-3 us a call, as long as a small layer's kernels. Each takes
// the arguments of the op it runs (csrc/cpu/autograd.h), checked by Python
// first (fastgan/ops/checks.py); here only their Python types are checked, and
// a wrong one is a TypeError naming the argument.
//
//   cpu_linear_act(x, weight, bias, activation, negative_slope, p, seed, offset) -> y
//   cpu_linear_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
//                     num_batches_tracked, training, momentum, eps, activation,
//                     negative_slope, p, seed, offset) -> y
//   cpu_next_key(state) -> (seed, offset)
//   cpu_set_double_backward(op, fn)           op: 0 linear_act, 1 linear_bn_act
//   cpu_autograd_backward_calls() -> (linear_act, linear_bn_act)
#include <Python.h>

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <string>

#include "cpu/autograd.h"

namespace {

using fastgan::cpu::AutogradOp;

[[noreturn]] void type_error(const char* name, const char* what, PyObject* got) {
  throw torch::TypeError(std::string(name) + " must be " + what + ", got " +
                         Py_TYPE(got)->tp_name);
}

const at::Tensor& tensor(PyObject* o, const char* name) {
  if (!THPVariable_Check(o)) type_error(name, "a Tensor", o);
  return THPVariable_Unpack(o);
}

std::optional<at::Tensor> optional_tensor(PyObject* o, const char* name) {
  if (o == Py_None) return std::nullopt;
  return tensor(o, name);
}

double real(PyObject* o, const char* name) {
  if (!PyFloat_Check(o) && !PyLong_Check(o)) type_error(name, "a float", o);
  const double v = PyFloat_AsDouble(o);
  if (v == -1.0 && PyErr_Occurred()) throw python_error();
  return v;
}

std::optional<double> optional_real(PyObject* o, const char* name) {
  if (o == Py_None) return std::nullopt;
  return real(o, name);
}

int64_t integer(PyObject* o, const char* name) {
  if (!PyLong_Check(o) || PyBool_Check(o)) type_error(name, "an int", o);
  const int64_t v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) throw python_error();
  return v;
}

bool boolean(PyObject* o, const char* name) {
  if (!PyBool_Check(o)) type_error(name, "a bool", o);
  return o == Py_True;
}

void arity(const char* fn, Py_ssize_t nargs, Py_ssize_t want) {
  if (nargs != want) {
    throw torch::TypeError(std::string(fn) + " takes " + std::to_string(want) +
                           " arguments, got " + std::to_string(nargs));
  }
}

// The GIL released for the kernels, as torch's own bindings do.
struct NoGil {
  PyThreadState* state = PyEval_SaveThread();
  ~NoGil() { PyEval_RestoreThread(state); }
};

// The tensor `run()` returns, computed without the GIL, as a Python object.
template <typename F>
PyObject* tensor_without_gil(const F& run) {
  at::Tensor y;
  {
    NoGil no_gil;
    y = run();
  }
  return THPVariable_Wrap(std::move(y));
}

PyObject* cpu_linear_act(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  arity("cpu_linear_act", n, 8);
  const at::Tensor &x = tensor(a[0], "x"), &weight = tensor(a[1], "weight");
  const auto bias = optional_tensor(a[2], "bias");
  const int64_t act = integer(a[3], "activation");
  const double slope = real(a[4], "negative_slope"), p = real(a[5], "p");
  const at::Tensor &seed = tensor(a[6], "seed"), &offset = tensor(a[7], "offset");
  return tensor_without_gil(
      [&] { return fastgan::cpu::linear_act(x, weight, bias, act, slope, p, seed, offset); });
  END_HANDLE_TH_ERRORS
}

PyObject* cpu_linear_bn_act(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  arity("cpu_linear_bn_act", n, 16);
  const at::Tensor &x = tensor(a[0], "x"), &weight = tensor(a[1], "weight");
  const auto bias = optional_tensor(a[2], "bias");
  const at::Tensor &bn_weight = tensor(a[3], "bn_weight"), &bn_bias = tensor(a[4], "bn_bias");
  // the statistics are updated in place: the Python tensors' own
  at::Tensor running_mean = tensor(a[5], "running_mean");
  at::Tensor running_var = tensor(a[6], "running_var");
  at::Tensor num_batches_tracked = tensor(a[7], "num_batches_tracked");
  const bool training = boolean(a[8], "training");
  const auto momentum = optional_real(a[9], "momentum");
  const double eps = real(a[10], "eps");
  const int64_t act = integer(a[11], "activation");
  const double slope = real(a[12], "negative_slope"), p = real(a[13], "p");
  const at::Tensor &seed = tensor(a[14], "seed"), &offset = tensor(a[15], "offset");
  return tensor_without_gil([&] {
    return fastgan::cpu::linear_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean,
                                       running_var, num_batches_tracked, training, momentum, eps,
                                       act, slope, p, seed, offset);
  });
  END_HANDLE_TH_ERRORS
}

PyObject* cpu_next_key(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  arity("cpu_next_key", n, 1);
  auto [seed, offset] = fastgan::cpu::cpu_next_key(tensor(a[0], "state"));
  PyObject* out = PyTuple_New(2);
  if (out == nullptr) return nullptr;
  PyTuple_SET_ITEM(out, 0, THPVariable_Wrap(std::move(seed)));  // (steals the references)
  PyTuple_SET_ITEM(out, 1, THPVariable_Wrap(std::move(offset)));
  return out;
  END_HANDLE_TH_ERRORS
}

PyObject* cpu_set_double_backward(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  arity("cpu_set_double_backward", n, 2);
  const int64_t op = integer(a[0], "op");
  TORCH_CHECK_VALUE(op >= 0 && op < fastgan::cpu::kAutogradOps, "op must be 0 or 1, got ", op);
  if (!PyCallable_Check(a[1])) type_error("fn", "callable", a[1]);
  fastgan::cpu::set_double_backward(static_cast<AutogradOp>(op), a[1]);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* cpu_autograd_backward_calls(PyObject*, PyObject* const*, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  arity("cpu_autograd_backward_calls", n, 0);
  return Py_BuildValue("(LL)", static_cast<long long>(fastgan::cpu::backward_calls(
                                   fastgan::cpu::kLinearAct)),
                       static_cast<long long>(
                           fastgan::cpu::backward_calls(fastgan::cpu::kLinearBNAct)));
  END_HANDLE_TH_ERRORS
}

#define FASTGAN_METHOD(f) {#f, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(f)), \
                           METH_FASTCALL, nullptr}
PyMethodDef methods[] = {
    FASTGAN_METHOD(cpu_linear_act),
    FASTGAN_METHOD(cpu_linear_bn_act),
    FASTGAN_METHOD(cpu_next_key),
    FASTGAN_METHOD(cpu_set_double_backward),
    FASTGAN_METHOD(cpu_autograd_backward_calls),
    {nullptr, nullptr, 0, nullptr},
};
#undef FASTGAN_METHOD

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
