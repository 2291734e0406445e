"""Old import paths of the flat package, kept working for users' code.

Each old module name is an alias of the module that now holds its contents;
``import fastgan.backend`` and ``from fastgan.checkpoint import save`` return
the very same module objects as ``fastgan.ops.dispatch`` and
``fastgan.train.checkpoint``. Aliases resolve on first import (nothing heavy
is imported with ``fastgan``). Add a line here when a module moves.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

ALIASES = {
    "fastgan.spec": "fastgan.ops.spec",
    "fastgan._checks": "fastgan.ops.checks",
    "fastgan.backend": "fastgan.ops.dispatch",
    "fastgan.functional": "fastgan.ops.functional",
    "fastgan.reference": "fastgan.impl.reference",
    "fastgan.cext": "fastgan.impl.cpu",
    "fastgan.cext_cuda": "fastgan.impl.cuda",
    "fastgan.models": "fastgan.nn.models",
    "fastgan.fuse": "fastgan.nn.fuse",
    "fastgan.checkpoint": "fastgan.train.checkpoint",
    "fastgan.data": "fastgan.train.data",
    "fastgan.distributed": "fastgan.train.distributed",
    "fastgan.benchmark": "fastgan.tools.benchmark",
    "fastgan.quality": "fastgan.tools.quality",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.own_spec = module.__spec__
        return module

    def exec_module(self, module):
        # The target ran when it was imported; the import system has just put
        # the alias's spec on it: give it its own back (reload, pickling).
        module.__spec__ = self.own_spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in ALIASES:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(ALIASES[fullname]))


def install(eager=()) -> None:
    """Put the finder on ``sys.meta_path``; alias the ``eager`` old names now
    (modules the package imports anyway, and names that are also attributes of
    ``fastgan``, such as the function ``fastgan.fuse``, which a late import of
    the module would overwrite)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
    package = sys.modules[__package__]
    for old in eager:
        module = sys.modules.setdefault(old, importlib.import_module(ALIASES[old]))
        attr = old.rpartition(".")[2]
        if not hasattr(package, attr):
            setattr(package, attr, module)
