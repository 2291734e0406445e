"""linear_act: y = dropout(act(x @ W.T + b)), forward and backward in Triton.

Forward: one GEMM kernel whose epilogue adds the bias, rounds to x.dtype (the
``nn.Linear`` output the reference activates), applies the activation and the
Philox dropout mask, and stores y. Nothing else is written.

Backward: the saved output y gives the activation derivative (divided back by
the dropout scale), the mask is recomputed from (seed, offset). One
elementwise kernel writes dz in x.dtype and the bias gradient's column sums
(directly when one row tile covers the batch, else per-tile partials summed by
``col_sum``); then the two GEMMs dx = dz @ W and dW = dz.T @ x.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs, guards, runtime
from .common import (act, act_grad_from_output, drop, linear_tile, load_tile, round_to,
                     store_tile, tile_offsets)
from .matmul import col_sum, matmul


@triton.autotune(configs=configs.gemm_configs(), key=["M", "N", "K", "TF32"],
                 prune_configs_by=configs.PRUNE)
@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, seed_ptr, offset_ptr, M, N, K,
                stride_xm, stride_xk, stride_wn, stride_wk, slope, p, scale,
                HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                TF32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    _, offs_m, offs_n = tile_offsets(BLOCK_M, BLOCK_N)
    acc = linear_tile(x_ptr, w_ptr, b_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                      offs_m, offs_n, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, TF32)
    # the Linear output, in x.dtype like nn.Linear
    z = round_to(acc, y_ptr.dtype.element_ty).to(tl.float32)
    a = act(z, ACT, slope)
    if HAS_DROPOUT:
        a = drop(a, seed_ptr, offset_ptr, offs_m, offs_n, N, p, scale)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    store_tile(y_ptr, a, offs_m, offs_n, N, mask)


@triton.autotune(configs=configs.elementwise_configs(), key=["M", "N", "SINGLE"],
                 prune_configs_by=configs.PRUNE)
@triton.jit
def _bwd_dz_kernel(g_ptr, y_ptr, dz_ptr, part_ptr, db_ptr, seed_ptr, offset_ptr, M, N,
                   stride_gm, stride_gn, stride_ym, stride_yn, slope, p, scale,
                   ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, SINGLE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, offs_m, offs_n = tile_offsets(BLOCK_M, BLOCK_N)
    n_ok = offs_n < N
    mask = (offs_m[:, None] < M) & n_ok[None, :]
    g = load_tile(g_ptr, offs_m, offs_n, stride_gm, stride_gn, mask)
    a = load_tile(y_ptr, offs_m, offs_n, stride_ym, stride_yn, mask)
    if HAS_DROPOUT:
        g = drop(g, seed_ptr, offset_ptr, offs_m, offs_n, N, p, scale)
        a = a / scale
    dz = store_tile(dz_ptr, g * act_grad_from_output(a, ACT, slope), offs_m, offs_n, N, mask)
    colsum = tl.sum(tl.where(mask, dz.to(tl.float32), 0.0), axis=0)
    if SINGLE:  # one row tile holds the whole batch: the sum is final
        tl.store(db_ptr + offs_n, round_to(colsum, db_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(part_ptr + pid_m * N + offs_n, colsum, mask=n_ok)


def forward(x, weight, bias, activation, negative_slope, p, seed, offset):
    guards.operands(x=x, weight=weight, bias=bias)
    b, k = x.shape
    n = weight.shape[0]
    guards.output((b, n), "y")
    scalars, flags = runtime.act_args(activation, negative_slope, p)
    bias = None if bias is None else bias.contiguous()  # indexed densely by the kernel
    y = torch.empty((b, n), dtype=x.dtype, device=x.device)
    if b == 0 or n == 0:
        return y
    grid = lambda meta: (triton.cdiv(b, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    runtime.launch("linear_act_fwd", _fwd_kernel, grid, x, weight,
                   weight if bias is None else bias, y, seed, offset, b, n, k,
                   x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
                   *scalars, HAS_BIAS=bias is not None, TF32=runtime.tf32(x.dtype), **flags)
    return y


def backward(grad_y, x, weight, y, activation, negative_slope, p, seed, offset, compute_dx,
             compute_dw=True):
    b, n = x.shape[0], weight.shape[0]
    guards.operands(x=x, weight=weight)
    guards.operands((b, n), grad_y=grad_y, y=y)
    guards.rng(seed, offset)
    scalars, flags = runtime.act_args(activation, negative_slope, p)
    dz = torch.empty((b, n), dtype=x.dtype, device=x.device)
    single = b <= configs.MAX_SINGLE_TILE_B
    block_m = configs.single_tile_block_m(b) if single else configs.STATS_BLOCK_M
    tiles_m = triton.cdiv(b, block_m)
    db = torch.empty(n, dtype=x.dtype, device=x.device)
    part = db if single else torch.empty((tiles_m, n), dtype=torch.float32, device=x.device)
    if b > 0 and n > 0:
        grid = lambda meta: (tiles_m, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        runtime.launch("linear_act_bwd_dz", _bwd_dz_kernel, grid, grad_y, y, dz, part, db,
                       seed, offset, b, n, grad_y.stride(0), grad_y.stride(1), y.stride(0),
                       y.stride(1), *scalars, SINGLE=single, BLOCK_M=block_m, **flags)
        if not single:
            db = col_sum(part, x.dtype)
    elif n > 0:
        db.zero_()
    dx = matmul(dz, weight) if compute_dx else x.new_empty(0)
    dw = matmul(dz.t(), x) if compute_dw else weight.new_empty(0)
    return dx, dw, db
