"""The CPU layer matrix (issue 11): every fused layer against the plain
``nn.Sequential`` it replaces, side by side in one process.

Cells: batch x layer (in -> out) x dropout {0, 0.2} x BN {on, off} x
{fp32, bf16} x {train, eval} x {forward, forward+backward}. Each cell times
the fused layer (``LinearBNAct`` / ``LinearAct``, cpu backend) and the plain
block (``linear_bn_act_sequential`` / ``linear_act_sequential``) round-robin
with the one timer (fastgan.tools.benchmark.timing.measure_many) and reports
speed-up = plain median / fused median. Writes every cell to a JSON file and
prints the worst cells.

    python bench/bench_cpu_matrix.py              # the full matrix (idle machine: ~10 min)
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
    if with_aten:  # the same fused layer with its GEMMs on ATen: the oneDNN gain alone
        fns["fused_aten"] = under_aten(fns["fused"])
    # one thread-visible cost per call: repeat tiny cells so a sample is >= ~1 ms
    t = measure_many(fns, torch.device("cpu"), warmup=3, iters=iters, min_time_s=min_time_s,
                     repeat=max(1, min(50, int(2e5 // max(b * k * n, 1)) or 1)))
    fused_ms, plain_ms = t["fused"].median_ms, t["plain"].median_ms
    out = dict(batch=b, layer=f"{k}->{n}", dropout=dropout, bn=bn, dtype=dt, mode=mode,
               pass_="fwd+bwd" if backward else "fwd", fused_ms=fused_ms, plain_ms=plain_ms,
               speedup=plain_ms / fused_ms)
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
    ap.add_argument("--out", default="bench/results/issue11-layer-matrix.json")
    ap.add_argument("--note", default="", help="machine state, written with the results")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
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
                  f"fused {c['fused_ms']:8.3f} ms  plain {c['plain_ms']:8.3f} ms{aten}  "
                  f"{c['speedup']:5.2f}x", flush=True)
    worst = sorted(cells, key=lambda c: c["speedup"])[:10]
    meta = dict(command="python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
                machine=f"{platform.processor() or platform.machine()}, "
                        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
                note=a.note, torch=torch.__version__, threads=a.threads, gemm=a.gemm,
                gemm_info=cpu_impl.gemm_info(), seconds=time.perf_counter() - t0)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, worst=worst, cells=cells), f, indent=1)
    print(f"\n{len(cells)} cells -> {a.out}; worst speed-ups:")
    for c in worst:
        print(f"  {c['speedup']:5.2f}x  B={c['batch']} {c['layer']} p={c['dropout']} "
              f"bn={int(c['bn'])} {c['dtype']} {c['mode']} {c['pass_']}")
    return cells


if __name__ == "__main__":
    main()
