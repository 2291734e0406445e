"""What a launch needs to stay inside memory, checked once per call.

The op boundary (``fastgan.ops.checks``, run before dispatch) is the one full
argument check of the forward ops: ranks and shapes, dtypes that agree with x,
devices, hyper-parameters. These guards add only what these kernels need and
the boundary cannot know: a device the kernels run on, a dtype they compile
for, offsets that fit in 32 bits (inputs and outputs), and dense layout where
a kernel indexes a tensor as contiguous and cannot be handed a copy. The
backward ops are not checked at the boundary (their arguments are the
forward's saved tensors), so their launchers also guard the shapes the kernels
index by.
"""
from __future__ import annotations

import math

import torch

from . import runtime

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_LIMIT = 2**31  # the kernels' offsets are int32


def _device(t: torch.Tensor, name: str) -> None:
    # runtime.INTERPRET is read per call: tests switch it off.
    if t.device.type == "cuda" or (t.device.type == "cpu" and runtime.INTERPRET):
        return
    raise ValueError(f"the triton backend runs on CUDA tensors (or CPU tensors with "
                     f"TRITON_INTERPRET=1); {name} is on {t.device}")


def _span(t: torch.Tensor, name: str) -> None:
    # torch strides are never negative: the furthest element is the sum below
    span = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)
    if span >= _INDEX_LIMIT or t.numel() >= _INDEX_LIMIT:
        raise ValueError(f"{name} spans {span + 1} elements; the triton backend indexes with "
                         f"32-bit offsets (limit 2**31)")


def operands(shape: tuple | None = None, **named) -> None:
    """Tensors the kernels read in x's dtype (None skipped): on a device and of a
    dtype the kernels support, within 32-bit offsets; of ``shape`` where given."""
    for name, t in named.items():
        if t is None:
            continue
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        _device(t, name)
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"the triton backend supports float32, float16 and bfloat16; {name} "
                            f"is {t.dtype} (use the reference or cpu backend for "
                            f"float64/gradcheck)")
        _span(t, name)


def output(shape: tuple, name: str) -> None:
    """An output of ``shape`` that the kernels will write densely."""
    if math.prod(shape) >= _INDEX_LIMIT:
        raise ValueError(f"{name} would have {math.prod(shape)} elements; the triton backend "
                         f"indexes with 32-bit offsets (limit 2**31)")


def vectors(n: int, **named) -> None:
    """Per-column fp32 vectors of the backward (BN parameters, saved statistics)."""
    for name, t in named.items():
        if tuple(t.shape) != (n,) or t.dtype != torch.float32:
            raise ValueError(f"{name} must be a float32 vector of {n} elements, got "
                             f"{t.dtype} {tuple(t.shape)}")


def rng(seed: torch.Tensor, offset: torch.Tensor) -> None:
    """The kernels load one int64 from each."""
    for t, name in ((seed, "seed"), (offset, "offset")):
        if t.numel() != 1 or t.dtype != torch.int64:
            raise ValueError(f"{name} must be a 1-element int64 tensor")


def dense(**named) -> None:
    """Tensors a kernel indexes as contiguous and writes in place (it cannot copy them)."""
    for name, t in named.items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place or indexed "
                             f"densely)")
