// linear_bn_act on the CPU: y = dropout(act(BN(x @ W.T + b))).
// Spec: fastgan/impl/reference.py (linear_bn_act_forward / _backward).
//
// Forward:  h = x W^T + b (csrc/cpu/gemm.h: oneDNN or ATen), then one parallel
//           region over column blocks; each thread owns its columns, so it
//           (1) sums h and h^2 down its columns (shifted by the first row, in
//           double: no cancellation), (2) updates the running statistics of
//           its columns, (3) writes y = dropout(act(BN(h))) for its columns.
//           No barrier between the steps, one read of h per step.
// Backward: one parallel region over column blocks: (1) dz = dropout'(grad_y)
//           * act'(z), z recomputed from h/mean/rstd and the mask from
//           (seed, offset), with the column sums of dz and dz * xhat,
//           (2) dh from dz and those sums, with the column sums of dh (db),
//           and dh^T from the slab; then dW = dh^T x and dx = dh W through
//           csrc/cpu/gemm.h.
#include <torch/library.h>

#include <vector>

#include "cpu_common.h"
#include "gemm.h"

namespace fastgan {
namespace cpu {
namespace {

constexpr const char* kForward = "linear_bn_act_forward";
constexpr const char* kBackward = "linear_bn_act_backward";

// ---- tile loops (see FASTGAN_ISA_CLONES): pointers start at the tile's first column

// Column sums of d = h - shift and d^2 over B rows of w columns (row stride N).
template <typename scalar_t>
FASTGAN_ISA_CLONES void shifted_column_sums(const scalar_t* __restrict__ h, int64_t B, int64_t N,
                                            int64_t w, const double* __restrict__ shift,
                                            double* __restrict__ s, double* __restrict__ ss) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < B; ++i) {
    const scalar_t* __restrict__ row = h + i * N;
    for (int64_t j = 0; j < w; ++j) {
      const double d = static_cast<double>(widen<acc_t>(row[j])) - shift[j];
      s[j] += d;
      ss[j] += d * d;
    }
  }
}

// y = dropout(act(((h - mean) * rstd) * gamma + beta)) over n elements of a row.
template <int A, bool kDrop, typename scalar_t, typename acc_t>
FASTGAN_ISA_CLONES void bn_act_tile(const scalar_t* __restrict__ h, scalar_t* __restrict__ y,
                                    const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                    const acc_t* __restrict__ gamma,
                                    const acc_t* __restrict__ beta, int64_t n, acc_t slope,
                                    const float* __restrict__ u, float p, acc_t scale) {
  if constexpr (A == kTanh && std::is_same_v<acc_t, float>) {
    float t[kTile];  // n <= kTile
    for (int64_t j = 0; j < n; ++j) {
      t[j] = ((widen<acc_t>(h[j]) - mean[j]) * rstd[j]) * gamma[j] + beta[j];
    }
    store_tanh_tile<kDrop>(t, n, u, p, scale, y);
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const acc_t z = ((widen<acc_t>(h[j]) - mean[j]) * rstd[j]) * gamma[j] + beta[j];
      acc_t a = activate(z, A, slope);
      if constexpr (kDrop) a = u[j] >= p ? a * scale : acc_t(0);
      y[j] = narrow<scalar_t>(a);
    }
  }
}

// Backward step (1) over n elements of a row: dz = dropout(grad_y) * act'(z)
// with z recomputed from h; accumulates sum(dz) and sum(dz * xhat) per column.
template <int A, bool kDrop, typename scalar_t, typename acc_t>
FASTGAN_ISA_CLONES void bn_dz_tile(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ h,
                                   const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                   const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta,
                                   int64_t n, acc_t slope, const float* __restrict__ u, float p,
                                   acc_t scale, acc_t* __restrict__ dz, double* __restrict__ sdz,
                                   double* __restrict__ sdzx) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t xhat = (widen<acc_t>(h[j]) - mean[j]) * rstd[j];
    const acc_t z = xhat * gamma[j] + beta[j];
    acc_t g = widen<acc_t>(gy[j]);
    if constexpr (kDrop) g = u[j] >= p ? g * scale : acc_t(0);
    const acc_t d = g * activate_grad(z, A, slope);
    dz[j] = d;
    sdz[j] += static_cast<double>(d);
    sdzx[j] += static_cast<double>(d * xhat);
  }
}

