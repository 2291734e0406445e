"""The ``cpu`` backend: C++ kernels of the extension ``fastgan._C`` (csrc/cpu).

The extension registers its kernels as ``torch.ops.fastgan_C.<function>``
(schemas in csrc/ops.cpp, CPU kernels in csrc/cpu/<op>.cpp, CUDA kernels in
csrc/cuda/<op>.cu). This module adapts the backend contract of
``fastgan.impl.reference`` to them: activation names become the integer codes
of ``fastgan.ops.spec.ACTIVATIONS`` (csrc/activation.h) and inputs are made
contiguous. Arguments arrive checked (``fastgan.ops.checks``); the C++ entries
check again only what protects memory (csrc/checks.h).
"""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (ImportError = extension not built; ops.dispatch reports it)
from ..ops.spec import ACTIVATIONS

name = "cpu"
_DEVICE_KEY = "CPU"
_FUNCTIONS = ("linear_bn_act_forward", "linear_bn_act_backward", "linear_act_forward",
              "linear_act_backward", "gan_bce_forward")


def registered(dispatch_key: str) -> dict[str, bool]:
    """For each C++ function, whether a kernel is registered for ``dispatch_key``."""
    return {f: torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgan_C::{f}", dispatch_key)
            for f in _FUNCTIONS}


def available() -> tuple[bool, str]:
    missing = [f for f, ok in registered(_DEVICE_KEY).items() if not ok]
    if missing:
        return False, f"fastgan._C has no {_DEVICE_KEY} kernel for {missing}"
    return True, f"C++ kernels (fastgan._C, {_DEVICE_KEY})"


def supports(device: torch.device) -> bool:
    return device.type == "cpu"


def _c(t):
    return None if t is None else t.contiguous()


def linear_bn_act_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                          num_batches_tracked, training, momentum, eps, activation,
                          negative_slope, p, seed, offset):
    return torch.ops.fastgan_C.linear_bn_act_forward(
        _c(x), _c(weight), _c(bias), _c(bn_weight), _c(bn_bias), running_mean, running_var,
        num_batches_tracked, training, momentum, eps, ACTIVATIONS[activation], negative_slope,
        p, seed, offset)


def linear_bn_act_backward(grad_y, x, weight, bn_weight, bn_bias, h, mean, rstd, training,
                           activation, negative_slope, p, seed, offset, compute_dx):
    return torch.ops.fastgan_C.linear_bn_act_backward(
        _c(grad_y), _c(x), _c(weight), _c(bn_weight), _c(bn_bias), _c(h), _c(mean), _c(rstd),
        training, ACTIVATIONS[activation], negative_slope, p, seed, offset, compute_dx)


def linear_act_forward(x, weight, bias, activation, negative_slope, p, seed, offset):
    return torch.ops.fastgan_C.linear_act_forward(
        _c(x), _c(weight), _c(bias), ACTIVATIONS[activation], negative_slope, p, seed, offset)


def linear_act_backward(grad_y, x, weight, y, activation, negative_slope, p, seed, offset,
                        compute_dx):
    return torch.ops.fastgan_C.linear_act_backward(
        _c(grad_y), _c(x), _c(weight), _c(y), ACTIVATIONS[activation], negative_slope, p, seed,
        offset, compute_dx)


def gan_bce_forward(logits_a, logits_b, target_a, target_b):
    return torch.ops.fastgan_C.gan_bce_forward(_c(logits_a), _c(logits_b), target_a, target_b)
