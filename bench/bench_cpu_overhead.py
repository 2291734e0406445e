"""Per-call cost of one fused layer on the CPU eager fast path (issue 11, item 4).

At a tiny shape (B=1, 8 -> 8) the GEMM and epilogue cost ~1 us, so what is
left is Python and dispatch. Times, side by side in one process, per call:
the C++ op alone (torch.ops.fastgan_C.*_forward, the floor), the functional
op (fastgan.functional: checks, dispatch, autograd.Function), the fused layer
(``LinearAct`` / ``LinearBNAct`` forward), and the plain nn.Sequential; with
grad enabled (an input that needs grad) and under no_grad.

    python bench/bench_cpu_overhead.py [--out bench/results/issue11-overhead.json]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os

import torch

import fastgan
from fastgan import functional as FG
from fastgan.nn import layers
from fastgan.ops.spec import ACTIVATIONS
from fastgan.tools.benchmark.timing import measure_many


def contenders(bn: bool, grad: bool):
    k = n = 8
    x = torch.randn(4 if bn else 1, k, requires_grad=grad)
    fused = (layers.LinearBNAct(k, n) if bn else layers.LinearAct(k, n)).eval()
    plain = (layers.linear_bn_act_sequential(k, n) if bn else layers.linear_act_sequential(k, n)).eval()
    lin = fused[0]
    w, b = lin.weight, lin.bias
    seed, offset = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    code = ACTIVATIONS["leaky_relu"]
    importlib.import_module("fastgan._C")  # registers torch.ops.fastgan_C
    C = torch.ops.fastgan_C
    if bn:
        bnm = fused[1]
        bt = (bnm.weight, bnm.bias, bnm.running_mean, bnm.running_var, bnm.num_batches_tracked)
        raw = lambda: C.linear_bn_act_forward(x, w, b, *bt, False, 0.1, 1e-5, code, 0.2, 0.0,  # noqa: E731
                                              seed, offset)
        func = lambda: FG.linear_bn_act(x, w, b, *bt, False, 0.1, 1e-5, "leaky_relu", 0.2,  # noqa: E731
                                        0.0, seed, offset)
    else:
        raw = lambda: C.linear_act_forward(x, w, b, code, 0.2, 0.0, seed, offset)  # noqa: E731
        func = lambda: FG.linear_act(x, w, b, "leaky_relu", 0.2, 0.0, False, seed, offset)  # noqa: E731
    return {"C++ op": raw, "functional": func, "fused layer": lambda: fused(x),
            "plain Sequential": lambda: plain(x)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/issue11-overhead.json")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    with fastgan.use_backend("cpu"):
        for bn in (False, True):
            for grad in (True, False):
                ctx = torch.enable_grad() if grad else torch.no_grad()
                with ctx:
                    t = measure_many(contenders(bn, grad), torch.device("cpu"), warmup=50,
                                     iters=30, repeat=200)
                us = {k: v.median_ms * 1e3 for k, v in t.items()}
                row = dict(layer="LinearBNAct" if bn else "LinearAct", grad=grad, us=us,
                           overhead_us=us["fused layer"] - us["C++ op"])
                rows.append(row)
                print(f"{row['layer']:11} grad={int(grad)} " +
                      "  ".join(f"{k} {v:6.1f} us" for k, v in us.items()) +
                      f"  -> layer overhead over the C++ op {row['overhead_us']:.1f} us", flush=True)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(load=os.getloadavg()[0], threads=a.threads, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
