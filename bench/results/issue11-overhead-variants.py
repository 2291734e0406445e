"""Per-call Python + dispatch cost of a fused layer, every variant (issue 11, item 4).

Method: a tiny shape (8 -> 8; B = 4), 1 thread, the cpu backend, the fused
path forced (``fused_path("fused")``: the cost of the fused op's call). For
each variant (LinearAct / LinearBNAct x grad on/off x dropout on/off x
train/eval) the fused layer's forward call and the bare C++ op it ends in
(``torch.ops.fastgan_C.<op>_forward`` with the same arguments) are timed
round-robin: one sample = ``--repeat`` back-to-back calls, ``--iters``
samples each, the median per call; the overhead is the difference of the
two medians. Two clocks side by side: the wall clock, and the thread's CPU
time (``time.thread_time``), which other jobs on a loaded machine do not
inflate (the figure to read there). "grad" means x and the parameters
require grad, so the call also records the autograd node; the C++ op has
none, by construction.

    python bench/results/issue11-overhead-variants.py [--out bench/results/issue11-overhead-variants.json]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import os
import platform

import torch

import fastgan
from fastgan.nn import layers
from fastgan.ops.spec import ACTIVATIONS
import statistics
import time

K = N = 8
B = 4


def contenders(bn: bool, grad: bool, dropout: bool, train: bool, path: str = "fused"):
    torch.manual_seed(0)
    p = 0.2 if dropout else 0.0
    layer = layers.LinearBNAct(K, N, dropout=p) if bn else layers.LinearAct(K, N, dropout=p)
    layer.train(train)
    for t in layer.parameters():
        t.requires_grad_(grad)
    x = torch.randn(B, K, requires_grad=grad)
    importlib.import_module("fastgan._C")  # registers torch.ops.fastgan_C
    C = torch.ops.fastgan_C
    lin = layer[0]
    seed, offset = torch.tensor([1]), torch.tensor([2])
    code = ACTIVATIONS["leaky_relu"]
    pp = p if train else 0.0
    with torch.no_grad():
        if bn:
            bnm = layer[1]
            st = (bnm.weight, bnm.bias, bnm.running_mean.clone(), bnm.running_var.clone(),
                  bnm.num_batches_tracked.clone())
            raw = lambda: C.linear_bn_act_forward(x, lin.weight, lin.bias, *st, train, 0.1,  # noqa: E731
                                                  1e-5, code, 0.2, pp, seed, offset)
        else:
            raw = lambda: C.linear_act_forward(x, lin.weight, lin.bias, code, 0.2, pp, seed,  # noqa: E731
                                               offset)

    return {"C++ op": raw, "fused layer": lambda: layer(x)}


def measure(fns: dict, iters: int, repeat: int, warmup: int = 100) -> dict:
    """Median ms per call of each callable, round-robin, by (wall, thread CPU) clock."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {k: ([], []) for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(repeat):
                fn()
            c1, w1 = time.thread_time(), time.perf_counter()
            samples[k][0].append((w1 - w0) / repeat * 1e6)
            samples[k][1].append((c1 - c0) / repeat * 1e6)
    return {k: (statistics.median(w), statistics.median(c)) for k, (w, c) in samples.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/issue11-overhead-variants.json")
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--note", default="")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    path = getattr(layers, "fused_path", None)
    with fastgan.use_backend("cpu"), (path("fused") if path else contextlib.nullcontext()):
        for bn, grad, dropout, train in itertools.product((False, True), (True, False),
                                                          (False, True), (True, False)):
            ctx = torch.enable_grad() if grad else torch.no_grad()
            with ctx:
                t = measure(contenders(bn, grad, dropout, train), a.iters, a.repeat)
            wall = {k: v[0] for k, v in t.items()}
            cpu = {k: v[1] for k, v in t.items()}
            row = dict(layer="LinearBNAct" if bn else "LinearAct", grad=grad, dropout=dropout,
                       mode="train" if train else "eval", wall_us=wall, cpu_us=cpu,
                       overhead_wall_us=wall["fused layer"] - wall["C++ op"],
                       overhead_us=cpu["fused layer"] - cpu["C++ op"])
            rows.append(row)
            print(f"{row['layer']:11} grad={int(grad)} dropout={int(dropout)} {row['mode']:5}  "
                  f"CPU time: C++ op {cpu['C++ op']:5.1f} us  layer {cpu['fused layer']:5.1f} us"
                  f"  -> overhead {row['overhead_us']:4.1f} us   (wall: "
                  f"{row['overhead_wall_us']:5.1f} us)", flush=True)
    worst = max(r["overhead_us"] for r in rows)
    print(f"worst overhead (thread CPU time) {worst:.1f} us")
    meta = dict(command="python bench/results/issue11-overhead-variants.py", threads=1,
                machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                        f"load {os.getloadavg()[0]:.1f}", note=a.note, torch=torch.__version__)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, worst_overhead_us=worst, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
