"""``torch.library`` registration of the fused ops, namespace ``fastgan``.

Each op is a ``custom_op`` whose body validates its arguments and hands them
to the backend chosen for the input's device (``fastgan.backend``), a fake
(meta) kernel for ``torch.compile``, and autograd:

* ``linear_act`` and ``gan_bce`` are functional, so autograd is attached with
  ``register_autograd`` and ``torch.ops.fastgan.<op>`` is differentiable.
* ``linear_bn_act`` updates the BatchNorm running statistics in place, inside
  the same kernel as the forward. ``register_autograd`` refuses mutating ops,
  so its gradient comes from ``LinearBNActFunction``, an ``autograd.Function``
  that calls the forward op and the ``linear_bn_act_backward`` op.

Backward ops recompute the dropout mask from ``(seed, offset)`` and the
activation derivative from saved tensors; no mask is ever stored.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op, register_fake

from . import checks as _checks
from . import dispatch as backend


def _impl(function: str, x: Tensor):
    return backend.get(function, x.device)


def _eager(*tensors: Tensor) -> bool:
    """Whether an autograd.Function may call the op's body directly.

    The custom-op round trip (Python -> dispatcher -> Python) costs tens of
    microseconds per call, as much as the fused kernels of a small layer on
    the CPU. In plain eager code on plain tensors the body (same checks, same
    backend) runs directly; under torch.compile, or on fake, meta or subclass
    tensors, the registered op is called.
    """
    if torch.compiler.is_compiling():
        return False
    return all(type(t) is Tensor and t.device.type != "meta" for t in tensors)


# ------------------------------------------------------------------ linear_bn_act
@custom_op("fastgan::linear_bn_act",
           mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def linear_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Tensor,
                  bn_bias: Tensor, running_mean: Tensor, running_var: Tensor,
                  num_batches_tracked: Tensor, training: bool, momentum: Optional[float],
                  eps: float, activation: str, negative_slope: float, p: float, seed: Tensor,
                  offset: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = dropout(act(BN(x @ W.T + b))); returns (y, h, mean, rstd), see reference."""
    return _linear_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                          num_batches_tracked, training, momentum, eps, activation,
                          negative_slope, p, seed, offset)


def _linear_bn_act(*args):
    _checks.linear_bn_act(*args)
    return _impl("linear_bn_act_forward", args[0])(*args)


@register_fake("fastgan::linear_bn_act")
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
      training, momentum, eps, activation, negative_slope, p, seed, offset):
    _checks.linear_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                          num_batches_tracked, training, momentum, eps, activation,
                          negative_slope, p, seed, offset)
    b, n = x.shape[0], weight.shape[0]
    stat = x.new_empty(n, dtype=bn_weight.dtype)
    return x.new_empty(b, n), x.new_empty(b, n), stat, torch.empty_like(stat)


@custom_op("fastgan::linear_bn_act_backward", mutates_args=())
def linear_bn_act_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bn_weight: Tensor,
                           bn_bias: Tensor, h: Tensor, mean: Tensor, rstd: Tensor,
                           training: bool, activation: str, negative_slope: float, p: float,
                           seed: Tensor, offset: Tensor, compute_dx: bool
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dW, db, dgamma, dbeta); dx is empty unless compute_dx."""
    return _linear_bn_act_backward(grad_y, x, weight, bn_weight, bn_bias, h, mean, rstd,
                                   training, activation, negative_slope, p, seed, offset,
                                   compute_dx)


def _linear_bn_act_backward(grad_y, *args):
    # autograd may hand us an expanded or strided gradient
    return _impl("linear_bn_act_backward", args[0])(grad_y.contiguous(), *args)


@register_fake("fastgan::linear_bn_act_backward")
def _(grad_y, x, weight, bn_weight, bn_bias, h, mean, rstd, training, activation,
      negative_slope, p, seed, offset, compute_dx):
    n = weight.shape[0]
    dx = torch.empty_like(x) if compute_dx else x.new_empty(0)
    return (dx, torch.empty_like(weight), x.new_empty(n),
            torch.empty_like(bn_weight), torch.empty_like(bn_bias))


class LinearBNActFunction(torch.autograd.Function):
    """Autograd for the mutating ``linear_bn_act`` op (see module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                num_batches_tracked, training, momentum, eps, activation, negative_slope, p,
                seed, offset):
        fwd = _linear_bn_act if _eager(x, weight) else torch.ops.fastgan.linear_bn_act
        y, h, mean, rstd = fwd(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                               num_batches_tracked, training, momentum, eps, activation,
                               negative_slope, p, seed, offset)
        ctx.save_for_backward(x, weight, bn_weight, bn_bias, h, mean, rstd, seed, offset)
        ctx.hyper = (training, activation, negative_slope, p)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bn_weight, bn_bias, h, mean, rstd, seed, offset = ctx.saved_tensors
        training, activation, negative_slope, p = ctx.hyper
        bwd = (_linear_bn_act_backward if _eager(grad_y, x)
               else torch.ops.fastgan.linear_bn_act_backward)
        dx, dw, db, dgamma, dbeta = bwd(grad_y, x, weight, bn_weight, bn_bias, h, mean, rstd,
                                        training, activation, negative_slope, p, seed, offset,
                                        ctx.needs_input_grad[0])
        return ((dx if ctx.needs_input_grad[0] else None), dw, (db if ctx.has_bias else None),
                dgamma, dbeta) + (None,) * 11


