"""``fuse``: walk the model bottom-up, giving each container to the pass that reads it.

Plain Sequentials go to the Sequential pass; other user modules to the fx
pass; torch's own modules and fused layers are left as they are.
"""
from __future__ import annotations

import copy
from collections import Counter

from torch import nn

from ..layers import _Fused
from .fx_pass import fuse_fx
from .keys import remove_key_hooks
from .report import FuseReport, LeftAlone, join
from .sequential import fuse_sequential, is_plain_sequential, whole_run


def shared_modules(model: nn.Module) -> set:
    """ids of modules that appear under more than one name (fusing them would
    change the other places they are used)."""
    counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    return {i for i, n in counts.items() if n > 1}


def walk(module: nn.Module, path: str, shared: set, report: FuseReport) -> nn.Module:
    if isinstance(module, _Fused):
        report.left_alone.append(LeftAlone(f"{path or '<root>'} ({type(module).__name__})",
                                           "already a fused layer"))
        return module
    for name, child in list(module._modules.items()):
        if child is not None:
            new = walk(child, join(path, name), shared, report)
            if new is not child:
                module._modules[name] = new
    if is_plain_sequential(module):
        fuse_sequential(module, path, shared, report)
        whole = whole_run(module)
        if whole is not None:
            remove_key_hooks(module)
            for item in report.fused:
                if item.path == join(path, "0"):
                    item.path = path or "<root>"
            return whole
        return module
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)) or type(module) is nn.Sequential:
        return module
    if type(module).__module__.startswith("torch."):
        return module  # a library module (nn.Linear, nn.LSTM...): nothing of ours inside
    return fuse_fx(module, path, shared, report) or module


def fuse(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, FuseReport]:
    """Rewrite every fusable run of ``model`` into fastgan's fused layers.

    Returns ``(fused_model, report)``; ``print(report)`` says what was fused
    and what was left alone and why. With ``inplace=False`` (the default) the
    model is deep-copied first and the original is not touched; with
    ``inplace=True`` the fused layers take over the model's own modules (the
    returned model is ``model`` unless the root itself was rewritten by fx).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = FuseReport()
    model = walk(model, "", shared_modules(model), report)
    return model, report
