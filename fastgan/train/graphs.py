"""The one way fastgan captures work in a CUDA graph: the train step, the
benchmarks and the tests all call ``capture``.

The recipe is PyTorch's documented one. ``fn`` first runs ``warmup`` times
eagerly on a side stream, so that lazy initialisation (optimizer state,
Triton autotuning, cuBLAS workspaces) happens outside the capture; then
``after_warmup`` runs (the engine puts back the state the warm-up changed);
then one call of ``fn`` is captured. ``Graphed.replay()`` reruns it and
leaves its results in the same output tensors.

    g = capture(step, warmup=3, generators=(noise,))
    out = g.replay()          # out is g.outputs, overwritten by each replay

Random draws inside ``fn`` must come from generators passed in
``generators``: they are registered with the graph, so each replay draws
fresh numbers instead of repeating the captured ones.

``capture_guard`` checks the same rules without a GPU: under it, a call that a
capture could not hold raises ``GraphCaptureError`` on any device (the CPU
tests run the train step's graph body under it).
"""
from __future__ import annotations

import contextlib
import random
from typing import Callable, Iterable, Optional

import torch
from torch.overrides import TorchFunctionMode


class GraphCaptureError(RuntimeError):
    """``fn`` could not be captured in a CUDA graph (an op that is not
    capturable: a host sync, a host-to-device copy, a CPU tensor...).
    ``reason`` is the first line of the error that stopped the capture."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


class Graphed:
    """A captured call: ``replay()`` runs it again and returns ``outputs``,
    the tensors the captured call returned (the same objects every time)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, outputs):
        self.graph, self.outputs = graph, outputs

    def replay(self):
        self.graph.replay()
        return self.outputs


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def capture(fn: Callable[[], object], warmup: int = 3,
            generators: Iterable[torch.Generator] = (),
            after_warmup: Optional[Callable[[], object]] = None, device=None) -> Graphed:
    """Warm ``fn`` up on a side stream, run ``after_warmup``, capture one call
    of ``fn`` and return it as a ``Graphed`` (module docstring).

    Raises ``GraphCaptureError`` when the capture fails; an error in the
    warm-up calls is ``fn``'s own and propagates unchanged.
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    if after_warmup is not None:
        after_warmup()
    graph = torch.cuda.CUDAGraph()
    for gen in generators:
        graph.register_generator_state(gen)
    try:
        with torch.cuda.graph(graph):
            outputs = fn()
    except RuntimeError as e:
        reason = _first_line(e)
        what = getattr(fn, "__qualname__", type(fn).__name__)
        raise GraphCaptureError(f"capturing {what} in a CUDA graph failed ({reason})",
                                reason) from e
    return Graphed(graph, outputs)


# What a CUDA graph cannot hold, by name: host syncs (the host reads device
# memory), host data turned into tensors (a host-to-device copy of values fixed
# at capture time), and tensors leaving torch's allocator.
_SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
          torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
          torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.pin_memory}
_FROM_HOST = {torch.tensor, torch.as_tensor, torch.from_numpy, torch.asarray,
              torch.Tensor.new_tensor}
# Random draws: each must name a generator registered with the graph.
_RANDOM = {torch.randn, torch.rand, torch.randint, torch.randperm, torch.normal,
           torch.bernoulli, torch.multinomial, torch.poisson, torch.randn_like, torch.rand_like,
           torch.randint_like, torch.Tensor.normal_, torch.Tensor.uniform_,
           torch.Tensor.bernoulli_, torch.Tensor.random_, torch.Tensor.exponential_,
           torch.Tensor.geometric_, torch.Tensor.log_normal_, torch.Tensor.cauchy_,
           torch.nn.functional.dropout, torch.dropout, torch.Tensor.bernoulli}


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


def _no_draw(func, args, kwargs) -> bool:
    """Dropout with p == 0 or outside training draws nothing."""
    if func not in (torch.nn.functional.dropout, torch.dropout):
        return False
    p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
    training = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else True))
    return p == 0 or not training


class _Guard(TorchFunctionMode):
    def __init__(self, generators):
        super().__init__()
        self.generators = list(generators)
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls += 1
        if func in _SYNCS:
            raise GraphCaptureError(f"{_name(func)} syncs the host: a CUDA graph cannot hold it",
                                    _name(func))
        if func in _FROM_HOST:
            raise GraphCaptureError(f"{_name(func)} copies host data to the device at capture "
                                    "time: a CUDA graph would replay the same values", _name(func))
        if func in _RANDOM and not _no_draw(func, args, kwargs):
            gen = kwargs.get("generator")
            if gen is None or not any(gen is g for g in self.generators):
                raise GraphCaptureError(f"{_name(func)} draws from a generator not registered "
                                        "with the graph: each replay would repeat its numbers",
                                        _name(func))
        return func(*args, **kwargs)


def _refuse(what: str):
    def f(*args, **kwargs):
        raise GraphCaptureError(f"{what} under capture: a CUDA graph cannot hold it", what)
    return f


@contextlib.contextmanager
def capture_guard(generators: Iterable[torch.Generator] = ()):
    """Run code as a CUDA graph capture would accept it, on any device: host
    syncs (``.item()``, ``.tolist()``, ``.cpu()``, ``bool(t)``, ``nonzero``,
    ``torch.cuda.synchronize``), tensors built from host data (``torch.tensor``,
    ``as_tensor``, ``from_numpy``), random draws that do not name one of
    ``generators`` and Python's or NumPy's RNG raise ``GraphCaptureError``.
    Yields the guard; ``guard.calls`` counts the torch calls it saw."""
    guard = _Guard(generators)
    patched = [(torch.cuda, "synchronize"), (torch.cuda.Stream, "synchronize"),
               (torch.cuda.Event, "synchronize"), (random, "random"), (random, "getrandbits")]
    try:
        import numpy
        patched += [(numpy.random, "rand"), (numpy.random, "randn"), (numpy.random, "random")]
    except ImportError:  # numpy is optional for torch
        pass
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr in patched]
    for obj, attr in patched:
        setattr(obj, attr, _refuse(f"{getattr(obj, '__name__', obj)}.{attr}"))
    try:
        with guard:
            yield guard
    finally:
        for obj, attr, old in saved:
            setattr(obj, attr, old)
