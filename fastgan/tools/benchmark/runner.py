"""The driver: a ``Config`` names the workloads, batches, dtypes and
contenders; ``run`` builds, warms up and samples each group of contenders side
by side and returns their records; ``profile_step`` tables where a step's time
goes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ...impl import keep_cpu_heap
from ...ops import dispatch as _backend
from .contenders import Contender, contenders, runs
from .peak import PEAK_N, gemm_peaks
from .records import add_peaks, add_speedups, record
from .timing import measure_many, sync, warm
from .workloads import (OPS, PASSES, build_op, build_step, op_flops, op_plain_reason, seed_gan,
                        step_flops)

GPU_BATCHES = (32, 64, 256, 1024, 4096, 16384)
CPU_BATCHES = (32, 64, 256)
DTYPES = ("fp32", "bf16")          # "tf32" is an opt-in label: fp32 with TF32 matmuls


def _error(e: Exception) -> str:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


def _backend_calls(name: Optional[str]) -> int:
    return sum(n for (b, _), n in _backend.calls.items() if b == name)


@dataclass
class Config:
    device: torch.device
    batches: tuple = CPU_BATCHES
    dtypes: tuple = ("fp32",)
    contenders: Optional[tuple] = None   # names; None = all available
    steps: bool = True                   # whole train step
    ops: tuple = OPS
    passes: tuple = PASSES
    warmup: int = 3
    iters: int = 20
    min_time_s: float = 0.5
    repeat: int = 1                      # calls per sample on a GPU (the CPU takes one)
    seed: int = 0
    # Train-step schedules, sampled side by side in one group; None: the
    # engine's default, under the nominal FLOP count.
    schedules: Optional[tuple] = None
    # The machine's GEMM peak per compute dtype (an n×n×n GEMM, measured once
    # per process): every record's GFLOP/s is also given as a fraction of it.
    peak: bool = True
    peak_n: int = PEAK_N


def peaks(cfg: Config) -> dict:
    """The GEMM peaks of ``cfg``'s compute dtypes (fp32 and bf16 always); {} if
    ``cfg.peak`` is off. Cached: asking again costs nothing."""
    if not cfg.peak:
        return {}
    dts = [d for _, d in runs(contenders(cfg.device, cfg.contenders), cfg.dtypes)]
    return gemm_peaks(cfg.device, dts, cfg.peak_n)


def step_op(schedule: Optional[str]) -> str:
    """The ``op`` of a train-step record: ``gan_step``, or ``gan_step:<schedule>``."""
    return "gan_step" if schedule is None else f"gan_step:{schedule}"


def run(cfg: Config, on_record: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Run every (contender, workload, batch, dtype) of ``cfg``; returns records.

    A contender that fails (e.g. torch.compile without a C++ compiler) gets a
    record with no timing and the error in ``note`` instead of stopping the run.
    Every (contender, dtype) of one (workload, batch) is one group, sampled
    round-robin: ratios across dtypes (fastgan bf16 over eager fp32) are side
    by side too. The GEMM peaks (``peaks(cfg)``) are measured first.
    """
    device = cfg.device
    keep_cpu_heap(device)   # every contender alike (fastgan.impl.keep_cpu_heap)
    pk = peaks(cfg)
    cs = runs(contenders(device, cfg.contenders), cfg.dtypes)
    # A sample is ``repeat`` calls between two CUDA events, which hides the
    # events' own launch latency; the host clock has none to hide.
    repeat = cfg.repeat if device.type == "cuda" else 1
    records = []

    def emit(r):
        records.append(r)
        if on_record is not None:
            on_record(r)

    work = []
    if cfg.steps:
        work.append(("step", "gan_step", "both"))
    work += [("op", op, p) for op in cfg.ops for p in cfg.passes]
    for kind, op, pass_ in work:
        schedules = (cfg.schedules or (None,)) if kind == "step" else (None,)
        for batch in cfg.batches:
            # One group: every (contender, dtype, schedule), sampled round-robin.
            # An op has no optimizer and no graph: eager-fused-adam would be
            # eager again, and there is no graph contender.
            group = [(c, d, s) for s in schedules for c, d in cs
                     if not (kind == "op" and (c.cuda_graph or c.fused_adam))]
            fns, notes, timings = {}, {}, {}
            for c, d, s in group:  # build and warm up each; a failure is recorded, not fatal
                key = (c.name, d, s)
                try:
                    if kind == "step":
                        fn = build_step(c, batch, device, d, cfg.seed, schedule=s)[0]
                    else:
                        fn = build_op(c, op, pass_, batch, device, d, cfg.seed)
                    before = _backend_calls(c.backend)
                    timings[key] = warm(fn, device, cfg.warmup)
                    fns[key] = fn
                    if (c.backend and _backend_calls(c.backend) == before
                            and (op, pass_) != ("gan_bce", "backward")):
                        # The label must be true: the speed rule's plain path, or a bug.
                        why = (op_plain_reason(c, op, pass_, batch, device, d)
                               if kind == "op" else None)
                        notes[key] = (f"plain path (speed rule: {why})" if why
                                      else f"backend {c.backend} never ran")
                except Exception as e:
                    notes[key] = _error(e)
            try:
                sampled = measure_many(fns, device, 0, cfg.iters, cfg.min_time_s, repeat)
            except Exception as e:
                sampled = {}
                for key in fns:
                    notes[key] = _error(e)
            group_records = []
            for c, d, s in group:
                key = (c.name, d, s)
                t = timings.get(key)
                if key in sampled and sampled[key].samples_ms:
                    t.samples_ms = sampled[key].samples_ms
                else:
                    t = None
                flops = (step_flops(*seed_gan(), batch, s) if kind == "step"
                         else op_flops(op, pass_, batch))
                group_records.append(record(kind, step_op(s) if kind == "step" else op,
                                            pass_, c, batch, d, t, flops,
                                            notes.get(key, "")))
            add_peaks(add_speedups(group_records), pk)
            for r in group_records:
                emit(r)
            del fns
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return add_peaks(add_speedups(records), pk)


# ---------------------------------------------------------------------------- profile
def profile_step(c: Contender, batch: int, device: torch.device, dtype: str = "fp32",
                 steps: int = 10, row_limit: int = 25) -> str:
    """A torch.profiler table (self time, top ops) of ``steps`` train steps."""
    step = build_step(c, batch, device, dtype)[0]
    for _ in range(3):
        step()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=row_limit)
