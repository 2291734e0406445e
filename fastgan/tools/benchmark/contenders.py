"""Who competes: the contenders of one device, and the settings each runs under
(its forced backend, torch.compile mode, dtype label)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from ...ops import dispatch as _backend


@dataclass(frozen=True)
class Contender:
    name: str
    fused: bool                      # fastgan layers (True) or the nn reference (False)
    backend: Optional[str] = None    # forced fastgan backend
    compile_mode: Optional[str] = None  # None: eager; "default", "reduce-overhead", ...
    cuda_graph: bool = False


def contenders(device: torch.device, names: Optional[Iterable[str]] = None) -> list[Contender]:
    """Every contender that can run on ``device`` (filtered by ``names`` if given).

    ``names`` may use the family names ``eager``, ``compile``, ``fastgan``
    (every backend) and ``graph`` as well as exact contender names.
    """
    out = [Contender("eager", fused=False)]
    modes = ["default"] + (["reduce-overhead", "max-autotune"] if device.type == "cuda" else [])
    for m in modes:
        out.append(Contender("compile" if m == "default" else f"compile-{m}", fused=False,
                             compile_mode=m))
    for b in _backend.backends():
        mod = _backend._load(b)[0]
        if mod is not None and mod.supports(device):
            out.append(Contender(f"fastgan-{b}", fused=True, backend=b))
            if device.type == "cuda" and b != "reference":
                out.append(Contender(f"fastgan-{b}-graph", fused=True, backend=b, cuda_graph=True))
    # Triton on CPU tensors is the interpreter: a correctness tool, far too slow
    # to time. It runs only when named exactly.
    interp = {"fastgan-triton"} if device.type == "cpu" else set()
    if names is None:
        return [c for c in out if c.name not in interp]
    wanted = set(names)
    unknown = wanted - {c.name for c in out} - {"eager", "compile", "fastgan", "graph"}
    if unknown:
        raise ValueError(f"contenders: unknown or unavailable here: {sorted(unknown)}; "
                         f"available: {[c.name for c in out]}")

    def keep(c: Contender) -> bool:
        return (c.name in wanted or ("compile" in wanted and c.compile_mode is not None)
                or ("fastgan" in wanted and c.fused and not c.cuda_graph
                    and c.name not in interp)
                or ("graph" in wanted and c.cuda_graph))
    return [c for c in out if keep(c)]


@contextlib.contextmanager
def precision(dtype: str, device: torch.device):
    """Autocast / TF32 settings of one dtype label."""
    if dtype not in ("fp32", "bf16", "fp16", "tf32"):
        raise ValueError(f"dtype must be fp32, bf16, fp16 or tf32, got {dtype!r}")
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")
        if dtype in ("bf16", "fp16"):
            dt = torch.bfloat16 if dtype == "bf16" else torch.float16
            with torch.autocast(device.type, dtype=dt):
                yield
        else:
            yield
    finally:
        torch.set_float32_matmul_precision(prev)


@contextlib.contextmanager
def forced_backend(c: Contender):
    """``c``'s fastgan backend forced for the block (nothing for the nn reference)."""
    # The environment variable rather than ``use_backend``: that one is
    # thread-local, and autograd runs CUDA backward passes on its own threads.
    if not c.backend:
        yield
        return
    prev = os.environ.get("FASTGAN_BACKEND")
    os.environ["FASTGAN_BACKEND"] = c.backend
    try:
        yield
    finally:
        if prev is None:
            del os.environ["FASTGAN_BACKEND"]
        else:
            os.environ["FASTGAN_BACKEND"] = prev


def compiled(module: nn.Module, c: Contender) -> nn.Module:
    """``module`` under ``c``'s torch.compile mode (itself when ``c`` is eager)."""
    if c.compile_mode is None:
        return module
    mode = None if c.compile_mode == "default" else c.compile_mode
    # A fresh start and static shapes for every (contender, batch, dtype): the
    # models share forward code objects, so otherwise a second batch size would
    # get a dynamic-shape recompile, and many would hit the recompile limit and
    # silently fall back to eager.
    torch._dynamo.reset()
    return torch.compile(module, mode=mode, dynamic=False)
