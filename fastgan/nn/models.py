"""The seed GAN: the MLP GAN of a TensorFlow tutorial this package grew from.

``fused=True`` builds it from fastgan's fused layers; ``fused=False`` builds
the plain-PyTorch reference. Both have identical ``state_dict`` keys
(``net.<i>.<j>.*``), so a checkpoint of one loads into the other.

The fused ``Discriminator`` also runs the simultaneous train step's backward
in one sweep (``Discriminator.forward(x, ghost=...)``, ``GhostRows``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops import dispatch
from ..ops import functional as FG
from ..ops.registry import LinearActFunction
from .layers import (LinearAct, LinearBNAct, autocast_inputs, linear_act_sequential,
                     linear_bn_act_sequential)


class Generator(nn.Module):
    """z(latent_dim) -> [Linear, BatchNorm1d, LeakyReLU, Dropout] x len(hidden) -> Linear -> tanh.

    ``eps``/``momentum`` are the BatchNorm1d's (PyTorch's convention)."""

    def __init__(self, latent_dim: int = 100, hidden=(256, 512, 1024), out_dim: int = 784,
                 dropout: float = 0.2, negative_slope: float = 0.2, fused: bool = True,
                 eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.latent_dim, self.out_dim, self.fused = latent_dim, out_dim, fused
        block = LinearBNAct if fused else linear_bn_act_sequential
        head = LinearAct if fused else linear_act_sequential
        layers, d = [], latent_dim
        for h in hidden:
            layers.append(block(d, h, eps=eps, momentum=momentum, negative_slope=negative_slope,
                                dropout=dropout))
            d = h
        layers.append(head(d, out_dim, activation="tanh"))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    """x(in_dim) -> [Linear, LeakyReLU, Dropout] x len(hidden) -> Linear -> one logit.

    ``forward(x, ghost=g)`` (fused only) is the simultaneous step's D: ``g``
    holds the same values as the first ``len(g)`` rows of ``x`` with their own
    autograd history. D runs once, on ``x``; it returns ``(logits of x,
    logits of the ghost rows)``, and in backward the gradient reaching the
    ghost logits flows down to ``g``'s inputs only: D's weights get their
    gradient from ``x``'s logits alone. See ``GhostRows``.
    """

    def __init__(self, in_dim: int = 784, hidden=(1024, 512, 256), dropout: float = 0.2,
                 negative_slope: float = 0.2, fused: bool = True):
        super().__init__()
        self.in_dim, self.fused = in_dim, fused
        block = LinearAct if fused else linear_act_sequential
        layers, d = [], in_dim
        for h in hidden:
            layers.append(block(d, h, negative_slope=negative_slope, dropout=dropout))
            d = h
        layers.append(block(d, 1, activation="identity"))
        self.net = nn.Sequential(*layers)

    @property
    def supports_ghost(self) -> bool:
        """Whether ``forward(x, ghost=...)`` runs (every layer a fused LinearAct)."""
        return all(isinstance(m, LinearAct) for m in self.net)

    def forward(self, x: Tensor, ghost: Optional[Tensor] = None):
        x = x.flatten(1)
        if ghost is None:
            return self.net(x)
        if not self.supports_ghost:
            raise ValueError("ghost: only a Discriminator of fused LinearAct layers takes "
                             "ghost rows (build it with fused=True)")
        ghost = ghost.flatten(1)
        if ghost.shape[0] > x.shape[0] or ghost.shape[1:] != x.shape[1:]:
            raise ValueError(f"ghost: expected at most {x.shape[0]} rows of {x.shape[1]} "
                             f"values (the first rows of x), got shape {tuple(ghost.shape)}")
        for layer in self.net:
            x, ghost = ghost_linear_act(layer, x, ghost)
        return x, ghost


def ghost_linear_act(layer: LinearAct, x: Tensor, ghost: Tensor) -> tuple[Tensor, Tensor]:
    """One ``LinearAct`` over ``x`` plus ghost rows: the layer's own op on ``x``
    (its dropout key drawn once, as its ordinary forward does), and
    ``GhostRows`` for the ghost rows."""
    a = layer.op_inputs(x)
    y = FG.linear_act(a.x, a.weight, a.bias, a.activation, a.negative_slope, a.p, True, a.seed,
                      a.offset)
    ghost = autocast_inputs(ghost, layer[0].weight, layer[0].bias)[0]
    return y, GhostRows.apply(ghost, y.detach(), a.weight.detach(), a.activation,
                              a.negative_slope, a.p, a.seed, a.offset)


class GhostRows(torch.autograd.Function):
    """The ghost rows of one fused LinearAct: ``y``'s first ``len(ghost)`` rows
    forward (their input equals ``x``'s first rows, so their output is ``y``'s);
    in backward, the gradient reaching them goes to ``ghost`` only.

    The layer's x rows differentiate through the op itself, and autograd runs
    this node in the same sweep, at the same layer. Because the ghost rows are
    rows ``0 .. n-1`` of the op's output, the op's own backward kernel on those
    rows (``linear_act_backward`` with ``compute_dw=False``, on the backend the
    forward ran on) recomputes exactly their dropout mask (element ``i * N +
    j`` of the forward's ``(seed, offset)``) and the activation's derivative
    from ``y``, and forms ``dX = dz @ W``: no forward runs again and no ``dW``
    is formed for the ghost rows. (That is why the simultaneous step puts the
    fakes first in D's batch.)
    """

    @staticmethod
    def forward(ctx, ghost, y, weight, activation, negative_slope, p, seed, offset):
        n = ghost.shape[0]
        ctx.save_for_backward(ghost, y[:n], weight, seed, offset)
        ctx.hyper = (activation, negative_slope, p)
        ctx.backend = dispatch.forced()   # backward runs where the forward ran (registry)
        return y[:n].clone()

    @staticmethod
    def backward(ctx, gg):
        if torch.is_grad_enabled():  # create_graph: this formula holds no graph of y, W
            raise RuntimeError("the ghost rows of the simultaneous step cannot be "
                               "differentiated twice (gradient penalty); call the "
                               "Discriminator without ghost=")
        ghost, y, weight, seed, offset = ctx.saved_tensors
        activation, slope, p = ctx.hyper
        dx = ghost_dx(gg, ghost, weight, y, activation, slope, p, seed, offset, ctx.backend)
        return (dx,) + (None,) * 7


def ghost_dx(grad: Tensor, x: Tensor, weight: Tensor, y: Tensor, activation: str,
             negative_slope: float, p: float, seed: Tensor, offset: Tensor,
             backend: Optional[str]) -> Tensor:
    """The input gradient of the first ``len(grad)`` rows of a ``LinearAct`` op
    (``x``, ``y``: those rows of its input and output) from ``grad``, with no
    weight gradient: the op's own backward kernel, on the backend its forward
    ran on. The ghost rows' backward (``GhostRows``, ``fastgan.train.tape``)."""
    dx, _, _ = LinearActFunction.backward_call(grad, x, weight, y, activation, negative_slope,
                                               p, seed, offset, True, False, backend or "")
    return dx


def keras_init_(model: nn.Module) -> nn.Module:
    """Keras ``Dense``'s initialisation for every ``nn.Linear`` of ``model``:
    Glorot-uniform weights (``U(+-sqrt(6 / (fan_in + fan_out)))``), zero biases.
    In place; draws from torch's default generator; returns ``model``."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
    return model
