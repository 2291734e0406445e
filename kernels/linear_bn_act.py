"""linear_bn_act: y = dropout(act(BN(x @ W.T + b))), forward and backward in Triton.

Forward, training
  * B <= MAX_SINGLE_TILE_B (the GAN case): ONE kernel. Each program owns a block
    of columns and every row, so the GEMM tile it accumulates (fp32) is the
    whole batch: it stores h, takes the batch mean and biased variance from the
    tile in registers (two-pass, exact), normalizes, activates, drops out,
    stores y, mean, rstd, and updates the running statistics of its columns.
  * Larger B: the GEMM kernel (2-D grid) stores h and, per row tile and column,
    the sum and the centred sum of squares of its rows (Chan's parallel
    variance, no E[h^2] - mean^2 cancellation); a light second pass combines
    those partials per column, then reads h once to write y. h is written
    once and read once; nothing reads the output a third time.
  ``num_batches_tracked`` is read by the kernels (momentum=None: factor
  1 / (n + 1)) and incremented by one device-side ``add_`` after them, so no
  program can see another's increment and nothing syncs with the host.
Forward, eval: one GEMM kernel with BN (running statistics) folded into its
  epilogue.

Backward: the activation derivative and dropout mask are recomputed from
h / mean / rstd and (seed, offset). dgamma and dbeta are column reductions;
dh = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) needs them
first, so one kernel does it all in registers when the batch fits (SINGLE),
else a reduce pass writes per-row-tile partials and the same kernel, reading
them, finishes.
dh is written once in x.dtype (as the reference rounds it), db is its column
sum, then the two GEMMs dx = dh @ W and dW = dh.T @ x.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs, guards, runtime
from .common import (act, act_grad, div_ieee, drop, linear_tile, load_tile, round_to,
                     store_tile, sum_partials, tile_offsets)
from .matmul import col_sum, matmul


# ---------------------------------------------------------------- jit helpers
@triton.jit
def _linear_h(x_ptr, w_ptr, b_ptr, h_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
              offs_m, offs_n, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TF32: tl.constexpr):
    """Stores the tile of h = x @ W.T + b (in h's dtype); returns it as fp32."""
    acc = linear_tile(x_ptr, w_ptr, b_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                      offs_m, offs_n, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, TF32)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    return store_tile(h_ptr, acc, offs_m, offs_n, N, mask).to(tl.float32)


@triton.jit
def _moments(hf, m_ok, count):
    """Per column over the rows ``m_ok`` (``count`` of them): the sum, the mean
    and the sum of squares about that mean (two-pass, no cancellation)."""
    total = tl.sum(tl.where(m_ok[:, None], hf, 0.0), axis=0)
    mean = div_ieee(total, count)
    d = tl.where(m_ok[:, None], hf - mean[None, :], 0.0)
    return total, mean, tl.sum(d * d, axis=0)


@triton.jit
def _store_stats(mean_ptr, rstd_ptr, rm_ptr, rv_ptr, nbt_ptr, offs_n, n_ok, mean, var, rstd,
                 momentum, unbias, CUMULATIVE: tl.constexpr):
    """Stores mean and rstd, and updates the running statistics as
    nn.BatchNorm1d: running = factor * batch + (1 - factor) * running, where
    momentum=None means factor = 1 / num_batches_tracked after this step."""
    tl.store(mean_ptr + offs_n, mean, mask=n_ok)
    tl.store(rstd_ptr + offs_n, rstd, mask=n_ok)
    if CUMULATIVE:
        factor = div_ieee(1.0, (tl.load(nbt_ptr) + 1).to(tl.float32))
    else:
        factor = momentum
    rm = tl.load(rm_ptr + offs_n, mask=n_ok, other=0.0)
    rv = tl.load(rv_ptr + offs_n, mask=n_ok, other=0.0)
    tl.store(rm_ptr + offs_n, factor * mean + (1.0 - factor) * rm, mask=n_ok)
    tl.store(rv_ptr + offs_n, factor * (var * unbias) + (1.0 - factor) * rv, mask=n_ok)


@triton.jit
def _bn_act_store(hf, mean, rstd, gamma_ptr, beta_ptr, y_ptr, offs_m, offs_n, mask, N,
                  seed_ptr, offset_ptr, slope, p, scale, ACT: tl.constexpr,
                  HAS_DROPOUT: tl.constexpr):
    """y = dropout(act(gamma * (h - mean) * rstd + beta)) for one tile, stored."""
    n_ok = offs_n < N
    gamma = tl.load(gamma_ptr + offs_n, mask=n_ok, other=0.0)
    beta = tl.load(beta_ptr + offs_n, mask=n_ok, other=0.0)
    z = (hf - mean[None, :]) * rstd[None, :] * gamma[None, :] + beta[None, :]
    a = act(z, ACT, slope)
    if HAS_DROPOUT:
        a = drop(a, seed_ptr, offset_ptr, offs_m, offs_n, N, p, scale)
    store_tile(y_ptr, a, offs_m, offs_n, N, mask)


@triton.jit
def _bwd_dz(g_ptr, h_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, stride_gm, stride_gn,
            offs_m, offs_n, mask, N, seed_ptr, offset_ptr, slope, p, scale, ACT: tl.constexpr,
            HAS_DROPOUT: tl.constexpr):
    """(dz, xhat, rstd, gamma), fp32: dz = dL/d(BN output) with dropout and act'
    applied, zero outside ``mask``; xhat the normalized h."""
    n_ok = offs_n < N
    mean = tl.load(mean_ptr + offs_n, mask=n_ok, other=0.0)
    rstd = tl.load(rstd_ptr + offs_n, mask=n_ok, other=0.0)
    gamma = tl.load(gamma_ptr + offs_n, mask=n_ok, other=0.0)
    beta = tl.load(beta_ptr + offs_n, mask=n_ok, other=0.0)
    g = load_tile(g_ptr, offs_m, offs_n, stride_gm, stride_gn, mask)
    hf = load_tile(h_ptr, offs_m, offs_n, N, 1, mask)
    xhat = (hf - mean[None, :]) * rstd[None, :]
    z = xhat * gamma[None, :] + beta[None, :]
    if HAS_DROPOUT:
        g = drop(g, seed_ptr, offset_ptr, offs_m, offs_n, N, p, scale)
    dz = tl.where(mask, g * act_grad(z, ACT, slope), 0.0)
    return dz, xhat, rstd, gamma


@triton.jit
def _bwd_dh(dz, xhat, rstd, gamma, sum_dz, sum_dz_xhat, M, TRAINING: tl.constexpr):
    dxhat = dz * gamma[None, :]
    if TRAINING:
        mean_dxhat = div_ieee(gamma * sum_dz, M.to(tl.float32))
        mean_dxhat_xhat = div_ieee(gamma * sum_dz_xhat, M.to(tl.float32))
        return rstd[None, :] * (dxhat - mean_dxhat[None, :] - xhat * mean_dxhat_xhat[None, :])
    else:
        return dxhat * rstd[None, :]


# ---------------------------------------------------------------- forward kernels
@triton.autotune(configs=configs.gemm_configs(with_block_m=False), key=["M", "N", "K", "TF32"],
                 prune_configs_by=configs.PRUNE, restore_value=["rm_ptr", "rv_ptr"])
@triton.jit(do_not_specialize=["M"])  # M == 1 would become a constexpr: M.to() fails
def _fwd_single_kernel(x_ptr, w_ptr, b_ptr, gamma_ptr, beta_ptr, rm_ptr, rv_ptr, nbt_ptr,
                       y_ptr, h_ptr, mean_ptr, rstd_ptr, seed_ptr, offset_ptr, M, N, K,
                       stride_xm, stride_xk, stride_wn, stride_wk, momentum, unbias, eps, slope,
                       p, scale, HAS_BIAS: tl.constexpr, CUMULATIVE: tl.constexpr,
                       ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, TF32: tl.constexpr,
                       BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Training, whole batch in one tile (M <= BLOCK_M): one program per column block."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    m_ok = offs_m < M
    hf = _linear_h(x_ptr, w_ptr, b_ptr, h_ptr, M, N, K, stride_xm, stride_xk, stride_wn,
                   stride_wk, offs_m, offs_n, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, TF32)
    _, mean, m2 = _moments(hf, m_ok, M.to(tl.float32))
    var = div_ieee(m2, M.to(tl.float32))
    rstd = div_ieee(1.0, tl.sqrt_rn(var + eps))
    _store_stats(mean_ptr, rstd_ptr, rm_ptr, rv_ptr, nbt_ptr, offs_n, n_ok, mean, var, rstd,
                 momentum, unbias, CUMULATIVE)
    _bn_act_store(hf, mean, rstd, gamma_ptr, beta_ptr, y_ptr, offs_m, offs_n,
                  m_ok[:, None] & n_ok[None, :], N, seed_ptr, offset_ptr, slope, p, scale, ACT,
                  HAS_DROPOUT)


@triton.autotune(configs=configs.gemm_configs(with_block_m=False), key=["M", "N", "K", "TF32"],
                 prune_configs_by=configs.PRUNE)
@triton.jit
def _fwd_stats_kernel(x_ptr, w_ptr, b_ptr, h_ptr, psum_ptr, pm2_ptr, M, N, K,
                      stride_xm, stride_xk, stride_wn, stride_wk, HAS_BIAS: tl.constexpr,
                      TF32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """Training, multi-tile pass 1: h, and per (row tile, column) the sum of h
    and the sum of squares about the tile's own mean."""
    pid_m, offs_m, offs_n = tile_offsets(BLOCK_M, BLOCK_N)
    n_ok = offs_n < N
    hf = _linear_h(x_ptr, w_ptr, b_ptr, h_ptr, M, N, K, stride_xm, stride_xk, stride_wn,
                   stride_wk, offs_m, offs_n, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, TF32)
    count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    tile_sum, _, m2 = _moments(hf, offs_m < M, count)
    tl.store(psum_ptr + pid_m * N + offs_n, tile_sum, mask=n_ok)
    tl.store(pm2_ptr + pid_m * N + offs_n, m2, mask=n_ok)


@triton.autotune(configs=configs.elementwise_configs(), key=["M", "N"],
                 prune_configs_by=configs.PRUNE, restore_value=["rm_ptr", "rv_ptr"])
@triton.jit(do_not_specialize=["M"])  # M == 1 would become a constexpr: M.to() fails
def _fwd_apply_kernel(h_ptr, psum_ptr, pm2_ptr, gamma_ptr, beta_ptr, rm_ptr, rv_ptr, nbt_ptr,
                      y_ptr, mean_ptr, rstd_ptr, seed_ptr, offset_ptr, M, N, R, STATS_M,
                      momentum, unbias, eps, slope, p, scale, CUMULATIVE: tl.constexpr,
                      ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Training, multi-tile pass 2: combine the R partials of each column into
    mean / biased variance (Chan), then normalize + activate + drop out one h
    tile. Programs of row tile 0 also store mean, rstd and the running statistics."""
    pid_m, offs_m, offs_n = tile_offsets(BLOCK_M, BLOCK_N)
    n_ok = offs_n < N
    mean = div_ieee(sum_partials(psum_ptr, R, N, offs_n, n_ok, BLOCK_N), M.to(tl.float32))
    m2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r in range(0, R):
        count = tl.minimum(M - r * STATS_M, STATS_M).to(tl.float32)
        s = tl.load(psum_ptr + r * N + offs_n, mask=n_ok, other=0.0)
        d = div_ieee(s, count) - mean
        m2 += tl.load(pm2_ptr + r * N + offs_n, mask=n_ok, other=0.0) + count * d * d
    var = div_ieee(m2, M.to(tl.float32))
    rstd = div_ieee(1.0, tl.sqrt_rn(var + eps))
    if pid_m == 0:
        _store_stats(mean_ptr, rstd_ptr, rm_ptr, rv_ptr, nbt_ptr, offs_n, n_ok, mean, var, rstd,
                     momentum, unbias, CUMULATIVE)
    mask = (offs_m[:, None] < M) & n_ok[None, :]
    hf = load_tile(h_ptr, offs_m, offs_n, N, 1, mask)
    _bn_act_store(hf, mean, rstd, gamma_ptr, beta_ptr, y_ptr, offs_m, offs_n, mask, N,
                  seed_ptr, offset_ptr, slope, p, scale, ACT, HAS_DROPOUT)


@triton.autotune(configs=configs.gemm_configs(), key=["M", "N", "K", "TF32"],
                 prune_configs_by=configs.PRUNE)
@triton.jit
def _fwd_eval_kernel(x_ptr, w_ptr, b_ptr, gamma_ptr, beta_ptr, rm_ptr, rv_ptr, y_ptr, h_ptr,
                     mean_ptr, rstd_ptr, seed_ptr, offset_ptr, M, N, K, stride_xm, stride_xk,
                     stride_wn, stride_wk, eps, slope, p, scale, HAS_BIAS: tl.constexpr,
                     ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, TF32: tl.constexpr,
                     BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Eval: GEMM with BN by the running statistics folded into the epilogue."""
    pid_m, offs_m, offs_n = tile_offsets(BLOCK_M, BLOCK_N)
    n_ok = offs_n < N
    hf = _linear_h(x_ptr, w_ptr, b_ptr, h_ptr, M, N, K, stride_xm, stride_xk, stride_wn,
                   stride_wk, offs_m, offs_n, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, TF32)
    mean = tl.load(rm_ptr + offs_n, mask=n_ok, other=0.0)
    rv = tl.load(rv_ptr + offs_n, mask=n_ok, other=1.0)
    rstd = div_ieee(1.0, tl.sqrt_rn(rv + eps))
    if pid_m == 0:
        tl.store(mean_ptr + offs_n, mean, mask=n_ok)
        tl.store(rstd_ptr + offs_n, rstd, mask=n_ok)
    _bn_act_store(hf, mean, rstd, gamma_ptr, beta_ptr, y_ptr, offs_m, offs_n,
                  (offs_m[:, None] < M) & n_ok[None, :], N, seed_ptr, offset_ptr, slope, p,
                  scale, ACT, HAS_DROPOUT)


# ---------------------------------------------------------------- backward kernels
@triton.autotune(configs=configs.elementwise_configs(), key=["M", "N"],
                 prune_configs_by=configs.PRUNE)
@triton.jit
def _bwd_reduce_kernel(g_ptr, h_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, pdbeta_ptr,
                       pdgamma_ptr, seed_ptr, offset_ptr, M, N, stride_gm, stride_gn, slope, p,
                       scale, ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Multi-tile pass 1: per (row tile, column) sums of dz and dz * xhat."""
    pid_m, offs_m, offs_n = tile_offsets(BLOCK_M, BLOCK_N)
    n_ok = offs_n < N
    mask = (offs_m[:, None] < M) & n_ok[None, :]
    dz, xhat, _, _ = _bwd_dz(g_ptr, h_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, stride_gm,
                             stride_gn, offs_m, offs_n, mask, N, seed_ptr, offset_ptr, slope, p,
                             scale, ACT, HAS_DROPOUT)
    tl.store(pdbeta_ptr + pid_m * N + offs_n, tl.sum(dz, axis=0), mask=n_ok)
    tl.store(pdgamma_ptr + pid_m * N + offs_n, tl.sum(dz * xhat, axis=0), mask=n_ok)


@triton.autotune(configs=configs.elementwise_configs(), key=["M", "N", "SINGLE"],
                 prune_configs_by=configs.PRUNE)
@triton.jit(do_not_specialize=["M"])  # M == 1 would become a constexpr: M.to() fails
def _bwd_kernel(g_ptr, h_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, pdbeta_ptr,
                pdgamma_ptr, dh_ptr, db_ptr, pdb_ptr, dgamma_ptr, dbeta_ptr, seed_ptr,
                offset_ptr, M, N, R, stride_gm, stride_gn, slope, p, scale,
                TRAINING: tl.constexpr, ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                SINGLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dgamma, dbeta, dh and db for a tile. SINGLE (one row tile holds the
    batch): the column sums are taken here. Else multi-tile pass 2: they are
    combined from the reduce pass's partials (stored by row tile 0), and db is
    left as per-tile partials for ``col_sum``."""
    pid_m, offs_m, offs_n = tile_offsets(BLOCK_M, BLOCK_N)
    n_ok = offs_n < N
    mask = (offs_m[:, None] < M) & n_ok[None, :]
    dz, xhat, rstd, gamma = _bwd_dz(g_ptr, h_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
                                    stride_gm, stride_gn, offs_m, offs_n, mask, N, seed_ptr,
                                    offset_ptr, slope, p, scale, ACT, HAS_DROPOUT)
    if SINGLE:
        dbeta = tl.sum(dz, axis=0)
        dgamma = tl.sum(dz * xhat, axis=0)
        tl.store(dbeta_ptr + offs_n, dbeta, mask=n_ok)
        tl.store(dgamma_ptr + offs_n, dgamma, mask=n_ok)
    else:
        dbeta = sum_partials(pdbeta_ptr, R, N, offs_n, n_ok, BLOCK_N)
        dgamma = sum_partials(pdgamma_ptr, R, N, offs_n, n_ok, BLOCK_N)
        if pid_m == 0:
            tl.store(dbeta_ptr + offs_n, dbeta, mask=n_ok)
            tl.store(dgamma_ptr + offs_n, dgamma, mask=n_ok)
    dh = store_tile(dh_ptr, _bwd_dh(dz, xhat, rstd, gamma, dbeta, dgamma, M, TRAINING), offs_m,
                    offs_n, N, mask)
    colsum = tl.sum(tl.where(mask, dh.to(tl.float32), 0.0), axis=0)
    if SINGLE:
        tl.store(db_ptr + offs_n, round_to(colsum, db_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(pdb_ptr + pid_m * N + offs_n, colsum, mask=n_ok)


# ---------------------------------------------------------------- launchers
def forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
            training, momentum, eps, activation, negative_slope, p, seed, offset):
    guards.operands(x=x, weight=weight, bias=bias)
    guards.dense(running_mean=running_mean, running_var=running_var)
    b, k = x.shape
    n = weight.shape[0]
    guards.output((b, n), "y")
    # the kernels index these densely (the running statistics, updated in place,
    # cannot be copied: guarded above)
    bias = None if bias is None else bias.contiguous()
    bn_weight, bn_bias = bn_weight.contiguous(), bn_bias.contiguous()
    dev = x.device
    y = torch.empty((b, n), dtype=x.dtype, device=dev)
    h = torch.empty((b, n), dtype=x.dtype, device=dev)
    mean = torch.empty(n, dtype=torch.float32, device=dev)
    rstd = torch.empty(n, dtype=torch.float32, device=dev)
    bias_arg = weight if bias is None else bias  # never read when HAS_BIAS is False
    (slope, p, scale), flags = runtime.act_args(activation, negative_slope, p)
    gemm = (b, n, k, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1))
    tf32 = runtime.tf32(x.dtype)
    if b == 0 or n == 0:  # eval on an empty batch: nothing to compute
        mean.copy_(running_mean)
        rstd.copy_(torch.rsqrt(running_var + eps))
        return y, h, mean, rstd
    if not training:
        grid = lambda meta: (triton.cdiv(b, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        runtime.launch("linear_bn_act_fwd_eval", _fwd_eval_kernel, grid, x, weight, bias_arg,
                       bn_weight, bn_bias, running_mean, running_var, y, h, mean, rstd, seed,
                       offset, *gemm, float(eps), slope, p, scale, HAS_BIAS=bias is not None,
                       TF32=tf32, **flags)
        return y, h, mean, rstd
    cumulative = momentum is None
    stats = dict(momentum=0.0 if cumulative else float(momentum), unbias=b / (b - 1),
                 eps=float(eps), slope=slope, p=p, scale=scale, CUMULATIVE=cumulative, **flags)
    if b <= configs.MAX_SINGLE_TILE_B:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        runtime.launch("linear_bn_act_fwd_single", _fwd_single_kernel, grid, x, weight, bias_arg,
                       bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, y, h,
                       mean, rstd, seed, offset, *gemm, HAS_BIAS=bias is not None, TF32=tf32,
                       BLOCK_M=configs.single_tile_block_m(b), **stats)
    else:
        block_m = configs.STATS_BLOCK_M
        tiles_m = triton.cdiv(b, block_m)
        psum = torch.empty((tiles_m, n), dtype=torch.float32, device=dev)
        pm2 = torch.empty((tiles_m, n), dtype=torch.float32, device=dev)
        grid = lambda meta: (tiles_m, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        runtime.launch("linear_bn_act_fwd_stats", _fwd_stats_kernel, grid, x, weight, bias_arg,
                       h, psum, pm2, *gemm, HAS_BIAS=bias is not None, TF32=tf32,
                       BLOCK_M=block_m)
        runtime.launch("linear_bn_act_fwd_apply", _fwd_apply_kernel, grid, h, psum, pm2,
                       bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, y,
                       mean, rstd, seed, offset, b, n, tiles_m, block_m, BLOCK_M=block_m,
                       **stats)
    # After the kernels, which read the old count (see the module docstring).
    num_batches_tracked.add_(1)
    return y, h, mean, rstd


def backward(grad_y, x, weight, bn_weight, bn_bias, h, mean, rstd, training, activation,
             negative_slope, p, seed, offset, compute_dx, compute_dw=True):
    b, n = x.shape[0], weight.shape[0]
    guards.operands(x=x, weight=weight)
    guards.operands((b, n), grad_y=grad_y, h=h)
    guards.dense(h=h)
    guards.vectors(n, bn_weight=bn_weight, bn_bias=bn_bias, mean=mean, rstd=rstd)
    guards.rng(seed, offset)
    bn_weight, bn_bias = bn_weight.contiguous(), bn_bias.contiguous()
    mean, rstd = mean.contiguous(), rstd.contiguous()
    dev = x.device
    dh = torch.empty((b, n), dtype=x.dtype, device=dev)
    db = torch.empty(n, dtype=x.dtype, device=dev)
    dgamma = torch.empty(n, dtype=torch.float32, device=dev)
    dbeta = torch.empty(n, dtype=torch.float32, device=dev)
    scalars, flags = runtime.act_args(activation, negative_slope, p)
    if b == 0 or n == 0:
        for t in (db, dgamma, dbeta):
            t.zero_()
        return _input_grads(dh, x, weight, compute_dx, compute_dw) + (db, dgamma, dbeta)
    single = b <= configs.MAX_SINGLE_TILE_B
    block_m = configs.single_tile_block_m(b) if single else configs.STATS_BLOCK_M
    tiles_m = triton.cdiv(b, block_m)
    grid = lambda meta: (tiles_m, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    tile = (grad_y, h, mean, rstd, bn_weight, bn_bias)
    if single:  # no partials: the kernel never reads or writes them
        pdbeta = pdgamma = pdb = dbeta
    else:
        pdbeta, pdgamma, pdb = (torch.empty((tiles_m, n), dtype=torch.float32, device=dev)
                                for _ in range(3))
        runtime.launch("linear_bn_act_bwd_reduce", _bwd_reduce_kernel, grid, *tile, pdbeta,
                       pdgamma, seed, offset, b, n, grad_y.stride(0), grad_y.stride(1),
                       *scalars, BLOCK_M=block_m, **flags)
    runtime.launch("linear_bn_act_bwd_single" if single else "linear_bn_act_bwd_apply",
                   _bwd_kernel, grid, *tile, pdbeta, pdgamma, dh, db, pdb, dgamma, dbeta, seed,
                   offset, b, n, tiles_m, grad_y.stride(0), grad_y.stride(1), *scalars,
                   TRAINING=bool(training), SINGLE=single, BLOCK_M=block_m, **flags)
    if not single:
        db = col_sum(pdb, x.dtype)
    return _input_grads(dh, x, weight, compute_dx, compute_dw) + (db, dgamma, dbeta)


def _input_grads(dh, x, weight, compute_dx, compute_dw=True):
    """(dx, dW) = (dh @ W, dh.T @ x); dx (dW) empty unless ``compute_dx`` (``compute_dw``)."""
    dx = matmul(dh, weight) if compute_dx else x.new_empty(0)
    dw = matmul(dh.t(), x) if compute_dw else weight.new_empty(0)
    return dx, dw
