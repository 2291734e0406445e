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
# One program walks all the GAN's logits (one per sample) in blocks of this,
# with this many warps (at 4 warps, 8 logits a thread, ptxas spilled 16 B across
# the two logit loops; at 8 none).
BCE_BLOCK = 1024 if not INTERPRET else 256
BCE_WARPS = 8
# Column block of the partial-sum finisher (``matmul.col_sum``).
COL_SUM_BLOCK = 128

# FASTGAN_TRITON_AUTOTUNE=0: one config per kernel on the GPU too (fast start
# for tests and CI): the first config of the list that the device, dtype and
# tile height admit.
AUTOTUNE = os.environ.get("FASTGAN_TRITON_AUTOTUNE", "1") != "0"

# Registers. ptxas gives a thread at most 255 registers (fewer with more than
# 256 threads per block: 64 K per block), and the fused epilogues (tanh, Philox
# dropout, BN) keep several fp32 values per output element live. Measured with
# ``python -m fastgan.kernels.resources`` (Triton 3.8, sm_90/sm_80, tanh +
# dropout): the elementwise passes spill above 16 tile elements per thread
# (some fp32 ones above 8: ptxas settles at 128 registers and spills 8 B),
# the GEMMs whose epilogue fuses BN / activation / dropout above 32 (the
# accumulator plus the epilogue; the plain backward GEMM holds 64 without
# spilling), and at 32 warps the 64-register cap spills
# everything. So every config below has at most 16 warps and its tile height
# times width within ``PER_THREAD`` elements per thread. Where the launcher
# chooses the tile height (the single-tile kernels hold the whole batch), a
# config's warps are not enough for every height: the pruner drops the
# configs a launch's height would overflow.
PER_THREAD = {"elementwise": {"mma": 16, "fp32": 8}, "gemm": 32, "matmul": 64}

# id(config) -> (arch, dtype class, per-thread cap, fewest warps); see ``admits``.
_TAG_OF_CONFIG: dict[int, tuple[str, str, int, bool]] = {}


def single_tile_block_m(b: int) -> int:
    """Tile height that holds a whole batch of ``b`` rows."""
    return max(16, triton.next_power_of_2(b))


def _cfg(arch: str, cls: str, cap: int, fewest: bool, num_warps: int, num_stages: int,
         **kwargs) -> triton.Config:
    c = triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)
    _TAG_OF_CONFIG[id(c)] = (arch, cls, cap, fewest)
    return c


def configs(interpret: dict, rows: dict, cap: int | dict,
            fewest: bool = False) -> list[triton.Config]:
    """Config list from ``{(arch, dtype class): [(kwargs, num_warps, num_stages)]}``;
    ``cap``: elements per thread (see ``admits``), one or per dtype class;
    ``fewest``: more than 4 warps only where half as many would overflow the cap.
    Dtype classes: "mma" (bf16/fp16: tensor cores), "tf32" (fp32 with the TF32
    opt-in: tensor cores on 4-byte operands, so the "mma" tiles at half the
    depth) and "fp32" (IEEE fp32: FMA, which holds whole operand slices in
    registers, so it wants thin K). Kernels without a GEMM see "mma" or "fp32"."""
    if INTERPRET:
        return [triton.Config(interpret, num_warps=1, num_stages=1)]
    caps = cap if isinstance(cap, dict) else {cls: cap for _, cls in rows}
    return [_cfg(arch, cls, caps[cls], fewest, w, s, **kw) for (arch, cls), lst in rows.items()
            for kw, w, s in lst]


def _arch() -> str:
    major, _ = torch.cuda.get_device_capability()
    return "sm90" if major >= 9 else "sm80"


def dtype_class(dtype, tf32: bool) -> str:
    """Which config rows a launch in ``dtype`` uses (``tf32``: the TF32 opt-in)."""
    if dtype != torch.float32:
        return "mma"
    return "tf32" if tf32 else "fp32"


def per_thread(block_m: int, cfg: triton.Config) -> int:
    """Tile elements per thread of ``cfg`` at tile height ``block_m``."""
    kw = cfg.kwargs
    return kw.get("BLOCK_M", block_m) * kw["BLOCK_N"] // (32 * cfg.num_warps)


def admits(cfg: triton.Config, arch: str, cls: str, block_m: int | None) -> bool:
    """Whether ``cfg`` runs on ``arch`` for dtype class ``cls`` at the launcher's
    tile height ``block_m`` (None: the config has its own BLOCK_M)."""
    c_arch, c_cls, cap, fewest = _TAG_OF_CONFIG[id(cfg)]
    if c_arch != arch or c_cls != cls:
        return False
    if block_m is None or "BLOCK_M" in cfg.kwargs:
        return True
    per = per_thread(block_m, cfg)
    # fewest: a tile of a few elements per thread over 16 warps made ptxas settle at
    # 40 registers and spill (sm_80 fp32); such a tile gets fewer warps instead
    return per <= cap and not (fewest and cfg.num_warps > 4 and 2 * per <= cap)


