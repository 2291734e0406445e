"""How a module runs its fused runs: its plan, and the class that reads it.

``fuse`` never moves, wraps or replaces a module. A module with runs gets

* a plan, in its ``__dict__`` under ``PLAN``: the runs (``run.Run``), what its
  children looked like when it was planned, and how to step through them;
* a class made for it at run time: a subclass of its own class, with the
  same name, qualname and module (so ``repr``, ``isinstance`` and printing
  are unchanged), whose only addition is a ``forward`` that follows the plan.
  For a plain ``nn.Sequential`` that forward calls the children in order,
  with one fused call in place of each run's children; for a module whose
  forward ``fastgan.fuse`` traced with torch.fx, it is the generated code,
  which calls the fused runs and leaves the rest of the forward as written.

Before each call the plan checks that the module still looks as planned
(the same child types under the same names, for fx the same plain Python
attributes its traced forward read). If not, the module runs its own
class's forward, so the edit takes effect, and a warning (once) says that
it now runs unfused until ``fuse`` is called again. ``unfuse`` gives the
module its class back and removes the plan (``undo``).

Instances pickle and deep-copy as (original class, generated source), state.
"""
from __future__ import annotations

import functools
import importlib
import types
import warnings
from typing import Optional

from torch import nn

PLAN = "_fastgan_plan"
BASE = "_fastgan_base"        # class attribute of a planned class: the original class
_MISSING = object()


def original_class(t: type) -> type:
    """The class a user sees: the original of a planned or parametrized class."""
    base = t.__dict__.get(BASE)
    if base is not None:
        return base
    if t.__module__ == "torch.nn.utils.parametrize":  # Parametrized<Cls>, made by parametrize
        return t.__mro__[1]
    return t


def changed(expected: tuple, owner: nn.Module) -> Optional[str]:
    """What differs between ``expected`` ((child name, class) pairs) and owner's children."""
    mods = owner._modules
    for name, t in expected:
        if "." in name:
            try:
                m = owner.get_submodule(name)
            except AttributeError:
                return f"{name} is gone"
        else:
            m = mods.get(name, _MISSING)
            if m is _MISSING:
                return f"{name} is gone"
        if original_class(type(m)) is not t:
            return f"{name} is now a {type(m).__name__}, was {t.__name__}"
    return None


class Plan:
    """The runs of one module and what it looked like when they were planned.

    ``children``: ((name, original class), ...) the plan relies on. The first
    check that passes remembers the children's actual classes (``_fast``), so
    later calls compare them by identity; they are not pickled (a planned
    class pickles only through its instances).
    """

    def __init__(self, path: str, runs: list, children: tuple):
        self.path = path or "<root>"
        self.runs = runs
        self.children = children
        self.names = tuple(n for n, _ in children)
        self.warned = False
        self._fast = None

    def __getstate__(self):
        return {**self.__dict__, "_fast": None}

    def actual(self, owner: nn.Module) -> Optional[tuple]:
        mods = owner._modules
        try:
            return tuple(type(mods[n]) for n in self.names)
        except KeyError:
            return None

    def what_changed(self, owner: nn.Module) -> Optional[str]:
        return changed(self.children, owner)

    def fits(self, owner: nn.Module) -> bool:
        if self._fast is not None and self.actual(owner) == self._fast:
            return True
        why = self.what_changed(owner)
        if why is None:
            self._fast = self.actual(owner)
            return True
        return self.refuse(why)

    def refuse(self, why: str) -> bool:
        if not self.warned:
            self.warned = True
            warnings.warn(f"fastgan.fuse: {self.path} changed after fuse ({why}); it now runs "
                          "unfused, as written. Call fastgan.fuse on the model again to fuse it.",
                          RuntimeWarning, stacklevel=5)
        return False


class SequentialPlan(Plan):
    """``steps``: for each position, a child name (called as is) or a Run."""

    def __init__(self, path, runs, children, steps):
        super().__init__(path, runs, children)
        self.steps = steps

    def actual(self, owner):
        mods = owner._modules
        return tuple(map(type, mods.values())) if tuple(mods) == self.names else None

    def what_changed(self, owner):
        if tuple(owner._modules) != self.names:
            return "its children were added, removed or renamed"
        return changed(self.children, owner)


