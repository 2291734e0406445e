// Helpers shared by the CPU kernels of fastgan._C (csrc/cpu/<op>.cpp):
// argument checks that name the argument, the activation functions, the
// dropout key/mask plumbing, and the column partition used by every pass.
//
// Numerics follow fastgan/reference.py: epilogue math in `acc_t`
// (at::opmath_type: float for fp32/bf16/fp16, double for fp64), column
// reductions accumulated in double so their only error is the final rounding.
// The extension is built with -ffp-contract=off so `a * b + c` rounds twice,
// as the eager PyTorch reference does.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <type_traits>

#include "philox.h"

namespace fastgan {
namespace cpu {

// ------------------------------------------------------------------ checks
// Every kernel entry runs these before it touches memory. Messages read
// "<function>: <argument> must ..., got ...".

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

inline void check_defined_cpu(const char* fn, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a defined tensor");
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ",
              t.device());
}

inline void check_tensor(const char* fn, const at::Tensor& t, const char* name, int64_t ndim,
                         at::ScalarType dtype) {
  check_defined_cpu(fn, t, name);
  TORCH_CHECK(t.dim() == ndim, fn, ": ", name, " must be ", ndim, "-D, got shape ",
              shape_str(t));
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
}

// A 1-D tensor of `n` elements (BN parameters and statistics).
inline void check_vector(const char* fn, const at::Tensor& t, const char* name, int64_t n,
                         at::ScalarType dtype) {
  check_tensor(fn, t, name, 1, dtype);
  TORCH_CHECK(t.size(0) == n, fn, ": ", name, " must have ", n, " elements, got shape ",
              shape_str(t));
}

// A 2-D tensor of shape (rows, cols).
inline void check_matrix(const char* fn, const at::Tensor& t, const char* name, int64_t rows,
                         int64_t cols, at::ScalarType dtype) {
  check_tensor(fn, t, name, 2, dtype);
  TORCH_CHECK(t.size(0) == rows && t.size(1) == cols, fn, ": ", name, " must have shape [",
              rows, ", ", cols, "], got ", shape_str(t));
}

// A one-element int64 tensor (seed, offset, num_batches_tracked).
inline void check_counter(const char* fn, const at::Tensor& t, const char* name) {
  check_defined_cpu(fn, t, name);
  TORCH_CHECK(t.scalar_type() == at::kLong, fn, ": ", name, " must have dtype int64, got ",
              t.scalar_type());
  TORCH_CHECK(t.numel() == 1, fn, ": ", name, " must have exactly 1 element, got shape ",
              shape_str(t));
}

inline void check_float_input(const char* fn, const at::Tensor& x, const char* name) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              fn, ": ", name, " must be float32, float16, bfloat16 or float64, got ", dt);
}

