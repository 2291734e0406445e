"""Forward+backward time of each fused op's Triton kernels on a GPU, side by side
with eager PyTorch and torch.compile.

Contenders per (op, batch, dtype), one training step each (forward, then
backward with input gradient):

* ``eager``           the plain nn layers (shared with bench_cuda_ops.py)
* ``compile``         the same under torch.compile (default mode)
* ``triton``          fastgan.nn.LinearBNAct / LinearAct / gan_bce_d under
                      use_backend("triton"): custom op + autograd + kernels
* ``triton-graph``    that step captured once in a CUDA graph and replayed
                      (what the training engine does): no Python, no launch gaps
* ``triton-kernels``  the backend functions called directly (no autograd, no
                      custom-op dispatch): what the kernels alone cost

``fastgan.kernels.warmup`` compiles and autotunes first, so no contender pays
for it. Results (median, p20, p80 ms per step; speedup against eager) go to the
JSON path given on the command line.

    python bench/bench_triton_ops.py out/triton_ops.json              # B = 64, 1024, 8192
    python bench/bench_triton_ops.py out/triton_ops.json --batch 64 --dtype bf16
    python bench/bench_triton_ops.py out/triton_ops.json --dry-run    # no GPU needed
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cuda_ops as common  # noqa: E402  (step builders and the CUDA-event timer)

OPS = common.OPS
CONTENDERS = ("eager", "compile", "triton", "triton-graph", "triton-kernels")
DTYPES = common.DTYPES


def parse_args(argv=None) -> argparse.Namespace:
    return common.parse_args(argv, CONTENDERS, __doc__.splitlines()[0])


def _kernel_step(op: str, batch: int, k: int, n: int, p: float,
                 dtype: torch.dtype) -> Callable[[], None]:
    """The backend functions of fastgan.kernels, forward then backward."""
    from fastgan.impl import triton as K

    dev = dict(device="cuda")
    seed = torch.zeros(1, dtype=torch.int64, **dev)
    offset = torch.zeros(1, dtype=torch.int64, **dev)
    if op == "gan_bce":
        real = torch.randn(batch, 1, dtype=dtype, **dev)
        fake = torch.randn(batch, 1, dtype=dtype, **dev)
        return lambda: K.gan_bce_forward(real, fake, 0.9, 0.0)
    x = torch.randn(batch, k, dtype=dtype, **dev)
    w = torch.randn(n, k, dtype=dtype, **dev) * k ** -0.5
    b = torch.zeros(n, dtype=dtype, **dev)
    g = torch.randn(batch, n, dtype=dtype, **dev)
    if op == "linear_act":
        def step():
            y = K.linear_act_forward(x, w, b, "leaky_relu", 0.2, p, seed, offset)
            K.linear_act_backward(g, x, w, y, "leaky_relu", 0.2, p, seed, offset, True)
        return step
    gamma, beta = torch.ones(n, **dev), torch.zeros(n, **dev)
    rm, rv = torch.zeros(n, **dev), torch.ones(n, **dev)
    nbt = torch.zeros(1, dtype=torch.int64, **dev)

    def step():
        _, h, mean, rstd = K.linear_bn_act_forward(x, w, b, gamma, beta, rm, rv, nbt, True, 0.1,
                                                   1e-5, "leaky_relu", 0.2, p, seed, offset)
        K.linear_bn_act_backward(g, x, w, gamma, beta, h, mean, rstd, True, "leaky_relu", 0.2,
                                 p, seed, offset, True)
    return step


def _graph_step(step: Callable[[], None]) -> Callable[[], None]:
    """Capture ``step`` in a CUDA graph (after a side-stream warm-up); replay it."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def build_step(op, contender, batch, args, dtype):
    if contender == "triton-kernels":
        return _kernel_step(op, batch, args.k, args.n, args.dropout, dtype)
    base = "triton" if contender == "triton-graph" else contender
    if op == "gan_bce":
        step = common._bce_step(base, batch, dtype)
    else:
        step = common._layer_step(op, base, batch, args.k, args.n, args.dropout, dtype)
    return _graph_step(step) if contender == "triton-graph" else step


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = common.plan_or_exit(args, "bench_triton_ops.py")
    if isinstance(plan, int):
        return plan

    import fastgan
    from fastgan.impl import triton as K
    torch.backends.cuda.matmul.allow_tf32 = False
    if "triton" not in fastgan.backends():
        print(f"triton backend unavailable: {fastgan.unavailable().get('triton')}", file=sys.stderr)
        return 2
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, K={args.k} N={args.n} "
          f"dropout={args.dropout}: warming up (compile + autotune)", flush=True)
    K.warmup([(b, args.k, args.n) for b in args.batch], dtypes=[DTYPES[d] for d in args.dtype],
             device="cuda", dropout=(args.dropout,), training=(True,))
    rows = []
    for op, batch, dt, contender in plan:
        row = dict(op=op, batch=batch, dtype=dt, contender=contender, k=args.k, n=args.n,
                   dropout=args.dropout)
        try:
            step = build_step(op, contender, batch, args, DTYPES[dt])
            row.update(common.time_step(step, args.warmup, args.iters, args.samples))
        except Exception as e:  # a contender that cannot run here is reported, not fatal
            row["skipped"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    for r in rows:
        base = next((e for e in rows if e["contender"] == "eager" and "median_ms" in e
                     and (e["op"], e["batch"], e["dtype"]) == (r["op"], r["batch"], r["dtype"])),
                    None)
        if base is not None and "median_ms" in r:
            r["speedup_vs_eager"] = base["median_ms"] / r["median_ms"]
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       cuda=torch.version.cuda, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
