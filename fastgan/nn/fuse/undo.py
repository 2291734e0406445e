"""``unfuse``: the plain-PyTorch model again, from the marks ``fuse`` left.

A fused layer ``fuse`` made knows its children's original names (``wrap``),
a module the fx pass rewrote knows its base class and child order; fused
layers built directly become an ``nn.Sequential`` of their children.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

from torch import nn

from ..layers import _Fused
from .keys import remove_key_hooks
from .sequential import is_plain_sequential
from .wrap import ORIGIN, plain_children


def unfuse_fx(module: nn.Module) -> None:
    """Give a module ``fuse`` rewrote with fx back its class and children."""
    base = type(module)._fastgan_fx[0]
    for name, child in list(module._modules.items()):
        if isinstance(child, _Fused) and getattr(child, ORIGIN, None):
            del module._modules[name]
            for orig, plain in plain_children(child):
                if orig is not None:
                    module._modules[orig] = plain
    order = module.__dict__.pop("_fastgan_fx_order")
    module._modules = OrderedDict(
        [(n, module._modules[n]) for n in order if n in module._modules] +
        [(n, m) for n, m in module._modules.items() if n not in order])
    module.__class__ = base


def unfuse_walk(module: nn.Module) -> nn.Module:
    if isinstance(module, _Fused):
        return nn.Sequential(*(c for _, c in plain_children(module)))
    if "_fastgan_fx" in type(module).__dict__:
        unfuse_fx(module)
    for name, child in list(module._modules.items()):
        if child is not None:
            module._modules[name] = unfuse_walk(child)
    if isinstance(module, nn.Sequential):
        # Put children fuse wrapped back, flat, under their original names.
        out = []
        for name, child in module._modules.items():
            origin = getattr(child, "_fastgan_unfused_from", None)
            out.extend(origin if origin else [(name, child)])
        module._modules = OrderedDict(out)
    remove_key_hooks(module)
    return module


def mark_flat_runs(model: nn.Module) -> None:
    """Before unfusing: note, on the Sequential that will replace each fused
    child of a plain Sequential, the original (name, child) pairs to splice back."""
    for parent in list(model.modules()):
        if not is_plain_sequential(parent):
            continue
        for name, child in list(parent._modules.items()):
            if isinstance(child, _Fused) and getattr(child, ORIGIN, None):
                plain = nn.Sequential(*(c for _, c in plain_children(child)))
                plain._fastgan_unfused_from = [(n, c) for n, c in plain_children(child)]
                parent._modules[name] = plain


def unfuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The plain-PyTorch model: every fused layer becomes its Linear,
    BatchNorm1d, activation and Dropout again, with the same tensors.

    Layers ``fuse`` made go back exactly where they were (same names, same
    state-dict keys as the model ``fuse`` was given); fused layers built
    directly (``fastgan.nn.LinearBNAct(...)``) become an ``nn.Sequential`` of
    their children, the layout of ``fastgan.models``' ``fused=False`` models.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    mark_flat_runs(model)
    return unfuse_walk(model)
