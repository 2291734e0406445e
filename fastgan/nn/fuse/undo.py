"""``unfuse``: the plain-PyTorch model again.

A module ``fuse`` planned gets its own class back and loses its plan: that
is all ``fuse`` changed, so the result is exactly the model ``fuse`` was
given (the same modules, Parameters, buffers and hooks). Fused layers built
directly (``fastgan.nn.LinearBNAct(...)``) become an ``nn.Sequential`` of their
children, the layout of ``fastgan.nn.models``' ``fused=False`` models; models
fused by an older fastgan (loaded from a pickle) get their old layout undone
(``legacy``).
"""
from __future__ import annotations

from torch import nn

from ..layers import _Fused
from .legacy import ORIGIN, plain_children, unfuse_legacy
from .checks import target
from .plan import unplan


def unfuse_walk(module: nn.Module) -> nn.Module:
    if isinstance(module, _Fused):
        return nn.Sequential(*(c for _, c in plain_children(module)))
    unplan(module)
    for name, child in list(module._modules.items()):
        if child is not None:
            module._modules[name] = unfuse_walk(child)
    return module


def unfuse(model: nn.Module, inplace: bool | None = None, *,
           copy: bool | None = None) -> nn.Module:
    """The plain-PyTorch model: ``fuse``'s plans removed, fused layers made plain.

    Like ``fuse``, it changes ``model`` itself unless ``copy=True`` (then a
    deep copy is unfused and returned); ``inplace=False`` is the old
    spelling of ``copy=True``. Returns the model (a new ``nn.Sequential`` if
    ``model`` itself was a fused layer).
    """
    model = target(model, copy, inplace)
    if any(getattr(m, ORIGIN, None) for m in model.modules()) or \
            any("_fastgan_fx" in type(m).__dict__ for m in model.modules()):
        unfuse_legacy(model)
    return unfuse_walk(model)
