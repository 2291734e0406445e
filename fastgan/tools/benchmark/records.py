"""What a run writes: one plain-dict record per measurement (``RECORD_FIELDS``),
speed-ups within each group, and the JSON document of a run (``SCHEMA``)
with the machine the numbers were measured on."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Optional

import torch

from ...ops import dispatch as _backend
from .contenders import Contender, contenders, eager_baseline, precision_label, runs
from .timing import Timing

if TYPE_CHECKING:
    from .runner import Config

SCHEMA = "fastgan-bench/2"  # 2: the GEMM peaks, xeager-fp32, precision

# One record = one (contender, what, batch, dtype) measurement.
# ``dtype`` is the compute dtype the contender ran in, ``precision`` how (autocast,
# or fastgan's bf16 training mode). ``speedup_vs_eager``: over the eager reference
# in the row's dtype; ``speedup_vs_eager_fp32``: over eager fp32 at the same
# batch. ``gemm_gflops``: the step's (op's) GEMM FLOPs / its median time;
# ``peak_gflops``: this machine's GEMM peak in the row's dtype, measured in the
# same run (``peak.gemm_peak``); ``peak_frac`` = gemm_gflops / peak_gflops.
RECORD_FIELDS = (
    "kind", "op", "pass", "contender", "backend", "batch", "dtype", "precision", "median_ms",
    "p20_ms", "p80_ms", "images_per_s", "speedup_vs_eager", "speedup_vs_eager_fp32",
    "speedup_vs_compile", "tflops", "gemm_gflops", "peak_gflops", "peak_frac", "peak_mem_mb",
    "first_call_s", "warmup_s", "iters", "gflop", "note",
)


# ---------------------------------------------------------------------------- machine
def _git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_heap_kept() -> bool:
    cpu = sys.modules.get("fastgan.impl.cpu")
    return bool(cpu is not None and cpu.freed_memory_kept())


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on: recorded with every result file."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # not installed, or broken on this platform
        triton_version = None
    info = {
        "device": device.type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "backends": dict(_backend.backends()),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        # fastgan.impl.cpu.keep_freed_memory: whether the heap keeps freed memory
        "cpu_heap_kept": _cpu_heap_kept(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return info


# ---------------------------------------------------------------------------- records
def record(kind, op, pass_, c: Contender, batch, dtype, t: Optional[Timing], flops,
           note="") -> dict:
    """The record of one measurement; ``t=None`` (it failed) leaves the timings empty."""
    r = dict.fromkeys(RECORD_FIELDS)
    r.update(kind=kind, op=op, contender=c.name, backend=c.backend, batch=batch, dtype=dtype,
             precision=precision_label(c, dtype), note=note, gflop=flops / 1e9)
    r["pass"] = pass_
    if t is not None:
        med = t.median_ms
        r.update(median_ms=med, p20_ms=t.percentile(20), p80_ms=t.percentile(80),
                 images_per_s=batch / (med / 1e3), tflops=(flops / (med / 1e3) / 1e12) or None,
                 gemm_gflops=(flops / (med / 1e3) / 1e9) or None,
                 peak_mem_mb=t.peak_mem_mb, first_call_s=t.first_call_s, warmup_s=t.warmup_s,
                 iters=len(t.samples_ms))
    return r


def add_speedups(records: list[dict]) -> list[dict]:
    """Fill, within each (kind, op, pass, batch): ``speedup_vs_eager`` (over the
    eager reference in the row's dtype: ``eager``, or ``eager-<dtype>``),
    ``speedup_vs_eager_fp32`` (over ``eager`` in fp32, whatever the row's
    dtype) and ``speedup_vs_compile`` (over the fastest ``compile*`` contender
    in the row's dtype). A baseline that is absent or failed leaves None."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["kind"], r["op"], r["pass"], r["batch"]), []).append(r)
    for rs in groups.values():
        ok = [r for r in rs if r["median_ms"] is not None]

        def eager_ms(dtype):
            return next((r["median_ms"] for r in ok if r["dtype"] == dtype
                         and r["contender"] in eager_baseline(dtype)), None)
        fp32 = eager_ms("fp32")
        for r in ok:
            same = eager_ms(r["dtype"])
            comp = [q["median_ms"] for q in ok
                    if q["dtype"] == r["dtype"] and q["contender"].startswith("compile")]
            r["speedup_vs_eager"] = same / r["median_ms"] if same else None
            r["speedup_vs_eager_fp32"] = fp32 / r["median_ms"] if fp32 else None
            r["speedup_vs_compile"] = min(comp) / r["median_ms"] if comp else None
    return records


def add_peaks(records: list[dict], peaks: Optional[dict]) -> list[dict]:
    """Fill ``peak_gflops`` and ``peak_frac`` from ``peaks`` ({dtype: gemm_peak dict})."""
    for r in records:
        p = (peaks or {}).get(r["dtype"]) or {}
        r["peak_gflops"] = p.get("gflops")
        r["peak_frac"] = (r["gemm_gflops"] / r["peak_gflops"]
                          if r.get("gemm_gflops") and r["peak_gflops"] else None)
    return records


# ---------------------------------------------------------------------------- document
def result(cfg: Config, records: list[dict], machine: Optional[dict] = None,
           peaks: Optional[dict] = None) -> dict:
    """The JSON document of one run (``peaks``: {dtype: gemm_peak dict}, the
    machine's GEMM peak in each compute dtype, measured in the run)."""
    return {
        "schema": SCHEMA,
        "machine": machine if machine is not None else machine_info(cfg.device),
        "config": {"batches": list(cfg.batches), "dtypes": list(cfg.dtypes),
                   "contenders": [c.name for c in contenders(cfg.device, cfg.contenders)],
                   # what was timed: (contender, compute dtype, how it computed it)
                   "runs": [[c.name, d, precision_label(c, d)]
                            for c, d in runs(contenders(cfg.device, cfg.contenders), cfg.dtypes)],
                   "peak_n": cfg.peak_n if cfg.peak else None,
                   "ops": list(cfg.ops), "passes": list(cfg.passes), "steps": cfg.steps,
                   "warmup": cfg.warmup, "iters": cfg.iters, "min_time_s": cfg.min_time_s,
                   "repeat": cfg.repeat, "seed": cfg.seed,
                   "schedules": list(cfg.schedules) if cfg.schedules else None,
                   "flop_model": "GEMMs only: 2*B*K*N per Linear forward, x3 with backward; "
                                 "step gan_step = 3*G + 9*D forward GEMM FLOPs (nominal); "
                                 "gan_step:<schedule> = the GEMMs that schedule needs "
                                 "(fastgan.tools.benchmark.step_flops)"},
        "peaks": peaks or {},
        "records": records,
    }


def validate(doc: dict) -> None:
    """Raise ValueError if ``doc`` is not a well-formed result document."""
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"schema must be {SCHEMA!r}, got {doc.get('schema')!r}")
    for key in ("machine", "config", "peaks", "records"):
        if key not in doc:
            raise ValueError(f"result document lacks {key!r}")
    for key in ("cpu", "torch", "git_commit", "device"):
        if key not in doc["machine"]:
            raise ValueError(f"machine info lacks {key!r}")
    for i, r in enumerate(doc["records"]):
        missing = set(RECORD_FIELDS) - set(r)
        if missing:
            raise ValueError(f"record {i} lacks {sorted(missing)}")
