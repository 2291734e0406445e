"""When a fused op beats the same children run as plain PyTorch: the one rule.

Both users of fused ops read it: the fused layers (``fastgan.nn.LinearAct`` /
``LinearBNAct`` run their own children plainly where it says no, see
``fastgan.nn.layers``) and ``fuse`` (a run calls its children, with the reason
in the report). Neither may make a model slower than the plain model.

The rule is a table of measurements (``TABLE``), per backend and per kind of
call: the compute dtype, the path the backend's GEMMs of that dtype take on
this machine (``fastgan.impl.cpu.gemm_path``: oneDNN on an AVX-512 CPU, ATen
without AVX-512, "widened" for bf16 without native bf16 instructions; a row
measured with one path says nothing about another, where the plain layers'
GEMM may be 2x slower or 6x slower than the fused op's, or the same), the
hardware kind (``fastgan.impl.cpu.hardware``: vendor and ISA level, e.g.
"amd-avx512"; MKL runs AVX-512 on Intel CPUs only, so on the same ISA the
plain layers' fp32 GEMM is 2x faster on an Intel CPU than on an AMD one and
the fused op's gains differ), BatchNorm1d (none, training or eval
statistics), whether dropout is active and whether the call records a
backward (grad on).
A row holds the smallest batch, the smallest forward work ``B * K * N`` and
(optionally, default 1) the fewest output features from which the fused op
was measured ahead of the plain layers in every cell of the matrix; below
any of them, the plain computation runs. (The output width is there for a
discriminator's last layer, N = 1: a matrix-vector product whose fused op
loses at every batch, while the wide layers of the same kind win from far
smaller work.) A backend with
a table runs the plain computation for a kind of call it has no row for (not
measured: a dtype the matrix did not time, fp16 and fp64 on the CPU). A
backend without a table runs the fused op everywhere (the CUDA backends: no
GPU has run the matrix yet). The ``reference`` backend (plain-PyTorch math
of the spec, a test oracle) never gains; a device with no fused backend
neither. On a hardware kind that has no rows for a (dtype, GEMM path), the
rows measured on the nearest kind are read: the same ISA level from another
vendor first, else any kind measured with that GEMM path (``measured_kind``).
``calibrate`` makes the rows from the matrix's cells: per kind, the
thresholds that leave every cell where the fused op lost on the plain path
and fuse the most of the others.

Calibration (an idle machine, ~10 min; it rewrites ``TABLE`` below from the
matrix and prints the worst cell)::

    python bench/bench_cpu_matrix.py --write-rule

The ``reference`` backend, when forced (``use_backend`` / ``FASTGAN_BACKEND``), runs
in the fused layers: forcing the oracle says which code to run.
``fastgan.nn.fused_path("fused" | "plain")`` (or ``FASTGAN_FUSED_PATH``) forces
the fused layers onto either path; ``fuse(model, only_if_faster=False)`` skips
the rule for ``fuse``.
"""
from __future__ import annotations

import json
from typing import Optional

import torch

from ...ops import dispatch

