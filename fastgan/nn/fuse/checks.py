"""What a run is, which modules can join one, and why not: what both passes share.

A run is ``Linear [-> BatchNorm1d] -> X`` where X is

* ``act [-> Dropout]``,
* ``Dropout -> act`` for a positively homogeneous act (``ACTIVATION_TABLE``
  rows say which): the mask's kept values are scaled by 1/(1-p) > 0, so
  act(mask * z) == mask * act(z) and the run equals ``act -> Dropout``;
  cgan's ``Linear -> Dropout -> LeakyReLU`` is one,
* or ``Dropout`` alone, or nothing after a BatchNorm1d (identity activation).

Each module the passes meet becomes a ``Step``; ``match`` reads steps from
a Linear on and returns the run's steps or the reason there is none. What
is checked here is fixed by the model's structure; what can change between
calls (hooks, dtypes, modes, the speed rule) is read on every call (``run``).
"""
from __future__ import annotations

import copy as copy_module
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from ...ops import spec

FUSABLE = ", ".join(f"nn.{row.module.__name__}" for row in spec.ACTIVATION_TABLE)


@dataclass
class Step:
    kind: str                       # "linear", "bn", "act", "dropout" or "other"
    label: str                      # as the report names it: "model.3 (BatchNorm1d)"
    name: Optional[str] = None      # the child's path under the module that runs it
    module: Optional[nn.Module] = None
    act: Optional[tuple] = None     # (table row, slope) of an activation
    p: Optional[float] = None       # dropout probability
    follows_training: bool = True   # a functional dropout's training=self.training
    problem: Optional[str] = None   # why it cannot join a run
    node: object = None             # the fx node, for the fx pass


def label(path: str, m: nn.Module) -> str:
    return f"{path or '<root>'} ({type(m).__name__})"


def stored(m: nn.Module, name: str):
    """``m.<name>`` as stored, without running a parametrization of it (spectral
    norm's would advance its power iteration)."""
    params = m._modules.get("parametrizations")
    if params is not None and name in params:
        p = params[name]
        original = getattr(p, "original", None)
        return original if original is not None else next(p.parameters())
    return getattr(m, name)


def device_of(lin: nn.Module) -> torch.device:
    return stored(lin, "weight").device


def linear_problem(lin: nn.Module) -> Optional[str]:
    if type(lin).forward is not nn.Linear.forward:
        return f"{type(lin).__name__} has its own forward"
    weight = stored(lin, "weight")
    if isinstance(weight, UninitializedParameter):
        return f"{type(lin).__name__} is not initialized yet (run one forward before fuse)"
    if not weight.is_floating_point():
        return f"the Linear's weight has dtype {weight.dtype}"
    return None


def bn_problem(lin: nn.Module, bn: nn.Module) -> Optional[str]:
    if not isinstance(bn, nn.BatchNorm1d) or type(bn).forward is not nn.BatchNorm1d.forward:
        return f"{type(bn).__name__} is not nn.BatchNorm1d"
    if not bn.affine:
        return "BatchNorm1d(affine=False) is not supported by the fused kernels"
    if not bn.track_running_stats:
        return "BatchNorm1d(track_running_stats=False) is not supported by the fused kernels"
    if bn.num_features != lin.out_features:
        return f"BatchNorm1d({bn.num_features}) after Linear(out_features={lin.out_features})"
    if not (math.isfinite(bn.eps) and bn.eps > 0):
        return f"BatchNorm1d eps={bn.eps} is not finite and > 0"
    if bn.momentum is not None and not 0.0 <= bn.momentum <= 1.0:
        return f"BatchNorm1d momentum={bn.momentum} is not None or in [0, 1]"
    return None


def slope_problem(row, slope) -> Optional[str]:
    if row.has_slope and not (math.isfinite(slope) and slope >= 0):
        # The kernels recover act'(z) from the output, which needs the sign kept.
        return f"{row.module.__name__} negative_slope={slope} < 0 is not supported by the fused kernels"
    return None


