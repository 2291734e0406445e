"""Argument validation shared by every op entry point: errors name the argument."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .spec import ACTIVATIONS

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(t, name: str, *, ndim: int | None = None, dtype=None, device=None, numel=None):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got shape {tuple(t.shape)}")


def hyper(activation: str, negative_slope: float, p: float):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if not math.isfinite(negative_slope) or negative_slope < 0:
        raise ValueError(f"negative_slope must be finite and >= 0, got {negative_slope}")
    if not (0.0 <= p < 1.0) or math.isnan(p):
        raise ValueError(f"dropout p must be in [0, 1), got {p}")


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], seed: Tensor, offset: Tensor):
    tensor(x, "x", ndim=2)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 (or float64), got {x.dtype}")
    tensor(weight, "weight", ndim=2, dtype=x.dtype, device=x.device)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight has in_features={weight.shape[1]} but x has {x.shape[1]} columns (K mismatch)")
    n = weight.shape[0]
    if bias is not None:
        tensor(bias, "bias", ndim=1, dtype=x.dtype, device=x.device, numel=n)
    tensor(seed, "seed", dtype=torch.int64, device=x.device, numel=1)
    tensor(offset, "offset", dtype=torch.int64, device=x.device, numel=1)
    if x.shape[0] * n >= 2**32:
        raise ValueError(f"batch * out_features must be below 2**32, got {x.shape[0]} * {n}")


def linear_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                  num_batches_tracked, training, momentum, eps, activation, negative_slope, p,
                  seed, offset):
    linear(x, weight, bias, seed, offset)
    n = weight.shape[0]
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    for t, name in ((bn_weight, "bn_weight"), (bn_bias, "bn_bias"),
                    (running_mean, "running_mean"), (running_var, "running_var")):
        tensor(t, name, ndim=1, dtype=stat_dtype, device=x.device, numel=n)
    tensor(num_batches_tracked, "num_batches_tracked", dtype=torch.int64, device=x.device, numel=1)
    hyper(activation, negative_slope, p)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    if momentum is not None and not (math.isfinite(momentum) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be None or in [0, 1], got {momentum}")
    if training and x.shape[0] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{list(x.shape)} (x batch size must be > 1 for batch statistics)")


def gan_bce(logits_a, logits_b, target_a, target_b):
    tensor(logits_a, "real_logits" if logits_b is not None else "fake_logits")
    if logits_a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be a float tensor, got {logits_a.dtype}")
    if logits_a.numel() == 0:
        raise ValueError("logits must not be empty")
    if logits_b is not None:
        tensor(logits_b, "fake_logits", dtype=logits_a.dtype, device=logits_a.device)
        if logits_b.numel() == 0:
            raise ValueError("fake_logits must not be empty")
    for t, name in ((target_a, "target_a"), (target_b, "target_b")):
        if not (math.isfinite(t) and 0.0 <= t <= 1.0):
            raise ValueError(f"{name} (label) must be in [0, 1], got {t}")
