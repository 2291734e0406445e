"""Forward+backward time of the fused layers on the CPU, side by side in one run.

For each batch size it times one training step of a layer (forward, backward
with input gradient, grads reset), for:

* ``eager``      nn.Sequential(Linear, BatchNorm1d, LeakyReLU(0.2), Dropout(0.2))
                 (or without the BatchNorm1d for linear_act)
* ``cpu``        fastgan.nn.LinearBNAct / LinearAct under use_backend("cpu"), the C++ kernels
* ``reference``  the same fused layer under use_backend("reference"), plain PyTorch

All three share one set of weights. Each is timed with torch.utils.benchmark in
interleaved rounds of ~50 ms; the table shows the median round and the IQR;
speedup = eager / contender.

    python bench/bench_cpu_ops.py                      # B=64 and 1024, K=512, N=1024, 2 threads
    python bench/bench_cpu_ops.py --batch 64 --threads 1 --min-run-time 2
"""
from __future__ import annotations

import argparse
import json

import torch
from torch import nn
from torch.utils import benchmark

import fastgan
from fastgan import nn as fnn
from fastgan.benchmark import cpu_model


def _step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, backend: str | None):
    def run():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        if backend is None:
            y = layer(x)
            y.backward(g)
        else:
            with fastgan.use_backend(backend):
                y = layer(x)
                y.backward(g)
    return run


def _layers(op: str, k: int, n: int, p: float, slope: float):
    if op == "linear_bn_act":
        fused = fnn.LinearBNAct(k, n, negative_slope=slope, dropout=p)
    else:
        fused = fnn.LinearAct(k, n, negative_slope=slope, dropout=p)
    eager = fused.to_sequential()  # the plain nn.Sequential, sharing the weights
    for m in (fused, eager):
        m.train()
    return eager, fused


def measure(op: str, batch: int, k: int, n: int, p: float, min_run_time: float,
            reference: bool = True) -> list[dict]:
    """Times the contenders in interleaved rounds (eager, cpu, reference, eager, ...)
    and reports the median round: on a shared machine the load then drifts over
    all contenders alike instead of favouring whichever ran in a quiet moment."""
    torch.manual_seed(0)
    eager, fused = _layers(op, k, n, p, 0.2)
    x = torch.randn(batch, k, requires_grad=True)
    g = torch.randn(batch, n)
    contenders = [("eager", eager, None), ("cpu", fused, "cpu")]
    if reference:
        contenders.append(("reference", fused, "reference"))
    timers, number = {}, {}
    for name, layer, backend in contenders:
        fn = _step(layer, x, g, backend)
        for _ in range(3):  # warm-up: allocator, MKL, OpenMP pool
            fn()
        timers[name] = benchmark.Timer(stmt="fn()", globals={"fn": fn},
                                       num_threads=torch.get_num_threads())
        once = timers[name].timeit(1).median
        number[name] = max(1, int(0.05 / max(once, 1e-6)))  # ~50 ms per round
    times = {name: [] for name in timers}
    rounds = max(5, int(min_run_time / 0.05))
    for r in range(rounds):
        for name, t in timers.items():
            if name == "reference" and r % 5:  # context only: every 5th round
                continue
            times[name].append(t.timeit(number[name]).median)
    rows = []
    for name, ts in times.items():
        q = torch.tensor(ts, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75],
                                                                        dtype=torch.float64))
        rows.append(dict(op=op, batch=batch, k=k, n=n, dropout=p, contender=name,
                         median_ms=q[1].item() * 1e3, iqr_ms=(q[2] - q[0]).item() * 1e3,
                         rounds=len(ts)))
    base = rows[0]["median_ms"]
    for r in rows:
        r["speedup_vs_eager"] = base / r["median_ms"]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 1024])
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-run-time", type=float, default=1.0, help="seconds per contender")
    ap.add_argument("--ops", nargs="+", default=["linear_bn_act", "linear_act"],
                    choices=["linear_bn_act", "linear_act"])
    ap.add_argument("--no-reference", action="store_true", help="skip the slow reference backend")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if "cpu" not in fastgan.backends():
        raise SystemExit(f"the cpu backend is unavailable: {fastgan.backend.unavailable()['cpu']}")
    print(f"# {cpu_model()}, {args.threads} threads, torch {torch.__version__}, "
          f"K={args.k} N={args.n} dropout={args.dropout}, training forward+backward")
    print(f"{'op':<14} {'B':>5} {'contender':<10} {'median ms':>10} {'IQR ms':>8} {'vs eager':>9}")
    rows = []
    for op in args.ops:
        for b in args.batch:
            for r in measure(op, b, args.k, args.n, args.dropout, args.min_run_time,
                             not args.no_reference):
                rows.append(r)
                print(f"{r['op']:<14} {r['batch']:>5} {r['contender']:<10} {r['median_ms']:>10.3f} "
                      f"{r['iqr_ms']:>8.3f} {r['speedup_vs_eager']:>8.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(cpu=cpu_model(), threads=args.threads, torch=torch.__version__,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
