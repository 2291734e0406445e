"""How the Triton kernels run: compiled or interpreted, how often each was
launched (tests read ``launches`` to prove a kernel ran, and which path), and
the activation/dropout arguments every fused kernel takes.

Autotune configs and tile sizes live in ``configs.py``, the per-call argument
guards in ``guards.py``; ``common.py`` holds the ``@triton.jit`` helpers.
"""
from __future__ import annotations

import collections
import os

import torch

from fastgan.ops.spec import ACTIVATIONS, dropout_scale

# TRITON_INTERPRET=1 must be set before any kernel module is imported: triton.jit
# decides at decoration time whether a function is compiled or interpreted.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# kernel name -> number of launches by the Python launchers.
launches: collections.Counter = collections.Counter()


def launch(name: str, kernel, grid, *args, **kwargs):
    """Launch ``kernel[grid](*args, **kwargs)`` and count it under ``name``."""
    launches[name] += 1
    kernel[grid](*args, **kwargs)


def act_args(activation: str, negative_slope: float, p: float) -> tuple[tuple, dict]:
    """``(slope, p, scale)`` and the ``ACT`` / ``HAS_DROPOUT`` constexprs of the
    fused kernels (scale: the inverted-dropout factor, 1 without dropout)."""
    scalars = (float(negative_slope), float(p), dropout_scale(p) if p > 0 else 1.0)
    return scalars, dict(ACT=ACTIVATIONS[activation], HAS_DROPOUT=p > 0)


def tf32(dtype: torch.dtype) -> bool:
    """The TF32 opt-in of the fp32 GEMMs (the ``TF32`` constexpr of the GEMM
    kernels). Off by default: fp32 is IEEE fp32 (``tl.dot(input_precision="ieee")``),
    the fp32 contract. On exactly when torch lets cuBLAS use TF32 for fp32
    matmuls (``torch.backends.cuda.matmul.allow_tf32 = True``, which
    ``torch.set_float32_matmul_precision("high")`` also sets), so that a
    "tf32" benchmark compares TF32 with TF32. bf16/fp16 never look at it."""
    return dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
