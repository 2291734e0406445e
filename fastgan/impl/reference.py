"""The reference backend: every fused op written as plain PyTorch.

This module is the ground truth the other backends are tested against, and the
specification they implement. It imports no kernel. Each function here has a
twin with the same name and signature in every other backend
(``fastgan.cext`` for the C++ ``cpu``/``cuda`` kernels, ``fastgan.kernels``
for Triton); ``fastgan.ops`` picks one at call time.

Numerics shared by all backends
-------------------------------
* ``x``, ``weight`` and ``bias`` share one dtype (fp32, fp16 or bf16). The GEMM
  output ``h = x @ weight.T + bias`` is kept in that dtype, as ``nn.Linear``
  would; everything after it (BN statistics, normalize, activation, dropout)
  is computed in fp32 and rounded once to ``x.dtype`` at the end.
* BN parameters and running statistics are fp32 (fp64 when ``x`` is fp64, for
  ``gradcheck``); "fp32" below means that accumulation dtype, ``acc_dtype(x)``.
* Dropout is inverted dropout driven by Philox 4x32-10 (see ``philox_uniform``):
  element ``(i, j)`` of a ``(B, N)`` output keeps its value iff
  ``u(seed, offset, i * N + j) >= p``, and kept values are multiplied by
  ``float32(1 / (1 - p))``. ``p == 0`` skips dropout entirely.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import spec
from ..ops.spec import acc_dtype, dropout_scale

name = "reference"


def available() -> tuple[bool, str]:
    return True, "plain PyTorch, always available"


def supports(device: torch.device) -> bool:
    return True


# --------------------------------------------------------------------------
# Philox 4x32-10, bit-exact with Triton's ``tl.philox`` / ``tl.rand``.
# Values are carried in int64 tensors holding unsigned 32-bit numbers; the
# 32x32 -> 64 bit product is split into 16-bit halves so nothing overflows.
# --------------------------------------------------------------------------
_M32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
# Largest float32 scale with (2**31 - 1) * scale < 1.0, the constant tl.rand uses.
UINT_TO_FLOAT_SCALE = 4.6566127342e-10


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of the 64-bit product of constant ``a`` and ``b``."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo_lo = a_lo * b_lo
    mid1 = a_hi * b_lo
    mid2 = a_lo * b_hi
    cross = (lo_lo >> 16) + (mid1 & 0xFFFF) + (mid2 & 0xFFFF)
    lo = ((cross & 0xFFFF) << 16) | (lo_lo & 0xFFFF)
    hi = a_hi * b_hi + (mid1 >> 16) + (mid2 >> 16) + (cross >> 16)
    return hi, lo


def philox4x32(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: Tensor, k1: Tensor,
               rounds: int = PHILOX_ROUNDS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox 4x32 on int64 tensors of uint32 values (Random123's round order)."""
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def uint32_to_uniform(r: Tensor) -> Tensor:
    """uint32 (in int64) -> float32 in [0, 1), exactly as ``tl.rand`` converts."""
    x = torch.where(r >= 2**31, r - 2**32, r)  # reinterpret as int32
    x = torch.where(x < 0, -x - 1, x)
    scale = torch.tensor(UINT_TO_FLOAT_SCALE, dtype=torch.float32, device=r.device)
    return x.to(torch.float32) * scale


def philox_uniform(seed: Tensor, offset: Tensor, numel: int) -> Tensor:
    """Uniform floats for element indices ``0 .. numel-1``.

    Key = (seed low 32 bits, seed high 32 bits); counter = (index,
    offset low 32 bits, offset high 32 bits, 0); the first Philox output word
    becomes the float. A new ``offset`` therefore gives a disjoint stream.
    """
    if numel >= 2**32:
        raise ValueError(f"dropout needs fewer than 2**32 elements per call, got {numel}")
    dev = seed.device
    s = seed.reshape(-1)[:1].to(torch.int64)
    o = offset.reshape(-1)[:1].to(torch.int64)
    idx = torch.arange(numel, dtype=torch.int64, device=dev)
    zero = torch.zeros_like(idx)
    r, _, _, _ = philox4x32(idx, zero + (o & _M32), zero + ((o >> 32) & _M32), zero,
                            s & _M32, (s >> 32) & _M32)
    return uint32_to_uniform(r)


