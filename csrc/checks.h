// The argument checks of the kernel entries, CPU (csrc/cpu) and CUDA (csrc/cuda).
//
// An entry checks only what keeps its kernels inside their buffers: every
// tensor is defined, on the entry's device, of the dtype and shape the kernels
// index it with, laid out as they assume, and small enough for the 32-bit
// dropout counter. Hyper-parameters (activation code, negative_slope, p, eps,
// momentum, labels) cannot move an index: the op boundary in Python checks
// them once (fastgan/ops/checks.py), with the tensors, before any kernel runs.
//
// The macros stringify the tensor they check, so an entry names its tensors
// as the schema does (csrc/ops.cpp) and each message is one line naming the
// argument, e.g. "grad_y must have shape [4, 5], got [4, 6]".
#pragma once

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <optional>
#include <string_view>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#define FASTGAN_CHECK_DEFINED(T) TORCH_CHECK((T).defined(), #T " must be a defined tensor")

#define FASTGAN_CHECK_DEVICE_TYPE(T, TYPE)                                 \
  TORCH_CHECK((T).device().type() == (TYPE), #T " must be a ",             \
              c10::DeviceTypeName(TYPE), " tensor, got one on ", (T).device())

// REF is the tensor whose device the entry runs on (x, logits_a).
#define FASTGAN_CHECK_SAME_DEVICE(T, REF)                                                \
  TORCH_CHECK((T).device() == (REF).device(), #T " must be on the device of " #REF " (", \
              (REF).device(), "), got ", (T).device())

#define FASTGAN_CHECK_DTYPE(T, DTYPE)                                                 \
  TORCH_CHECK((T).scalar_type() == (DTYPE), #T " must have dtype ", (DTYPE), ", got ", \
              (T).scalar_type())

