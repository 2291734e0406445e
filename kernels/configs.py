"""Tile sizes and autotune config tables of the Triton kernels.

Each GPU generation gets its own list; the union is handed to
``triton.autotune`` and ``prune_for_device`` keeps the current device's list.
Under the interpreter exactly one config (no benchmarking on the CPU), with big
tiles: the interpreter pays per program and per op, not per element.
"""
from __future__ import annotations

import os

import torch
import triton

from .runtime import INTERPRET

# Largest batch handled by the single-tile kernels (all rows in one program, so
# BN statistics and column sums never leave registers). Above it, the
# multi-tile path: partial sums per row tile, then a light second pass. Tests
# lower both under the interpreter to reach the multi-tile path cheaply; the
# launchers read them at call time.
MAX_SINGLE_TILE_B = 256 if not INTERPRET else 64
# Row tile of the multi-tile statistics and of the elementwise passes.
STATS_BLOCK_M = 128 if not INTERPRET else 16
# One program walks all the GAN's logits (one per sample) in blocks of this.
BCE_BLOCK = 1024 if not INTERPRET else 256
# Column block of the partial-sum finisher (``matmul.col_sum``).
COL_SUM_BLOCK = 128

# FASTGAN_TRITON_AUTOTUNE=0: one config per kernel on the GPU too (fast start
# for tests and CI; the first sm80 entry of each list runs on sm80 and sm90).
AUTOTUNE = os.environ.get("FASTGAN_TRITON_AUTOTUNE", "1") != "0"

_ARCH_OF_CONFIG: dict[int, str] = {}


def single_tile_block_m(b: int) -> int:
    """Tile height that holds a whole batch of ``b`` rows."""
    return max(16, triton.next_power_of_2(b))


def _cfg(arch: str, num_warps: int, num_stages: int, **kwargs) -> triton.Config:
    c = triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)
    _ARCH_OF_CONFIG[id(c)] = arch
    return c


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


def _unique(rows: list[tuple]) -> list[tuple]:
    return list(dict.fromkeys(rows))


def gemm_configs(with_block_m: bool = True) -> list[triton.Config]:
    """Tiles of the GEMM kernels. ``with_block_m=False``: BLOCK_M is chosen by
    the launcher (the single-tile BN kernel holds the whole batch)."""
    def tiles(rows):
        return [({k: v for k, v in dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k).items()
                  if with_block_m or k != "BLOCK_M"}, w, s) for m, n, k, w, s in _unique(rows)]
    sm80 = [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3),
            (32, 64, 64, 4, 4), (64, 32, 64, 4, 4)]
    sm90 = [(64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3),
            (128, 256, 64, 8, 3), (32, 64, 128, 4, 4), (64, 32, 128, 4, 4)]
    if not with_block_m:  # the tile height is the batch: vary width and depth only
        sm80 = [(0, 16, 64, 4, 3), (0, 32, 64, 4, 3), (0, 64, 32, 4, 3), (0, 64, 64, 8, 3),
                (0, 128, 32, 8, 3)]
        sm90 = [(0, 16, 128, 4, 3), (0, 32, 64, 4, 3), (0, 32, 128, 4, 4), (0, 64, 64, 8, 3),
                (0, 128, 64, 8, 3)]
    interp = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128)
    if not with_block_m:
        interp.pop("BLOCK_M")
    return configs(interp, tiles(sm80), tiles(sm90))


def elementwise_configs() -> list[triton.Config]:
    """Column-block width of the elementwise/reduction passes (row tile fixed)."""
    widths = [(dict(BLOCK_N=n), w, 1) for n, w in ((32, 4), (64, 4), (128, 8))]
    return configs(dict(BLOCK_N=128), widths, widths)
