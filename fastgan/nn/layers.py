"""Fused layers that drop into existing models.

``LinearBNAct`` *is* an ``nn.Sequential(Linear, BatchNorm1d, act, Dropout)``
whose forward runs the fused op with its children's parameters and
hyper-parameters. So its ``state_dict`` keys, printing and indexing are those of
the plain Sequential, weights load both ways, and ``unfuse`` only has to
change the class. ``LinearAct`` is the same without the BatchNorm1d.

Dropout randomness: each layer holds a non-persistent ``dropout_rng`` buffer
``[seed, counter]`` (int64, on the layer's device, not in the state_dict).
Every training forward uses ``(seed, counter)`` and advances the counter on the
device, so a CUDA graph replay draws a fresh mask with no host involvement.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..ops import functional as FG
from ..ops import spec

_instances = itertools.count()


def activation_module(activation: str, negative_slope: float = 0.2) -> nn.Module:
    """The ``nn`` module of an activation of ``fastgan.ops.spec.ACTIVATION_TABLE``."""
    return spec.activation(activation).make_module(negative_slope)


def activation_of(module: nn.Module) -> tuple[str, float]:
    """(name, negative_slope) of an activation module; ValueError if not fusable."""
    row = spec.activation_of_module(module)
    if row is None:
        raise ValueError(f"{type(module).__name__} is not a fusable activation")
    return row.name, row.slope_of(module)


def _new_rng_state(device=None) -> Tensor:
    # Draw the seed without consuming torch's default generator, so building a
    # fused model leaves the same RNG state (and weights) as the plain one; the
    # instance counter keeps layers of one model on different streams.
    with torch.random.fork_rng(devices=[]):
        seed = int(torch.randint(0, 2**61, (1,)))
    seed = (seed + next(_instances) * 0x9E3779B97F4A7C15) % 2**62
    return torch.tensor([seed, 0], dtype=torch.int64, device=device)


def _next_key(state: Tensor) -> tuple[Tensor, Tensor]:
    # Copies, not views: autograd saves them for backward, and a later forward's
    # in-place advance of the buffer must not invalidate an earlier graph.
    seed, offset = state[:1].clone(), state[1:].clone()
    state[1:].add_(1)
    return seed, offset


def autocast_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """``(x, weight, bias)`` in the autocast dtype while autocast is on for ``x``'s
    device, as they are otherwise: the fused ops take one dtype for all three and
    are not autocast-aware themselves."""
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        return x.to(dt), weight.to(dt), (None if bias is None else bias.to(dt))
    return x, weight, bias


class FusedInputs(NamedTuple):
    """What a fused layer's training or eval forward hands its op, besides the
    BatchNorm1d's tensors (``_Fused.op_inputs``)."""
    x: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    activation: str
    negative_slope: float
    p: float          # dropout probability of this forward (0 in eval)
    seed: Tensor
    offset: Tensor


def linear_bn_act_sequential(in_features, out_features, bias=True, eps=1e-5, momentum=0.1,
                             activation="leaky_relu", negative_slope=0.2, dropout=0.0,
                             device=None, dtype=None) -> nn.Sequential:
    """The plain-PyTorch block ``LinearBNAct`` fuses (the reference)."""
    kw = dict(device=device, dtype=dtype)
    return nn.Sequential(nn.Linear(in_features, out_features, bias=bias, **kw),
                         nn.BatchNorm1d(out_features, eps=eps, momentum=momentum, device=device),
                         activation_module(activation, negative_slope), nn.Dropout(dropout))


def linear_act_sequential(in_features, out_features, bias=True, activation="leaky_relu",
                          negative_slope=0.2, dropout=0.0, device=None,
                          dtype=None) -> nn.Sequential:
    """The plain-PyTorch block ``LinearAct`` fuses (the reference)."""
    layers = [nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype),
              activation_module(activation, negative_slope)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class _Fused(nn.Sequential):
    act_index = 1   # position of the activation child (after the Linear [and BatchNorm1d])

    def __init__(self, *layers: nn.Module):
        super().__init__(*layers)
        self.register_buffer("dropout_rng", _new_rng_state(layers[0].weight.device),
                             persistent=False)

    @classmethod
    def from_sequential(cls, seq: nn.Sequential) -> "_Fused":
        """Wrap the children of an equivalent plain Sequential (shares its tensors)."""
        fused = cls.__new__(cls)
        _Fused.__init__(fused, *seq)
        fused._validate()
        return fused

    def to_sequential(self) -> nn.Sequential:
        """The plain-PyTorch equivalent, sharing this layer's parameters."""
        return nn.Sequential(*self)

    def activation(self) -> tuple[str, float]:
        """(name, negative_slope) of the activation child."""
        return activation_of(self[self.act_index])

    def dropout_p(self) -> float:
        """The dropout probability of a forward now: the Dropout child's in training, else 0."""
        last = self[-1]
        return float(last.p) if isinstance(last, nn.Dropout) and self.training else 0.0

    def dropout_key(self, p: float) -> tuple[Tensor, Tensor]:
        """(seed, offset) of the next dropout mask; advances the stream when ``p > 0``."""
        if p > 0:
            return _next_key(self.dropout_rng)
        return self.dropout_rng[:1].clone(), self.dropout_rng[1:].clone()  # unused by the kernels

    def op_inputs(self, x: Tensor) -> FusedInputs:
        """The arguments of this forward's op call (draws the dropout key, so call
        it once per forward)."""
        lin = self[0]
        activation, slope = self.activation()
        x, weight, bias = autocast_inputs(x, lin.weight, lin.bias)
        p = self.dropout_p()
        seed, offset = self.dropout_key(p)
        return FusedInputs(x, weight, bias, activation, slope, p, seed, offset)

    def seed_dropout(self, seed: int) -> None:
        """Restart this layer's dropout stream at ``seed``."""
        self.dropout_rng.copy_(torch.tensor([seed % 2**62, 0], dtype=torch.int64))