def dropout_keep_mask(seed: Tensor, offset: Tensor, shape: tuple[int, int], p: float) -> Tensor:
    """Boolean keep-mask of a ``(B, N)`` output for dropout probability ``p``."""
    u = philox_uniform(seed, offset, shape[0] * shape[1]).reshape(shape)
    return u >= torch.tensor(p, dtype=torch.float32)


def apply_dropout(a: Tensor, p: float, seed: Tensor, offset: Tensor) -> Tensor:
    """Inverted dropout of a ``(B, N)`` tensor with the op's mask for ``(seed, offset)``.

    Backward applies the same call to the incoming gradient: the mask is
    recomputed, never stored.
    """
    if p == 0.0:
        return a
    keep = dropout_keep_mask(seed, offset, tuple(a.shape), p)
    return torch.where(keep, a * dropout_scale(p), torch.zeros_like(a))


# --------------------------------------------------------------------------
# Activations: rows of ``fastgan.ops.spec.ACTIVATION_TABLE`` (fp32 in, fp32 out).
# ``act_grad`` is the derivative from the pre-activation ``z``;
# ``act_grad_from_output`` recovers it from the output ``a`` (slope >= 0).
# --------------------------------------------------------------------------
def act(z: Tensor, activation: str, negative_slope: float) -> Tensor:
    return spec.activation(activation).fn(z, negative_slope)


def act_grad(z: Tensor, activation: str, negative_slope: float) -> Tensor:
    return spec.activation(activation).grad(z, negative_slope)


def act_grad_from_output(a: Tensor, activation: str, negative_slope: float) -> Tensor:
    return spec.activation(activation).grad_from_output(a, negative_slope)


def act_backward(g: Tensor, z: Tensor, activation: str, negative_slope: float) -> Tensor:
    """``g * act'(z)``: the gradient at the pre-activation ``z`` (in ``z``'s dtype,
    so fp64 inputs keep an fp64 slope)."""
    return g * act_grad(z, activation, negative_slope)


# --------------------------------------------------------------------------
# linear_bn_act: y = dropout(act(BN(x @ W.T + b)))
# --------------------------------------------------------------------------
def linear_bn_act_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Tensor,
                          bn_bias: Tensor, running_mean: Tensor, running_var: Tensor,
                          num_batches_tracked: Tensor, training: bool, momentum: Optional[float],
                          eps: float, activation: str, negative_slope: float, p: float,
                          seed: Tensor, offset: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(y, h, mean, rstd)``.

    ``h`` is the Linear output ``x @ W.T + b`` in ``x.dtype`` (saved for
    backward); ``mean``/``rstd`` are fp32: the batch mean and 1/sqrt(biased
    var + eps) in training, the running statistics in eval. In training the
    running statistics and ``num_batches_tracked`` are updated in place
    exactly as ``nn.BatchNorm1d`` does (momentum None = cumulative average).
    """
    h = F.linear(x, weight, bias)
    hf = h.to(acc_dtype(x))
    if training:
        var, mean = torch.var_mean(hf, dim=0, correction=0)
        rstd = torch.rsqrt(var + eps)
        update_running_stats(running_mean, running_var, num_batches_tracked, mean, var,
                             hf.shape[0], momentum)
    else:
        mean = running_mean.to(hf.dtype, copy=True)
        rstd = torch.rsqrt(running_var.to(hf.dtype) + eps)
    y = bn_act_dropout(hf, mean, rstd, bn_weight, bn_bias, activation, negative_slope, p, seed,
                       offset)
    return y.to(x.dtype), h, mean, rstd


def linear_bn_act_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bn_weight: Tensor,
                           bn_bias: Tensor, h: Tensor, mean: Tensor, rstd: Tensor, training: bool,
                           activation: str, negative_slope: float, p: float, seed: Tensor,
                           offset: Tensor, compute_dx: bool, compute_dw: bool = True
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx, dW, db, dgamma, dbeta)``; ``dx`` is empty if not ``compute_dx``,
    ``dW`` if not ``compute_dw`` (a frozen weight: its GEMM is skipped).

    The activation derivative and the dropout mask are recomputed from ``h``
    and ``(seed, offset)``; nothing else is saved. ``dgamma``/``dbeta`` are
    fp32; ``dx``, ``dW`` and ``db`` are in ``x.dtype``.
    """
    dz, xhat = bn_act_dropout_backward(grad_y, h, mean, rstd, bn_weight, bn_bias, activation,
                                       negative_slope, p, seed, offset)
    return bn_linear_backward(dz, xhat, x, weight, bn_weight, rstd, training, compute_dx,
                              compute_dw)