// Backward step (2) over n elements of a row: dh from dz (m1, m2 = batch means
// of dxhat and dxhat * xhat), accumulating sum(dh) per column. When scalar_t
// is the accumulation dtype, dh is written over dz in place (`dh` unused).
template <bool kTraining, typename scalar_t, typename acc_t>
FASTGAN_ISA_CLONES void bn_dh_tile(acc_t* __restrict__ dz, scalar_t* __restrict__ dh,
                                   const scalar_t* __restrict__ h, const acc_t* __restrict__ mean,
                                   const acc_t* __restrict__ rstd, const acc_t* __restrict__ gamma,
                                   const acc_t* __restrict__ m1, const acc_t* __restrict__ m2,
                                   int64_t n, double* __restrict__ sdh) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t xhat = (widen<acc_t>(h[j]) - mean[j]) * rstd[j];
    const acc_t dxhat = dz[j] * gamma[j];
    const acc_t d = kTraining ? rstd[j] * ((dxhat - m1[j]) - xhat * m2[j]) : dxhat * rstd[j];
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      dz[j] = d;
    } else {
      dh[j] = narrow<scalar_t>(d);
    }
  }
  // A loop of its own, as in linear_act's act_grad_tile (vectorizes for bf16).
  const scalar_t* __restrict__ out = std::is_same_v<scalar_t, acc_t>
      ? reinterpret_cast<const scalar_t*>(dz) : dh;
  for (int64_t j = 0; j < n; ++j) sdh[j] += static_cast<double>(widen<acc_t>(out[j]));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_act_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, at::Tensor& running_mean,
    at::Tensor& running_var, at::Tensor& num_batches_tracked, bool training,
    std::optional<double> momentum, double eps, int64_t activation, double negative_slope,
    double p, const at::Tensor& seed, const at::Tensor& offset) {
  const int64_t N =
      check_linear_bn_act_forward(kBackend, x, weight, bias, bn_weight, bn_bias, running_mean,
                                  running_var, num_batches_tracked, training, seed, offset);
  const int64_t B = x.size(0);

  const at::Tensor h = gemm::linear(x, weight, bias);  // (B, N) in x.dtype, contiguous
  at::Tensor y = at::empty_like(h);
  at::Tensor mean = at::empty({N}, bn_weight.options());
  at::Tensor rstd = at::empty({N}, bn_weight.options());
  const at::Tensor gamma = bn_weight.contiguous(), beta = bn_bias.contiguous();
  const Dropout drop(p, seed, offset);

  int64_t* nbt = num_batches_tracked.data_ptr<int64_t>();
  if (training) *nbt += 1;  // on the CPU the counter is host memory: no sync involved

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), kForward, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    acc_t* meanp = mean.data_ptr<acc_t>();
    acc_t* rstdp = rstd.data_ptr<acc_t>();
    const acc_t* gp = gamma.data_ptr<acc_t>();
    const acc_t* bp = beta.data_ptr<acc_t>();
    acc_t* rm = running_mean.data_ptr<acc_t>();
    acc_t* rv = running_var.data_ptr<acc_t>();
    const int64_t rms = running_mean.stride(0), rvs = running_var.stride(0);
    // reference: factor = momentum, or 1 / num_batches_tracked (after the increment)
    const acc_t factor = momentum.has_value() ? static_cast<acc_t>(*momentum)
                                              : acc_t(1) / static_cast<acc_t>(*nbt);
    const acc_t unbias = static_cast<acc_t>(static_cast<double>(B) / static_cast<double>(B - 1));
    const acc_t eps_a = static_cast<acc_t>(eps);
    const acc_t slope = static_cast<acc_t>(negative_slope);
    const acc_t scale = static_cast<acc_t>(drop.scale);

    dispatch_activation(activation, [&](auto act_code) {
      constexpr int A = decltype(act_code)::value;
      at::parallel_for(0, N, column_grain(B), [&](int64_t c0, int64_t c1) {
        const int64_t w = c1 - c0;
        // (1) + (2): statistics of columns [c0, c1), shifted by the first row
        if (training) {
          std::vector<double> shift(w), s(w, 0.0), ss(w, 0.0);
          for (int64_t j = 0; j < w; ++j) shift[j] = static_cast<acc_t>(hp[c0 + j]);
          shifted_column_sums<scalar_t>(hp + c0, B, N, w, shift.data(), s.data(), ss.data());
          for (int64_t j = 0; j < w; ++j) {
            const double m = s[j] / B;
            const acc_t var = static_cast<acc_t>(std::max(ss[j] / B - m * m, 0.0));
            const acc_t mu = static_cast<acc_t>(shift[j] + m);
            const int64_t c = c0 + j;
            meanp[c] = mu;
            rstdp[c] = acc_t(1) / std::sqrt(var + eps_a);
            rm[c * rms] = factor * mu + (acc_t(1) - factor) * rm[c * rms];
            rv[c * rvs] = factor * (var * unbias) + (acc_t(1) - factor) * rv[c * rvs];
          }
        } else {
          for (int64_t c = c0; c < c1; ++c) {
            meanp[c] = rm[c * rms];
            rstdp[c] = acc_t(1) / std::sqrt(rv[c * rvs] + eps_a);
          }
        }
        // (3): y = dropout(act(BN(h))), a row tile at a time
        float u[kTile];
        for (int64_t i = 0; i < B; ++i) {
          for (int64_t t0 = c0; t0 < c1; t0 += kTile) {
            const int64_t tw = std::min(kTile, c1 - t0), at = i * N + t0;
            if (drop.on) {
              philox_uniform_row(drop.key, static_cast<uint32_t>(at), tw, u);
              bn_act_tile<A, true>(hp + at, yp + at, meanp + t0, rstdp + t0, gp + t0, bp + t0,
                                   tw, slope, u, drop.p, scale);
            } else {
              bn_act_tile<A, false>(hp + at, yp + at, meanp + t0, rstdp + t0, gp + t0, bp + t0,
                                    tw, slope, u, drop.p, scale);
            }
          }
        }
      });
    });
  });
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_act_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& h,
    const at::Tensor& mean, const at::Tensor& rstd, bool training, int64_t activation,
    double negative_slope, double p, const at::Tensor& seed, const at::Tensor& offset,
    bool compute_dx, bool compute_dw) {
  const int64_t N = check_linear_bn_act_backward(kBackend, grad_y, x, weight, bn_weight, bn_bias,
                                                 h, mean, rstd, seed, offset);
  const int64_t B = x.size(0);
  const auto dt = x.scalar_type();
  const auto sdt = stat_dtype(dt);

  const at::Tensor gy = grad_y.contiguous(), hc = h.contiguous();
  const at::Tensor gamma = bn_weight.contiguous(), beta = bn_bias.contiguous();
  const at::Tensor mu = mean.contiguous(), rs = rstd.contiguous();
  at::Tensor dh = at::empty({B, N}, x.options());
  // dh^T for the dW product where its GEMM wants it contiguous, written slab by
  // slab (see transpose_block); ATen's takes the view dh.t().
  const bool write_dht = compute_dw && gemm::needs_contiguous_a(dt, N, B, x.size(1));
  at::Tensor dht = write_dht ? at::empty({N, B}, x.options()) : at::Tensor();
  at::Tensor dgamma = at::empty({N}, bn_weight.options());
  at::Tensor dbeta = at::empty({N}, bn_weight.options());
  at::Tensor db = at::empty({N}, x.options());
  // dz lives in dh's memory when it has the accumulation dtype, else in fp32 scratch.
  at::Tensor dz_scratch = sdt == dt ? dh : at::empty({B, N}, bn_weight.options());
  const Dropout drop(p, seed, offset);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, kBackward, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gyp = gy.data_ptr<scalar_t>();
    const scalar_t* hp = hc.data_ptr<scalar_t>();
    scalar_t* dhp = dh.data_ptr<scalar_t>();
    scalar_t* dhtp = write_dht ? dht.data_ptr<scalar_t>() : nullptr;
    scalar_t* dbp = db.data_ptr<scalar_t>();
    acc_t* dzp = dz_scratch.data_ptr<acc_t>();
    const acc_t *gp = gamma.data_ptr<acc_t>(), *bp = beta.data_ptr<acc_t>();
    const acc_t *mp = mu.data_ptr<acc_t>(), *rp = rs.data_ptr<acc_t>();
    acc_t *dgp = dgamma.data_ptr<acc_t>(), *dbtp = dbeta.data_ptr<acc_t>();
    const acc_t slope = grad_slope<acc_t>(negative_slope);
    const acc_t scale = static_cast<acc_t>(drop.scale);

    dispatch_activation(activation, [&](auto act_code) {
      constexpr int A = decltype(act_code)::value;
      at::parallel_for(0, N, column_grain(B), [&](int64_t c0, int64_t c1) {
        const int64_t w = c1 - c0;
        std::vector<double> sdz(w, 0.0), sdzx(w, 0.0), sdh(w, 0.0);
        std::vector<acc_t> m1(w), m2(w);
        float u[kTile];
        // (1) dz and its column sums
        for (int64_t i = 0; i < B; ++i) {
          for (int64_t t0 = c0; t0 < c1; t0 += kTile) {
            const int64_t tw = std::min(kTile, c1 - t0), at = i * N + t0;
            double *s1 = sdz.data() + (t0 - c0), *s2 = sdzx.data() + (t0 - c0);
            if (drop.on) {
              philox_uniform_row(drop.key, static_cast<uint32_t>(at), tw, u);
              bn_dz_tile<A, true>(gyp + at, hp + at, mp + t0, rp + t0, gp + t0, bp + t0, tw,
                                  slope, u, drop.p, scale, dzp + at, s1, s2);
            } else {
              bn_dz_tile<A, false>(gyp + at, hp + at, mp + t0, rp + t0, gp + t0, bp + t0, tw,
                                   slope, u, drop.p, scale, dzp + at, s1, s2);
            }
          }
        }
        for (int64_t j = 0; j < w; ++j) {
          const int64_t c = c0 + j;
          dbtp[c] = static_cast<acc_t>(sdz[j]);
          dgp[c] = static_cast<acc_t>(sdzx[j]);
          // batch means of dxhat = dz * gamma and of dxhat * xhat
          m1[j] = static_cast<acc_t>(static_cast<double>(gp[c]) * sdz[j] / B);
          m2[j] = static_cast<acc_t>(static_cast<double>(gp[c]) * sdzx[j] / B);
        }
        // (2) dh and its column sums (db)
        for (int64_t i = 0; i < B; ++i) {
          const int64_t at = i * N + c0;
          if (training) {
            bn_dh_tile<true>(dzp + at, dhp + at, hp + at, mp + c0, rp + c0, gp + c0, m1.data(),
                             m2.data(), w, sdh.data());
          } else {
            bn_dh_tile<false>(dzp + at, dhp + at, hp + at, mp + c0, rp + c0, gp + c0, m1.data(),
                              m2.data(), w, sdh.data());
          }
        }
        for (int64_t j = 0; j < w; ++j) {
          dbp[c0 + j] = static_cast<scalar_t>(static_cast<acc_t>(sdh[j]));
        }
        if (dhtp != nullptr) transpose_block(dhp + c0, N, dhtp + c0 * B, B, B, w);
      });
    });
  });

  const at::Tensor xc = x.contiguous();
  // compute_dw is false where the weight needs no gradient (a frozen layer).
  at::Tensor dweight = compute_dw ? gemm::mm(write_dht ? dht : dh.t(), xc)
                                 : at::empty({0}, weight.options());
  at::Tensor dx = compute_dx ? gemm::mm(dh, weight) : at::empty({0}, x.options());
  return {dx, dweight, db, dgamma, dbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgan_C, CPU, m) {
  m.impl("linear_bn_act_forward", &linear_bn_act_forward);
  m.impl("linear_bn_act_backward", &linear_bn_act_backward);
}

}  // namespace cpu
}  // namespace fastgan