class LinearBNAct(_Fused):
    """Fused Linear -> BatchNorm1d -> activation -> Dropout.

    Children ``0`` Linear, ``1`` BatchNorm1d (kept in fp32), ``2`` activation,
    ``3`` Dropout, exactly as ``linear_bn_act_sequential`` builds them.
    """

    act_index = 2

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 eps: float = 1e-5, momentum: float | None = 0.1,
                 activation: str = "leaky_relu", negative_slope: float = 0.2,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__(*linear_bn_act_sequential(in_features, out_features, bias, eps,
                                                   momentum, activation, negative_slope,
                                                   dropout, device, dtype))
        self._validate()

    def _validate(self):
        lin, bn, _, drop = self  # raises ValueError if the shape of the block differs
        if not (isinstance(lin, nn.Linear) and type(bn) is nn.BatchNorm1d
                and type(drop) is nn.Dropout):
            raise ValueError("LinearBNAct needs children (Linear, BatchNorm1d, activation, Dropout)")
        self.activation()  # ValueError if the activation is not fusable
        if not (bn.affine and bn.track_running_stats):
            raise ValueError("LinearBNAct needs BatchNorm1d(affine=True, track_running_stats=True)")

    def _apply(self, fn, recurse=True):
        # BN parameters and running statistics stay fp32 whatever dtype the
        # Linear is cast to: the kernels keep statistics in fp32.
        super()._apply(fn, recurse)
        bn = self[1]
        if bn.weight.dtype != torch.float32:
            bn.float()
        return self

    # Cross-process batch statistics: fastgan.distributed.convert_sync_batchnorm
    # sets a callable (layer, x) -> y that runs training forwards while active().
    sync_stats = None

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.sync_stats is not None and self.sync_stats.active():
            return self.sync_stats(self, x)
        a, bn = self.op_inputs(x), self[1]
        return FG.linear_bn_act(a.x, a.weight, a.bias, bn.weight, bn.bias, bn.running_mean,
                                bn.running_var, bn.num_batches_tracked, self.training,
                                bn.momentum, bn.eps, a.activation, a.negative_slope, a.p,
                                a.seed, a.offset)


class LinearAct(_Fused):
    """Fused Linear -> activation (-> Dropout): children ``0`` Linear, ``1``
    activation and, when ``dropout > 0``, ``2`` Dropout."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str = "leaky_relu", negative_slope: float = 0.2,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__(*linear_act_sequential(in_features, out_features, bias, activation,
                                                negative_slope, dropout, device, dtype))
        self._validate()

    def _validate(self):
        if len(self) not in (2, 3) or not isinstance(self[0], nn.Linear):
            raise ValueError("LinearAct needs children (Linear, activation[, Dropout])")
        self.activation()  # ValueError if the activation is not fusable
        if len(self) == 3 and type(self[2]) is not nn.Dropout:
            raise ValueError("LinearAct's third child must be nn.Dropout")

    def forward(self, x: Tensor) -> Tensor:
        a = self.op_inputs(x)
        return FG.linear_act(a.x, a.weight, a.bias, a.activation, a.negative_slope, a.p, True,
                             a.seed, a.offset)


def seed_dropout(model: nn.Module, seed: int) -> None:
    """Give every fused layer of ``model`` its own dropout stream derived from ``seed``."""
    for i, m in enumerate(m for m in model.modules() if isinstance(m, _Fused)):
        m.seed_dropout(seed * 1_000_003 + i)


def dropout_rng_state(model: nn.Module) -> list[Tensor]:
    """The dropout RNG buffers of ``model``'s fused layers (for checkpoints)."""
    return [m.dropout_rng.detach().cpu().clone() for m in model.modules() if isinstance(m, _Fused)]


def set_dropout_rng_state(model: nn.Module, states: list[Tensor]) -> None:
    layers = [m for m in model.modules() if isinstance(m, _Fused)]
    if len(layers) != len(states):
        raise ValueError(f"dropout RNG state has {len(states)} entries, model has {len(layers)} fused layers")
    for m, s in zip(layers, states):
        m.dropout_rng.copy_(s)
