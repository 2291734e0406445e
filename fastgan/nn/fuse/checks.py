"""Can this run fuse? Each check returns None, or the reason the report gives.

The fused layer reads its children's tensors and hyper-parameters and runs
one op instead of their forwards, so anything the kernels do not implement, or
that a child's own forward would have done, keeps the run as it is.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...ops import spec


def hooked(m: nn.Module) -> bool:
    # The fused layer reads its children's tensors without calling their
    # forward, so a hook (nn.utils.spectral_norm recomputes the weight in one)
    # would silently stop running.
    return bool(m._forward_hooks or m._forward_pre_hooks)


def linear_problem(lin: nn.Module) -> str | None:
    if type(lin) is not nn.Linear:
        return f"{type(lin).__name__} is not a plain nn.Linear"
    if hooked(lin):
        return "the Linear has forward hooks (e.g. nn.utils.spectral_norm)"
    if not lin.weight.is_floating_point():
        return f"Linear weight has dtype {lin.weight.dtype}"
    return None


def bn_problem(lin: nn.Linear, bn: nn.Module) -> str | None:
    if type(bn) is not nn.BatchNorm1d:
        return f"{type(bn).__name__} is not nn.BatchNorm1d"
    if hooked(bn):
        return "the BatchNorm1d has forward hooks"
    if not bn.affine:
        return "BatchNorm1d(affine=False) is not supported by the fused kernels"
    if not bn.track_running_stats:
        return "BatchNorm1d(track_running_stats=False) is not supported by the fused kernels"
    if bn.num_features != lin.out_features:
        return f"BatchNorm1d({bn.num_features}) after Linear(out_features={lin.out_features})"
    stat = torch.float64 if lin.weight.dtype == torch.float64 else torch.float32
    if bn.weight.dtype != stat:
        return (f"BatchNorm1d is {bn.weight.dtype} with a {lin.weight.dtype} Linear; the kernels "
                f"keep statistics in {stat}")
    if bn.weight.device != lin.weight.device:
        return "Linear and BatchNorm1d are on different devices"
    if not (math.isfinite(bn.eps) and bn.eps > 0):
        return f"BatchNorm1d eps={bn.eps} is not finite and > 0"
    if bn.momentum is not None and not 0.0 <= bn.momentum <= 1.0:
        return f"BatchNorm1d momentum={bn.momentum} is not None or in [0, 1]"
    if bn.training != lin.training:
        return "Linear and BatchNorm1d are in different train/eval modes"
    return None


def act_problem(act: nn.Module) -> str | None:
    row = spec.activation_of_module(act)
    if row is None:
        return f"{type(act).__name__} is not a fusable activation"
    if hooked(act):
        return f"the {type(act).__name__} has forward hooks"
    slope = row.slope_of(act)
    if row.has_slope and not (math.isfinite(slope) and slope >= 0):
        # The kernels recover act'(z) from the output, which needs the sign kept.
        return (f"{type(act).__name__} negative_slope={slope} < 0 is not supported by the fused "
                "kernels")
    return None


def dropout_ok(drop: nn.Module, ref: nn.Module) -> bool:
    """``drop`` is a Dropout the fused layer can take over from ``ref``'s run."""
    return (type(drop) is nn.Dropout and 0.0 <= drop.p < 1.0 and drop.training == ref.training
            and not hooked(drop))
