"""Models fused by fastgan before ``fuse`` kept the tree: load them, and unfuse them.

That ``fuse`` replaced each run with a ``LinearBNAct`` / ``LinearAct`` holding
the run's children (marked with their original names, ``ORIGIN``), renamed
state-dict keys back through hooks on the parent, and gave fx-rewritten
modules a generated class. Pickles of such models name ``rebuild_fx`` and
the two key hooks (as ``fastgan.nn.fuse._rebuild_fx`` etc.), so those stay,
and ``unfuse`` turns such a model into the plain one (``unfuse_legacy``).
"""
from __future__ import annotations

import importlib
from collections import OrderedDict

from torch import nn

from ..layers import _Fused

ORIGIN = "_fastgan_fuse_origin"    # original child names of a fused layer fuse made
FILLER = "_fastgan_fuse_filler"    # True where a child was a Dropout(0) fuse made up
_FX_CLASSES: dict = {}


# ----------------------------------------------------------------------------- pickles
def rebuild_fx(base: type, src: str, globals_: tuple):
    """An instance of the old fx-rewritten class of ``base``."""
    key = (base, src)
    if key not in _FX_CLASSES:
        namespace = {k: importlib.import_module(v) if kind == "module" else v
                     for k, (kind, v) in globals_}
        exec(compile(src, f"<fastgan.fuse {base.__qualname__}.forward>", "exec"), namespace)
        _FX_CLASSES[key] = type(base.__name__, (base,), {
            "forward": namespace["forward"], "__module__": base.__module__,
            "__qualname__": base.__qualname__, "_fastgan_fx": (base, src, globals_),
            "__reduce_ex__": lambda self, protocol: (rebuild_fx, type(self)._fastgan_fx,
                                                     self.__dict__)})
    cls = _FX_CLASSES[key]
    return cls.__new__(cls)


def renames(parent: nn.Module):
    """(fused child name, child index, original name) for every fused child of parent."""
    for name, child in parent._modules.items():
        origin = getattr(child, ORIGIN, None) if child is not None else None
        if origin:
            for i, orig in enumerate(origin):
                if orig is not None:
                    yield name, str(i), orig


def state_dict_hook(module, state_dict, prefix, local_metadata):
    """Save fused children under their original names (``3.weight``, not ``3.0.weight``)."""
    mapping = {f"{prefix}{name}.{i}.": f"{prefix}{orig}." for name, i, orig in renames(module)}
    if not mapping:
        return
    mine = [k for k in state_dict if k.startswith(prefix)]
    items = [(k, state_dict.pop(k)) for k in mine]
    for k, v in items:
        for old, new in mapping.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        state_dict[k] = v


def load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
                  unexpected_keys, error_msgs):
    """Accept original-name keys for fused children (and fused-layout keys as they are)."""
    for name, i, orig in renames(module):
        child = module._modules[name][int(i)]
        own = set(child.state_dict().keys())
        for k in [k for k in state_dict if k.startswith(f"{prefix}{orig}.")]:
            rest = k[len(f"{prefix}{orig}."):]
            if rest in own:
                state_dict[f"{prefix}{name}.{i}.{rest}"] = state_dict.pop(k)


# ----------------------------------------------------------------------------- unfuse
def remove_key_hooks(parent: nn.Module) -> None:
    for hooks in (parent._state_dict_hooks, parent._load_state_dict_pre_hooks):
        for key, h in list(hooks.items()):
            if getattr(h, "hook", h) in (state_dict_hook, load_pre_hook):
                del hooks[key]


def plain_children(fused: _Fused):
    """(original name or None, child) pairs, minus the Dropout(0) fillers fuse made up."""
    origin = getattr(fused, ORIGIN, None) or (None,) * len(fused)
    filler = getattr(fused, FILLER, (False,) * len(fused))
    return [(o, c) for o, c, f in zip(origin, fused, filler) if not f]


def unfuse_legacy(module: nn.Module) -> None:
    """Put back, in ``module`` and below, what the old ``fuse`` wrapped or rewrote."""
    for child in list(module._modules.values()):
        if child is not None and not isinstance(child, _Fused):
            unfuse_legacy(child)
    if "_fastgan_fx" in type(module).__dict__:
        for name, child in list(module._modules.items()):
            if isinstance(child, _Fused) and getattr(child, ORIGIN, None):
                del module._modules[name]
                for orig, plain in plain_children(child):
                    if orig is not None:
                        module._modules[orig] = plain
        order = module.__dict__.pop("_fastgan_fx_order", list(module._modules))
        module._modules = OrderedDict(
            [(n, module._modules[n]) for n in order if n in module._modules]
            + [(n, m) for n, m in module._modules.items() if n not in order])
        module.__class__ = type(module)._fastgan_fx[0]
    elif any(isinstance(c, _Fused) and getattr(c, ORIGIN, None)
             for c in module._modules.values()):
        out = []  # a Sequential: the wrapped children back, flat, under their names
        for name, child in module._modules.items():
            if isinstance(child, _Fused) and getattr(child, ORIGIN, None):
                out.extend(plain_children(child))
            else:
                out.append((name, child))
        module._modules = OrderedDict(out)
    remove_key_hooks(module)
