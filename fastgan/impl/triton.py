"""The ``triton`` backend: the Triton kernels of ``fastgan.kernels`` (kernels/).

Runs on CUDA tensors, and on CPU tensors through the Triton interpreter when
``TRITON_INTERPRET=1`` was set before the kernels were imported.
"""
from __future__ import annotations

import torch

from fastgan.kernels import INTERPRET, launches, warmup  # noqa: F401  (tests read launches)
from fastgan.kernels import gan_bce as _gan_bce
from fastgan.kernels import linear_act as _linear_act
from fastgan.kernels import linear_bn_act as _linear_bn_act

name = "triton"


def available() -> tuple[bool, str]:
    import triton
    if INTERPRET:
        return True, f"Triton {triton.__version__} kernels (TRITON_INTERPRET=1: interpreter on CPU tensors)"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 before import to interpret on CPU)"
    return True, f"Triton {triton.__version__} kernels on CUDA"


def supports(device) -> bool:
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and INTERPRET)


def linear_bn_act_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                          num_batches_tracked, training, momentum, eps, activation,
                          negative_slope, p, seed, offset):
    return _linear_bn_act.forward(x, weight, bias, bn_weight, bn_bias, running_mean,
                                  running_var, num_batches_tracked, training, momentum, eps,
                                  activation, negative_slope, p, seed, offset)


def linear_bn_act_backward(grad_y, x, weight, bn_weight, bn_bias, h, mean, rstd, training,
                           activation, negative_slope, p, seed, offset, compute_dx,
                           compute_dw=True):
    return _linear_bn_act.backward(grad_y, x, weight, bn_weight, bn_bias, h, mean, rstd,
                                   training, activation, negative_slope, p, seed, offset,
                                   compute_dx, compute_dw)


def linear_act_forward(x, weight, bias, activation, negative_slope, p, seed, offset):
    return _linear_act.forward(x, weight, bias, activation, negative_slope, p, seed, offset)


def linear_act_backward(grad_y, x, weight, y, activation, negative_slope, p, seed, offset,
                        compute_dx, compute_dw=True):
    return _linear_act.backward(grad_y, x, weight, y, activation, negative_slope, p, seed,
                                offset, compute_dx, compute_dw)


def gan_bce_forward(logits_a, logits_b, target_a, target_b):
    return _gan_bce.forward(logits_a, logits_b, target_a, target_b)
