"""Forward+backward time of each fused op on a GPU: the hand-written CUDA kernels
(``cuda`` backend) side by side with Triton, eager PyTorch and torch.compile.

For each op, batch size and dtype it times one training step (forward, then
backward with input gradient) of:

* ``eager``      nn.Sequential(Linear, BatchNorm1d, LeakyReLU(0.2), Dropout(p)) (no
                 BatchNorm1d for linear_act); for gan_bce, two
                 F.binary_cross_entropy_with_logits calls plus the sigmoid means
* ``compile``    the same eager module under torch.compile (default mode)
* ``triton``     fastgan.nn.LinearBNAct / LinearAct / functional.gan_bce_d under
                 use_backend("triton")
* ``cuda``       the same under use_backend("cuda"): the kernels of csrc/cuda

All contenders share one set of weights. A sample is ``--iters`` back-to-back
steps between two CUDA events (no host sync inside), reported per step; the
median and the 20th/80th percentiles over ``--samples`` samples are written as
JSON to the path given on the command line.

    python bench/bench_cuda_ops.py out/cuda_ops.json                    # B=64,1024,8192
    python bench/bench_cuda_ops.py out/cuda_ops.json --batch 64 --dtype bf16
    python bench/bench_cuda_ops.py out/cuda_ops.json --dry-run          # check args, no GPU needed
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

OPS = ("linear_bn_act", "linear_act", "gan_bce")
CONTENDERS = ("eager", "compile", "triton", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None, contenders=CONTENDERS, description=None) -> argparse.Namespace:
    """Arguments shared by the op benchmarks (bench_triton_ops.py passes its contenders)."""
    ap = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    ap.add_argument("json", help="write the results (JSON) to this path")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 1024, 8192])
    ap.add_argument("--k", type=int, default=1024, help="in_features (the seed D's widest layer)")
    ap.add_argument("--n", type=int, default=1024, help="out_features")
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--contenders", nargs="+", default=list(contenders), choices=contenders)
    ap.add_argument("--iters", type=int, default=20, help="steps per timed sample")
    ap.add_argument("--samples", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compiles)")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate the arguments and print the plan; needs no GPU")
    args = ap.parse_args(argv)
    if any(b < 2 for b in args.batch):
        ap.error("--batch values must be >= 2 (BatchNorm needs 2 rows in training)")
    if not 0.0 <= args.dropout < 1.0:
        ap.error("--dropout must be in [0, 1)")
    if min(args.k, args.n, args.iters, args.samples) < 1 or args.warmup < 0:
        ap.error("--k, --n, --iters, --samples must be >= 1 and --warmup >= 0")
    return args


# ------------------------------------------------------------------ steps
def _layer_step(op: str, contender: str, batch: int, k: int, n: int, p: float,
                dtype: torch.dtype) -> Callable[[], None]:
    import fastgan
    from fastgan import nn as fnn

    torch.manual_seed(0)
    cls = fnn.LinearBNAct if op == "linear_bn_act" else fnn.LinearAct
    # LinearBNAct keeps its BatchNorm parameters and statistics fp32 under .to(dtype)
    fused = cls(k, n, negative_slope=0.2, dropout=p).to("cuda", dtype).train()
    x = torch.randn(batch, k, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(batch, n, device="cuda", dtype=dtype)
    if contender in ("eager", "compile"):
        module = fused.to_sequential()  # plain nn layers sharing the weights
        if op == "linear_bn_act" and dtype != torch.float32:
            module = _AutocastBN(module)
        if contender == "compile":
            module = torch.compile(module)

        def step():
            module(x).backward(g)
    else:
        def step():
            with fastgan.use_backend(contender):
                fused(x).backward(g)
    return step


class _AutocastBN(nn.Module):
    """nn.BatchNorm1d with fp32 parameters needs fp32 input: run the block with the
    BatchNorm in fp32 and everything else in the layer dtype, as the fused op does."""

    def __init__(self, seq: nn.Sequential):
        super().__init__()
        self.seq = seq

    def forward(self, x):
        linear, bn, *rest = self.seq
        y = bn(linear(x).float()).to(x.dtype)
        for m in rest:
            y = m(y)
        return y


def _bce_step(contender: str, batch: int, dtype: torch.dtype) -> Callable[[], None]:
    import fastgan
    from fastgan import functional as FG

    real = torch.randn(batch, 1, device="cuda", dtype=dtype, requires_grad=True)
    fake = torch.randn(batch, 1, device="cuda", dtype=dtype, requires_grad=True)

    def eager_loss(r, f):
        loss = (F.binary_cross_entropy_with_logits(r.float(), torch.full_like(r, 0.9).float())
                + F.binary_cross_entropy_with_logits(f.float(), torch.zeros_like(f).float()))
        return loss, torch.sigmoid(r.detach().float()).mean(), torch.sigmoid(f.detach().float()).mean()

    if contender in ("eager", "compile"):
        fn = torch.compile(eager_loss) if contender == "compile" else eager_loss

        def step():
            fn(real, fake)[0].backward()
    else:
        def step():
            with fastgan.use_backend(contender):
                FG.gan_bce_d(real, fake, 0.1).loss.backward()
    return step


# ------------------------------------------------------------------ timing
def time_step(step: Callable[[], None], warmup: int, iters: int, samples: int) -> dict:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    per_step = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        per_step.append(start.elapsed_time(end) / iters)
    q = statistics.quantiles(per_step, n=5) if len(per_step) > 1 else per_step * 4
    return dict(median_ms=statistics.median(per_step), p20_ms=q[0], p80_ms=q[-1])


def plan_or_exit(args, script: str):
    """The (op, batch, dtype, contender) measurements, or an exit code: 0 after
    printing the plan for --dry-run, 2 when there is no GPU to run it on."""
    plan = [(op, b, dt, c) for op in args.ops for b in args.batch for dt in args.dtype
            for c in args.contenders]
    if args.dry_run:
        print(f"{len(plan)} measurements -> {args.json}")
        for row in plan:
            print("  op={} batch={} dtype={} contender={}".format(*row))
        return 0
    if not torch.cuda.is_available():
        print(f"{script} needs a CUDA GPU (use --dry-run to check the arguments)",
              file=sys.stderr)
        return 2
    return plan


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = plan_or_exit(args, "bench_cuda_ops.py")
    if isinstance(plan, int):
        return plan

    import fastgan
    torch.backends.cuda.matmul.allow_tf32 = False
    available = fastgan.backends()
    rows = []
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, K={args.k} N={args.n} "
          f"dropout={args.dropout}, training forward+backward")
    for op, batch, dt, contender in plan:
        row = dict(op=op, batch=batch, dtype=dt, contender=contender, k=args.k, n=args.n,
                   dropout=args.dropout)
        if contender in ("triton", "cuda") and contender not in available:
            row["skipped"] = fastgan.unavailable().get(contender, "unavailable")
        else:
            if op == "gan_bce":
                step = _bce_step(contender, batch, DTYPES[dt])
            else:
                step = _layer_step(op, contender, batch, args.k, args.n, args.dropout, DTYPES[dt])
            row.update(time_step(step, args.warmup, args.iters, args.samples))
        rows.append(row)
        print(json.dumps(row), flush=True)
    for r in rows:  # speedups against eager of the same (op, batch, dtype)
        base = next((e for e in rows if e["contender"] == "eager" and "median_ms" in e
                     and (e["op"], e["batch"], e["dtype"]) == (r["op"], r["batch"], r["dtype"])),
                    None)
        if base is not None and "median_ms" in r:
            r["speedup_vs_eager"] = base["median_ms"] / r["median_ms"]
    with open(args.json, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       cuda=torch.version.cuda, backends=available, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