# ---------------------------------------------------------------- the table
# backend -> {(dtype, gemm, hardware, bn, dropout, grad): (min_batch, min_work[, min_out])
#             or None}
#   dtype: "float32" | "bfloat16" | ...; gemm: the backend's GEMM path for the
#   dtype ("onednn" | "aten" | "widened"); hardware: the kind of machine it was
#   measured on ("amd-avx512", ...); bn: "none" | "train" | "eval";
#   dropout: dropout active in this call; grad: the call records a backward.
#   None: the fused op lost in every measured cell of the row.
# BEGIN TABLE (written by bench/bench_cpu_matrix.py --write-rule)
TABLE: dict = {
    "cpu": {
        ('bfloat16', 'onednn', 'amd-avx512', 'eval', False, False): (1, 256, 256),
        ('bfloat16', 'onednn', 'amd-avx512', 'eval', False, True): (1, 822083584),
        ('bfloat16', 'onednn', 'amd-avx512', 'none', False, False): (256, 1605632),
        ('bfloat16', 'onednn', 'amd-avx512', 'none', False, True): (1, 2147483648),
        ('bfloat16', 'onednn', 'amd-avx512', 'none', True, False): (1, 256, 128),
        ('bfloat16', 'onednn', 'amd-avx512', 'none', True, True): (1, 256, 128),
        ('bfloat16', 'onednn', 'amd-avx512', 'train', False, False): (2, 512),
        ('bfloat16', 'onednn', 'amd-avx512', 'train', False, True): (2, 52428800, 1024),
        ('bfloat16', 'onednn', 'amd-avx512', 'train', True, False): (2, 512, 128),
        ('bfloat16', 'onednn', 'amd-avx512', 'train', True, True): (2, 512, 128),
        ('bfloat16', 'onednn', 'intel-avx512', 'eval', False, False): (1, 51200, 128),
        ('bfloat16', 'onednn', 'intel-avx512', 'eval', False, True): (4097, 3288334337),
        ('bfloat16', 'onednn', 'intel-avx512', 'none', False, False): (1, 1638400),
        ('bfloat16', 'onednn', 'intel-avx512', 'none', False, True): (4097, 3288334337),
        ('bfloat16', 'onednn', 'intel-avx512', 'none', True, False): (1, 256, 128),
        ('bfloat16', 'onednn', 'intel-avx512', 'none', True, True): (1, 256, 128),
        ('bfloat16', 'onednn', 'intel-avx512', 'train', False, False): (2, 512, 128),
        ('bfloat16', 'onednn', 'intel-avx512', 'train', False, True): (4097, 3288334337),
        ('bfloat16', 'onednn', 'intel-avx512', 'train', True, False): (2, 512, 128),
        ('bfloat16', 'onednn', 'intel-avx512', 'train', True, True): (2, 512, 128),
        ('bfloat16', 'widened', 'amd-avx2', 'eval', False, False): (16, 131072),
        ('bfloat16', 'widened', 'amd-avx2', 'eval', False, True): (1, 512),
        ('bfloat16', 'widened', 'amd-avx2', 'none', False, False): (16, 131072),
        ('bfloat16', 'widened', 'amd-avx2', 'none', False, True): (2, 409600),
        ('bfloat16', 'widened', 'amd-avx2', 'none', True, False): (16, 131072),
        ('bfloat16', 'widened', 'amd-avx2', 'none', True, True): (1, 65536),
        ('bfloat16', 'widened', 'amd-avx2', 'train', False, False): (16, 204800),
        ('bfloat16', 'widened', 'amd-avx2', 'train', False, True): (2, 512),
        ('bfloat16', 'widened', 'amd-avx2', 'train', True, False): (16, 512),
        ('bfloat16', 'widened', 'amd-avx2', 'train', True, True): (2, 512),
        ('float32', 'aten', 'amd-avx2', 'eval', False, False): (257, 205520897),
        ('float32', 'aten', 'amd-avx2', 'eval', False, True): (257, 205520897),
        ('float32', 'aten', 'amd-avx2', 'none', False, False): (257, 205520897),
        ('float32', 'aten', 'amd-avx2', 'none', False, True): (257, 205520897),
        ('float32', 'aten', 'amd-avx2', 'none', True, False): (1, 256),
        ('float32', 'aten', 'amd-avx2', 'none', True, True): (1, 205520896),
        ('float32', 'aten', 'amd-avx2', 'train', False, False): (257, 205520897),
        ('float32', 'aten', 'amd-avx2', 'train', False, True): (257, 205520897),
        ('float32', 'aten', 'amd-avx2', 'train', True, False): (2, 512, 784),
        ('float32', 'aten', 'amd-avx2', 'train', True, True): (2, 12845056, 784),
        ('float32', 'aten', 'intel-avx512', 'eval', False, False): (256, 33554432, 256),
        ('float32', 'aten', 'intel-avx512', 'eval', False, True): (1, 256, 256),
        ('float32', 'aten', 'intel-avx512', 'none', False, False): (1, 26214400),
        ('float32', 'aten', 'intel-avx512', 'none', False, True): (256, 33554432),
        ('float32', 'aten', 'intel-avx512', 'none', True, False): (1, 256, 128),
        ('float32', 'aten', 'intel-avx512', 'none', True, True): (1, 256, 128),
        ('float32', 'aten', 'intel-avx512', 'train', False, False): (2, 512),
        ('float32', 'aten', 'intel-avx512', 'train', False, True): (2, 512, 256),
        ('float32', 'aten', 'intel-avx512', 'train', True, False): (2, 512),
        ('float32', 'aten', 'intel-avx512', 'train', True, True): (2, 512),
        ('float32', 'onednn', 'amd-avx512', 'eval', False, False): (1, 256, 128),
        ('float32', 'onednn', 'amd-avx512', 'eval', False, True): (1, 256, 256),
        ('float32', 'onednn', 'amd-avx512', 'none', False, False): (1, 2097152),
        ('float32', 'onednn', 'amd-avx512', 'none', False, True): (1, 2097152, 256),
        ('float32', 'onednn', 'amd-avx512', 'none', True, False): (1, 256, 128),
        ('float32', 'onednn', 'amd-avx512', 'none', True, True): (1, 256, 128),
        ('float32', 'onednn', 'amd-avx512', 'train', False, False): (2, 512),
        ('float32', 'onednn', 'amd-avx512', 'train', False, True): (16, 512, 128),
        ('float32', 'onednn', 'amd-avx512', 'train', True, False): (2, 512, 128),
        ('float32', 'onednn', 'amd-avx512', 'train', True, True): (2, 512, 128),
    },
}
# (dtype, GEMM path, hardware) -> where its rows come from
CALIBRATION: dict = {
    ('bfloat16', 'onednn', 'amd-avx512'): (
        'calibrated from bench/results/issue11-layer-matrix-session7.json (by med'
        'ian, noise 0.05, 2026-12-03)'
    ),
    ('bfloat16', 'onednn', 'intel-avx512'): (
        'calibrated from bench/results/issue11-layer-matrix-xeon-calib.json (by m'
        'edian, noise 0.05, 2026-12-04)'
    ),
    ('bfloat16', 'widened', 'amd-avx2'): (
        'calibrated from bench/results/issue11-layer-matrix-zen3.json (by median,'
        ' noise 0.05, 2026-12-03)'
    ),
    ('float32', 'aten', 'amd-avx2'): (
        'calibrated from bench/results/issue11-layer-matrix-zen3.json (by median,'
        ' noise 0.05, 2026-12-03)'
    ),
    ('float32', 'aten', 'intel-avx512'): (
        'calibrated from bench/results/issue11-layer-matrix-xeon-calib.json (by m'
        'edian, noise 0.05, 2026-12-04)'
    ),
    ('float32', 'onednn', 'amd-avx512'): (
        'calibrated from bench/results/issue11-layer-matrix-session7.json (by med'
        'ian, noise 0.05, 2026-12-03)'
    ),
}
# END TABLE

