"""What this machine's GEMMs can do: the GFLOP/s of one large square GEMM
(4096³ by default) in each compute dtype, measured in the run itself, so every
contender's GEMM GFLOP/s can be shown as a fraction of it.

On the CPU the GEMM is oneDNN's (``torch.ops.mkldnn._linear_pointwise``, the
library torch bundles) and, for fp32, also ATen's ``torch.mm`` (MKL), the faster
of the two counting: on an AMD CPU with AVX-512 oneDNN is ~2x faster than MKL,
which runs AVX2 there; on an Intel CPU MKL runs AVX-512 and was ~10% ahead
(``op`` names the winner). fp32 is IEEE precision (no implicit bf16 or TF32).
bf16 is oneDNN's alone (ATen's bf16 ``torch.mm`` is oneDNN's or, without native
bf16, 5-10x slower). Without oneDNN it is ``torch.mm``. On a GPU it is
``torch.mm`` (cuBLAS). A few calls, the best one counts: the peak is what the
machine reaches, not its average under other jobs' load. The result is cached
per process (one measurement however many runs ask).
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch

from .contenders import precision
from .timing import sync

PEAK_N = 4096
# Per dtype, after the untimed first call: timed calls until this much time has
# gone (at least one, at most _MAX_CALLS). One 4096³ fp32 call takes ~0.4 s on
# 2 idle Zen 5 cores, bf16 ~0.2 s: about 2.5 s for both.
_BUDGET_S = 0.8
_MAX_CALLS = 4
_TORCH_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
                 "fp16": torch.float16}


@contextlib.contextmanager
def _ieee_onednn(dtype: str):
    """oneDNN's fp32 matmuls in IEEE fp32 for the block (``tf32``: as the label asks)."""
    mm = getattr(torch.backends.mkldnn, "matmul", None)
    prev = getattr(mm, "fp32_precision", None)
    if prev is None or dtype == "tf32":
        yield
        return
    try:
        mm.fp32_precision = "ieee"
        yield
    finally:
        mm.fp32_precision = prev


def _gemms(device: torch.device, dtype: str, n: int) -> list:
    """The zero-argument n×n×n GEMMs to try, each with the name of what it calls."""
    dt = _TORCH_DTYPES[dtype]
    a = torch.randn(n, n, device=device).to(dt)
    w = torch.randn(n, n, device=device).to(dt)
    mm = ((lambda: torch.mm(a, w)), "torch.mm")
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        lp = torch.ops.mkldnn._linear_pointwise
        onednn = ((lambda: lp(a, w, None, "none", [], "")), "mkldnn._linear_pointwise")
        return [onednn, mm] if dt == torch.float32 else [onednn]
    return [mm]


def _best_seconds(fn, dev: torch.device) -> tuple[float, int]:
    """The fastest of a few calls after an untimed first one, and how many were timed."""
    fn()  # first call: weight reorder, lazy init
    sync(dev)
    best, spent, calls = float("inf"), 0.0, 0
    while calls < 1 or (spent < _BUDGET_S and calls < _MAX_CALLS):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        dt = time.perf_counter() - t0
        best, spent, calls = min(best, dt), spent + dt, calls + 1
    return best, calls


@functools.lru_cache(maxsize=None)
def _measure(device: str, dtype: str, n: int, threads: int) -> dict:
    dev = torch.device(device)
    out = {"dtype": dtype, "n": n, "threads": threads, "gflops": None, "op": None, "note": ""}
    try:
        with precision(dtype, dev, autocast=False), _ieee_onednn(dtype):
            for fn, op in _gemms(dev, dtype, n):
                best, calls = _best_seconds(fn, dev)
                gflops = 2 * n ** 3 / best / 1e9
                if out["gflops"] is None or gflops > out["gflops"]:
                    out.update(gflops=gflops, calls=calls, op=op)
    except Exception as e:  # a dtype this machine's GEMM lacks: no peak, said why
        if "could not create a primitive" in str(e):   # oneDNN has no kernel for this ISA
            out["note"] = (f"no oneDNN {dtype} GEMM on this CPU (no native {dtype} "
                           f"instructions; fastgan's cpu backend computes {dtype} products in fp32)")
            return out
        out["note"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
    return out


def gemm_peak(device: torch.device, dtype: str, n: int = PEAK_N) -> dict:
    """The best GFLOP/s of a few n×n×n GEMMs in ``dtype`` on ``device``: a dict
    with ``gflops`` (None if it could not run; ``note`` says why), ``op``,
    ``n``, ``threads``. Cached per (device, dtype, n, thread count)."""
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_TORCH_DTYPES)}, got {dtype!r}")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    return dict(_measure(str(torch.device(device)), dtype, int(n), torch.get_num_threads()))


def gemm_peaks(device: torch.device, dtypes=("fp32", "bf16"), n: int = PEAK_N) -> dict:
    """``gemm_peak`` of fp32 and bf16 (always) and of every other dtype in ``dtypes``."""
    names = list(dict.fromkeys(("fp32", "bf16", *dtypes)))
    return {d: gemm_peak(device, d, n) for d in names}
