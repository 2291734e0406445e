"""The one timer of fastgan's benchmarks (``fastgan bench``, bench/bench_ops.py).

A sample is ``repeat`` back-to-back calls, reported per call: between two CUDA
events on a GPU (no host sync inside, so the timer's own launch latency is
not counted), by the host clock on the CPU. ``warm`` times the first call
(compilation, capture, lazy init) and the rest of the warm-up apart from the
samples. ``measure_many`` samples several callables round-robin, one sample
each per round, so a change in the machine's load hits all of them alike; the
order rotates each round, so that no callable always runs right after the same
other one (the first call after a switch pays for what the previous callable
left in the caches and the heap: a fixed order put that on one of them, up to
10% of a 400 us call in the layer matrix), and ``settle`` untimed calls before
each sample leave it out where a sample holds only a few calls.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch


@dataclass
class Timing:
    samples_ms: list = field(default_factory=list)
    first_call_s: float = 0.0
    warmup_s: float = 0.0
    peak_mem_mb: Optional[float] = None

    def percentile(self, q: float) -> float:
        xs = sorted(self.samples_ms)
        if len(xs) == 1:
            return xs[0]
        pos = q / 100 * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm(fn: Callable[[], object], device: torch.device, warmup: int = 3) -> Timing:
    """First call (compilation, capture, lazy init) and warm-up, timed apart."""
    t = Timing()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    t.first_call_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(max(warmup - 1, 0)):
        fn()
    sync(device)
    t.warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        # peak of the warm-up calls: what one contender needs (later samples
        # interleave contenders, so their peak would mix them)
        t.peak_mem_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return t


def sample(fn: Callable[[], object], device: torch.device, repeat: int = 1) -> float:
    """Milliseconds per call over ``repeat`` back-to-back calls."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(repeat):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / repeat
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) * 1e3 / repeat


def measure_many(fns: dict, device: torch.device, warmup: int = 3, iters: int = 20,
                 min_time_s: float = 0.0, repeat: Union[int, dict] = 1,
                 settle: int = 0) -> dict:
    """Time several callables side by side: each is warmed up, then samples are
    taken round-robin (one per callable per round, the order rotated each round)
    until each has ``iters`` and ``min_time_s`` per callable has passed.
    Interleaving keeps the ratios fair when the machine's load drifts (a shared
    CPU). ``repeat`` is the calls per sample, one number or one per key;
    ``settle`` the untimed calls before each sample. Returns {key: Timing}."""
    timings = {k: (warm(fn, device, warmup) if warmup else Timing()) for k, fn in fns.items()}
    if not fns:
        return timings
    reps = repeat if isinstance(repeat, dict) else dict.fromkeys(fns, repeat)
    keys = list(fns)
    start = time.perf_counter()
    rounds = 0
    while rounds < iters or time.perf_counter() - start < min_time_s * len(fns):
        shift = rounds % len(keys)
        for k in keys[shift:] + keys[:shift]:
            fn = fns[k]
            for _ in range(settle):
                fn()
            timings[k].samples_ms.append(sample(fn, device, reps[k]))
        rounds += 1
        if rounds >= 50 * max(iters, 1):
            break
    return timings


def measure(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 20,
            min_time_s: float = 0.0, repeat: int = 1) -> Timing:
    """Time ``fn`` alone (see ``measure_many``)."""
    return measure_many({0: fn}, device, warmup, iters, min_time_s, repeat)[0]