REFERENCE = "the reference backend runs the spec's plain-PyTorch math, slower than eager"
NO_BACKEND = "no fused backend runs on this device"
NEVER = "the fused op was measured slower than the plain layers for every size of this kind"
UNMEASURED = ("this kind of call (dtype, GEMM path, BatchNorm1d mode, dropout, grad) was not "
              "measured on any hardware")


def _limits(row: tuple) -> tuple[int, int, int]:
    """(min_batch, min_work, min_out) of a table row (``min_out`` 1 where left out)."""
    return (*row, 1) if len(row) == 2 else row


def _small(min_batch: int, min_work: int, min_out: int = 1) -> str:
    out = f" or {min_out} output features" if min_out > 1 else ""
    return (f"the fused op was measured slower than the plain layers below batch {min_batch} "
            f"or B*K*N = {min_work}{out} for this kind of call")


_chosen: dict = {}   # device type -> the backend the dispatcher would pick (None: none)


def backend(device_type: str) -> Optional[str]:
    """The backend that would run a fused op on ``device_type`` (None: none would)."""
    forced = dispatch.forced()
    if forced is not None:
        return forced
    if device_type not in _chosen:
        # Only this device's backends are loaded (the triton import is slow).
        _chosen[device_type] = next((n for n in dispatch._PREFERENCE.get(device_type, ())
                                     if dispatch._load(n)[0] is not None), None)
    return _chosen[device_type]


def bn_kind(bn_training: Optional[bool]) -> str:
    return "none" if bn_training is None else ("train" if bn_training else "eval")


def gemm(name: Optional[str], dtype: torch.dtype) -> str:
    """The path backend ``name``'s GEMMs of ``dtype`` take here ("" for a backend
    that has one path)."""
    module = dispatch._load(name)[0] if name else None
    path_of = getattr(module, "gemm_path", None)
    if path_of is None:
        return ""
    listeners = getattr(module, "on_gemm_change", None)
    if listeners is not None and reset not in listeners:
        listeners.append(reset)   # a new GEMM policy changes the answers cached here
    return path_of(dtype)


def hardware(name: Optional[str]) -> str:
    """The kind of machine backend ``name`` runs on ("" for a backend that does not say)."""
    module = dispatch._load(name)[0] if name else None
    kind = getattr(module, "hardware", None)
    return kind() if kind is not None else ""


_kinds: dict = {}   # (backend, dtype, gemm, hardware) -> the kind whose rows are read


