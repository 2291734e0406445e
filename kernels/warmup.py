"""Compile and autotune the Triton kernels before a CUDA graph is captured.

Autotuning benchmarks configs (timed launches, host syncs) the first time a
kernel sees a new (shape, dtype) key, and compiling happens on first use of
each constexpr combination; neither may happen inside ``torch.cuda.graph``.
``warmup`` runs every op forward and backward once per requested case on
throw-away tensors, so the model's own parameters and running statistics are
never touched.
"""
from __future__ import annotations

import itertools
from typing import Iterable, Sequence

import torch

from . import gan_bce, linear_act, linear_bn_act


def warmup(shapes: Iterable[Sequence[int]], dtypes: Iterable[torch.dtype] = (torch.float32,),
           device="cuda", activations: Iterable[str] = ("leaky_relu",),
           dropout: Iterable[float] = (0.0, 0.2), training: Iterable[bool] = (True,),
           momentum: Iterable = (0.1,), negative_slope: float = 0.2,
           ops: Iterable[str] = ("linear_bn_act", "linear_act", "gan_bce")) -> int:
    """Run each op on every combination of the arguments; returns the number of cases.

    ``shapes``: ``(batch, in_features, out_features)`` triples (the layers of
    the model at its batch size); ``gan_bce`` is warmed for each batch size.
    """
    device = torch.device(device)
    ops = set(ops)
    unknown = ops - {"linear_bn_act", "linear_act", "gan_bce"}
    if unknown:
        raise ValueError(f"ops must name linear_bn_act, linear_act or gan_bce, got {sorted(unknown)}")
    shapes = [tuple(int(v) for v in s) for s in shapes]
    for s in shapes:
        if len(s) != 3 or min(s) < 1:
            raise ValueError(f"shapes must be (batch, in_features, out_features) triples, got {s}")
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    offset = torch.zeros(1, dtype=torch.int64, device=device)
    cases = 0
    for (b, k, n), dtype in itertools.product(shapes, tuple(dtypes)):
        x = torch.randn(b, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype) * k ** -0.5
        bias = torch.zeros(n, device=device, dtype=dtype)
        g = torch.randn(b, n, device=device, dtype=dtype)
        for act, p in itertools.product(tuple(activations), tuple(dropout)):
            if "linear_act" in ops:
                y = linear_act.forward(x, w, bias, act, negative_slope, p, seed, offset)
                linear_act.backward(g, x, w, y, act, negative_slope, p, seed, offset, True)
                cases += 1
            if "linear_bn_act" not in ops:
                continue
            for train, mom in itertools.product(tuple(training), tuple(momentum)):
                if train and b < 2:
                    continue
                f32 = dict(device=device, dtype=torch.float32)
                gamma, beta = torch.ones(n, **f32), torch.zeros(n, **f32)
                rm, rv = torch.zeros(n, **f32), torch.ones(n, **f32)
                nbt = torch.zeros(1, dtype=torch.int64, device=device)
                _, h, mean, rstd = linear_bn_act.forward(
                    x, w, bias, gamma, beta, rm, rv, nbt, train, mom, 1e-5, act,
                    negative_slope, p, seed, offset)
                linear_bn_act.backward(g, x, w, gamma, beta, h, mean, rstd, train, act,
                                       negative_slope, p, seed, offset, True)
                cases += 1
        if "gan_bce" in ops:
            logits = torch.randn(b, 1, device=device, dtype=dtype)
            gan_bce.forward(logits, logits.clone(), 1.0, 0.0)
            gan_bce.forward(logits, None, 1.0, 0.0)
            cases += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return cases
