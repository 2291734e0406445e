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
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch


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