def measured_kind(name: Optional[str], dtype: str, gemm_path: str, kind: str) -> str:
    """The hardware kind whose rows backend ``name`` reads for ``dtype`` and ``gemm_path``
    on hardware ``kind``: ``kind`` itself where it was measured, else a kind of the
    same ISA level ("intel-avx512" reads "amd-avx512"), else the first kind measured
    with this GEMM path ("" where none was)."""
    key = (name, dtype, gemm_path, kind)
    hit = _kinds.get(key)
    if hit is None:
        kinds = sorted({k[2] for k in TABLE.get(name, {}) if k[:2] == (dtype, gemm_path)})
        isa = kind.rpartition("-")[2]
        same_isa = [k for k in kinds if k.rpartition("-")[2] == isa]
        hit = _kinds[key] = (kind if kind in kinds else
                             (same_isa or kinds or [""])[0])
    return hit


def row(name: Optional[str], dtype: torch.dtype, bn_training: Optional[bool], dropout: bool,
        grad: bool, gemm_path: Optional[str] = None, kind: Optional[str] = None):
    """The table's row for this kind of call on backend ``name`` (``gemm_path``: the
    GEMM path it is for, ``kind``: the hardware; None: this machine's):
    (min_batch, min_work[, min_out]), None (never gains), or ``...`` when it has none."""
    rows = TABLE.get(name)
    if rows is None:
        return ...
    if gemm_path is None:
        gemm_path = gemm(name, dtype)
    if kind is None:
        kind = hardware(name)
    dt = str(dtype).rpartition(".")[2]
    key = (dt, gemm_path, measured_kind(name, dt, gemm_path, kind), bn_kind(bn_training),
           bool(dropout), bool(grad))
    return rows.get(key, ...)


