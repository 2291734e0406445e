"""One fused run: Linear [-> BatchNorm1d] -> activation / Dropout, executed over the
model's own, untouched children.

A ``Run`` holds no module: on every call it looks its children up by name in
the module being run (``owner``), reads their parameters, buffers and
hyper-parameters there (so a parametrized weight, a changed ``p``, ``.eval()``
on one child, ``.double()`` or ``.to()`` all take effect), and either calls
one fused op or, where the fused op cannot reproduce what the children would
do, calls the children themselves (``plain``). The plain path is the run as
written, hooks and all; it is taken while

* a hook needs a child's own input, output or gradient (``hooks``),
* the tensors are not what the fused op takes (dtype, device, a 1-row batch
  in training, BatchNorm1d in eval with dropout active...),
* or the speed rule says the fused op would not gain (``speed``).

Dropout: each run draws its Philox seed from torch's default generator (of
the input's device) on its first fused call with dropout, so ``torch.manual_seed``
governs it as it governs ``nn.Dropout``; every later call advances a counter
on the device (no host sync, CUDA-graph safe).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import functional as FG
from ...ops import spec
from ..layers import autocast_inputs, draw_seed_, next_key
from . import hooks, speed
from .checks import label, stored
from .report import join


@dataclass(frozen=True)
class RunSpec:
    """What a run is made of, by name under the module that runs it.

    ``act`` names an activation child; a functional activation
    (``F.leaky_relu(h, 0.2)``) is ``act_call`` = (table name, slope) instead,
    and neither means identity. ``drop`` names a Dropout child; a functional
    ``F.dropout`` is ``drop_call`` = (p, follows_training) (False: it drops in
    eval too, as ``F.dropout(h, p)`` does). ``dropout_first``: the run is
    written Dropout -> activation (equal for a positively homogeneous one).
    """
    linear: str
    bn: Optional[str] = None
    act: Optional[str] = None
    act_call: Optional[tuple] = None
    drop: Optional[str] = None
    drop_call: Optional[tuple] = None
    dropout_first: bool = False

    def names(self) -> tuple:
        return tuple(n for n in (self.linear, self.bn, self.act, self.drop) if n is not None)

    @classmethod
    def of(cls, steps) -> "RunSpec":
        """The spec of a matched run (``checks.match``'s steps)."""
        lin, rest = steps[0], list(steps[1:])
        bn = rest.pop(0) if rest and rest[0].kind == "bn" else None
        act = next((s for s in rest if s.kind == "act"), None)
        drop = next((s for s in rest if s.kind == "dropout"), None)
        return cls(
            linear=lin.name, bn=bn.name if bn else None,
            act=act.name if act is not None and act.module is not None else None,
            act_call=((act.act[0].name, float(act.act[1]))
                      if act is not None and act.module is None else None),
            drop=drop.name if drop is not None and drop.module is not None else None,
            drop_call=((drop.p, drop.follows_training)
                       if drop is not None and drop.module is None else None),
            dropout_first=bool(act and drop and rest.index(drop) < rest.index(act)))


def child(owner: nn.Module, name: str) -> nn.Module:
    if "." not in name:
        return owner._modules[name]
    return owner.get_submodule(name)


class DropoutStream:
    """A run's dropout stream: ``dropout_rng`` = ``[seed, counter]`` (int64), seeded
    from torch's default generator of the input's device on its first draw
    (``_dropout_seeded``), or explicitly by ``seed_dropout``. The same interface
    as a fused layer's, so ``fastgan.nn.seed_dropout`` / ``dropout_rng_state``
    can treat both alike."""

    def __init__(self, device=None):
        self.dropout_rng = torch.zeros(2, dtype=torch.int64, device=device)
        self._dropout_seeded = False

    def key(self, device: torch.device) -> tuple[Tensor, Tensor]:
        state = self.dropout_rng
        if state.device != device:   # the model moved (.to, .cuda) after fuse
            state = self.dropout_rng = state.to(device)
        if not self._dropout_seeded:
            draw_seed_(state)   # the fused layers' draw: a device op, capturable
            self._dropout_seeded = True
        seed, offset = next_key(state)
        return seed.view(1), offset.view(1)

    def seed_dropout(self, seed: int) -> None:
        """Restart the stream at ``seed`` instead of a draw at its first use."""
        self.dropout_rng = torch.tensor([seed % 2**62, 0], dtype=torch.int64,
                                        device=self.dropout_rng.device)
        self._dropout_seeded = True


class Run:
    """Executes one ``RunSpec`` (see the module docstring); ``only_if_faster``
    applies the speed rule on each call."""

    def __init__(self, spec_: RunSpec, only_if_faster: bool = True, device=None):
        self.spec = spec_
        self.only_if_faster = only_if_faster
        self.stream = DropoutStream(device)

    def modules(self, owner):
        """(Linear, BatchNorm1d or None, activation or None, Dropout or None) of owner."""
        s = self.spec
        mods = owner._modules
        try:   # direct children, the common case
            return (mods[s.linear], s.bn and mods[s.bn], s.act and mods[s.act],
                    s.drop and mods[s.drop])
        except KeyError:
            return (child(owner, s.linear), s.bn and child(owner, s.bn),
                    s.act and child(owner, s.act), s.drop and child(owner, s.drop))

    def activation(self, act: Optional[nn.Module]) -> tuple[str, float]:
        if act is not None:
            row = spec.activation_of_module(act)
            return row.name, row.slope_of(act)
        return self.spec.act_call or ("identity", 0.0)

    def dropout_p(self, owner, drop, training: Optional[bool] = None) -> float:
        """This call's dropout probability: the Dropout child's while it is in training
        mode, a functional dropout's while ``owner`` is (or always, as written).
        ``training``: as if the modules were in that mode."""
        if drop is not None:
            return float(drop.p) if (drop.training if training is None else training) else 0.0
        call = self.spec.drop_call
        if call is None:
            return 0.0
        p, follows_training = call
        active = owner.training if training is None else training
        return p if (active or not follows_training) else 0.0

    def __call__(self, owner: nn.Module, x):
        lin, bn, act, drop = mods = self.modules(owner)
        p = self.dropout_p(owner, drop)
        bn_training = None if bn is None else bn.training
        if not isinstance(x, Tensor) or x.dim() < 2:
            return self.plain(owner, mods, x)
        # The speed rule first: on the CPU most runs stop here, at eager's cost.
        if self.only_if_faster and speed.no_gain(
                x.device.type, _compute_dtype(x), x.shape[0] if x.dim() == 2 else
                x.numel() // max(x.shape[-1], 1), lin.in_features, lin.out_features,
                bn_training, p, torch.is_grad_enabled() and (
                    x.requires_grad or any(t.requires_grad for t in lin.parameters()))
                ) is not None:
            return self.plain(owner, mods, x)
        if hooks.global_hooks() or any(m is not None and hooks.needs_plain(m, m is lin)
                                       for m in mods):
            return self.plain(owner, mods, x)
        name, slope = self.activation(act)
        if slope < 0 or not 0.0 <= p < 1.0 or (p > 0 and bn_training is False):
            return self.plain(owner, mods, x)
        if lin._forward_pre_hooks:  # run once, here, as lin(x) would
            args, kwargs = hooks.call_pre_hooks(lin, (x,))
            if len(args) != 1 or kwargs or not isinstance(args[0], Tensor):
                return self.after_linear(owner, mods, lin.forward(*args, **kwargs))
            x = args[0]
        weight, bias = lin.weight, lin.bias       # read once: a parametrization runs here
        xf, w, b = autocast_inputs(x, weight, bias)
        bn_tensors = None if bn is None else (bn.weight, bn.bias, bn.running_mean,
                                              bn.running_var, bn.num_batches_tracked)
        if not self.takes(xf, w, b, bn_training, bn_tensors):
            return self.after_linear(owner, mods, F.linear(x, weight, bias))
        seed, offset = self.stream.key(xf.device) if p > 0 else _zero_key(xf.device)
        lead = xf.shape[:-1]
        if xf.dim() != 2:
            xf = xf.reshape(-1, xf.shape[-1])
        if bn is None:
            y = FG.linear_act(xf, w, b, name, slope, p, True, seed, offset)
        else:
            y = FG.linear_bn_act(xf, w, b, *bn_tensors, bn_training, bn.momentum, bn.eps, name,
                                 slope, p, seed, offset)
        return y if len(lead) == 1 else y.reshape(*lead, y.shape[-1])

    def why_unfused(self, owner: nn.Module, prefix: str,
                    training: Optional[bool] = None) -> Optional[str]:
        """Why a call now would run plain (None: it would fuse), without a tensor:
        the report's view. ``training``: as if the run's modules were in that mode."""
        lin, bn, act, drop = mods = self.modules(owner)
        if hooks.global_hooks():
            return "a global module hook is registered (it needs every module's own call)"
        for m, n in zip(mods, (self.spec.linear, self.spec.bn, self.spec.act, self.spec.drop)):
            why = m is not None and hooks.hook_problem(label(join(prefix, n), m), m, m is lin)
            if why:
                return why + "; the run runs unfused while it is registered"
        _, slope = self.activation(act)
        if slope < 0:
            return "a negative activation slope is not supported by the fused kernels"
        p = self.dropout_p(owner, drop, training)
        bn_training = None if bn is None else (bn.training if training is None else training)
        if bn is not None and p > 0 and not bn_training:
            return "BatchNorm1d in eval mode with dropout in training: the fused op has no such mode"
        w = stored(lin, "weight")
        if bn is not None:
            stat, bw = spec.acc_dtype(w), stored(bn, "weight")
            if bw.dtype != stat or bw.device != w.device:
                return (f"BatchNorm1d is {bw.dtype} on {bw.device} with a {w.dtype} Linear on "
                        f"{w.device}; the kernels keep statistics in {stat}, on the Linear's "
                        "device")
        if self.only_if_faster:
            why = speed.no_gain(w.device.type, w.dtype, None, lin.in_features,
                                lin.out_features, bn_training, p)
            if why:
                return f"would not gain: {why}"
        return None

    @staticmethod
    def takes(x: Tensor, w: Tensor, b, bn_training, bn_tensors) -> bool:
        """The tensors are ones the fused op takes (else plain PyTorch decides, errors included)."""
        if x.dim() < 2 or (bn_tensors is not None and (x.dim() != 2
                                                       or (bn_training and x.shape[0] < 2))):
            return False
        if not (x.dtype == w.dtype and x.device == w.device and x.is_floating_point()
                and w.dim() == 2 and w.shape[1] == x.shape[-1]
                and (b is None or (b.dtype == w.dtype and b.device == w.device))):
            return False
        if bn_tensors is None:
            return True
        stat = spec.acc_dtype(x)
        return all(t is not None and t.dtype == stat and t.device == x.device
                   for t in bn_tensors[:4])

    # ------------------------------------------------------------------ plain PyTorch
    def plain(self, owner, mods, x):
        """The run as written: each child called (hooks and all)."""
        return self.after_linear(owner, mods, mods[0](x))

    def after_linear(self, owner, mods, h):
        _, bn, act, drop = mods
        if bn is not None:
            h = bn(h)
        if self.spec.dropout_first:
            return self.activate(act, self.drop(owner, drop, h))
        return self.drop(owner, drop, self.activate(act, h))

    def activate(self, act, h):
        if act is not None:
            return act(h)
        if self.spec.act_call is None:
            return h
        name, slope = self.spec.act_call
        return spec.activation(name).fn(h, slope)

    def drop(self, owner, drop, h):
        if drop is not None:
            return drop(h)
        if self.spec.drop_call is None:
            return h
        p, follows_training = self.spec.drop_call
        return F.dropout(h, p, training=owner.training if follows_training else True)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the run computes in: autocast's while it is on for x's device."""
    device = x.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _zero_key(device) -> tuple[Tensor, Tensor]:
    # Unused by the kernels when p == 0, but the ops take a key on x's device.
    z = torch.zeros(2, dtype=torch.int64, device=device)
    return z[:1], z[1:]
