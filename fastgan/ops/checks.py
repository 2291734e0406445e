"""The one argument check of every fused op, run once per call at the op boundary.

``fastgan.ops.registry`` calls ``linear_bn_act``, ``linear_act`` or ``gan_bce``
(same arguments as the op) from the op's body and from its fake, so eager code,
``torch.ops.fastgan.*`` and ``torch.compile`` all get the same errors, raised
before any backend sees the call. The backends trust these checks: the Triton
launchers and the C++ entries keep only what protects memory (contiguity, the
index range a kernel can address, devices and dtypes a backend cannot run).

Every error is one line that names the argument: ``TypeError`` for a wrong
type or dtype, ``ValueError`` for a wrong value, shape or device. The backward
ops take tensors their forward produced and are not checked here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import spec

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Dropout numbers the elements of a (B, N) output with a 32-bit Philox counter.
MAX_OUTPUT_NUMEL = 2**32


# ----------------------------------------------------------------- shared helpers
def tensor(t, name: str, *, ndim: int | None = None, dtype=None, device=None, numel=None,
           like: str = "x"):
    """``t`` is a Tensor with the given ndim, dtype (one or a tuple), numel and
    device (that of the argument named ``like``)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but {like} is on {device}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got shape {tuple(t.shape)}")


def finite(value, name: str) -> bool:
    """Whether the number ``value`` is finite; TypeError naming it if it is no number."""
    try:
        return math.isfinite(value)
    except TypeError:
        raise TypeError(f"{name} must be a float, got {type(value).__name__}") from None


def hyper(activation: str, negative_slope: float, p: float):
    """The epilogue's hyper-parameters: a known activation, slope >= 0, dropout p in [0, 1)."""
    spec.activation(activation)  # ValueError naming `activation`
    if not finite(negative_slope, "negative_slope") or negative_slope < 0:
        raise ValueError(f"negative_slope must be finite and >= 0, got {negative_slope}")
    if not (finite(p, "dropout p") and 0.0 <= p < 1.0):
        raise ValueError(f"dropout p must be in [0, 1), got {p}")


def rng(seed: Tensor, offset: Tensor, device: torch.device):
    """The dropout key: two 1-element int64 tensors on x's device."""
    tensor(seed, "seed", dtype=torch.int64, device=device, numel=1)
    tensor(offset, "offset", dtype=torch.int64, device=device, numel=1)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], seed: Tensor, offset: Tensor):
    """The Linear of both linear ops: x (B, K) float, weight (N, K) and bias (N,) of
    x's dtype and device, the dropout key, and B * N within the dropout counter."""
    tensor(x, "x", ndim=2)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 (or float64), got {x.dtype}")
    tensor(weight, "weight", ndim=2, dtype=x.dtype, device=x.device)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight has in_features={weight.shape[1]} but x has {x.shape[1]} "
                         "columns (K mismatch)")
    n = weight.shape[0]
    if bias is not None:
        tensor(bias, "bias", ndim=1, dtype=x.dtype, device=x.device, numel=n)
    rng(seed, offset, x.device)
    if x.shape[0] * n >= MAX_OUTPUT_NUMEL:
        raise ValueError(f"batch * out_features must be below 2**32, got {x.shape[0]} * {n}")


# ----------------------------------------------------------------- one check per op
def linear_act(x, weight, bias, activation, negative_slope, p, seed, offset):
    """Arguments of ``fastgan::linear_act``."""
    linear(x, weight, bias, seed, offset)
    hyper(activation, negative_slope, p)


def linear_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                  num_batches_tracked, training, momentum, eps, activation, negative_slope, p,
                  seed, offset):
    """Arguments of ``fastgan::linear_bn_act``: the Linear's, then BatchNorm's
    parameters and statistics ((N,), fp32; fp64 for fp64 x), eps, momentum and,
    in training, a batch of more than one row."""
    linear(x, weight, bias, seed, offset)
    n = weight.shape[0]
    stat_dtype = spec.acc_dtype(x)
    for t, name in ((bn_weight, "bn_weight"), (bn_bias, "bn_bias"),
                    (running_mean, "running_mean"), (running_var, "running_var")):
        tensor(t, name, ndim=1, dtype=stat_dtype, device=x.device, numel=n)
    tensor(num_batches_tracked, "num_batches_tracked", dtype=torch.int64, device=x.device, numel=1)
    hyper(activation, negative_slope, p)
    if not (finite(eps, "eps") and eps > 0):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    if momentum is not None and not (finite(momentum, "momentum") and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be None or in [0, 1], got {momentum}")
    if training and x.shape[0] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{list(x.shape)} (x batch size must be > 1 for batch statistics)")


def gan_bce(logits_a, logits_b, target_a, target_b):
    """Arguments of ``fastgan::gan_bce``: non-empty float logits (``logits_b``, if
    given, of the same dtype and device) and label targets in [0, 1]."""
    name_a = "real_logits" if logits_b is not None else "fake_logits"
    tensor(logits_a, name_a)
    if logits_a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name_a} must be a float tensor, got {logits_a.dtype}")
    if logits_a.numel() == 0:
        raise ValueError(f"{name_a} must not be empty")
    if logits_b is not None:
        tensor(logits_b, "fake_logits", dtype=logits_a.dtype, device=logits_a.device,
               like=name_a)
        if logits_b.numel() == 0:
            raise ValueError("fake_logits must not be empty")
    for t, name in ((target_a, "target_a"), (target_b, "target_b")):
        if not (finite(t, name) and 0.0 <= t <= 1.0):
            raise ValueError(f"{name} (label) must be in [0, 1], got {t}")