// Statistics and BN parameters are fp32, fp64 when the input is fp64.
inline at::ScalarType stat_dtype(at::ScalarType x) {
  return x == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_hyper(const char* fn, int64_t activation, double negative_slope, double p) {
  TORCH_CHECK(activation >= 0 && activation <= 3, fn,
              ": activation must be a code of fastgan.spec.ACTIVATIONS (0..3), got ", activation);
  TORCH_CHECK(std::isfinite(negative_slope) && negative_slope >= 0.0, fn,
              ": negative_slope must be finite and >= 0, got ", negative_slope);
  TORCH_CHECK(p >= 0.0 && p < 1.0, fn, ": dropout p must be in [0, 1), got ", p);
}

// x (B, K), weight (N, K), optional bias (N), seed, offset; returns nothing,
// throws on the first bad argument.
inline void check_linear(const char* fn, const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& seed,
                         const at::Tensor& offset) {
  check_defined_cpu(fn, x, "x");
  TORCH_CHECK(x.dim() == 2, fn, ": x must be 2-D, got shape ", shape_str(x));
  check_float_input(fn, x, "x");
  check_tensor(fn, weight, "weight", 2, x.scalar_type());
  TORCH_CHECK(weight.size(1) == x.size(1), fn, ": weight has in_features=", weight.size(1),
              " but x has ", x.size(1), " columns (K mismatch)");
  if (bias.has_value() && bias->defined()) {
    check_vector(fn, *bias, "bias", weight.size(0), x.scalar_type());
  }
  check_counter(fn, seed, "seed");
  check_counter(fn, offset, "offset");
  TORCH_CHECK(x.size(0) * weight.size(0) < (int64_t(1) << 32), fn,
              ": batch * out_features must be below 2**32 (dropout counter), got ", x.size(0),
              " * ", weight.size(0));
}

// ------------------------------------------------------------------ activations
// Codes of fastgan/spec.py. Kernels take the code as a template argument
// (dispatch_activation) so each inner loop is branch-free and vectorizes.
enum Activation : int64_t { kIdentity = 0, kRelu = 1, kLeakyRelu = 2, kTanh = 3 };

template <int64_t A, typename T>
inline T act_forward(T z, T slope) {
  if constexpr (A == kRelu) return z < T(0) ? T(0) : z;  // NaN stays NaN, as torch.relu
  else if constexpr (A == kLeakyRelu) return z > T(0) ? z : z * slope;
  else if constexpr (A == kTanh) return std::tanh(z);
  else return z;
}

// Derivative from the pre-activation z (reference.act_grad).
template <int64_t A, typename T>
inline T act_grad(T z, T slope) {
  if constexpr (A == kRelu) return z > T(0) ? T(1) : T(0);
  else if constexpr (A == kLeakyRelu) return z > T(0) ? T(1) : slope;
  else if constexpr (A == kTanh) {
    const T t = std::tanh(z);
    return T(1) - t * t;
  } else return T(1);
}

// Derivative from the activation output a (reference.act_grad_from_output).
template <int64_t A, typename T>
inline T act_grad_from_output(T a, T slope) {
  if constexpr (A == kRelu) return a > T(0) ? T(1) : T(0);
  else if constexpr (A == kLeakyRelu) return a > T(0) ? T(1) : slope;
  else if constexpr (A == kTanh) return T(1) - a * a;
  else return T(1);
}

// The slope the derivative uses: the reference builds act_grad with
// torch.where(z > 0, 1.0, slope), whose Python scalars make an fp32 tensor,
// so even the fp64 path multiplies by float(slope).
template <typename T>
inline T grad_slope(double negative_slope) {
  return static_cast<T>(static_cast<float>(negative_slope));
}

// Calls f(std::integral_constant<int64_t, code>{}) for a checked code.
template <typename F>
inline void dispatch_activation(int64_t act, const F& f) {
  switch (act) {
    case kRelu: f(std::integral_constant<int64_t, kRelu>{}); break;
    case kLeakyRelu: f(std::integral_constant<int64_t, kLeakyRelu>{}); break;
    case kTanh: f(std::integral_constant<int64_t, kTanh>{}); break;
    default: f(std::integral_constant<int64_t, kIdentity>{}); break;
  }
}

// ------------------------------------------------------------------ vectorization
// The elementwise tile loops are compiled once per x86-64
// ISA level and picked at load time (GCC/Clang target_clones, an ifunc): 16
// float lanes with AVX-512, 8 with AVX2, 4 on baseline SSE2. Each tile loop
// is a function of __restrict__ pointers and by-value scalars, so -O3 sees
// no aliasing and vectorizes it.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define FASTGAN_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTGAN_ISA_CLONES
#endif

// ------------------------------------------------------------------ dropout
// Uniforms u[k] = philox(seed, offset, idx0 + k) for k < n. Defined in
// dropout.cpp with AVX-512 / AVX2 intrinsics (16 or 8 counters at a time),
// picked at load time; this is the only Philox loop of the kernels.
void philox_uniform_row(const DropoutKey& key, uint32_t idx0, int64_t n, float* u);

// What a kernel needs to apply the mask of reference._apply_dropout:
// keep iff u >= float(p); kept values times float(1 / (1 - p)).
struct Dropout {
  bool on;
  float p;
  float scale;
  DropoutKey key;
  Dropout(double p_, const at::Tensor& seed, const at::Tensor& offset)
      : on(p_ != 0.0),
        p(static_cast<float>(p_)),
        scale(static_cast<float>(1.0 / (1.0 - p_))),
        key(*seed.data_ptr<int64_t>(), *offset.data_ptr<int64_t>()) {}
};

// Row tiles: a pass over columns [c0, c1) of row i draws the uniforms of at
// most kTile elements at a time into a stack buffer, then consumes them.
constexpr int64_t kTile = 256;

// Grain of the column partition: a thread gets at least ~32K elements and
// 16 columns, so small layers run on one thread without OpenMP overhead.
inline int64_t column_grain(int64_t rows) {
  const int64_t g = (int64_t(1) << 15) / std::max<int64_t>(rows, 1);
  return std::max<int64_t>(g, 16);
}

}  // namespace cpu
}  // namespace fastgan
