"""The public functional forms of the fused ops (``fastgan.functional``).

Each calls its op's ``autograd.Function`` (``<Op>Function.call``,
``fastgan.ops.registry``): it differentiates, compiles with ``torch.compile(fullgraph=True)``, and in plain
eager code skips the dispatcher round trip. Arguments are checked once, at the
op boundary (``fastgan.ops.checks``).

For dropout the ops need a ``(seed, offset)`` pair of 1-element int64 tensors
on the input's device. Pass them explicitly to control the masks; when
omitted, a seed is drawn from torch's default generator of the input's device
(as ``F.dropout`` draws its mask, so ``torch.manual_seed`` governs it), by a
device op that reads nothing on the host.

Every op differentiates twice (gradient penalties): see ``fastgan.ops.registry``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import checks
from .registry import GanBCEFunction, LinearActFunction, LinearBNActFunction


def _rng(x: Tensor, seed: Optional[Tensor], offset: Optional[Tensor], p: float):
    # A non-tensor x is left for the op's check to report.
    device = x.device if isinstance(x, Tensor) else None
    if seed is None:
        if p > 0:
            seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
        else:
            seed = torch.zeros(1, dtype=torch.int64, device=device)
    if offset is None:
        offset = torch.zeros(1, dtype=torch.int64, device=device)
    return seed, offset


def linear_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Tensor,
                  bn_bias: Tensor, running_mean: Tensor, running_var: Tensor,
                  num_batches_tracked: Tensor, training: bool = True,
                  momentum: Optional[float] = 0.1, eps: float = 1e-5,
                  activation: str = "leaky_relu", negative_slope: float = 0.2,
                  dropout: float = 0.0, seed: Optional[Tensor] = None,
                  offset: Optional[Tensor] = None) -> Tensor:
    """dropout(act(batch_norm(linear(x)))) in one fused op.

    In training the running statistics are updated in place like
    ``nn.BatchNorm1d``; dropout is applied only in training.
    """
    p = float(dropout) if training else 0.0
    seed, offset = _rng(x, seed, offset, p)
    return LinearBNActFunction.call(x, weight, bias, bn_weight, bn_bias, running_mean,
                                    running_var, num_batches_tracked, bool(training), momentum,
                                    float(eps), activation, float(negative_slope), p, seed,
                                    offset)


def linear_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
               activation: str = "leaky_relu", negative_slope: float = 0.2,
               dropout: float = 0.0, training: bool = True, seed: Optional[Tensor] = None,
               offset: Optional[Tensor] = None) -> Tensor:
    """dropout(act(linear(x))) in one fused op; dropout only in training."""
    p = float(dropout) if training else 0.0
    seed, offset = _rng(x, seed, offset, p)
    return LinearActFunction.call(x, weight, bias, activation, float(negative_slope), p, seed,
                                  offset)


class DLoss(NamedTuple):
    loss: Tensor     # BCE(D(x), 1 - smoothing) + BCE(D(G(z)), 0): the SUM of the two, fp32
    d_real: Tensor   # mean sigmoid(real_logits): mean D(x)
    d_fake: Tensor   # mean sigmoid(fake_logits): mean D(G(z))


class GLoss(NamedTuple):
    loss: Tensor     # non-saturating BCE(D(G(z)), 1), fp32 scalar
    d_fake: Tensor   # mean D(G(z))


def gan_bce_d(real_logits: Tensor, fake_logits: Tensor, smoothing: float = 0.0) -> DLoss:
    """Discriminator loss from **logits**, with optional one-sided label smoothing.

    ``loss = mean BCE(real_logits, 1 - smoothing) + mean BCE(fake_logits, 0)``:
    the **sum** of the real and the fake term, as the seed GAN (the MLP GAN of
    ``fastgan.nn.models``) computes it. Many GAN codes average the two
    (``0.5 * (real + fake)``, e.g. PyTorch-GAN); for those, use ``0.5 * loss``
    (or halve the discriminator's learning rate under plain SGD) to keep their
    numbers. The logits are the discriminator's output *before* any sigmoid,
    what ``F.binary_cross_entropy_with_logits`` takes: a sigmoid's output is
    refused (ValueError) when the autograd graph shows it; logits that happen
    to lie in [0, 1] are legal and cannot be told apart, so a discriminator
    that ends in ``nn.Sigmoid`` under ``torch.no_grad`` goes unnoticed.
    """
    checks.logits(real_logits, "real_logits")
    checks.logits(fake_logits, "fake_logits")
    loss, d_real, d_fake = GanBCEFunction.call(real_logits, fake_logits, 1.0 - float(smoothing),
                                               0.0)
    return DLoss(loss, d_real.detach(), d_fake.detach())


def gan_bce_g(fake_logits: Tensor) -> GLoss:
    """Generator's non-saturating loss ``mean BCE(fake_logits, 1)`` from the
    discriminator's **logits** on fakes (refused if they are a sigmoid's output,
    as in ``gan_bce_d``)."""
    checks.logits(fake_logits, "fake_logits")
    loss, d_fake, _ = GanBCEFunction.call(fake_logits, None, 1.0, 0.0)
    return GLoss(loss, d_fake.detach())
