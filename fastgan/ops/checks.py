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
# One limit for every backend: the Triton kernels index a (B, N) output with
# 32-bit offsets (the C++ kernels and the 32-bit dropout counter would allow 2**32).
MAX_OUTPUT_NUMEL = 2**31


# ----------------------------------------------------------------- shared helpers
# Each helper first asks a quick question whose "yes" means the full check
# would pass (the common case, a few attribute reads: this runs on every op
# call); on "no" the full check runs and names what is wrong.
_PLAIN = (Tensor, torch.nn.Parameter)


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


def _fits(t, ndim, dtype, device, numel) -> bool:
    """Quick: ``tensor(t, ndim=ndim, dtype=dtype, device=device, numel=numel)``
    passes (ndim or numel None: not asked; dtype one dtype)."""
    return (t.__class__ in _PLAIN and t.dtype is dtype and t.device == device
            and (ndim is None or t.dim() == ndim) and (numel is None or t.numel() == numel))


def finite(value, name: str) -> bool:
    """Whether the number ``value`` is finite; TypeError naming it if it is no number."""
    try:
        return math.isfinite(value)
    except TypeError:
        raise TypeError(f"{name} must be a float, got {type(value).__name__}") from None


def hyper(activation: str, negative_slope: float, p: float):
    """The epilogue's hyper-parameters: a known activation, slope >= 0, dropout p in
    [0, 1). The fused layers run it (and ``batch_norm``) at construction too, so a
    layer no forward could run is never built."""
    if (negative_slope.__class__ is float and p.__class__ is float
            and 0.0 <= negative_slope < math.inf and 0.0 <= p < 1.0
            and activation.__class__ is str and activation in spec.ACTIVATION):
        return  # (NaN fails the comparisons)
    spec.activation(activation)  # ValueError naming `activation`
    if not finite(negative_slope, "negative_slope") or negative_slope < 0:
        raise ValueError(f"negative_slope must be finite and >= 0, got {negative_slope}")
    if not (finite(p, "dropout p") and 0.0 <= p < 1.0):
        raise ValueError(f"dropout p must be in [0, 1), got {p}")


def batch_norm(eps: float, momentum: Optional[float]):
    """BatchNorm's hyper-parameters: eps finite and > 0, momentum None or in [0, 1]."""
    if eps.__class__ is float and 0.0 < eps < math.inf and (
            momentum is None or (momentum.__class__ is float and 0.0 <= momentum <= 1.0)):
        return
    if not (finite(eps, "eps") and eps > 0):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    if momentum is not None and not (finite(momentum, "momentum") and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be None or in [0, 1], got {momentum}")


def rng(seed: Tensor, offset: Tensor, device: torch.device):
    """The dropout key: two 1-element int64 tensors on x's device."""
    if not _fits(seed, None, torch.int64, device, 1):
        tensor(seed, "seed", dtype=torch.int64, device=device, numel=1)
    if not _fits(offset, None, torch.int64, device, 1):
        tensor(offset, "offset", dtype=torch.int64, device=device, numel=1)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], seed: Tensor, offset: Tensor):
    """The Linear of both linear ops: x (B, K) float, weight (N, K) and bias (N,) of
    x's dtype and device, the dropout key, and B * N within the dropout counter."""
    if _linear_fits(x, weight, bias, seed, offset):
        return
    if not (x.__class__ in _PLAIN and x.dim() == 2):
        tensor(x, "x", ndim=2)
    dtype, device = x.dtype, x.device
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 (or float64), got {x.dtype}")
    if not _fits(weight, 2, dtype, device, None):
        tensor(weight, "weight", ndim=2, dtype=dtype, device=device)
    b, k = x.shape
    n, k_w = weight.shape
    if k_w != k:
        raise ValueError(f"weight has in_features={k_w} but x has {k} columns (K mismatch)")
    if bias is not None and not _fits(bias, 1, dtype, device, n):
        tensor(bias, "bias", ndim=1, dtype=dtype, device=device, numel=n)
    rng(seed, offset, device)
    if b * n >= MAX_OUTPUT_NUMEL:
        raise ValueError(f"batch * out_features must be below 2**31 (32-bit element offsets), "
                         f"got x with {b} rows and weight with {n} out_features")


def _linear_fits(x, weight, bias, seed, offset) -> bool:
    """Quick: ``linear`` passes. Every condition of the full check, in one
    expression of attribute reads (the full check runs only when one fails)."""
    c = x.__class__
    if not (c in _PLAIN and weight.__class__ in _PLAIN and seed.__class__ in _PLAIN
            and offset.__class__ in _PLAIN):
        return False
    dtype, device, shape = x.dtype, x.device, x.shape
    wshape = weight.shape
    return (len(shape) == 2 and dtype in FLOAT_DTYPES and len(wshape) == 2
            and weight.dtype is dtype and wshape[1] == shape[1] and weight.device == device
            and (bias is None or (bias.__class__ in _PLAIN and bias.dtype is dtype
                                  and bias.shape == wshape[:1] and bias.device == device))
            and seed.dtype is torch.int64 and offset.dtype is torch.int64
            and seed.numel() == 1 and offset.numel() == 1
            and seed.device == device and offset.device == device
            and shape[0] * wshape[0] < MAX_OUTPUT_NUMEL)


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
    n, device = weight.shape[:1], x.device
    stat_dtype = torch.float64 if x.dtype is torch.float64 else torch.float32  # spec.acc_dtype
    stats = (bn_weight, bn_bias, running_mean, running_var)
    for t in stats:
        if not (t.__class__ in _PLAIN and t.dtype is stat_dtype and t.shape == n
                and t.device == device):  # _fits, inlined: 4 per call
            for u, name in zip(stats, ("bn_weight", "bn_bias", "running_mean", "running_var")):
                tensor(u, name, ndim=1, dtype=stat_dtype, device=device, numel=n[0])
            break
    if not _fits(num_batches_tracked, None, torch.int64, device, 1):
        tensor(num_batches_tracked, "num_batches_tracked", dtype=torch.int64, device=device,
               numel=1)
    hyper(activation, negative_slope, p)
    batch_norm(eps, momentum)
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


# Autograd nodes that only reshape, select, copy or cast: a sigmoid behind them
# still produced the values.
_SHAPE_ONLY = frozenset({"View", "UnsafeView", "ReshapeAlias", "Squeeze", "Unsqueeze", "Expand",
                         "T", "Transpose", "Permute", "Select", "Slice", "Clone", "ToCopy",
                         "AsStrided", "Alias"})


def logits(t, name: str):
    """Refuse tensors that are evidently probabilities where logits are due: the
    output of a sigmoid (read from the autograd graph, so no value is looked at;
    logits that happen to lie in [0, 1] are legal). The functional losses run
    it before the op (the op's own check sees tensors cut from their graph)."""
    if torch.compiler.is_compiling():
        return  # (the graph being traced is not the one autograd records)
    node = getattr(t, "grad_fn", None)
    for _ in range(8):
        if node is None:
            return
        kind = node.name().rstrip("0123456789")
        if kind == "SigmoidBackward":
            raise ValueError(f"{name} is the output of a sigmoid, i.e. probabilities, but the "
                             "GAN losses take logits (the discriminator's output before any "
                             "sigmoid): drop the final nn.Sigmoid, or use "
                             "F.binary_cross_entropy on probabilities")
        if kind[:-len("Backward")] not in _SHAPE_ONLY:
            return
        node = node.next_functions[0][0] if node.next_functions else None
