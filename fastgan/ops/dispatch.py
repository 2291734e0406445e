"""Which backend runs an op: availability, automatic choice, overrides.

(Old name: ``fastgan.backend``, still importable.) The op bodies of
``fastgan.ops.registry`` ask ``get(function, device)`` for the backend
function to call; nothing else here touches tensors.

A backend is the module ``fastgan.impl.<name>``: it defines the functions named
in ``spec.BACKEND_FUNCTIONS`` plus ``name``, ``available() -> (bool, reason)``
and ``supports(device)``. It is imported on first use, by name: a backend whose
dependency is missing (an unbuilt extension, no Triton) is reported, not fatal.

Choice, first match wins:
1. ``use_backend(name)`` (a context manager) or the ``FASTGAN_BACKEND`` env var:
   that backend or an error, never a silent substitute.
2. By device: CUDA tensors -> ``triton``, then ``cuda``; CPU tensors -> ``cpu``;
   if none of those is available, ``reference`` with a warning (once per device type).

Every dispatch is counted in ``calls`` (``(backend, function) -> n``) so tests can
prove which backend actually ran; so is every run of a backend function that no
Python saw (a backend's ``uncounted_calls()``: the cpu backend's backward kernels
run by its C++ autograd nodes).

The override is per thread, and autograd runs the backward of CUDA tensors on
its own worker thread, which sees none: the ops' autograd Functions therefore
remember the backend their forward ran on and pass it back here
(``select(device, name)``) for their backward.
"""
from __future__ import annotations

import collections
import collections.abc
import contextlib
import importlib
import os
import threading
import warnings

import torch

NAMES = ("reference", "cpu", "triton", "cuda")
_MODULES = {name: f"fastgan.impl.{name}" for name in NAMES}
_PREFERENCE = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}

_counted: collections.Counter = collections.Counter()   # what resolve and count saw


class _Override(threading.local):
    forced = None   # (a class default: reading a missing thread-local attribute raises inside)


_local = _Override()
_warned: set = set()
_cache: dict = {}
# Every op call asks: the answers, per device, once found (what is installed
# does not change while the process runs).
_runs_on: set = set()    # (backend, device) pairs checked to work
_chosen: dict = {}       # device -> the backend chosen without an override
_resolved: dict = {}     # (override or None, device, function) -> resolve()'s answer + its count key
_ENV = "FASTGAN_BACKEND"
# os.environ.get of a missing variable raises and catches a KeyError inside:
# slow for a per-call question. Its backing dict answers the same, directly.
_environ = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(_ENV) if _environ is not None else None


def _load(name: str):
    """Import a backend module; returns (module or None, reason)."""
    if name not in _cache:
        try:
            mod = importlib.import_module(_MODULES[name])
            ok, why = mod.available()
        except Exception as e:  # a missing optional dependency, an unbuilt extension
            mod, ok, why = None, False, f"{type(e).__name__}: {e}"
        _cache[name] = (mod if ok else None, why)
    return _cache[name]


def backends() -> dict[str, str]:
    """Available backends here, each with a one-line reason/description."""
    return {n: _load(n)[1] for n in NAMES if _load(n)[0] is not None}


def unavailable() -> dict[str, str]:
    """Backends that cannot run here, with the reason."""
    return {n: _load(n)[1] for n in NAMES if _load(n)[0] is None}


