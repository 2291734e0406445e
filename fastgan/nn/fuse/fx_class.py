"""The class of a module the fx pass rewrote, made at run time.

It is a subclass of the user's class whose ``forward`` is the source torch.fx
generated. Such a class exists in no module, so its instances pickle (and so
deep-copy) as (base class, source, globals), and ``rebuild_fx`` makes the
class again from those, once per (base, source).
"""
from __future__ import annotations

import importlib
import types

_FX_CLASSES: dict = {}


def portable(globals_: dict) -> tuple:
    """The generated code's globals with modules named, so they pickle."""
    items = []
    for k, v in sorted(globals_.items(), key=lambda kv: kv[0]):
        items.append((k, ("module", v.__name__) if isinstance(v, types.ModuleType)
                      else ("object", v)))
    return tuple(items)


def fx_class(base: type, src: str, globals_: tuple) -> type:
    key = (base, src)
    if key not in _FX_CLASSES:
        namespace = {k: importlib.import_module(v) if kind == "module" else v
                     for k, (kind, v) in globals_}
        exec(compile(src, f"<fastgan.fuse {base.__qualname__}.forward>", "exec"), namespace)
        _FX_CLASSES[key] = type(base.__name__, (base,), {
            "forward": namespace["forward"],
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__reduce_ex__": _reduce_fx,
            "_fastgan_fx": (base, src, globals_),   # unfuse reads the base class here
        })
    return _FX_CLASSES[key]


def _reduce_fx(self, protocol):
    return rebuild_fx, (*type(self)._fastgan_fx,), self.__dict__


def rebuild_fx(base: type, src: str, globals_: tuple):
    cls = fx_class(base, src, globals_)
    return cls.__new__(cls)
