// linear_act on the CPU: y = dropout(act(x @ W.T + b)).
// Spec: fastgan/impl/reference.py (linear_act_forward / _backward).
//
// Forward:  z = x W^T + b (csrc/cpu/gemm.h: oneDNN or ATen), then one parallel
//           pass over row blocks that overwrites z with dropout(act(z)).
// Backward: one parallel pass over column blocks computes dz from grad_y and
//           the saved output y (mask recomputed from (seed, offset), the
//           activation derivative recovered from y) and the column sums of dz
//           (db), and dz^T from each column slab where the dW GEMM needs it
//           contiguous (gemm::needs_contiguous_a); then dW = dz^T x (unless
//           compute_dw is false) and dx = dz W
//           (if compute_dx) through csrc/cpu/gemm.h.
#include <torch/library.h>

#include <vector>

#include "cpu_common.h"
#include "gemm.h"

namespace fastgan {
namespace cpu {
namespace {

constexpr const char* kForward = "linear_act_forward";
constexpr const char* kBackward = "linear_act_backward";

// ---- tile loops (see FASTGAN_ISA_CLONES)

// y = dropout(act(y)) in place over n elements of a row.
template <int A, bool kDrop, typename scalar_t, typename acc_t>
FASTGAN_ISA_CLONES void act_tile(scalar_t* __restrict__ y, int64_t n, acc_t slope,
                                 const float* __restrict__ u, float p, acc_t scale) {
  if constexpr (A == kTanh && std::is_same_v<acc_t, float>) {
    float t[kTile];  // n <= kTile
    for (int64_t j = 0; j < n; ++j) t[j] = widen<acc_t>(y[j]);
    store_tanh_tile<kDrop>(t, n, u, p, scale, y);
  } else {
    for (int64_t j = 0; j < n; ++j) {
      acc_t a = activate(widen<acc_t>(y[j]), A, slope);
      if constexpr (kDrop) a = u[j] >= p ? a * scale : acc_t(0);
      y[j] = narrow<scalar_t>(a);
    }
  }
}

// dz = dropout(grad_y) * act'(a) over n elements of a row, with a = y (/ scale
// under dropout: kept elements recover act(z), dropped ones get no gradient
// anyway); accumulates sum(dz) per column.
template <int A, bool kDrop, typename scalar_t, typename acc_t>
FASTGAN_ISA_CLONES void act_grad_tile(const scalar_t* __restrict__ gy,
                                      const scalar_t* __restrict__ y, int64_t n, acc_t slope,
                                      const float* __restrict__ u, float p, acc_t scale,
                                      scalar_t* __restrict__ dz, double* __restrict__ sdz) {
  for (int64_t j = 0; j < n; ++j) {
    acc_t g = widen<acc_t>(gy[j]);
    acc_t a = widen<acc_t>(y[j]);
    if constexpr (kDrop) {
      g = u[j] >= p ? g * scale : acc_t(0);
      a = a / scale;
    }
    dz[j] = narrow<scalar_t>(g * activate_grad_from_output(a, A, slope));
  }
  // A loop of its own: with the double sums in the loop above, GCC vectorizes
  // neither for bf16 (16-, 32- and 64-bit lanes in one loop).
  for (int64_t j = 0; j < n; ++j) sdz[j] += static_cast<double>(widen<acc_t>(dz[j]));
}

at::Tensor linear_act_forward(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, int64_t activation,
                              double negative_slope, double p, const at::Tensor& seed,
                              const at::Tensor& offset) {
  const int64_t N = check_linear(kBackend, x, weight, bias, seed, offset);
  const int64_t B = x.size(0);
  at::Tensor y = gemm::linear(x, weight, bias);  // fresh and contiguous: the epilogue runs in place
  if (activation == kIdentity && p == 0.0) return y;
  const Dropout drop(p, seed, offset);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), kForward, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const acc_t slope = static_cast<acc_t>(negative_slope);
    const acc_t scale = static_cast<acc_t>(drop.scale);
    dispatch_activation(activation, [&](auto act_code) {
      constexpr int A = decltype(act_code)::value;
      // Rows are independent: a flat range of B * N elements cut into row-aligned tiles.
      const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(N, 1));
      at::parallel_for(0, B, grain, [&](int64_t r0, int64_t r1) {
        float u[kTile];
        for (int64_t i = r0; i < r1; ++i) {
          for (int64_t t0 = 0; t0 < N; t0 += kTile) {
            const int64_t tw = std::min(kTile, N - t0), at = i * N + t0;
            if (drop.on) {
              philox_uniform_row(drop.key, static_cast<uint32_t>(at), tw, u);
              act_tile<A, true>(yp + at, tw, slope, u, drop.p, scale);
            } else {
              act_tile<A, false>(yp + at, tw, slope, u, drop.p, scale);
            }
          }
        }
      });
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& y,
    int64_t activation, double negative_slope, double p, const at::Tensor& seed,
    const at::Tensor& offset, bool compute_dx, bool compute_dw) {
  const int64_t N = check_linear_act_backward(kBackend, grad_y, x, weight, y, seed, offset);
  const int64_t B = x.size(0);
  const auto dt = x.scalar_type();

  const at::Tensor gy = grad_y.contiguous(), yc = y.contiguous();
  at::Tensor dz = at::empty({B, N}, x.options());
  // dz^T for the dW product where its GEMM wants it contiguous, written slab by
  // slab (see transpose_block); ATen's takes the view dz.t().
  const bool write_dzt = compute_dw && gemm::needs_contiguous_a(dt, N, B, x.size(1));
  at::Tensor dzt = write_dzt ? at::empty({N, B}, x.options()) : at::Tensor();
  at::Tensor db = at::empty({N}, x.options());
  const Dropout drop(p, seed, offset);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, kBackward, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gyp = gy.data_ptr<scalar_t>();
    const scalar_t* yp = yc.data_ptr<scalar_t>();
    scalar_t* dzp = dz.data_ptr<scalar_t>();
    scalar_t* dztp = write_dzt ? dzt.data_ptr<scalar_t>() : nullptr;
    scalar_t* dbp = db.data_ptr<scalar_t>();
    const acc_t slope = grad_slope<acc_t>(negative_slope);
    const acc_t scale = static_cast<acc_t>(drop.scale);
    dispatch_activation(activation, [&](auto act_code) {
      constexpr int A = decltype(act_code)::value;
      at::parallel_for(0, N, column_grain(B), [&](int64_t c0, int64_t c1) {
        std::vector<double> sdz(c1 - c0, 0.0);
        float u[kTile];
        for (int64_t i = 0; i < B; ++i) {
          for (int64_t t0 = c0; t0 < c1; t0 += kTile) {
            const int64_t tw = std::min(kTile, c1 - t0), at = i * N + t0;
            double* s = sdz.data() + (t0 - c0);
            if (drop.on) {
              philox_uniform_row(drop.key, static_cast<uint32_t>(at), tw, u);
              act_grad_tile<A, true>(gyp + at, yp + at, tw, slope, u, drop.p, scale, dzp + at, s);
            } else {
              act_grad_tile<A, false>(gyp + at, yp + at, tw, slope, u, drop.p, scale, dzp + at, s);
            }
          }
        }
        for (int64_t c = c0; c < c1; ++c) {
          dbp[c] = static_cast<scalar_t>(static_cast<acc_t>(sdz[c - c0]));
        }
        if (dztp != nullptr) transpose_block(dzp + c0, N, dztp + c0 * B, B, B, c1 - c0);
      });
    });
  });

  const at::Tensor xc = x.contiguous();
  // compute_dw is false where the weight needs no gradient (a frozen layer).
  at::Tensor dweight = compute_dw ? gemm::mm(write_dzt ? dzt : dz.t(), xc)
                                 : at::empty({0}, weight.options());
  at::Tensor dx = compute_dx ? gemm::mm(dz, weight) : at::empty({0}, x.options());
  return {dx, dweight, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgan_C, CPU, m) {
  m.impl("linear_act_forward", &linear_act_forward);
  m.impl("linear_act_backward", &linear_act_backward);
}

}  // namespace cpu
}  // namespace fastgan
