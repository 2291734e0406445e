// Typed dispatcher handles of the cpu kernels (csrc/ops.cpp schemas), for C++
// callers that run the ops the way Python calls them: the whole-chain calls
// (chain.cpp) and the autograd nodes (autograd.cpp). Calling through the
// dispatcher keeps every kernel call visible to torch.profiler under the op's
// name; a typed call costs ~0.1 us.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace fastgan {
namespace cpu {

using OptT = std::optional<at::Tensor>;

using LAForward = at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, int64_t, double,
                             double, const at::Tensor&, const at::Tensor&);
using LABackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double,
    double, const at::Tensor&, const at::Tensor&, bool, bool);
using LBNAForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&, const at::Tensor&,
    at::Tensor&, at::Tensor&, at::Tensor&, bool, std::optional<double>, double, int64_t, double,
    double, const at::Tensor&, const at::Tensor&);
using LBNABackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, int64_t, double, double,
    const at::Tensor&, const at::Tensor&, bool, bool);

template <typename Sig>
const c10::TypedOperatorHandle<Sig>& op_handle(const char* name) {
  // one handle per signature: each Sig below names exactly one op
  static const auto h = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
  return h;
}

inline const c10::TypedOperatorHandle<LAForward>& la_forward() {
  return op_handle<LAForward>("fastgan_C::linear_act_forward");
}
inline const c10::TypedOperatorHandle<LABackward>& la_backward() {
  return op_handle<LABackward>("fastgan_C::linear_act_backward");
}
inline const c10::TypedOperatorHandle<LBNAForward>& lbna_forward() {
  return op_handle<LBNAForward>("fastgan_C::linear_bn_act_forward");
}
inline const c10::TypedOperatorHandle<LBNABackward>& lbna_backward() {
  return op_handle<LBNABackward>("fastgan_C::linear_bn_act_backward");
}

// x.contiguous() for an optional tensor (bias), as fastgan/impl/cpu.py's _c.
inline OptT contiguous(const OptT& t) {
  return t.has_value() && t->defined() ? OptT(t->contiguous()) : t;
}

}  // namespace cpu
}  // namespace fastgan