#define FASTGAN_CHECK_DIM(T, NDIM) \
  TORCH_CHECK((T).dim() == (NDIM), #T " must be ", (NDIM), "-D, got shape ", (T).sizes())

#define FASTGAN_CHECK_SHAPE(T, ...)                                                   \
  TORCH_CHECK((T).sizes() == c10::IntArrayRef({__VA_ARGS__}), #T " must have shape ", \
              c10::IntArrayRef({__VA_ARGS__}), ", got ", (T).sizes())

// Each tensor named is contiguous: FASTGAN_CHECK_CONTIGUOUS(mean, rstd).
#define FASTGAN_CHECK_CONTIGUOUS(...) ::fastgan::check_contiguous(#__VA_ARGS__, {__VA_ARGS__})

// A tensor on REF's device, of dtype DTYPE and exactly the shape given.
#define FASTGAN_CHECK_TENSOR(T, REF, DTYPE, ...) \
  do {                                           \
    FASTGAN_CHECK_DEFINED(T);                    \
    FASTGAN_CHECK_SAME_DEVICE(T, REF);           \
    FASTGAN_CHECK_DTYPE(T, DTYPE);               \
    FASTGAN_CHECK_SHAPE(T, __VA_ARGS__);         \
  } while (0)

// A one-element int64 tensor on REF's device: a dropout seed or offset,
// num_batches_tracked (read, or incremented in place, as element 0).
#define FASTGAN_CHECK_COUNTER(T, REF)                                                       \
  do {                                                                                      \
    FASTGAN_CHECK_DEFINED(T);                                                               \
    FASTGAN_CHECK_SAME_DEVICE(T, REF);                                                      \
    FASTGAN_CHECK_DTYPE(T, at::kLong);                                                      \
    TORCH_CHECK((T).numel() == 1, #T " must have exactly 1 element, got shape ", (T).sizes()); \
  } while (0)

// A data tensor of a dtype the backend has kernels for.
#define FASTGAN_CHECK_FLOATING(T, BACKEND) \
  ::fastgan::check_floating((T).scalar_type(), #T, BACKEND)

namespace fastgan {

// What the kernel entries of one backend take.
struct Backend {
  const char* name;
  c10::DeviceType device;  // of x (logits_a); every other tensor must be on x's device
  bool float64;            // whether the kernels have a float64 instantiation
};

inline void check_floating(at::ScalarType dt, const char* name, const Backend& backend) {
  const bool low = dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16;
  if (backend.float64) {
    TORCH_CHECK(low || dt == at::kDouble, name,
                " must be float32, float16, bfloat16 or float64, got ", dt);
    return;
  }
  TORCH_CHECK(dt != at::kDouble, name, ": the ", backend.name,
              " backend supports float32, float16 and bfloat16, not float64 "
              "(use the reference backend, e.g. for gradcheck)");
  TORCH_CHECK(low, name, " must be float32, float16 or bfloat16, got ", dt);
}

// `names` is the stringified argument list of FASTGAN_CHECK_CONTIGUOUS: "a, b".
inline void check_contiguous(std::string_view names,
                             std::initializer_list<std::reference_wrapper<const at::Tensor>> ts) {
  for (const at::Tensor& t : ts) {
    const size_t comma = names.find(',');
    TORCH_CHECK(t.is_contiguous(), names.substr(0, comma), " must be contiguous, got strides ",
                t.strides());
    names.remove_prefix(comma == std::string_view::npos ? names.size() : comma + 1);
    while (!names.empty() && names.front() == ' ') names.remove_prefix(1);
  }
}

// BN parameters and statistics: float32, float64 for float64 inputs
// (fastgan.ops.spec.acc_dtype).
inline at::ScalarType stat_dtype(at::ScalarType x) {
  return x == at::kDouble ? at::kDouble : at::kFloat;
}

// x (B, K), weight (N, K), bias (N) or none, the dropout seed and offset;
// returns N. B * N bounds the 32-bit dropout counter, the element index i * N + j.
inline int64_t check_linear(const Backend& backend, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias_opt, const at::Tensor& seed,
                            const at::Tensor& offset) {
  FASTGAN_CHECK_DEFINED(x);
  FASTGAN_CHECK_DEVICE_TYPE(x, backend.device);
  FASTGAN_CHECK_DIM(x, 2);
  FASTGAN_CHECK_FLOATING(x, backend);
  FASTGAN_CHECK_DEFINED(weight);
  FASTGAN_CHECK_SAME_DEVICE(weight, x);
  FASTGAN_CHECK_DIM(weight, 2);
  FASTGAN_CHECK_DTYPE(weight, x.scalar_type());
  TORCH_CHECK(weight.size(1) == x.size(1), "weight has in_features=", weight.size(1),
              " but x has ", x.size(1), " columns (K mismatch)");
  const int64_t n = weight.size(0);
  if (bias_opt.has_value() && bias_opt->defined()) {
    const at::Tensor& bias = *bias_opt;
    FASTGAN_CHECK_TENSOR(bias, x, x.scalar_type(), n);
  }
  FASTGAN_CHECK_COUNTER(seed, x);
  FASTGAN_CHECK_COUNTER(offset, x);
  // The op boundary's limit (fastgan/ops/checks.py): the Triton kernels' 32-bit offsets.
  TORCH_CHECK(x.size(0) * n < (int64_t(1) << 31),
              "batch * out_features must be below 2**31 (32-bit element offsets), got x with ",
              x.size(0), " rows and weight with ", n, " out_features");
  return n;
}

inline int64_t check_linear_act_backward(const Backend& backend, const at::Tensor& grad_y,
                                         const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& y, const at::Tensor& seed,
                                         const at::Tensor& offset) {
  const int64_t n = check_linear(backend, x, weight, std::nullopt, seed, offset);
  FASTGAN_CHECK_TENSOR(grad_y, x, x.scalar_type(), x.size(0), n);
  FASTGAN_CHECK_TENSOR(y, x, x.scalar_type(), x.size(0), n);
  return n;
}

inline int64_t check_linear_bn_act_forward(
    const Backend& backend, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const at::Tensor& running_mean, const at::Tensor& running_var,
    const at::Tensor& num_batches_tracked, bool training, const at::Tensor& seed,
    const at::Tensor& offset) {
  const int64_t n = check_linear(backend, x, weight, bias, seed, offset);
  const at::ScalarType stat = stat_dtype(x.scalar_type());
  FASTGAN_CHECK_TENSOR(bn_weight, x, stat, n);
  FASTGAN_CHECK_TENSOR(bn_bias, x, stat, n);
  FASTGAN_CHECK_TENSOR(running_mean, x, stat, n);
  FASTGAN_CHECK_TENSOR(running_var, x, stat, n);
  FASTGAN_CHECK_COUNTER(num_batches_tracked, x);
  // Batch statistics need two rows (nn.BatchNorm1d's rule); the CPU kernel
  // also reads row 0 of h as its shift.
  TORCH_CHECK(!training || x.size(0) > 1,
              "Expected more than 1 value per channel when training, got input size ", x.sizes(),
              " (x batch size must be > 1 for batch statistics)");
  return n;
}

inline int64_t check_linear_bn_act_backward(
    const Backend& backend, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const at::Tensor& h, const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& seed,
    const at::Tensor& offset) {
  const int64_t n = check_linear(backend, x, weight, std::nullopt, seed, offset);
  FASTGAN_CHECK_TENSOR(grad_y, x, x.scalar_type(), x.size(0), n);
  FASTGAN_CHECK_TENSOR(h, x, x.scalar_type(), x.size(0), n);
  const at::ScalarType stat = stat_dtype(x.scalar_type());
  FASTGAN_CHECK_TENSOR(bn_weight, x, stat, n);
  FASTGAN_CHECK_TENSOR(bn_bias, x, stat, n);
  FASTGAN_CHECK_TENSOR(mean, x, stat, n);
  FASTGAN_CHECK_TENSOR(rstd, x, stat, n);
  return n;
}

// logits_a and, if given, logits_b of logits_a's device and dtype; any shape, not empty.
inline void check_gan_bce(const Backend& backend, const at::Tensor& logits_a,
                          const std::optional<at::Tensor>& logits_b_opt) {
  FASTGAN_CHECK_DEFINED(logits_a);
  FASTGAN_CHECK_DEVICE_TYPE(logits_a, backend.device);
  FASTGAN_CHECK_FLOATING(logits_a, backend);
  TORCH_CHECK(logits_a.numel() > 0, "logits_a must not be empty");
  if (logits_b_opt.has_value() && logits_b_opt->defined()) {
    const at::Tensor& logits_b = *logits_b_opt;
    FASTGAN_CHECK_SAME_DEVICE(logits_b, logits_a);
    FASTGAN_CHECK_DTYPE(logits_b, logits_a.scalar_type());
    TORCH_CHECK(logits_b.numel() > 0, "logits_b must not be empty");
  }
}

}  // namespace fastgan
