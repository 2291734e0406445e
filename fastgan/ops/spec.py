"""The facts every layer of fastgan reads: the activation table and the op table.

Activations
-----------
One row per activation, in the manner of a spec table: its integer ``code``
(what the C++/CUDA and Triton kernels switch on), its torch function, its
derivative (from the pre-activation ``z``, and from the output ``a`` where
that is possible), the ``nn`` module it stands for, the functional calls
``fastgan.fuse`` recognises in a traced forward, and whether it is
positively homogeneous (``act(c * z) == c * act(z)`` for ``c > 0``, so
dropout's scaling commutes with it and ``Dropout -> act`` equals
``act -> Dropout``).

Adding an activation: one row here, then one ``case`` in each kernel's
switch (``csrc/activation.h``, ``kernels/common.py``). ``tests/ops/test_spec.py``
checks the rows against autograd and each other; ``tests/impl/test_csrc_spec.py``
checks the C++ codes against this table (the Triton kernels read them from it).
See docs/adding_an_op.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _leaky_relu_grad(t: Tensor, slope: float) -> Tensor:
    # The slope is kept in t's dtype (fp64 for gradcheck): torch.where with a
    # Python float would round it through fp32.
    return torch.where(t > 0, torch.ones_like(t), torch.full_like(t, slope))


def _tanh_grad(z: Tensor, slope: float) -> Tensor:
    t = torch.tanh(z)
    return 1.0 - t * t


@dataclass(frozen=True)
class Activation:
    name: str
    code: int
    fn: Callable[[Tensor, float], Tensor]                  # (z, slope) -> act(z)
    grad: Callable[[Tensor, float], Tensor]                # (z, slope) -> act'(z)
    grad_from_output: Optional[Callable[[Tensor, float], Tensor]]  # (a, slope) -> act'(z)
    module: type                                           # the nn class it stands for
    make_module: Callable[[float], nn.Module]              # slope -> module
    slope_of: Callable[[nn.Module], float]                 # module -> slope (0 if none)
    # Functional targets fuse matches in a traced forward -> their default slope.
    functions: dict = field(default_factory=dict)
    methods: tuple = ()                                    # Tensor methods fuse matches
    positively_homogeneous: bool = False
    has_slope: bool = False


ACTIVATION_TABLE: tuple[Activation, ...] = (
    Activation("identity", 0,
               fn=lambda z, s: z,
               grad=lambda z, s: torch.ones_like(z),
               grad_from_output=lambda a, s: torch.ones_like(a),
               module=nn.Identity, make_module=lambda s: nn.Identity(),
               slope_of=lambda m: 0.0, positively_homogeneous=True),
    Activation("relu", 1,
               fn=lambda z, s: torch.relu(z),
               grad=lambda z, s: (z > 0).to(z.dtype),
               grad_from_output=lambda a, s: (a > 0).to(a.dtype),
               module=nn.ReLU, make_module=lambda s: nn.ReLU(),
               slope_of=lambda m: 0.0,
               functions={F.relu: 0.0, torch.relu: 0.0}, methods=("relu",),
               positively_homogeneous=True),
    Activation("leaky_relu", 2,
               fn=lambda z, s: F.leaky_relu(z, s),
               grad=_leaky_relu_grad,
               grad_from_output=_leaky_relu_grad,   # valid for slope >= 0 (sign kept)
               module=nn.LeakyReLU, make_module=lambda s: nn.LeakyReLU(s),
               slope_of=lambda m: float(m.negative_slope),
               functions={F.leaky_relu: 0.01},
               positively_homogeneous=True, has_slope=True),
    Activation("tanh", 3,
               fn=lambda z, s: torch.tanh(z),
               grad=_tanh_grad,
               grad_from_output=lambda a, s: 1.0 - a * a,
               module=nn.Tanh, make_module=lambda s: nn.Tanh(),
               slope_of=lambda m: 0.0,
               functions={torch.tanh: 0.0, F.tanh: 0.0}, methods=("tanh",)),
)

ACTIVATION = {a.name: a for a in ACTIVATION_TABLE}
# name -> integer code, the view the kernel adapters pass to C++ and Triton.
ACTIVATIONS = {a.name: a.code for a in ACTIVATION_TABLE}
ACTIVATION_NAMES = {a.code: a.name for a in ACTIVATION_TABLE}  # (C++ passes codes)


def activation(name: str) -> Activation:
    """The row of ``name``; ValueError naming the argument otherwise."""
    row = ACTIVATION.get(name) if isinstance(name, str) else None
    if row is None:
        raise ValueError(f"activation must be one of {sorted(ACTIVATION)}, got {name!r}")
    return row


def activation_of_module(module: nn.Module) -> Optional[Activation]:
    """The row whose ``nn`` class is exactly ``type(module)``, or None."""
    return next((a for a in ACTIVATION_TABLE if type(module) is a.module), None)


# The ops and the functions every backend module defines for them.
OPS = {
    "linear_bn_act": ("linear_bn_act_forward", "linear_bn_act_backward"),
    "linear_act": ("linear_act_forward", "linear_act_backward"),
    "gan_bce": ("gan_bce_forward",),
}
BACKEND_FUNCTIONS = tuple(f for fns in OPS.values() for f in fns)


def dropout_scale(p: float) -> float:
    """The float32 factor kept values are multiplied by (inverted dropout)."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def acc_dtype(x: Tensor) -> torch.dtype:
    """Dtype of statistics and epilogue math: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
