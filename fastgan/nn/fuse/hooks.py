"""Hooks on a run's children: which ones a fused call can honour, which ones need
the plain run.

A fused call computes the run's output from its input in one op. What it
can honour: forward pre-hooks on the run's Linear (they see the run's own
input; the old ``nn.utils.spectral_norm`` / ``weight_norm`` recompute the
weight in one), and parametrizations (``torch.nn.utils.parametrize``: the
weight is a property read once per call). What it cannot: a forward hook
(it needs a child's own output), a forward pre-hook on a later child (its
own input), a backward hook (the gradient of a child's own output), or a
global module hook. While any of those is registered the run runs as plain
PyTorch, so the hook sees exactly what it would have seen.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module


def global_hooks() -> bool:
    """A hook registered for every module (``register_module_forward_hook``...)."""
    return bool(_module._global_forward_pre_hooks or _module._global_forward_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def needs_plain(m: nn.Module, first: bool) -> bool:
    """Whether a hook of ``m`` needs the run to run plain (``first``: m is the Linear)."""
    return bool(m._forward_hooks or m._backward_hooks or m._backward_pre_hooks
                or (m._forward_pre_hooks and not first))


def call_pre_hooks(m: nn.Module, args: tuple) -> tuple[tuple, dict]:
    """Run ``m``'s forward pre-hooks on ``args`` exactly as ``m(*args)`` would:
    the (args, kwargs) its forward is then called with."""
    kwargs: dict = {}
    for hook_id, hook in m._forward_pre_hooks.items():
        if hook_id in m._forward_pre_hooks_with_kwargs:
            result = hook(m, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError("forward pre-hook must return None or a tuple of "
                                       f"(new_args, new_kwargs), but got {result}.")
                args, kwargs = result
        else:
            result = hook(m, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    return args, kwargs


def hook_problem(label: str, m: nn.Module, first: bool) -> str | None:
    """Why a hook of ``m`` keeps the run plain, as the report says it; None if none does."""
    if m._forward_hooks:
        return f"a forward hook on {label} needs its own output, which the fused op never forms"
    if m._backward_hooks or m._backward_pre_hooks:
        return (f"a backward hook on {label} needs the gradient of its own output, which the "
                "fused op never forms")
    if m._forward_pre_hooks and not first:
        return (f"a forward pre-hook on {label} needs its own input, which the fused op never "
                "forms")
    return None


def honoured(label: str, m: nn.Module) -> list[str]:
    """What the fused call does for ``m``'s pre-hooks and parametrizations (report notes)."""
    notes = []
    if m._forward_pre_hooks:
        names = ", ".join(sorted({type(h).__name__ for h in m._forward_pre_hooks.values()}))
        notes.append(f"{label}: its forward pre-hook(s) ({names}) run before each fused call")
    params = getattr(m, "parametrizations", None)
    if isinstance(params, nn.ModuleDict):
        for name, plist in params.items():
            kinds = ", ".join(type(p).__name__ for p in plist)
            notes.append(f"{label}: {name} is parametrized ({kinds}); the fused call reads it "
                         "once per call")
    return notes
