"""The CPU layer matrix (issue 11): every fused layer against the plain
``nn.Sequential`` it replaces, side by side in one process.

Cells: batch x layer (in -> out) x dropout {0, 0.2} x BN {on, off} x
{fp32, bf16} x {train, eval} x {forward, forward+backward}. Each cell times,
round-robin with the one timer (fastgan.tools.benchmark.timing.measure_many):

* ``fused``: the fused layer (``LinearBNAct`` / ``LinearAct``, cpu backend) as a
  user runs it, with the plain fallback of the speed rule
  (``fastgan.nn.fuse.speed``) in force;
* ``forced``: the same layer with the fused op forced (``fused_path("fused")``);
* ``fallback``: the same layer with its plain path forced (``fused_path("plain")``,
  what the rule falls back to: the children, and the fused kernels' dropout mask);
* ``plain``: the plain block (``linear_bn_act_sequential`` / ``linear_act_sequential``).

``speedup`` = plain / fused (the figure the issue's rule is about: no cell
below 1.0x beyond noise), ``speedup_forced`` = plain / forced (what the
rule is calibrated from), ``speedup_fallback`` = plain / fallback. Writes
every cell to a JSON file and prints the worst cells. ``--write-rule``
rewrites the speed rule's table from this run's cells
(``speed.calibrate``) and prints the worst cell the new rule would give,
from the same run's times.

    python bench/bench_cpu_matrix.py --write-rule # the full matrix + calibration (idle: ~13 min)
    python bench/bench_cpu_matrix.py              # the full matrix
    python bench/bench_cpu_matrix.py --quick      # B in {1, 64, 1024}, fewer samples
    python bench/bench_cpu_matrix.py --gemm aten  # the same with the cpu backend's GEMMs on ATen
    python bench/bench_cpu_matrix.py --batches 64 --layers 512x1024 --with-aten
        # one layer, plus the fused layer with ATen GEMMs in the same round-robin
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time

import torch

import fastgan
from fastgan.impl import cpu as cpu_impl
from fastgan.nn import layers
from fastgan.nn.fuse import speed
from fastgan.tools.benchmark.timing import measure_many

BATCHES = (1, 2, 16, 64, 256, 1024, 4096)
LAYERS = ((100, 128), (100, 256), (256, 512), (512, 1024), (784, 1024), (1024, 784), (256, 1))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(bn: bool, k: int, n: int, dropout: float, dtype, fused: bool, seed: int = 0):
    torch.manual_seed(seed)
    if bn:
        m = (layers.LinearBNAct(k, n, dropout=dropout, dtype=dtype) if fused
             else layers.linear_bn_act_sequential(k, n, dropout=dropout, dtype=dtype))
    else:
        m = (layers.LinearAct(k, n, dropout=dropout, dtype=dtype) if fused
             else layers.linear_act_sequential(k, n, dropout=dropout, dtype=dtype))
    return m


def step_fn(m, x, gy, backward: bool):
    params = list(m.parameters())
    if not backward:
        def fwd():
            with torch.no_grad():
                m(x)
        return fwd

    def fwd_bwd():
        for p in params:
            p.grad = None
        x.grad = None
        m(x).backward(gy)
    return fwd_bwd


def under_aten(fn):
    def call():
        with cpu_impl.gemm_policy("aten"):
            fn()
    return call


def under_path(fn, path: str):
    # (the switch's thread-local, set directly: a context manager per call would
    # add its own microseconds to the tiny cells)
    state = layers._path_state

    def call():
        prev, state.path = state.path, path
        try:
            fn()
        finally:
            state.path = prev
    return call


def calls_per_sample(fn, target_s: float = 2e-3, most: int = 200) -> int:
    """Calls of ``fn`` that take about ``target_s`` (timed over a few calls)."""
    fn()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    per_call = (time.perf_counter() - t0) / 3
    return max(1, min(most, int(target_s / max(per_call, 1e-7))))


def cell(b, k, n, dropout, bn, dt, mode, backward, iters, min_time_s, with_aten=False):
    dtype = DTYPES[dt]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, k, generator=g).to(dtype).requires_grad_(backward)
    gy = torch.randn(b, n, generator=g).to(dtype)
    fns = {}
    for fused in (True, False):
        m = build(bn, k, n, dropout, dtype, fused)
        m.train(mode == "train")
        fns["fused" if fused else "plain"] = step_fn(m, x, gy, backward)
    fns["forced"] = under_path(fns["fused"], "fused")
    fns["fallback"] = under_path(fns["fused"], "plain")
    fns["fused"] = under_path(fns["fused"], "auto")
    if with_aten:  # the same fused layer with its GEMMs on ATen: the oneDNN gain alone
        fns["fused_aten"] = under_aten(fns["forced"])
    # A sample is >= ~2 ms of calls: a single 100 us call is at the mercy of the
    # timer and of interrupts (medians 2x the fastest sample), which made the
    # small cells' ratios noise.
    # settle: one untimed call before each sample, so that a sample of a few large
    # calls does not hold the first call after another contender (which pays for
    # its leftovers in the caches and the heap: up to 10% of a 400 us call).
    t = measure_many(fns, torch.device("cpu"), warmup=3, iters=iters, min_time_s=min_time_s,
                     repeat={key: calls_per_sample(fn) for key, fn in fns.items()}, settle=1)
    fused_ms, plain_ms = t["fused"].median_ms, t["plain"].median_ms
    out = dict(batch=b, layer=f"{k}->{n}", dropout=dropout, bn=bn, dtype=dt, mode=mode,
               gemm=cpu_impl.gemm_path(dtype),   # the rule's rows are per GEMM path
               hardware=cpu_impl.hardware(),     # and per kind of CPU
               pass_="fwd+bwd" if backward else "fwd", fused_ms=fused_ms, plain_ms=plain_ms,
               speedup=plain_ms / fused_ms, forced_ms=t["forced"].median_ms,
               fallback_ms=t["fallback"].median_ms)
    out["speedup_forced"] = plain_ms / out["forced_ms"]
    out["speedup_fallback"] = plain_ms / out["fallback_ms"]
    out.update(forced_min_ms=min(t["forced"].samples_ms),
               fallback_min_ms=min(t["fallback"].samples_ms))
    # On a shared machine the fastest sample is the one least hit by others'
    # load: the min ratio is reported next to the median one.
    out.update(fused_min_ms=min(t["fused"].samples_ms), plain_min_ms=min(t["plain"].samples_ms))
    out["speedup_min"] = out["plain_min_ms"] / out["fused_min_ms"]
    if with_aten:
        out["fused_aten_ms"] = t["fused_aten"].median_ms
        out["fused_aten_min_ms"] = min(t["fused_aten"].samples_ms)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="B in {1, 64, 1024}, 5 samples")
    ap.add_argument("--batches", type=int, nargs="*", default=None)
    ap.add_argument("--layers", nargs="*", default=None, help="e.g. 512x1024 (default: all)")
    ap.add_argument("--dtypes", nargs="*", choices=tuple(DTYPES), default=tuple(DTYPES))
    ap.add_argument("--with-aten", action="store_true",
                    help="also time the fused layer with its GEMMs forced onto ATen")
    ap.add_argument("--iters", type=int, default=None, help="samples per contender per cell")
    ap.add_argument("--gemm", choices=cpu_impl.GEMM_POLICIES, default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--default-heap", action="store_true",
                    help="leave glibc malloc as it is (default: keep freed memory, as "
                         "fastgan bench and the trainer do for every contender)")
    ap.add_argument("--out", default="bench/results/issue11-layer-matrix.json")
    ap.add_argument("--note", default="", help="machine state, written with the results")
    ap.add_argument("--write-rule", action="store_true",
                    help="rewrite the speed rule's table (fastgan/nn/fuse/speed.py) from this run")
    ap.add_argument("--noise", type=float, default=0.05,
                    help="run-to-run noise of a cell (idle machine: ~5%%): the rule fuses "
                         "a kind of call where every cell measured >= 1 - noise")
    ap.add_argument("--by", choices=("median", "min"), default="median",
                    help="calibrate from median times (idle machine) or fastest samples (loaded)")
    ap.add_argument("--from-json", nargs="*", default=None,
                    help="skip timing: calibrate (--write-rule) from these result files")
    a = ap.parse_args(argv)
    if a.from_json:
        return calibrate_from(a)
    torch.set_num_threads(a.threads)
    # Both sides under the same allocator: without it, every call of a large
    # layer re-faults its freed dW (3 MB for 784x1024) and the medians of the
    # small-batch cells flip by 3x between runs.
    heap_kept = False if a.default_heap else cpu_impl.keep_freed_memory()
    batches = a.batches or ((1, 64, 1024) if a.quick else BATCHES)
    iters = a.iters or (5 if a.quick else 15)
    cells = []
    t0 = time.perf_counter()
    shapes = [tuple(map(int, s.split("x"))) for s in a.layers] if a.layers else LAYERS
    grid = itertools.product(batches, shapes, (0.0, 0.2), (True, False), a.dtypes,
                             ("train", "eval"), (False, True))
    with fastgan.use_backend("cpu"), cpu_impl.gemm_policy(a.gemm):
        for b, (k, n), p, bn, dt, mode, bwd in grid:
            if bn and mode == "train" and b == 1:
                continue  # BatchNorm1d cannot train on one row
            cells.append(cell(b, k, n, p, bn, dt, mode, bwd, iters, 0.0, a.with_aten))
            c = cells[-1]
            aten = f"  fused/ATen GEMMs {c['fused_aten_ms']:8.3f} ms" if a.with_aten else ""
            print(f"B={b:5} {c['layer']:>9} p={p} bn={int(bn)} {dt} {mode:5} {c['pass_']:7} "
                  f"fused {c['fused_ms']:8.3f} ms  forced {c['forced_ms']:8.3f} ms  fallback "
                  f"{c['fallback_ms']:8.3f} ms  plain {c['plain_ms']:8.3f} ms{aten}  "
                  f"{c['speedup']:5.2f}x (forced {c['speedup_forced']:5.2f}x)", flush=True)
    worst = sorted(cells, key=lambda c: c["speedup"])[:10]
    meta = dict(command="python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
                machine=f"{platform.processor() or platform.machine()}, "
                        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
                note=a.note, torch=torch.__version__, threads=a.threads, gemm=a.gemm,
                freed_memory_kept=heap_kept,
                gemm_info=cpu_impl.gemm_info(), seconds=time.perf_counter() - t0)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, worst=worst, cells=cells), f, indent=1)
    print(f"\n{len(cells)} cells -> {a.out}; worst speed-ups (fused layer, rule as run):")
    for c in worst:
        print(f"  {describe(c, c['speedup'])}")
    if a.write_rule:
        rows = speed.calibrate(cells, a.noise, a.by)
        write_rule(rows, _calibration_note([a.out], a))
        # the new rule's worst cell, from this run's times: plain / (forced or fallback)
        worst_new = min(cells, key=lambda c: predicted(c, rows))
        print(f"rule rewritten ({len(rows)} rows) in {speed.__file__}; worst cell under it "
              f"(same run): {describe(worst_new, predicted(worst_new, rows))}")
    return cells


def _calibration_note(files, a) -> str:
    """The rule's CALIBRATION: its result files, measure and noise (the speed-rule
    tests read all three back)."""
    return (f"calibrated from {', '.join(files)} (by {a.by}, noise {a.noise:g}, "
            f"{time.strftime('%Y-%m-%d')})")


def calibrate_from(a) -> list:
    """--write-rule from saved result files (no timing)."""
    cells = []
    for path in a.from_json:
        cells += speed.load_cells(path)
    rows = speed.calibrate(cells, a.noise, a.by)
    if a.write_rule:
        write_rule(rows, _calibration_note(a.from_json, a))
    for key, value in sorted(rows.items()):
        print(f"  {key}: {value}")
    return cells


def describe(c: dict, ratio: float) -> str:
    return (f"{ratio:5.2f}x  B={c['batch']} {c['layer']} p={c['dropout']} bn={int(c['bn'])} "
            f"{c['dtype']} {c['mode']} {c['pass_']}")


def predicted(c: dict, rows: dict) -> float:
    """plain / the path the rule ``rows`` takes for cell ``c``."""
    fused = speed.fused_in(c, rows.get(speed.cell_key(c), (0, 0)))
    return c["speedup_forced"] if fused else c["speedup_fallback"]


def write_rule(rows: dict, note: str) -> None:
    """Rewrite the block between ``# BEGIN TABLE`` and ``# END TABLE`` of speed.py: the
    rows of the (dtype, GEMM path, hardware) triples this calibration measured replace
    the old ones; the other triples' rows (other machines') and notes stay."""
    measured = {key[:3] for key in rows}
    table = {k: v for k, v in speed.TABLE.get("cpu", {}).items() if k[:3] not in measured}
    table.update(rows)
    notes = {k: v for k, v in speed.CALIBRATION.items() if k not in measured}
    notes.update({pair: note for pair in measured})
    path = speed.__file__
    with open(path) as f:
        text = f.read()
    head, rest = text.split("# BEGIN TABLE", 1)
    _, tail = rest.split("# END TABLE", 1)
    lines = [f"        {key!r}: {value!r}," for key, value in sorted(table.items())]
    block = ("# BEGIN TABLE (written by bench/bench_cpu_matrix.py --write-rule)\n"
             "TABLE: dict = {\n    \"cpu\": {\n" + "\n".join(lines) + "\n    },\n}\n"
             "# (dtype, GEMM path, hardware) -> where its rows come from\n"
             "CALIBRATION: dict = {\n" + "".join(
                 f"    {pair!r}: (\n" + "".join(f"        {text[i:i + 72]!r}\n"
                                               for i in range(0, len(text), 72)) + "    ),\n"
                 for pair, text in sorted(notes.items())) + "}\n")
    with open(path, "w") as f:
        f.write(head + block + "# END TABLE" + tail)


if __name__ == "__main__":
    main()
