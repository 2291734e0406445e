"""Launch machinery shared by the Triton kernels: interpreter detection, the
launch counter tests read, autotune config lists per GPU generation, and the
argument checks every entry point runs before a launch.

Nothing here is a kernel; ``common.py`` holds the ``@triton.jit`` helpers.
"""
from __future__ import annotations

import collections
import os

import torch
import triton

# TRITON_INTERPRET=1 must be set before any kernel module is imported: triton.jit
# decides at decoration time whether a function is compiled or interpreted.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# kernel name -> number of launches by the Python launchers (tests read it to
# prove a kernel ran, and which path: single tile or multi tile).
launches: collections.Counter = collections.Counter()

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Largest batch handled by the single-tile linear_bn_act kernels (all rows in
# one program, so BN statistics never leave registers). Above it, the
# multi-tile path: partial statistics per row tile, then a light second pass.
# Tests lower it under the interpreter to reach the multi-tile path cheaply.
MAX_SINGLE_TILE_B = 256 if not INTERPRET else 64
# Row tile of the multi-tile statistics and of the elementwise passes.
STATS_BLOCK_M = 128 if not INTERPRET else 16


def launch(name: str, kernel, grid, *args, **kwargs):
    """Launch ``kernel[grid](*args, **kwargs)`` and count it under ``name``."""
    launches[name] += 1
    kernel[grid](*args, **kwargs)


# ---------------------------------------------------------------- autotuning
# Each GPU generation gets its own list; the union is handed to
# triton.autotune and ``prune_for_device`` keeps the current device's list.
# Under the interpreter exactly one config (no benchmarking on the CPU).
_ARCH_OF_CONFIG: dict[int, str] = {}


def _cfg(arch: str, num_warps: int, num_stages: int, **kwargs) -> triton.Config:
    c = triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)
    _ARCH_OF_CONFIG[id(c)] = arch
    return c


# FASTGAN_TRITON_AUTOTUNE=0: one config per kernel on the GPU too (fast start
# for tests and CI; the first sm80 entry of each list runs on sm80 and sm90).
AUTOTUNE = os.environ.get("FASTGAN_TRITON_AUTOTUNE", "1") != "0"


def configs(interpret: dict, sm80: list[tuple], sm90: list[tuple]) -> list[triton.Config]:
    """Config list from ``(kwargs, num_warps, num_stages)`` tuples per arch."""
    if INTERPRET:
        return [triton.Config(interpret, num_warps=1, num_stages=1)]
    if not AUTOTUNE:
        kw, w, s = sm80[0]
        return [triton.Config(kw, num_warps=w, num_stages=s)]
    return ([_cfg("sm80", w, s, **kw) for kw, w, s in sm80]
            + [_cfg("sm90", w, s, **kw) for kw, w, s in sm90])


def _arch() -> str:
    major, _ = torch.cuda.get_device_capability()
    return "sm90" if major >= 9 else "sm80"


def prune_for_device(cfgs, named_args, **kwargs):
    if INTERPRET:
        return cfgs
    arch = _arch()
    kept = [c for c in cfgs if _ARCH_OF_CONFIG.get(id(c), arch) == arch]
    return kept or cfgs


PRUNE = {"early_config_prune": prune_for_device}


def gemm_configs(with_block_m: bool = True) -> list[triton.Config]:
    """Tiles of the GEMM kernels. ``with_block_m=False``: BLOCK_M is chosen by
    the launcher (the single-tile BN kernel holds the whole batch)."""
    def tiles(lst):
        return [({k: v for k, v in dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k).items()
                  if with_block_m or k != "BLOCK_M"}, w, s) for m, n, k, w, s in lst]
    sm80 = [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3),
            (32, 64, 64, 4, 4), (64, 32, 64, 4, 4)]
    sm90 = [(64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3),
            (128, 256, 64, 8, 3), (32, 64, 128, 4, 4), (64, 32, 128, 4, 4)]
    if not with_block_m:  # the tile height is the batch: vary width and depth only
        sm80 = [(0, 16, 64, 4, 3), (0, 32, 64, 4, 3), (0, 64, 32, 4, 3), (0, 64, 64, 8, 3),
                (0, 128, 32, 8, 3)]
        sm90 = [(0, 16, 128, 4, 3), (0, 32, 64, 4, 3), (0, 32, 128, 4, 4), (0, 64, 64, 8, 3),
                (0, 128, 64, 8, 3)]
    # The interpreter pays per program and per op, not per element: big tiles.
    interp = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128)
    if not with_block_m:
        interp.pop("BLOCK_M")
    uniq = lambda lst: list(dict.fromkeys(tuple(x) for x in lst))  # noqa: E731
    return configs(interp, tiles(uniq(sm80)), tiles(uniq(sm90)))


def elementwise_configs() -> list[triton.Config]:
    """Column-block width of the elementwise/reduction passes (row tile fixed)."""
    return configs(dict(BLOCK_N=128),
                   [(dict(BLOCK_N=n), w, 1) for n, w in ((32, 4), (64, 4), (128, 8))],
                   [(dict(BLOCK_N=n), w, 1) for n, w in ((32, 4), (64, 4), (128, 8))])


def single_tile_block_m(b: int) -> int:
    return max(16, triton.next_power_of_2(b))


# ---------------------------------------------------------------- validation
def check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and INTERPRET:
        return
    raise ValueError(f"the triton backend runs on CUDA tensors (or CPU tensors with "
                     f"TRITON_INTERPRET=1); {name} is on {t.device}")


def check_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the triton backend supports float32, float16 and bfloat16; {name} is "
                        f"{t.dtype} (use the reference or cpu backend for float64/gradcheck)")


def check_span(t: torch.Tensor, name: str) -> None:
    """Kernels index with 32-bit offsets: the furthest element must fit."""
    span = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)
    if span >= 2**31 or t.numel() >= 2**31:
        raise ValueError(f"{name} spans {span + 1} elements; the triton backend indexes with "
                         f"32-bit offsets (limit 2**31)")
    if any(st < 0 for st in t.stride()):
        raise ValueError(f"{name} has a negative stride {t.stride()}")


def check_like(t: torch.Tensor, name: str, shape: tuple, dtype, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    check_span(t, name)


def check_linear(x, weight, bias) -> None:
    """x (B, K), weight (N, K), bias (N,) or None: same dtype and device."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor, got {getattr(x, 'shape', type(x))}")
    check_device(x, "x")
    check_dtype(x, "x")
    check_span(x, "x")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be (out_features, {x.shape[1]}), got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    check_like(weight, "weight", tuple(weight.shape), x.dtype, x.device)
    if bias is not None:
        check_like(bias, "bias", (weight.shape[0],), x.dtype, x.device)


def check_rng(seed, offset, device) -> None:
    for t, name in ((seed, "seed"), (offset, "offset")):
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != torch.int64:
            raise ValueError(f"{name} must be a 1-element int64 tensor")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}")


def check_hyper(activation: str, negative_slope: float, p: float) -> None:
    from fastgan.ops import checks as _checks
    _checks.hyper(activation, negative_slope, p)


def check_batch_numel(b: int, n: int) -> None:
    if b * n >= 2**32:
        raise ValueError(f"batch * out_features must be below 2**32 (dropout counter), got {b} * {n}")
