"""State-dict keys: a fused layer's children are saved and loaded under the
names they had before ``fuse`` (``3.weight``, ``fc1.weight``), not under the
layer's own ``3.0.weight``, through hooks on the fused layer's parent."""
from __future__ import annotations

from torch import nn

from .wrap import ORIGIN


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
    # This module's keys are the last ones in the dict; re-add them in order.
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


def add_key_hooks(parent: nn.Module) -> None:
    if not any(h is state_dict_hook for h in parent._state_dict_hooks.values()):
        parent.register_state_dict_post_hook(state_dict_hook)
        parent.register_load_state_dict_pre_hook(load_pre_hook)


def remove_key_hooks(parent: nn.Module) -> None:
    for hooks in (parent._state_dict_hooks, parent._load_state_dict_pre_hooks):
        for key, h in list(hooks.items()):
            if getattr(h, "hook", h) in (state_dict_hook, load_pre_hook):
                del hooks[key]