def bn_linear_backward(dz: Tensor, xhat: Tensor, x: Tensor, weight: Tensor, bn_weight: Tensor,
                       rstd: Tensor, training: bool, compute_dx: bool, compute_dw: bool = True
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dW, db, dgamma, dbeta)`` from ``dz``, the gradient at the BN output
    (batch statistics in training: their own gradient terms; running ones in eval)."""
    dgamma = (dz * xhat).sum(0)
    dbeta = dz.sum(0)
    dxhat = dz * bn_weight
    if training:
        dh = rstd * (dxhat - dxhat.mean(0) - xhat * (dxhat * xhat).mean(0))
    else:
        dh = dxhat * rstd
    return (*linear_backward(dh.to(x.dtype), x, weight, compute_dx, compute_dw), dgamma, dbeta)


# The pieces of linear_bn_act that do not depend on where the batch statistics
# come from; fastgan.distributed's synchronized-statistics path reuses them
# with statistics all-reduced over ranks.
def update_running_stats(running_mean: Tensor, running_var: Tensor,
                         num_batches_tracked: Tensor, mean: Tensor, var: Tensor, count,
                         momentum: Optional[float]) -> None:
    """``nn.BatchNorm1d``'s update of the running statistics, in place.

    ``mean``/``var`` are the batch mean and biased variance over ``count``
    rows; ``momentum`` None is the cumulative average. ``count`` may be a
    tensor (a global batch size), so nothing is read on the host and the
    update can be captured in a CUDA graph. The unbiased variance is formed in
    ``var``'s dtype, then rounded to ``mean``'s, the dtype of the update.
    """
    with torch.no_grad():
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / num_batches_tracked.to(mean.dtype)
        else:
            factor = torch.full((), momentum, dtype=mean.dtype, device=mean.device)
        unbiased = (var * (count / (count - 1))).to(mean.dtype)
        running_mean.copy_(factor * mean + (1 - factor) * running_mean)
        running_var.copy_(factor * unbiased + (1 - factor) * running_var)


def bn_act_dropout(h: Tensor, mean: Tensor, rstd: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                   activation: str, negative_slope: float, p: float, seed: Tensor,
                   offset: Tensor) -> Tensor:
    """``dropout(act((h - mean) * rstd * bn_weight + bn_bias))`` in ``mean``'s dtype."""
    z = (h.to(mean.dtype) - mean) * rstd * bn_weight + bn_bias
    return apply_dropout(act(z, activation, negative_slope), p, seed, offset)


