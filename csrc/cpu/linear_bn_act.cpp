// linear_bn_act on the CPU: y = dropout(act(BN(x @ W.T + b))).
// Spec: fastgan/reference.py (linear_bn_act_forward / _backward).
//
// Forward:  h = at::linear (MKL/OpenBLAS, like nn.Linear), then one parallel
//           region over column blocks; each thread owns its columns, so it
//           (1) sums h and h^2 down its columns (shifted by the first row, in
//           double: no cancellation), (2) updates the running statistics of
//           its columns, (3) writes y = dropout(act(BN(h))) for its columns.
//           No barrier between the steps, one read of h per step.
// Backward: one parallel region over column blocks: (1) dz = dropout'(grad_y)
//           * act'(z), z recomputed from h/mean/rstd and the mask from
//           (seed, offset), with the column sums of dz and dz * xhat,
//           (2) dh from dz and those sums, with the column sums of dh (db);
//           then dW = dh^T x and dx = dh W through ATen.
#include <torch/library.h>

#include <vector>

#include "cpu_common.h"

namespace fastgan {
namespace cpu {
namespace {

constexpr const char* kForward = "linear_bn_act_forward";
constexpr const char* kBackward = "linear_bn_act_backward";

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_act_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, at::Tensor& running_mean,
    at::Tensor& running_var, at::Tensor& num_batches_tracked, bool training,
    c10::optional<double> momentum, double eps, int64_t activation, double negative_slope,
    double p, const at::Tensor& seed, const at::Tensor& offset) {
  check_linear(kForward, x, weight, bias, seed, offset);
  const int64_t B = x.size(0), N = weight.size(0);
  const auto sdt = stat_dtype(x.scalar_type());
  check_vector(kForward, bn_weight, "bn_weight", N, sdt);
  check_vector(kForward, bn_bias, "bn_bias", N, sdt);
  check_vector(kForward, running_mean, "running_mean", N, sdt);
  check_vector(kForward, running_var, "running_var", N, sdt);
  check_counter(kForward, num_batches_tracked, "num_batches_tracked");
  check_hyper(kForward, activation, negative_slope, p);
  TORCH_CHECK(std::isfinite(eps) && eps > 0.0, kForward, ": eps must be finite and > 0, got ",
              eps);
  TORCH_CHECK(!momentum.has_value() ||
                  (std::isfinite(*momentum) && *momentum >= 0.0 && *momentum <= 1.0),
              kForward, ": momentum must be None or in [0, 1], got ", momentum.value_or(0.0));
  TORCH_CHECK(!training || B > 1, kForward,
              ": Expected more than 1 value per channel when training, got input size [", B,
              ", ", N, "] (x batch size must be > 1 for batch statistics)");

  const at::Tensor h = at::linear(x, weight, bias);  // (B, N) in x.dtype, contiguous
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

    dispatch_activation(activation, [&](auto act_code) {
      constexpr int64_t A = decltype(act_code)::value;
      at::parallel_for(0, N, column_grain(B), [&](int64_t c0, int64_t c1) {
        const int64_t w = c1 - c0;
        // (1) + (2): statistics of columns [c0, c1)
        if (training) {
          std::vector<double> shift(w), s(w, 0.0), ss(w, 0.0);
          for (int64_t j = 0; j < w; ++j) shift[j] = static_cast<acc_t>(hp[c0 + j]);
          for (int64_t i = 0; i < B; ++i) {
            const scalar_t* row = hp + i * N + c0;
            for (int64_t j = 0; j < w; ++j) {
              const double d = static_cast<double>(static_cast<acc_t>(row[j])) - shift[j];
              s[j] += d;
              ss[j] += d * d;
            }
          }
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
        // (3): y = dropout(act(((h - mean) * rstd) * gamma + beta))
        float u[kTile];
        const acc_t scale = static_cast<acc_t>(drop.scale);
        for (int64_t i = 0; i < B; ++i) {
          for (int64_t t0 = c0; t0 < c1; t0 += kTile) {
            const int64_t tw = std::min(kTile, c1 - t0);
            const scalar_t* hr = hp + i * N + t0;
            scalar_t* yr = yp + i * N + t0;
            const acc_t *mr = meanp + t0, *rr = rstdp + t0, *gr = gp + t0, *br = bp + t0;
            if (drop.on) {
              philox_uniform_row(drop.key, static_cast<uint32_t>(i * N + t0), tw, u);
              for (int64_t j = 0; j < tw; ++j) {
                const acc_t z = ((static_cast<acc_t>(hr[j]) - mr[j]) * rr[j]) * gr[j] + br[j];
                const acc_t a = act_forward<A>(z, slope);
                yr[j] = static_cast<scalar_t>(u[j] >= drop.p ? a * scale : acc_t(0));
              }
            } else {
              for (int64_t j = 0; j < tw; ++j) {
                const acc_t z = ((static_cast<acc_t>(hr[j]) - mr[j]) * rr[j]) * gr[j] + br[j];
                yr[j] = static_cast<scalar_t>(act_forward<A>(z, slope));
              }
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
    bool compute_dx) {
  check_linear(kBackward, x, weight, c10::nullopt, seed, offset);
  const int64_t B = x.size(0), N = weight.size(0);
  const auto dt = x.scalar_type();
  const auto sdt = stat_dtype(dt);
  check_matrix(kBackward, grad_y, "grad_y", B, N, dt);
  check_matrix(kBackward, h, "h", B, N, dt);
  check_vector(kBackward, bn_weight, "bn_weight", N, sdt);
  check_vector(kBackward, bn_bias, "bn_bias", N, sdt);
  check_vector(kBackward, mean, "mean", N, sdt);
  check_vector(kBackward, rstd, "rstd", N, sdt);
  check_hyper(kBackward, activation, negative_slope, p);

  const at::Tensor gy = grad_y.contiguous(), hc = h.contiguous();
  const at::Tensor gamma = bn_weight.contiguous(), beta = bn_bias.contiguous();
  const at::Tensor mu = mean.contiguous(), rs = rstd.contiguous();
  at::Tensor dh = at::empty({B, N}, x.options());
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
    scalar_t* dbp = db.data_ptr<scalar_t>();
    acc_t* dzp = dz_scratch.data_ptr<acc_t>();
    const acc_t *gp = gamma.data_ptr<acc_t>(), *bp = beta.data_ptr<acc_t>();
    const acc_t *mp = mu.data_ptr<acc_t>(), *rp = rs.data_ptr<acc_t>();
    acc_t *dgp = dgamma.data_ptr<acc_t>(), *dbtp = dbeta.data_ptr<acc_t>();
    const acc_t slope = static_cast<acc_t>(negative_slope);
    const acc_t scale = static_cast<acc_t>(drop.scale);

    dispatch_activation(activation, [&](auto act_code) {
      constexpr int64_t A = decltype(act_code)::value;
      at::parallel_for(0, N, column_grain(B), [&](int64_t c0, int64_t c1) {
        const int64_t w = c1 - c0;
        std::vector<double> sdz(w, 0.0), sdzx(w, 0.0), sdh(w, 0.0);
        std::vector<acc_t> m1(w), m2(w);
        float u[kTile];
        // (1) dz and its column sums
        for (int64_t i = 0; i < B; ++i) {
          for (int64_t t0 = c0; t0 < c1; t0 += kTile) {
            const int64_t tw = std::min(kTile, c1 - t0);
            const int64_t base = i * N + t0;
            if (drop.on) philox_uniform_row(drop.key, static_cast<uint32_t>(base), tw, u);
            double* s1 = sdz.data() + (t0 - c0);
            double* s2 = sdzx.data() + (t0 - c0);
            for (int64_t j = 0; j < tw; ++j) {
              const int64_t c = t0 + j;
              const acc_t xhat = (static_cast<acc_t>(hp[base + j]) - mp[c]) * rp[c];
              const acc_t z = xhat * gp[c] + bp[c];
              acc_t g = static_cast<acc_t>(gyp[base + j]);
              if (drop.on) g = u[j] >= drop.p ? g * scale : acc_t(0);
              const acc_t dz = g * act_grad<A>(z, slope);
              dzp[base + j] = dz;
              s1[j] += static_cast<double>(dz);
              s2[j] += static_cast<double>(dz * xhat);
            }
          }
        }
        for (int64_t j = 0; j < w; ++j) {
          const int64_t c = c0 + j;
          dbtp[c] = static_cast<acc_t>(sdz[j]);
          dgp[c] = static_cast<acc_t>(sdzx[j]);
          // means over the batch of dxhat = dz * gamma and of dxhat * xhat
          m1[j] = static_cast<acc_t>(static_cast<double>(gp[c]) * sdz[j] / B);
          m2[j] = static_cast<acc_t>(static_cast<double>(gp[c]) * sdzx[j] / B);
        }
        // (2) dh and its column sums (db)
        for (int64_t i = 0; i < B; ++i) {
          const int64_t base = i * N + c0;
          for (int64_t j = 0; j < w; ++j) {
            const int64_t c = c0 + j;
            const acc_t xhat = (static_cast<acc_t>(hp[base + j]) - mp[c]) * rp[c];
            const acc_t dxhat = dzp[base + j] * gp[c];
            const acc_t d = training ? rp[c] * ((dxhat - m1[j]) - xhat * m2[j]) : dxhat * rp[c];
            const scalar_t ds = static_cast<scalar_t>(d);
            dhp[base + j] = ds;
            sdh[j] += static_cast<double>(static_cast<acc_t>(ds));
          }
        }
        for (int64_t j = 0; j < w; ++j) dbp[c0 + j] = static_cast<scalar_t>(static_cast<acc_t>(sdh[j]));
      });
    });
  });

  const at::Tensor xc = x.contiguous();
  at::Tensor dweight = at::mm(dh.t(), xc);
  at::Tensor dx = compute_dx ? at::mm(dh, weight) : at::empty({0}, x.options());
  return {dx, dweight, db, dgamma, dbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgan_C, CPU, m) {
  m.impl("linear_bn_act_forward", &linear_bn_act_forward);
  m.impl("linear_bn_act_backward", &linear_bn_act_backward);
}

}  // namespace cpu
}  // namespace fastgan