def no_gain(device_type: str, dtype: torch.dtype, batch: Optional[int], in_features: int,
            out_features: int, bn_training: Optional[bool], p: float,
            grad: bool = True, name: Optional[str] = "",
            gemm_path: Optional[str] = None, kind: Optional[str] = None) -> Optional[str]:
    """None if the fused op gains for this call, else why it would not.

    ``dtype``: the inputs' dtype after autocast; ``bn_training``: None without
    BatchNorm1d, else its mode; ``p``: this call's dropout probability (0: none
    active); ``grad``: the call records a backward (the report assumes so);
    ``batch`` None: not known (the report asks at fuse time), assumed large
    enough; ``name``: the backend that would run it ("" asks ``backend``);
    ``gemm_path``, ``kind``: its GEMM path and hardware kind to read the table for
    (None: this machine's).
    """
    if name == "":
        name = backend(device_type)
    if name is None:
        return NO_BACKEND
    if name == "reference":
        return REFERENCE
    limits = row(name, dtype, bn_training, p > 0, grad, gemm_path, kind)
    if limits is ...:
        return None if name not in TABLE else UNMEASURED
    if limits is None:
        return NEVER
    min_batch, min_work, min_out = _limits(limits)
    if batch is None:
        batch = max(min_batch, -(-min_work // max(in_features * out_features, 1)))
    if batch < min_batch or batch * in_features * out_features < min_work or \
            out_features < min_out:
        return _small(min_batch, min_work, min_out)
    return None


def plain_reason(name: Optional[str], dtype: torch.dtype, batch: int, in_features: int,
                 out_features: int, bn_training: Optional[bool], dropout: bool,
                 grad: bool) -> Optional[str]:
    """Why a fused layer's call of this kind on backend ``name`` runs the plain
    computation (its children), or None when it runs the fused op."""
    if name == "reference" and dispatch.forced() == "reference":
        # The reference forced (use_backend / FASTGAN_BACKEND: tests, gold runs) is
        # what runs; the rule's "never gains" is about choosing it automatically.
        return None
    return no_gain("", dtype, batch, in_features, out_features, bn_training,
                   1.0 if dropout else 0.0, grad, name)


_decisions: dict = {}   # the fused layers' per-call question, answered once per kind
# Bumped by ``reset``: the fused layers keep their last answer with it (``layers._route``).
generation = 0


def fused_wins(name: Optional[str], dtype: torch.dtype, batch: int, in_features: int,
               out_features: int, bn_training: Optional[bool], dropout: bool,
               grad: bool) -> bool:
    """``plain_reason(...) is None``, cached: the fused layers ask on every forward."""
    key = (name, dtype, batch, in_features, out_features, bn_training, dropout, grad,
           name == "reference" and dispatch.forced() == "reference")
    hit = _decisions.get(key)
    if hit is None:
        if len(_decisions) > 4096:   # shapes a run no longer uses
            _decisions.clear()
        hit = _decisions[key] = plain_reason(name, dtype, batch, in_features, out_features,
                                             bn_training, dropout, grad) is None
    return hit


def reset() -> None:
    """Forget the cached answers (after ``TABLE`` changes, in tests)."""
    global generation
    generation += 1
    _decisions.clear()
    _chosen.clear()
    _kinds.clear()


# ---------------------------------------------------------------- calibration
def cell_key(cell: dict) -> tuple:
    """The table key of one cell of bench/bench_cpu_matrix.py's JSON (``load_cells``
    fills in the hardware of cells written before it was recorded). (Cells written
    before the GEMM path was recorded were all measured where oneDNN ran both
    fp32 and bf16: their files' ``gemm_info``.)"""
    train = cell["mode"] == "train"
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[cell["dtype"]]
    bn = ("train" if train else "eval") if cell["bn"] else "none"
    return (dtype, cell.get("gemm", "onednn"), cell.get("hardware", ""), bn,
            bool(cell["dropout"] > 0 and train), cell["pass_"] == "fwd+bwd")


def file_hardware(meta: dict) -> str:
    """The hardware kind a result file of bench/bench_cpu_matrix.py was measured on.
    Files written before it was recorded came from three machines, which their
    ``gemm_info`` tells apart: ATen's fp32 GEMM on AVX-512 (the Intel Xeon), oneDNN
    usable for fp32 (the AMD EPYC Zen 5), neither (the AMD EPYC Zen 3, AVX2)."""
    info = meta.get("gemm_info", {})
    if info.get("hardware"):
        return info["hardware"]
    if info.get("aten_fp32_avx512"):
        return "intel-avx512"
    return "amd-avx512" if info.get("onednn", {}).get("float32", True) else "amd-avx2"


def load_cells(path: str) -> list:
    """The cells of a result file of bench/bench_cpu_matrix.py, each with its hardware."""
    with open(path) as f:
        data = json.load(f)
    kind = file_hardware(data.get("meta", {}))
    for c in data["cells"]:
        c.setdefault("hardware", kind)
    return data["cells"]


def cell_work(cell: dict) -> int:
    k, n = map(int, cell["layer"].split("->"))
    return cell["batch"] * k * n


def cell_out(cell: dict) -> int:
    return int(cell["layer"].split("->")[1])


def fused_in(cell: dict, limits) -> bool:
    """Whether a table row (``limits``) fuses matrix cell ``cell``."""
    if limits is None:
        return False
    min_batch, min_work, min_out = _limits(limits)
    return (cell["batch"] >= min_batch and cell_work(cell) >= min_work
            and cell_out(cell) >= min_out)


def cell_speedup(cell: dict, by: str = "median") -> float:
    """Plain time / fused-op time of a cell (the fused path forced), from the
    medians or (``by="min"``, a loaded machine) the fastest samples."""
    if by == "min":
        if "forced_min_ms" in cell:
            return cell["plain_min_ms"] / cell["forced_min_ms"]
        return cell.get("speedup_min", cell["speedup"])
    return cell.get("speedup_forced", cell["speedup"])


def calibrate(cells: list, noise: float = 0.0, by: str = "median") -> dict:
    """Rows of ``TABLE`` from matrix cells: per kind, the (min_batch, min_work,
    min_out) that fuses the most cells while every fused cell was measured at
    >= 1 - noise (a kind that lost everywhere fuses only beyond its largest
    measured cell); ``min_out`` is left out where the narrowest layer may fuse."""
    kinds: dict = {}
    for c in cells:
        kinds.setdefault(cell_key(c), []).append((c["batch"], cell_work(c), cell_out(c),
                                                  cell_speedup(c, by)))
    rows = {}
    for key, points in sorted(kinds.items()):
        best = None
        narrowest = min(n for _, _, n, _ in points)
        for mo in sorted({n for _, _, n, _ in points}):
            for mb in sorted({b for b, _, _, _ in points}):
                for mw in sorted({w for _, w, _, _ in points}):
                    covered = [s for b, w, n, s in points if b >= mb and w >= mw and n >= mo]
                    if covered and min(covered) >= 1.0 - noise and (
                            best is None or len(covered) > best[0]):
                        best = (len(covered), mb, mw, mo)
        if best is None:
            rows[key] = (max(b for b, _, _, _ in points) + 1,
                         max(w for _, w, _, _ in points) + 1)
        else:
            rows[key] = best[1:3] if best[3] == narrowest else best[1:]
    return rows
