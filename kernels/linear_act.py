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

from fastgan.ops.spec import ACTIVATIONS, dropout_scale

from . import runtime
from .common import act, act_grad_from_output, dropout_keep, element_index, matmul_tile, round_to
from .matmul import col_sum, matmul


@triton.autotune(configs=runtime.gemm_configs(), key=["M", "N", "K"],
                 prune_configs_by=runtime.PRUNE)
@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, seed_ptr, offset_ptr, M, N, K,
                stride_xm, stride_xk, stride_wn, stride_wk, slope, p, scale,
                HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    # W.T as the (K, N) operand: swap W's strides.
    acc = matmul_tile(x_ptr, w_ptr, M, N, K, stride_xm, stride_xk, stride_wk, stride_wn,
                      offs_m, offs_n, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    dtype = y_ptr.dtype.element_ty
    z = round_to(acc, dtype).to(tl.float32)  # the Linear output, in x.dtype like nn.Linear
    a = act(z, ACT, slope)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        offset = tl.load(offset_ptr)
        keep = dropout_keep(seed, offset, element_index(offs_m, offs_n, N), p)
        a = tl.where(keep, a * scale, 0.0)
    mask = (offs_m[:, None] < M) & n_ok[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], round_to(a, dtype), mask=mask)


@triton.autotune(configs=runtime.elementwise_configs(), key=["M", "N", "SINGLE"],
                 prune_configs_by=runtime.PRUNE)
@triton.jit
def _bwd_dz_kernel(g_ptr, y_ptr, dz_ptr, part_ptr, db_ptr, seed_ptr, offset_ptr, M, N,
                   stride_gm, stride_gn, stride_ym, stride_yn, slope, p, scale,
                   ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, SINGLE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    mask = (offs_m[:, None] < M) & n_ok[None, :]
    g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask,
                other=0.0).to(tl.float32)
    a = tl.load(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, mask=mask,
                other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        offset = tl.load(offset_ptr)
        keep = dropout_keep(seed, offset, element_index(offs_m, offs_n, N), p)
        g = tl.where(keep, g * scale, 0.0)
        a = a / scale
    dtype = dz_ptr.dtype.element_ty
    dz = round_to(g * act_grad_from_output(a, ACT, slope), dtype)
    tl.store(dz_ptr + offs_m[:, None] * N + offs_n[None, :], dz, mask=mask)
    colsum = tl.sum(tl.where(mask, dz.to(tl.float32), 0.0), axis=0)
    if SINGLE:  # one row tile holds the whole batch: the sum is final
        tl.store(db_ptr + offs_n, round_to(colsum, dtype), mask=n_ok)
    else:
        tl.store(part_ptr + pid_m * N + offs_n, colsum, mask=n_ok)


def _validate(x, weight, bias, activation, negative_slope, p, seed, offset):
    runtime.check_linear(x, weight, bias)
    runtime.check_rng(seed, offset, x.device)
    runtime.check_hyper(activation, negative_slope, p)
    runtime.check_batch_numel(x.shape[0], weight.shape[0])


def forward(x, weight, bias, activation, negative_slope, p, seed, offset):
    _validate(x, weight, bias, activation, negative_slope, p, seed, offset)
    b, k = x.shape
    n = weight.shape[0]
    bias = None if bias is None else bias.contiguous()  # indexed densely by the kernel
    y = torch.empty((b, n), dtype=x.dtype, device=x.device)
    if b == 0 or n == 0:
        return y
    grid = lambda meta: (triton.cdiv(b, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    runtime.launch("linear_act_fwd", _fwd_kernel, grid, x, weight,
                   weight if bias is None else bias, y, seed, offset, b, n, k,
                   x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
                   float(negative_slope), float(p), dropout_scale(p) if p > 0 else 1.0,
                   HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation], HAS_DROPOUT=p > 0)
    return y


def backward(grad_y, x, weight, y, activation, negative_slope, p, seed, offset, compute_dx):
    _validate(x, weight, None, activation, negative_slope, p, seed, offset)
    b, n = x.shape[0], weight.shape[0]
    runtime.check_like(grad_y, "grad_y", (b, n), x.dtype, x.device)
    runtime.check_like(y, "y", (b, n), x.dtype, x.device)
    dz = torch.empty((b, n), dtype=x.dtype, device=x.device)
    single = b <= runtime.MAX_SINGLE_TILE_B
    block_m = runtime.single_tile_block_m(b) if single else runtime.STATS_BLOCK_M
    tiles_m = triton.cdiv(b, block_m)
    db = torch.empty(n, dtype=x.dtype, device=x.device)
    part = db if single else torch.empty((tiles_m, n), dtype=torch.float32, device=x.device)
    if b > 0 and n > 0:
        grid = lambda meta: (tiles_m, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        runtime.launch("linear_act_bwd_dz", _bwd_dz_kernel, grid, grad_y, y, dz, part, db,
                       seed, offset, b, n, grad_y.stride(0), grad_y.stride(1), y.stride(0),
                       y.stride(1), float(negative_slope), float(p),
                       dropout_scale(p) if p > 0 else 1.0, ACT=ACTIVATIONS[activation],
                       HAS_DROPOUT=p > 0, SINGLE=single, BLOCK_M=block_m)
        if not single:
            db = col_sum(part, x.dtype)
    elif n > 0:
        db.zero_()
    dx = matmul(dz, weight) if compute_dx else x.new_empty(0)
    dw = matmul(dz.t(), x)
    return dx, dw, db