def bn_act_dropout_backward(grad_y: Tensor, h: Tensor, mean: Tensor, rstd: Tensor,
                            bn_weight: Tensor, bn_bias: Tensor, activation: str,
                            negative_slope: float, p: float, seed: Tensor,
                            offset: Tensor) -> tuple[Tensor, Tensor]:
    """``(dz, xhat)``: the gradient at the BN output and the normalized ``h``,
    both in ``mean``'s dtype, recomputed from ``h`` and ``(seed, offset)``."""
    xhat = (h.to(mean.dtype) - mean) * rstd
    z = xhat * bn_weight + bn_bias
    g = apply_dropout(grad_y.to(mean.dtype), p, seed, offset)
    return act_backward(g, z, activation, negative_slope), xhat


def linear_backward(dh: Tensor, x: Tensor, weight: Tensor, compute_dx: bool,
                    compute_dw: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dW, db)`` of ``h = x @ W.T + b`` from ``dh`` (in ``x.dtype``); ``db``
    is summed in fp32 (fp64 for fp64 inputs); ``dx`` is empty if not ``compute_dx``,
    ``dW`` if not ``compute_dw``. ``db`` is always computed (a column sum)."""
    dx = dh @ weight if compute_dx else x.new_empty(0)
    dw = dh.t() @ x if compute_dw else weight.new_empty(0)
    db = dh.sum(0, dtype=acc_dtype(x)).to(x.dtype)
    return dx, dw, db


# --------------------------------------------------------------------------
# linear_act: y = dropout(act(x @ W.T + b))
# --------------------------------------------------------------------------
def linear_act_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
                       negative_slope: float, p: float, seed: Tensor, offset: Tensor) -> Tensor:
    z = F.linear(x, weight, bias)
    a = act(z.to(acc_dtype(x)), activation, negative_slope)
    return apply_dropout(a, p, seed, offset).to(x.dtype)


def linear_act_backward(grad_y: Tensor, x: Tensor, weight: Tensor, y: Tensor, activation: str,
                        negative_slope: float, p: float, seed: Tensor, offset: Tensor,
                        compute_dx: bool, compute_dw: bool = True
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dx, dW, db)`` (``dx``/``dW`` empty unless ``compute_dx``/``compute_dw``).
    The activation derivative comes from the saved
    output ``y`` (dropped elements get zero gradient anyway, kept ones are
    divided back by the dropout scale), so no pre-activation is stored."""
    a = y.to(acc_dtype(x))
    g = apply_dropout(grad_y.to(a.dtype), p, seed, offset)
    if p != 0.0:
        a = a / dropout_scale(p)
    dz = (g * act_grad_from_output(a, activation, negative_slope)).to(x.dtype)
    return linear_backward(dz, x, weight, compute_dx, compute_dw)


# --------------------------------------------------------------------------
# gan_bce: BCE-with-logits losses of a GAN, loss and gradient in one pass.
# --------------------------------------------------------------------------
def _bce_term(logits: Tensor, target: float) -> tuple[Tensor, Tensor, Tensor]:
    z = logits.to(acc_dtype(logits))
    # softplus(z) - t*z, written so exp never overflows
    terms = z.clamp_min(0) - z * target + torch.log1p(torch.exp(-z.abs()))
    # An infinite logit gives inf - inf = nan there; its limit is (1 - t) * inf
    # for +inf and t * inf for -inf: inf, or 0 where the target matches it.
    terms = torch.where(z == math.inf, math.inf if target < 1 else 0.0, terms)
    terms = torch.where(z == -math.inf, math.inf if target > 0 else 0.0, terms)
    loss = terms.mean()
    prob = torch.sigmoid(z)
    return loss, prob.mean(), _bce_grad(prob, target, logits.dtype)


def _bce_grad(prob: Tensor, target: float, dtype: torch.dtype) -> Tensor:
    """d mean BCE / d logits from ``sigmoid(logits)``."""
    return ((prob - target) / prob.numel()).to(dtype)


