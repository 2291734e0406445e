// A chain of fused layers forward and backward in one call, for the engine's
// step without autograd (fastgan/train/tape.py) on the cpu backend:
//   fastgan_C::cpu_chain_forward(...)        -> (Tensor y, Tensor[] saved)
//   fastgan_C::cpu_chain_backward(...)       -> Tensor[] grads
//   fastgan_C::cpu_chain_backward_ghost(...) -> Tensor[] grads
// Why: on a 2-core CPU the Python around each layer's op call (its argument
// check, dispatch, the backend wrapper, the dropout key) costs ~30 us a layer,
// several times that in a real step, whose tensors push the interpreter out of
// the caches. Here each layer is the very op call that Python path makes
// (fastgan_C::linear_act_* / linear_bn_act_* through the dispatcher, inputs
// made contiguous as fastgan/impl/cpu.py makes them, the key drawn as
// cpu_next_key draws it), in the same order, so the numbers are the same bits.
// The Python side checks the layers (their tape_ready) and the chain's input;
// here only what keeps the calls well-formed is checked.
//
// Layer i is a linear_bn_act layer when bn_weights[i] is given, else
// linear_act. rng[i] is its dropout stream ([seed, counter], int64), read only
// when ps[i] > 0. momentums[i] is NaN for BatchNorm1d's momentum=None.
// saved holds, per layer, linear_act: x, y, seed, offset; linear_bn_act: x, y,
// h, mean, rstd, seed, offset.
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_common.h"
#include "op_handles.h"

