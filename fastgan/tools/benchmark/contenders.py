"""Who competes: the contenders of one device, and the settings each runs under
(its forced backend, torch.compile mode, optimizer, compute dtype)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from typing import Iterable, Optional

import torch
from torch import nn

from ...ops import dispatch as _backend


# The family names of ``contenders(names=...)``. ``eager`` is also the exact
# name of the plain reference and means only it, so commands that name it keep
# timing one contender; ``eager-all`` adds its honest variants.
FAMILIES = ("eager-all", "compile", "fastgan", "graph")


@dataclass(frozen=True)
class Contender:
    name: str
    fused: bool                      # fastgan layers (True) or the nn reference (False)
    backend: Optional[str] = None    # forced fastgan backend
    compile_mode: Optional[str] = None  # None: eager; "default", "reduce-overhead", ...
    cuda_graph: bool = False
    # The eager reference's Adam: torch.optim.Adam(fused=True) instead of the
    # default (foreach) one. Compiled and fastgan contenders always use the
    # engine's fused Adam (``make_adam``).
    fused_adam: bool = False
    # A compute dtype this contender always runs in, whatever the run's dtype
    # labels (``eager-bf16``: the eager reference under autocast bf16).
    dtype: Optional[str] = None
    # GANStep's tape (fastgan.train.tape): False runs the CPU step under autograd
    # (``fastgan-cpu-autograd``, to time what the tape saves).
    tape: bool = True


def eager_baseline(dtype: str) -> tuple[str, ...]:
    """The contender names that are "the eager reference in ``dtype``": what a row's
    ``speedup_vs_eager`` divides by (``eager``, or ``eager-bf16`` for bf16 rows)."""
    return ("eager", f"eager-{dtype}")


def contenders(device: torch.device, names: Optional[Iterable[str]] = None) -> list[Contender]:
    """Every contender that can run on ``device`` (filtered by ``names`` if given).

    ``names`` may use the family names ``eager-all`` (``eager``,
    ``eager-fused-adam``, ``eager-bf16``), ``compile``, ``fastgan`` (every
    backend) and ``graph`` as well as exact contender names.
    """
    out = [Contender("eager", fused=False),
           Contender("eager-bf16", fused=False, dtype="bf16"),
           Contender("eager-fused-adam", fused=False, fused_adam=True)]
    modes = ["default"] + (["reduce-overhead", "max-autotune"] if device.type == "cuda" else [])
    for m in modes:
        out.append(Contender("compile" if m == "default" else f"compile-{m}", fused=False,
                             compile_mode=m))
    for b in _backend.backends():
        mod = _backend._load(b)[0]
        if mod is not None and mod.supports(device):
            out.append(Contender(f"fastgan-{b}", fused=True, backend=b))
            if device.type == "cpu" and b == "cpu":
                out.append(Contender(f"fastgan-{b}-autograd", fused=True, backend=b,
                                     tape=False))
            if device.type == "cuda" and b != "reference":
                out.append(Contender(f"fastgan-{b}-graph", fused=True, backend=b, cuda_graph=True))
    # Triton on CPU tensors is the interpreter: a correctness tool, far too slow
    # to time. It runs only when named exactly, as does the untaped CPU step.
    interp = {"fastgan-triton", "fastgan-cpu-autograd"} if device.type == "cpu" else set()
    if names is None:
        return [c for c in out if c.name not in interp]
    wanted = set(names)
    unknown = wanted - {c.name for c in out} - set(FAMILIES)
    if unknown:
        raise ValueError(f"contenders: unknown or unavailable here: {sorted(unknown)}; "
                         f"available: {[c.name for c in out]}; families: {list(FAMILIES)}")

    def keep(c: Contender) -> bool:
        return (c.name in wanted or ("compile" in wanted and c.compile_mode is not None)
                or ("eager-all" in wanted and not c.fused and c.compile_mode is None)
                or ("fastgan" in wanted and c.fused and not c.cuda_graph
                    and c.name not in interp)
                or ("graph" in wanted and c.cuda_graph))
    return [c for c in out if keep(c)]


def runs(cs: list[Contender], dtypes: Iterable[str]) -> list[tuple[Contender, str]]:
    """The (contender, compute dtype) pairs a run times: every contender in every
    dtype label, a contender with its own ``dtype`` once, in that dtype. A pair
    that is the same computation as a pinned contender (``eager`` at bf16 is
    ``eager-bf16``) is timed once, under the pinned name. Ordered by dtype
    (the run's labels first, then pinned dtypes it lacks), then contender."""
    dtypes = list(dtypes)
    pinned = {(replace(c, name="", dtype=None), c.dtype) for c in cs if c.dtype}
    extra = [c.dtype for c in cs if c.dtype and c.dtype not in dtypes]
    out: list[tuple[Contender, str]] = []
    for d in dict.fromkeys(dtypes + extra):
        for c in cs:
            if c.dtype == d or (c.dtype is None and d in dtypes
                                and (replace(c, name=""), d) not in pinned):
                out.append((c, d))
    return out


def low_precision_training(c: Contender, dtype: str) -> bool:
    """Whether ``c`` runs ``dtype`` as fastgan's bf16 training mode (bf16 weights,
    fp32 master weights, BN in fp32) rather than under autocast. fastgan's own
    contenders do; the eager and compiled reference use autocast, as their
    users would."""
    return c.fused and dtype == "bf16"


def precision_label(c: Contender, dtype: str) -> str:
    """How ``c`` computes ``dtype``, in words (the record's ``precision``)."""
    if low_precision_training(c, dtype):
        return "bf16 weights, fp32 masters"
    return {"fp32": "fp32", "tf32": "fp32, TF32 matmuls", "bf16": "autocast bf16",
            "fp16": "autocast fp16"}.get(dtype, dtype)


@contextlib.contextmanager
def precision(dtype: str, device: torch.device, autocast: bool = True):
    """Autocast / TF32 settings of one dtype label (``autocast=False``: a model
    that is itself in that dtype, fastgan's bf16 training mode)."""
    if dtype not in ("fp32", "bf16", "fp16", "tf32"):
        raise ValueError(f"dtype must be fp32, bf16, fp16 or tf32, got {dtype!r}")
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")
        if dtype in ("bf16", "fp16") and autocast:
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
