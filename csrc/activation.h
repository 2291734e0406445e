// The activations of the fused ops, one definition for the CPU kernels
// (csrc/cpu), the CUDA kernels (csrc/cuda) and so the CPU emulation of the
// CUDA sources (csrc/cuda/emulate.cuh).
//
// The codes are those of fastgan.ops.spec.ACTIVATION_TABLE;
// tests/impl/test_csrc_spec.py checks the enum and the cases of the three
// functions against that table. Adding an activation: its row in the table,
// its enumerator here (before kActivationCount) and its case in each function.
//
// T is the epilogue's math type: float, or double on the CPU's float64 path.
// A kernel passes the code either as a compile-time constant (the CPU kernels:
// the switch folds to one case and the loop vectorizes) or as a uniform kernel
// argument (the CUDA kernels: one instantiation for all activations).
#pragma once

#include <cmath>

#include "host_device.h"

namespace fastgan {

enum Activation : int {
  kIdentity = 0,
  kRelu = 1,
  kLeakyRelu = 2,
  kTanh = 3,
  kActivationCount  // one past the last code, not an activation
};

// tanhf for float (as std::tanh(float) and the CUDA math library), tanh for double.
FASTGAN_HD float tanh_of(float z) { return tanhf(z); }
FASTGAN_HD double tanh_of(double z) { return tanh(z); }

// Unknown codes act as identity: codes are checked at the op boundary, in
// Python (fastgan/ops/checks.py), and a wrong one cannot move an index.

// act(z) (fastgan.ops.spec: Activation.fn).
template <typename T>
FASTGAN_HD T activate(T z, int act, T slope) {
  switch (act) {
    case kRelu: return z < T(0) ? T(0) : z;  // NaN passes and -0 stays -0, as torch.relu
    case kLeakyRelu: return z > T(0) ? z : z * slope;
    case kTanh: return tanh_of(z);
    case kIdentity:
    default: return z;
  }
}

// d act / dz from the pre-activation z (Activation.grad).
template <typename T>
FASTGAN_HD T activate_grad(T z, int act, T slope) {
  switch (act) {
    case kRelu: return z > T(0) ? T(1) : T(0);
    case kLeakyRelu: return z > T(0) ? T(1) : slope;
    case kTanh: {
      const T t = tanh_of(z);
      return T(1) - t * t;
    }
    case kIdentity:
    default: return T(1);
  }
}

// d act / dz from the output a = act(z) (Activation.grad_from_output; leaky_relu
// needs slope >= 0, so that a > 0 exactly where z > 0).
template <typename T>
FASTGAN_HD T activate_grad_from_output(T a, int act, T slope) {
  switch (act) {
    case kRelu: return a > T(0) ? T(1) : T(0);
    case kLeakyRelu: return a > T(0) ? T(1) : slope;
    case kTanh: return T(1) - a * a;
    case kIdentity:
    default: return T(1);
  }
}

}  // namespace fastgan
