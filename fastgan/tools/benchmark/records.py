"""What a run writes: one plain-dict record per measurement (``RECORD_FIELDS``),
speed-ups within each group, and the JSON document of a run (``SCHEMA``)
with the machine the numbers were measured on."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from typing import TYPE_CHECKING, Optional

import torch

from ...ops import dispatch as _backend
from .contenders import Contender, contenders
from .timing import Timing

if TYPE_CHECKING:
    from .runner import Config

SCHEMA = "fastgan-bench/1"

# One record = one (contender, what, batch, dtype) measurement.
RECORD_FIELDS = (
    "kind", "op", "pass", "contender", "backend", "batch", "dtype", "median_ms", "p20_ms",
    "p80_ms", "images_per_s", "speedup_vs_eager", "speedup_vs_compile", "tflops",
    "peak_mem_mb", "first_call_s", "warmup_s", "iters", "gflop", "note",
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
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return info


# ---------------------------------------------------------------------------- records
def record(kind, op, pass_, c: Contender, batch, dtype, t: Optional[Timing], flops,
           note="") -> dict:
    """The record of one measurement; ``t=None`` (it failed) leaves the timings empty."""
    r = dict.fromkeys(RECORD_FIELDS)
    r.update(kind=kind, op=op, contender=c.name, backend=c.backend, batch=batch, dtype=dtype,
             note=note, gflop=flops / 1e9)
    r["pass"] = pass_
    if t is not None:
        med = t.median_ms
        r.update(median_ms=med, p20_ms=t.percentile(20), p80_ms=t.percentile(80),
                 images_per_s=batch / (med / 1e3), tflops=(flops / (med / 1e3) / 1e12) or None,
                 peak_mem_mb=t.peak_mem_mb, first_call_s=t.first_call_s, warmup_s=t.warmup_s,
                 iters=len(t.samples_ms))
    return r


def add_speedups(records: list[dict]) -> list[dict]:
    """Fill ``speedup_vs_eager`` and ``speedup_vs_compile`` (vs the fastest
    ``compile*`` contender) within each (kind, op, pass, batch, dtype) group."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["kind"], r["op"], r["pass"], r["batch"], r["dtype"]), []).append(r)
    for rs in groups.values():
        ok = [r for r in rs if r["median_ms"] is not None]
        eager = next((r["median_ms"] for r in ok if r["contender"] == "eager"), None)
        comp = [r["median_ms"] for r in ok if r["contender"].startswith("compile")]
        best = min(comp) if comp else None
        for r in ok:
            r["speedup_vs_eager"] = eager / r["median_ms"] if eager else None
            r["speedup_vs_compile"] = best / r["median_ms"] if best else None
    return records


# ---------------------------------------------------------------------------- document
def result(cfg: Config, records: list[dict], machine: Optional[dict] = None) -> dict:
    """The JSON document of one run."""
    return {
        "schema": SCHEMA,
        "machine": machine if machine is not None else machine_info(cfg.device),
        "config": {"batches": list(cfg.batches), "dtypes": list(cfg.dtypes),
                   "contenders": [c.name for c in contenders(cfg.device, cfg.contenders)],
                   "ops": list(cfg.ops), "passes": list(cfg.passes), "steps": cfg.steps,
                   "warmup": cfg.warmup, "iters": cfg.iters, "min_time_s": cfg.min_time_s,
                   "repeat": cfg.repeat, "seed": cfg.seed,
                   "schedules": list(cfg.schedules) if cfg.schedules else None,
                   "flop_model": "GEMMs only: 2*B*K*N per Linear forward, x3 with backward; "
                                 "step gan_step = 3*G + 9*D forward GEMM FLOPs (nominal); "
                                 "gan_step:<schedule> = the GEMMs that schedule needs "
                                 "(fastgan.tools.benchmark.step_flops)"},
        "records": records,
    }


def validate(doc: dict) -> None:
    """Raise ValueError if ``doc`` is not a well-formed result document."""
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"schema must be {SCHEMA!r}, got {doc.get('schema')!r}")
    for key in ("machine", "config", "records"):
        if key not in doc:
            raise ValueError(f"result document lacks {key!r}")
    for key in ("cpu", "torch", "git_commit", "device"):
        if key not in doc["machine"]:
            raise ValueError(f"machine info lacks {key!r}")
    for i, r in enumerate(doc["records"]):
        missing = set(RECORD_FIELDS) - set(r)
        if missing:
            raise ValueError(f"record {i} lacks {sorted(missing)}")