def not_fusable(what: str) -> str:
    """Why an activation outside the table cannot fuse."""
    why = f"{what} is not a fused activation (the kernels implement {FUSABLE})"
    if "igmoid" in what:
        why += ("; for a discriminator, drop the Sigmoid and train on logits with "
                "fastgan.functional.gan_bce_d / gan_bce_g or BCEWithLogitsLoss")
    return why


_OTHER_ACTIVATIONS = tuple(getattr(nn, n) for n in (
    "Sigmoid", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Softplus", "Hardtanh", "ReLU6",
    "PReLU", "RReLU", "Hardswish", "Hardsigmoid", "LogSigmoid", "Softsign", "Tanhshrink"))


def module_step(name: str, path: str, m: nn.Module) -> Step:
    """The step of child ``name`` (``path`` in the whole model) of a run's module."""
    where = label(path, m)
    if isinstance(m, nn.Linear):
        return Step("linear", where, name, m, problem=linear_problem(m))
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return Step("bn", where, name, m)       # checked against its Linear in match
    row = spec.activation_of_module(m)
    if row is not None:
        slope = row.slope_of(m)
        return Step("act", where, name, m, act=(row, slope), problem=slope_problem(row, slope))
    if type(m) is nn.Dropout or (isinstance(m, nn.Dropout)
                                 and type(m).forward is nn.Dropout.forward):
        return Step("dropout", where, name, m, p=float(m.p), problem=dropout_problem(m.p))
    if isinstance(m, _OTHER_ACTIVATIONS):
        return Step("other", where, name, m, problem=not_fusable(type(m).__name__))
    return Step("other", where, name, m)


Next = Callable[[Step], Union[Step, str, None]]


def match(first: Step, next_step: Next) -> tuple[Optional[list], Optional[str], Optional[Step]]:
    """The run that starts at Linear step ``first``: (steps, None, None), or
    (None, why not, the step after the Linear that stopped it, if one did).

    ``next_step(step)`` gives the step that consumes ``step``'s output and
    nothing else, or a str saying why none does, or None at the end.
    """
    if first.problem:
        return None, first.problem, None
    run = [first]
    nxt = next_step(first)
    if nxt is None:
        return None, "nothing follows the Linear (a bare Linear has nothing to fuse)", None
    if isinstance(nxt, str):
        return None, nxt, None
    if nxt.kind == "bn":
        nxt.problem = bn_problem(first.module, nxt.module)
        if nxt.problem:
            return None, f"followed by {nxt.label}: {nxt.problem}", nxt
        run.append(nxt)
        nxt = next_step(nxt)
    if isinstance(nxt, Step) and nxt.kind == "act" and not nxt.problem:
        run.append(nxt)
        after = next_step(nxt)
        if isinstance(after, Step) and after.kind == "dropout" and not after.problem:
            run.append(after)
    elif isinstance(nxt, Step) and nxt.kind == "dropout" and not nxt.problem:
        run.append(nxt)
        after = next_step(nxt)
        if isinstance(after, Step) and after.kind == "act" and not after.problem \
                and after.act[0].positively_homogeneous:
            run.append(after)
    elif len(run) == 1:  # nothing fusable after the Linear itself
        if not isinstance(nxt, Step):
            return None, nxt or "nothing follows the Linear (a bare Linear has nothing to fuse)", None
        if nxt.problem:
            return None, f"followed by {nxt.label}: {nxt.problem}", nxt
        return None, f"followed by {nxt.label}, not a fusable activation, BatchNorm1d or Dropout", nxt
    return run, None, None


def dropout_problem(p) -> Optional[str]:
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        return f"dropout p={p!r} is not a number in [0, 1)"
    return None


def target(model, copy, inplace) -> nn.Module:
    """The module ``fuse``/``unfuse`` work on: ``model`` itself, or a deep copy
    with ``copy=True`` (``inplace=False`` is the old spelling of it)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if inplace is not None and copy is not None and bool(copy) == bool(inplace):
        raise ValueError(f"copy={copy} contradicts inplace={inplace} (inplace is the old "
                         "spelling of copy=False)")
    if copy if copy is not None else inplace is False:
        model = copy_module.deepcopy(model)
    return model