def _check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force every fastgan op inside the block onto backend ``name``."""
    _check_name(name)
    prev = _local.forced
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = prev


def forced() -> str | None:
    """The backend forced by ``use_backend`` (innermost) or ``FASTGAN_BACKEND``, or None."""
    name = _local.forced or _env_backend()
    return _check_name(name) if name else None


def _env_backend() -> str | None:
    if _environ is None:
        return os.environ.get(_ENV) or None
    value = _environ.get(_ENV_KEY)
    return os.environ.decodevalue(value) if value else None


def select(device: torch.device, name: str | None = None) -> str:
    """Name of the backend that runs ops on ``device`` right now, or of backend
    ``name`` (the one a forward ran on, for its backward) after checking it can."""
    if name is None:
        name = forced()
    if name is not None:
        if (name, device) in _runs_on:
            return name
        mod, why = _load(name)
        if mod is None:
            raise RuntimeError(f"fastgan backend {name!r} was requested but is unavailable: {why}")
        if not mod.supports(device):
            raise RuntimeError(f"fastgan backend {name!r} was requested but cannot run on "
                               f"{device.type} tensors")
        _runs_on.add((name, device))
        return name
    chosen = _chosen.get(device)
    if chosen is None:
        chosen = _chosen[device] = _choose(device)
    return chosen


def _choose(device: torch.device) -> str:
    for name in _PREFERENCE.get(device.type, ()):
        mod, _ = _load(name)
        if mod is not None and mod.supports(device):
            return name
    if device.type not in _warned:
        _warned.add(device.type)
        tried = ", ".join(f"{n}: {_load(n)[1]}" for n in _PREFERENCE.get(device.type, ()))
        warnings.warn(f"fastgan: no fused backend for {device.type} tensors ({tried or 'none exists'}); "
                      "using the slow reference backend", RuntimeWarning, stacklevel=4)
    return "reference"


def resolve(function: str, device: torch.device, name: str | None = None):
    """``(backend name, its implementation of function)`` for ``device`` (or the
    given backend, see ``select``); counts the call."""
    if name is None:
        name = _local.forced or _env_backend()
    key = (name, device, function)
    hit = _resolved.get(key)
    if hit is None:  # first call of its kind: check, choose, look up
        chosen = select(device, None if name is None else _check_name(name))
        hit = _resolved[key] = (chosen, getattr(_load(chosen)[0], function), (chosen, function))
    _counted[hit[2]] += 1
    return hit[0], hit[1]


def count(name: str, function: str, n: int = 1) -> None:
    """Count ``n`` calls of backend ``name``'s ``function`` that ran without
    ``resolve`` (the cpu backend's whole-chain call runs the layers' ops in C++)."""
    _counted[(name, function)] += n


def _uncounted() -> dict:
    """Every loaded backend's own counts of the calls no Python saw, since load."""
    out: dict = {}
    for mod, _ in list(_cache.values()):
        uncounted = getattr(mod, "uncounted_calls", None)
        if uncounted is not None:
            out.update(uncounted())
    return out


class CallCounts(collections.abc.Mapping):
    """``calls``: ``(backend, function) -> n`` since the last ``clear()``, 0 for a
    pair never called (as a Counter). The calls ``resolve`` and ``count`` saw, plus
    those the loaded backends ran without Python (their ``uncounted_calls()``,
    read when asked: counting them in the kernels' own code costs nothing per call)."""

    def __init__(self):
        self._cleared: dict = {}   # a backend's own counts at the last clear()

    def _native(self) -> collections.Counter:
        out = collections.Counter()
        for key, n in _uncounted().items():
            if n != self._cleared.get(key, 0):
                out[key] = n - self._cleared.get(key, 0)
        return out

    def _all(self) -> collections.Counter:
        both = collections.Counter(_counted)
        both.update(self._native())
        return both

    def __getitem__(self, key) -> int:
        return _counted[key] + self._native()[key]

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __contains__(self, key) -> bool:
        return key in self._all()

    def clear(self) -> None:
        _counted.clear()
        self._cleared.update(_uncounted())

    def __repr__(self) -> str:
        return f"CallCounts({dict(self._all())})"


calls = CallCounts()


def get(function: str, device: torch.device, name: str | None = None):
    """The implementation of backend ``function`` chosen for ``device``; counts the call."""
    return resolve(function, device, name)[1]


_OPTIONAL: dict = {}   # (backend, function) -> the function, or None


def optional(name: str, function: str):
    """Backend ``name``'s ``function`` where that backend is available, else None
    (the extension not built): for callers with a plain-PyTorch path of their
    own (the dropout key, the optimizers' one-call steps). Looked up once; no
    call is counted."""
    key = (name, function)
    if key not in _OPTIONAL:
        mod = _load(_check_name(name))[0]
        _OPTIONAL[key] = None if mod is None else getattr(mod, function)
    return _OPTIONAL[key]


def module(name: str):
    """The module of backend ``name``; RuntimeError if it is unavailable."""
    mod, why = _load(_check_name(name))
    if mod is None:
        raise RuntimeError(f"fastgan backend {name!r} is unavailable: {why}")
    return mod