# ------------------------------------------------------------------ linear_act
@custom_op("fastgan::linear_act", mutates_args=())
def linear_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
               negative_slope: float, p: float, seed: Tensor, offset: Tensor) -> Tensor:
    """y = dropout(act(x @ W.T + b))."""
    return _linear_act(x, weight, bias, activation, negative_slope, p, seed, offset)


def _linear_act(x, weight, bias, activation, negative_slope, p, seed, offset):
    _checks.linear(x, weight, bias, seed, offset)
    _checks.hyper(activation, negative_slope, p)
    return _impl("linear_act_forward", x)(x, weight, bias, activation, negative_slope, p,
                                          seed, offset)


@register_fake("fastgan::linear_act")
def _(x, weight, bias, activation, negative_slope, p, seed, offset):
    _checks.linear(x, weight, bias, seed, offset)
    _checks.hyper(activation, negative_slope, p)
    return x.new_empty(x.shape[0], weight.shape[0])


@custom_op("fastgan::linear_act_backward", mutates_args=())
def linear_act_backward(grad_y: Tensor, x: Tensor, weight: Tensor, y: Tensor, activation: str,
                        negative_slope: float, p: float, seed: Tensor, offset: Tensor,
                        compute_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dW, db); dx is empty unless compute_dx."""
    return _linear_act_backward_body(grad_y, x, weight, y, activation, negative_slope, p, seed,
                                     offset, compute_dx)


def _linear_act_backward_body(grad_y, *args):
    return _impl("linear_act_backward", args[0])(grad_y.contiguous(), *args)


@register_fake("fastgan::linear_act_backward")
def _(grad_y, x, weight, y, activation, negative_slope, p, seed, offset, compute_dx):
    dx = torch.empty_like(x) if compute_dx else x.new_empty(0)
    return dx, torch.empty_like(weight), x.new_empty(weight.shape[0])


def _linear_act_setup(ctx, inputs, output):
    x, weight, bias, activation, negative_slope, p, seed, offset = inputs
    ctx.save_for_backward(x, weight, output, seed, offset)
    ctx.hyper = (activation, negative_slope, p)
    ctx.has_bias = bias is not None


def _linear_act_backward(ctx, grad_y):
    x, weight, y, seed, offset = ctx.saved_tensors
    activation, negative_slope, p = ctx.hyper
    bwd = (_linear_act_backward_body if _eager(grad_y, x)
           else torch.ops.fastgan.linear_act_backward)
    dx, dw, db = bwd(
        grad_y, x, weight, y, activation, negative_slope, p, seed, offset,
        ctx.needs_input_grad[0])
    return ((dx if ctx.needs_input_grad[0] else None), dw, (db if ctx.has_bias else None),
            None, None, None, None, None)


linear_act.register_autograd(_linear_act_backward, setup_context=_linear_act_setup)


class LinearActFunction(torch.autograd.Function):
    """The eager fast path of ``linear_act`` (see ``_eager``): the same body,
    setup and backward as the registered op, without the dispatcher round trip."""

    @staticmethod
    def forward(ctx, *inputs):
        y = _linear_act(*inputs)
        _linear_act_setup(ctx, inputs, y)
        return y

    backward = staticmethod(_linear_act_backward)


# ------------------------------------------------------------------ gan_bce
@custom_op("fastgan::gan_bce", mutates_args=())
def gan_bce(logits_a: Tensor, logits_b: Optional[Tensor], target_a: float, target_b: float
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """mean BCE(a, target_a) [+ mean BCE(b, target_b)] from logits; returns
    (loss, mean sigmoid(a), mean sigmoid(b), dloss/da, dloss/db)."""
    _checks.gan_bce(logits_a, logits_b, target_a, target_b)
    return _impl("gan_bce_forward", logits_a)(logits_a.contiguous(),
                                              None if logits_b is None else logits_b.contiguous(),
                                              target_a, target_b)


@register_fake("fastgan::gan_bce")
def _(logits_a, logits_b, target_a, target_b):
    _checks.gan_bce(logits_a, logits_b, target_a, target_b)
    scalar = logits_a.new_empty((), dtype=torch.float64 if logits_a.dtype == torch.float64
                                else torch.float32)
    grad_b = logits_a.new_empty(0) if logits_b is None else torch.empty_like(logits_b)
    return (scalar, torch.empty_like(scalar), torch.empty_like(scalar),
            torch.empty_like(logits_a), grad_b)


def _gan_bce_setup(ctx, inputs, output):
    ctx.has_b = inputs[1] is not None
    ctx.save_for_backward(output[3], output[4])


def _gan_bce_backward(ctx, grad_loss, *_unused):
    # The loss's gradient was computed by the forward pass; only scale it.
    # The mean probabilities are diagnostics: no gradient flows through them.
    grad_a, grad_b = ctx.saved_tensors
    da = grad_a * grad_loss.to(grad_a.dtype)
    db = grad_b * grad_loss.to(grad_b.dtype) if ctx.has_b else None
    return da, db, None, None


gan_bce.register_autograd(_gan_bce_backward, setup_context=_gan_bce_setup)