def prune_for_device(cfgs, named_args, **kwargs):
    if INTERPRET:
        return cfgs
    # the first pointer argument has the op's dtype (x, a, g or h)
    first = next(v for v in named_args.values() if isinstance(v, torch.Tensor))
    tf32 = bool(kwargs.get("TF32", False))
    kept = [c for c in cfgs if admits(c, _arch(), dtype_class(first.dtype, tf32),
                                      kwargs.get("BLOCK_M"))]
    if not kept:  # cannot happen for heights <= MAX_SINGLE_TILE_B (tests check every list)
        raise RuntimeError(f"no Triton config fits a tile height of {kwargs.get('BLOCK_M')}")
    return kept if AUTOTUNE else kept[:1]


PRUNE = {"early_config_prune": prune_for_device}


def _rows(rows, with_block_m=True):
    return [({k: v for k, v in dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k).items()
              if with_block_m or k != "BLOCK_M"}, w, s) for m, n, k, w, s in rows]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Small tiles first: the
# first admitted row is the one AUTOTUNE=0 runs, and must suit small batches.
# Each list has a small-batch tile (32 x 64, 64 x 32) and large-batch ones
# (128 x 64, 64 x 128; 128 x 128 only where no epilogue is fused: matmul).
_GEMM = {
    ("sm80", "mma"): [(64, 64, 32, 4, 3), (32, 64, 64, 4, 4), (64, 32, 64, 4, 4),
                      (128, 64, 32, 8, 3), (64, 128, 32, 8, 3)],
    ("sm90", "mma"): [(64, 64, 64, 4, 3), (32, 64, 64, 4, 4), (64, 32, 64, 4, 4),
                      (128, 64, 64, 8, 3), (64, 128, 64, 8, 3)],
    # IEEE fp32 is FMA: whole operand slices live in registers, so K stays 16
    # (at K32 ptxas spilled 8 B at 128 registers in the plain GEMM)
    ("sm80", "fp32"): [(32, 64, 16, 4, 3), (64, 32, 16, 4, 3), (32, 32, 32, 4, 3),
                       (64, 64, 16, 8, 3), (64, 128, 16, 8, 3)],
    ("sm90", "fp32"): [(32, 64, 16, 4, 3), (64, 32, 16, 4, 3), (64, 64, 16, 4, 3),
                       (128, 64, 16, 8, 3), (64, 128, 16, 8, 3)],
}
# Without an epilogue (the backward GEMMs) the accumulator alone is live.
_MATMUL_EXTRA = {("sm80", "mma"): [(128, 128, 32, 8, 3)], ("sm90", "mma"): [(128, 128, 64, 8, 3)],
                 ("sm80", "fp32"): [], ("sm90", "fp32"): []}
# The tile height is the launcher's (the batch, up to MAX_SINGLE_TILE_B, or
# STATS_BLOCK_M): width, depth and warps only; the pruner drops rows the
# height would overflow (64-wide rows run for heights up to 128).
_GEMM_HEIGHT = {
    ("sm80", "mma"): [(0, 16, 16, 4, 3), (0, 32, 32, 8, 3), (0, 32, 16, 8, 3), (0, 64, 32, 8, 3)],
    ("sm90", "mma"): [(0, 16, 16, 4, 3), (0, 32, 32, 8, 3), (0, 32, 16, 8, 3), (0, 64, 32, 8, 3)],
    ("sm80", "fp32"): [(0, 16, 16, 4, 3), (0, 32, 16, 8, 3), (0, 64, 16, 8, 3)],
    ("sm90", "fp32"): [(0, 16, 16, 4, 3), (0, 32, 16, 8, 3), (0, 64, 16, 8, 3)],
}


def _with_tf32(table: dict) -> dict:
    """The table plus "tf32" rows: the "mma" tiles at half the depth (K >= 16)."""
    out = dict(table)
    for arch in ("sm80", "sm90"):
        out[(arch, "tf32")] = [(m, n, max(16, k // 2), w, s) for m, n, k, w, s in table[(arch, "mma")]]
    return out


def gemm_configs(with_block_m: bool = True, epilogue: bool = True) -> list[triton.Config]:
    """Tiles of the GEMM kernels. ``with_block_m=False``: BLOCK_M is chosen by
    the launcher (the single-tile BN kernel holds the whole batch).
    ``epilogue=False``: a plain GEMM (no fused epilogue), which affords a
    128 x 128 tile."""
    if with_block_m:
        extra = _with_tf32(_MATMUL_EXTRA)
        rows = {key: _rows(lst + ([] if epilogue else extra[key]))
                for key, lst in _with_tf32(_GEMM).items()}
        interp = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128)
    else:
        rows = {key: _rows(lst, False) for key, lst in _with_tf32(_GEMM_HEIGHT).items()}
        interp = dict(BLOCK_N=128, BLOCK_K=128)
    return configs(interp, rows, PER_THREAD["gemm" if epilogue else "matmul"])


def elementwise_configs() -> list[triton.Config]:
    """Column-block width of the elementwise/reduction passes (the launcher
    chooses the tile height): widths 16-64, each at the fewest of 4, 8 or 16
    warps that keeps the per-thread budget at the launch's height (up to 256
    rows for the single-tile kernels, 128 for the multi-tile passes); the
    pruner keeps those."""
    widths = [(dict(BLOCK_N=n), w, 1) for n in (16, 32, 64) for w in (4, 8, 16)]
    rows = {(arch, cls): widths for arch in ("sm80", "sm90") for cls in ("mma", "fp32")}
    return configs(dict(BLOCK_N=128), rows, PER_THREAD["elementwise"], fewest=True)