namespace fastgan {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> cpu_next_key(const at::Tensor& state);  // dropout.cpp

namespace {

bool has(const c10::List<OptT>& l, size_t i) {
  const OptT t = l.get(i);
  return t.has_value() && t->defined();
}

// The key of a p == 0 call: the kernels read none (fastgan.nn.layers.zero_key).
const std::tuple<at::Tensor, at::Tensor>& zero_key() {
  static const std::tuple<at::Tensor, at::Tensor> key{at::zeros({}, at::kLong),
                                                      at::zeros({}, at::kLong)};
  return key;
}

void check_lengths(size_t n, const std::vector<size_t>& sizes) {
  TORCH_CHECK(n > 0, "cpu_chain: no layers");
  for (size_t s : sizes) {
    TORCH_CHECK(s == n, "cpu_chain: every per-layer list must have ", n, " entries, got ", s);
  }
}

std::tuple<at::Tensor, std::vector<at::Tensor>> cpu_chain_forward(
    const at::Tensor& x_in, at::TensorList weights, const c10::List<OptT>& biases,
    const c10::List<OptT>& bn_weights, const c10::List<OptT>& bn_biases,
    const c10::List<OptT>& running_means, const c10::List<OptT>& running_vars,
    const c10::List<OptT>& num_batches, at::TensorList rng, at::IntArrayRef activations,
    at::ArrayRef<double> slopes, at::ArrayRef<double> ps, c10::List<bool> bn_training,
    at::ArrayRef<double> momentums, at::ArrayRef<double> epss) {
  const size_t n = weights.size();
  check_lengths(n, {biases.size(), bn_weights.size(), bn_biases.size(), running_means.size(),
                    running_vars.size(), num_batches.size(), rng.size(), activations.size(),
                    slopes.size(), ps.size(), bn_training.size(), momentums.size(),
                    epss.size()});
  std::vector<at::Tensor> saved;
  saved.reserve(7 * n);
  at::Tensor x = x_in;
  for (size_t i = 0; i < n; ++i) {
    const auto [seed, offset] = ps[i] > 0.0 ? cpu_next_key(rng[i]) : zero_key();
    const at::Tensor xc = x.contiguous(), w = weights[i].contiguous();
    const OptT b = contiguous(biases.get(i));
    if (has(bn_weights, i)) {
      at::Tensor rm = *running_means.get(i), rv = *running_vars.get(i), nb = *num_batches.get(i);
      const std::optional<double> momentum =
          std::isnan(momentums[i]) ? std::nullopt : std::optional<double>(momentums[i]);
      auto [y, h, mean, rstd] = lbna_forward().call(
          xc, w, b, bn_weights.get(i)->contiguous(), bn_biases.get(i)->contiguous(), rm, rv, nb,
          bn_training.get(i), momentum, epss[i], activations[i], slopes[i], ps[i], seed, offset);
      saved.insert(saved.end(), {xc, y, h, mean, rstd, seed, offset});
      x = y;
    } else {
      at::Tensor y = la_forward().call(xc, w, b, activations[i], slopes[i], ps[i], seed, offset);
      saved.insert(saved.end(), {xc, y, seed, offset});
      x = y;
    }
  }
  return {x, saved};
}

// One layer's backward from its saved tensors, starting at saved[at]; returns
// the op's gradient tuple as a vector (dx first).
std::vector<at::Tensor> layer_backward(const at::Tensor& grad, const std::vector<at::Tensor>& s,
                                       size_t at, const at::Tensor& w, bool bn,
                                       const OptT& bn_weight, const OptT& bn_bias, bool training,
                                       int64_t act, double slope, double p, bool dx, bool dw) {
  const at::Tensor g = grad.contiguous(), wc = w.contiguous();
  if (bn) {
    auto [gx, gw, gb, gg, gbeta] = lbna_backward().call(
        g, s[at], wc, bn_weight->contiguous(), bn_bias->contiguous(), s[at + 2], s[at + 3],
        s[at + 4], training, act, slope, p, s[at + 5], s[at + 6], dx, dw);
    return {gx, gw, gb, gg, gbeta};
  }
  auto [gx, gw, gb] =
      la_backward().call(g, s[at], wc, s[at + 1], act, slope, p, s[at + 2], s[at + 3], dx, dw);
  return {gx, gw, gb};
}

// Offsets of each layer's saved tensors.
std::vector<size_t> starts(const c10::List<OptT>& bn_weights, size_t saved) {
  std::vector<size_t> at;
  size_t k = 0;
  for (size_t i = 0; i < bn_weights.size(); ++i) {
    at.push_back(k);
    k += has(bn_weights, i) ? 7 : 4;
  }
  TORCH_CHECK(k == saved, "cpu_chain: saved has ", saved, " tensors, the layers need ", k);
  return at;
}

// Returns, from the top layer down, each layer's parameter gradients (dW, db
// [, dgamma, dbeta]), then the chain input's gradient (empty unless dx).
std::vector<at::Tensor> cpu_chain_backward(
    const at::Tensor& grad, at::TensorList saved_list, at::TensorList weights,
    const c10::List<OptT>& bn_weights, const c10::List<OptT>& bn_biases,
    at::IntArrayRef activations, at::ArrayRef<double> slopes, at::ArrayRef<double> ps,
    c10::List<bool> bn_training, c10::List<bool> compute_dw, bool dx) {
  const size_t n = weights.size();
  check_lengths(n, {bn_weights.size(), bn_biases.size(), activations.size(), slopes.size(),
                    ps.size(), bn_training.size(), compute_dw.size()});
  const std::vector<at::Tensor> saved(saved_list.begin(), saved_list.end());
  const std::vector<size_t> at = starts(bn_weights, saved.size());
  std::vector<at::Tensor> out;
  at::Tensor g = grad;
  for (size_t j = n; j-- > 0;) {
    auto grads = layer_backward(g, saved, at[j], weights[j], has(bn_weights, j),
                                bn_weights.get(j), bn_biases.get(j), bn_training.get(j),
                                activations[j], slopes[j], ps[j], j > 0 || dx, compute_dw.get(j));
    out.insert(out.end(), grads.begin() + 1, grads.end());
    g = grads[0];
  }
  out.push_back(g);
  return out;
}

// The simultaneous step's sweep over linear_act layers (fastgan.nn.models.GhostRows):
// grad (all rows) into the parameters, ghost_grad (the first rows) down to the
// input only. Returns cpu_chain_backward's list, then the ghost rows' input gradient.
std::vector<at::Tensor> cpu_chain_backward_ghost(
    const at::Tensor& grad, const at::Tensor& ghost_grad, at::TensorList saved_list,
    at::TensorList weights, at::IntArrayRef activations, at::ArrayRef<double> slopes,
    at::ArrayRef<double> ps, c10::List<bool> compute_dw) {
  const size_t n = weights.size();
  check_lengths(n, {activations.size(), slopes.size(), ps.size(), compute_dw.size()});
  TORCH_CHECK(saved_list.size() == 4 * n, "cpu_chain_backward_ghost: linear_act layers only");
  const std::vector<at::Tensor> s(saved_list.begin(), saved_list.end());
  const int64_t rows = ghost_grad.size(0);
  std::vector<at::Tensor> out;
  at::Tensor g = grad, gg = ghost_grad;
  for (size_t j = n; j-- > 0;) {
    const size_t at = 4 * j;
    const at::Tensor wc = weights[j].contiguous();
    // the ghost rows first, as GhostRows' backward (ghost_dx) calls the op
    gg = std::get<0>(la_backward().call(gg.contiguous(), s[at].slice(0, 0, rows).contiguous(), wc,
                                        s[at + 1].slice(0, 0, rows).contiguous(), activations[j],
                                        slopes[j], ps[j], s[at + 2], s[at + 3], true, false));
    auto [gx, gw, gb] = la_backward().call(g.contiguous(), s[at], wc, s[at + 1], activations[j],
                                           slopes[j], ps[j], s[at + 2], s[at + 3], j > 0,
                                           compute_dw.get(j));
    out.insert(out.end(), {gw, gb});
    g = gx;
  }
  out.push_back(g);
  out.push_back(gg);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastgan_C, m) {
  m.def(
      "cpu_chain_forward(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor?[] bn_weights, "
      "Tensor?[] bn_biases, Tensor?[] running_means, Tensor?[] running_vars, "
      "Tensor?[] num_batches_tracked, Tensor[] rng, int[] activations, float[] slopes, "
      "float[] ps, bool[] bn_training, float[] momentums, float[] eps) "
      "-> (Tensor y, Tensor[] saved)",
      &cpu_chain_forward);
  m.def(
      "cpu_chain_backward(Tensor grad, Tensor[] saved, Tensor[] weights, Tensor?[] bn_weights, "
      "Tensor?[] bn_biases, int[] activations, float[] slopes, float[] ps, bool[] bn_training, "
      "bool[] compute_dw, bool compute_dx) -> Tensor[]",
      &cpu_chain_backward);
  m.def(
      "cpu_chain_backward_ghost(Tensor grad, Tensor ghost_grad, Tensor[] saved, "
      "Tensor[] weights, int[] activations, float[] slopes, float[] ps, bool[] compute_dw) "
      "-> Tensor[]",
      &cpu_chain_backward_ghost);
}

}  // namespace cpu
}  // namespace fastgan