class FxPlan(Plan):
    """``attrs``: the plain Python attributes the traced forward may have read (frozen)."""

    def __init__(self, path, runs, children, attrs):
        super().__init__(path, runs, children)
        self.attrs = attrs

    def fits(self, owner):
        d = owner.__dict__
        for k, v in self.attrs:
            now = d.get(k, _MISSING)
            if now is not v and now != v:
                return self.refuse(f"self.{k} is now {now!r}, was {v!r} when its forward was "
                                   "traced")
        return super().fits(owner)


def frozen_attrs(module: nn.Module) -> tuple:
    """The public plain-value attributes of module (what a traced forward froze)."""
    plain = (bool, int, float, str, type(None))
    out = []
    for k, v in module.__dict__.items():
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, plain) or (isinstance(v, tuple) and all(isinstance(e, plain) for e in v)):
            out.append((k, v))
    return tuple(out)


# ----------------------------------------------------------------------------- classes
def sequential_forward(self, input):
    plan = self.__dict__.get(PLAN)
    if plan is None or not plan.fits(self):
        return type(self).__dict__[BASE].forward(self, input)
    mods = self._modules
    for step in plan.steps:
        input = mods[step](input) if step.__class__ is str else step(self, input)
    return input


def fx_forward(generated):
    def forward(self, *args, **kwargs):
        plan = self.__dict__.get(PLAN)
        if plan is None or not plan.fits(self):
            return type(self).__dict__[BASE].forward(self, *args, **kwargs)
        return generated(self, self, *args, **kwargs)
    return forward


def run_call(owner: nn.Module, index: int, x):
    """What the fx-generated forward calls for run ``index``."""
    return owner.__dict__[PLAN].runs[index](owner, x)


_CLASSES: dict = {}


def portable(globals_: dict) -> tuple:
    """The generated code's globals with modules named, so they pickle."""
    return tuple((k, ("module", v.__name__) if isinstance(v, types.ModuleType) else ("object", v))
                 for k, v in sorted(globals_.items(), key=lambda kv: kv[0]))


def planned_class(base: type, src: Optional[str] = None, globals_: tuple = ()) -> type:
    """The class of a planned module of class ``base`` (src: the fx-generated forward)."""
    key = (base, src)
    if key not in _CLASSES:
        if src is None:
            forward = functools.wraps(base.forward)(
                lambda self, *a, **k: sequential_forward(self, *a, **k))
        else:
            namespace = {k: importlib.import_module(v) if kind == "module" else v
                         for k, (kind, v) in globals_}
            exec(compile(src, f"<fastgan.fuse {base.__qualname__}.forward>", "exec"), namespace)
            forward = functools.wraps(base.forward)(fx_forward(namespace["forward"]))
        _CLASSES[key] = type(base.__name__, (base,), {
            "forward": forward, "__module__": base.__module__, "__qualname__": base.__qualname__,
            "__reduce_ex__": _reduce, BASE: base, "_fastgan_source": (src, globals_),
            "_fastgan_dropout_streams": dropout_streams})
    return _CLASSES[key]


def dropout_streams(self) -> list:
    """The dropout streams of this module's runs (``run.DropoutStream``), in order."""
    return [r.stream for r in self.__dict__[PLAN].runs]


def _reduce(self, protocol):
    return rebuild, (type(self).__dict__[BASE], *type(self)._fastgan_source), self.__dict__


def rebuild(base: type, src: Optional[str], globals_: tuple):
    cls = planned_class(base, src, globals_)
    return cls.__new__(cls)


def is_planned(m: nn.Module) -> bool:
    return BASE in type(m).__dict__


def unplan(m: nn.Module) -> None:
    """Give ``m`` its own class back and drop its plan."""
    if is_planned(m):
        m.__class__ = type(m).__dict__[BASE]
    m.__dict__.pop(PLAN, None)