def gan_bce_forward(logits_a: Tensor, logits_b: Optional[Tensor], target_a: float,
                    target_b: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``loss = mean BCE(logits_a, target_a) [+ mean BCE(logits_b, target_b)]``.

    Returns ``(loss, mean sigmoid(a), mean sigmoid(b), dloss/da, dloss/db)``;
    loss and means are fp32 (fp64 for fp64 logits) scalars (0-dim), gradients in the logits' dtype.
    Without ``logits_b`` its mean is 0 and its gradient empty.
    """
    loss, prob_a, grad_a = _bce_term(logits_a, target_a)
    if logits_b is None:
        return loss, prob_a, torch.zeros_like(prob_a), grad_a, logits_a.new_empty(0)
    loss_b, prob_b, grad_b = _bce_term(logits_b, target_b)
    return loss + loss_b, prob_a, prob_b, grad_a, grad_b


# --------------------------------------------------------------------------
# Differentiable gradients: the backward formulas above as functions of the
# forward's *inputs*, in plain differentiable PyTorch. The autograd Functions
# of fastgan.ops.registry call them when a backward builds a graph
# (create_graph=True: gradient penalties, double backward), so the graph of the
# gradient reaches x, W, b and the BN parameters, not only the saved outputs.
# The backends' kernels return numbers, not graphs, so they serve first-order
# backward only. ``keep`` is the forward's dropout multiplier, (B, N) fp32:
# ``1 / (1 - p)`` where its mask keeps an element and 0 where it drops it
# (the backend's own mask), or None without dropout.
# --------------------------------------------------------------------------
def _masked(grad_y: Tensor, keep: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    g = grad_y.to(dtype)
    return g if keep is None else g * keep.to(dtype)


def linear_act_grads(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                     activation: str, negative_slope: float, keep: Optional[Tensor],
                     compute_dx: bool, compute_dw: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dW, db)`` of ``linear_act``, differentiable in every tensor argument.
    The activation's derivative comes from the recomputed pre-activation."""
    z = F.linear(x, weight, bias).to(acc_dtype(x))
    dz = act_backward(_masked(grad_y, keep, z.dtype), z, activation, negative_slope)
    return linear_backward(dz.to(x.dtype), x, weight, compute_dx, compute_dw)


def linear_bn_act_grads(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                        bn_weight: Tensor, bn_bias: Tensor, mean: Tensor, rstd: Tensor,
                        training: bool, eps: float, activation: str, negative_slope: float,
                        keep: Optional[Tensor], compute_dx: bool, compute_dw: bool = True
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dW, db, dgamma, dbeta)`` of ``linear_bn_act``, differentiable in every
    tensor argument. In training the batch statistics are recomputed from ``x``
    (they depend on it); in eval ``mean``/``rstd`` are the forward's running
    statistics, constants (and the running statistics are not updated again)."""
    h = F.linear(x, weight, bias).to(mean.dtype)
    if training:
        var, mean = torch.var_mean(h, dim=0, correction=0)
        rstd = torch.rsqrt(var + eps)
    else:
        mean, rstd = mean.detach(), rstd.detach()
    xhat = (h - mean) * rstd
    z = xhat * bn_weight + bn_bias
    dz = act_backward(_masked(grad_y, keep, mean.dtype), z, activation, negative_slope)
    return bn_linear_backward(dz, xhat, x, weight, bn_weight, rstd, training, compute_dx,
                              compute_dw)


def gan_bce_grads(grad_loss: Tensor, logits_a: Tensor, logits_b: Optional[Tensor],
                  target_a: float, target_b: float, compute_da: bool) -> tuple[Tensor, Tensor]:
    """``(dlogits_a, dlogits_b)`` of ``gan_bce`` scaled by ``grad_loss``,
    differentiable in the logits (``dlogits_b`` is empty without ``logits_b``)."""
    def grad(logits, target):
        prob = torch.sigmoid(logits.to(acc_dtype(logits)))
        return _bce_grad(prob, target, logits.dtype) * grad_loss.to(logits.dtype)

    da = grad(logits_a, target_a) if compute_da else logits_a.new_empty(0)
    db = logits_a.new_empty(0) if logits_b is None else grad(logits_b, target_b)
    return da, db
