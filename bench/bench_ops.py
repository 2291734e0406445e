"""One training step of each fused op (forward, then backward with the input
gradient), every contender of one backend side by side in one process.

    python bench/bench_ops.py --backend cpu                  # B=64,1024, K=512, N=1024, 2 threads
    python bench/bench_ops.py --backend cpu out/cpu_ops.json --batch 64 --threads 1 --min-run-time 2
    python bench/bench_ops.py --backend cuda out/cuda_ops.json --dtype bf16    # B=64,1024,8192
    python bench/bench_ops.py --backend triton out/triton_ops.json --dry-run   # the plan; no GPU

Contenders (``--contenders`` picks some; the defaults of each backend in ``BACKENDS``):

* ``eager``           nn.Sequential(Linear, BatchNorm1d, LeakyReLU(0.2), Dropout(p)) (no
                      BatchNorm1d for linear_act) sharing the fused layer's weights; for
                      gan_bce, two F.binary_cross_entropy_with_logits calls and the sigmoid means
* ``compile``         the same eager module under torch.compile (default mode)
* ``<backend>``       fastgan.nn.LinearBNAct / LinearAct / functional.gan_bce_d under
                      use_backend(<backend>): custom op + autograd + kernels (``cpu``,
                      ``reference``, ``triton``, ``cuda``)
* ``<backend>-graph`` that step captured once in a CUDA graph and replayed (what the
                      training engine does): no Python, no launch gaps
* ``<backend>-kernels`` the backend's functions called directly (no autograd, no
                      custom-op dispatch): what the kernels alone cost

A step resets the gradients first (as ``zero_grad(set_to_none=True)`` does).
Timing is fastgan's one timer (``fastgan.tools.benchmark.timing``): every
contender is warmed up (``--warmup`` steps; for ``--backend triton``,
``fastgan.kernels.warmup`` compiles and autotunes first), then the contenders
of one (op, batch, dtype) are sampled round-robin, so a change in the
machine's load hits all of them alike. A sample is ``--iters`` back-to-back
steps (between two CUDA events on a GPU, no host sync inside; ``--iters 0``,
the CPU default: as many as take about 50 ms), reported per step; sampling
goes on until each contender has ``--samples`` samples and ``--min-run-time``
seconds each have passed. Reported: the median and the 20th/80th percentiles,
and the speed-up against eager, as a table and as JSON to the path given.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

OPS = ("linear_bn_act", "linear_act", "gan_bce")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_GPU = dict(device="cuda", batch=[64, 1024, 8192], k=1024, n=1024, dtype=["fp32", "bf16"],
            ops=list(OPS), iters=20, samples=15, min_run_time=0.0, warmup=5, threads=None)
# --backend: its device, its contenders and the defaults of the other arguments.
BACKENDS = {
    "cpu": dict(device="cpu", contenders=["eager", "cpu", "reference"], batch=[64, 1024],
                k=512, n=1024, dtype=["fp32"], ops=["linear_bn_act", "linear_act"], iters=0,
                samples=5, min_run_time=1.0, warmup=3, threads=2),
    "cuda": dict(_GPU, contenders=["eager", "compile", "triton", "cuda"]),
    "triton": dict(_GPU, contenders=["eager", "compile", "triton", "triton-graph",
                                     "triton-kernels"]),
}
SAMPLE_S = 0.05   # --iters 0: steps per sample to fill this many seconds


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="Defaults depend on --backend: see BACKENDS in the script.")
    ap.add_argument("--backend", required=True, choices=sorted(BACKENDS),
                    help="the fastgan backend to measure (it picks the device and contenders)")
    ap.add_argument("json", nargs="?", help="also write the results (JSON) to this path")
    ap.add_argument("--batch", type=int, nargs="+")
    ap.add_argument("--k", type=int, help="in_features")
    ap.add_argument("--n", type=int, help="out_features")
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES))
    ap.add_argument("--ops", nargs="+", choices=OPS)
    ap.add_argument("--contenders", nargs="+")
    ap.add_argument("--iters", type=int, help="steps per timed sample (0: about 50 ms of them)")
    ap.add_argument("--samples", type=int, help="timed samples per contender, at least")
    ap.add_argument("--min-run-time", type=float, help="seconds of sampling per contender, at least")
    ap.add_argument("--warmup", type=int, help="untimed steps first (compiles)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate the arguments and print the plan; needs no GPU")
    args = ap.parse_args(argv)
    spec = BACKENDS[args.backend]
    for name, value in spec.items():
        if name != "device" and getattr(args, name) is None:
            setattr(args, name, value)
    unknown = sorted(set(args.contenders) - set(spec["contenders"]))
    if unknown:
        ap.error(f"--contenders: {unknown} not among {spec['contenders']} "
                 f"(--backend {args.backend})")
    if any(b < 2 for b in args.batch):
        ap.error("--batch values must be >= 2 (BatchNorm needs 2 rows in training)")
    if not 0.0 <= args.dropout < 1.0:
        ap.error("--dropout must be in [0, 1)")
    if min(args.k, args.n, args.samples) < 1 or min(args.iters, args.warmup, args.min_run_time) < 0:
        ap.error("--k, --n, --samples must be >= 1 and --iters, --warmup, --min-run-time >= 0")
    return args


# ------------------------------------------------------------------ steps
def _train_step(forward_backward: Callable[[], None], leaves: list,
                backend: str | None) -> Callable[[], None]:
    import fastgan

    def step():
        for t in leaves:
            t.grad = None
        with fastgan.use_backend(backend) if backend else contextlib.nullcontext():
            forward_backward()
    return step


def _layer_step(op: str, contender: str, batch: int, args, dtype: torch.dtype,
                device: torch.device) -> Callable[[], None]:
    from fastgan import nn as fnn

    torch.manual_seed(0)
    cls = fnn.LinearBNAct if op == "linear_bn_act" else fnn.LinearAct
    # LinearBNAct keeps its BatchNorm parameters and statistics fp32 under .to(dtype)
    fused = cls(args.k, args.n, negative_slope=0.2, dropout=args.dropout).to(device, dtype).train()
    x = torch.randn(batch, args.k, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(batch, args.n, device=device, dtype=dtype)
    layer, backend = fused, contender
    if contender in ("eager", "compile"):
        layer, backend = fused.to_sequential(), None  # plain nn layers sharing the weights
        if op == "linear_bn_act" and dtype != torch.float32:
            layer = _AutocastBN(layer)
        if contender == "compile":
            layer = torch.compile(layer)
    return _train_step(lambda: layer(x).backward(g), [x, *layer.parameters()], backend)


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


def _bce_step(contender: str, batch: int, dtype: torch.dtype,
              device: torch.device) -> Callable[[], None]:
    from fastgan import functional as FG

    real = torch.randn(batch, 1, device=device, dtype=dtype, requires_grad=True)
    fake = torch.randn(batch, 1, device=device, dtype=dtype, requires_grad=True)

    def eager_loss(r, f):
        loss = (F.binary_cross_entropy_with_logits(r.float(), torch.full_like(r, 0.9).float())
                + F.binary_cross_entropy_with_logits(f.float(), torch.zeros_like(f).float()))
        return loss, torch.sigmoid(r.detach().float()).mean(), torch.sigmoid(f.detach().float()).mean()

    if contender in ("eager", "compile"):
        fn = torch.compile(eager_loss) if contender == "compile" else eager_loss
        return _train_step(lambda: fn(real, fake)[0].backward(), [real, fake], None)
    return _train_step(lambda: FG.gan_bce_d(real, fake, 0.1).loss.backward(), [real, fake],
                       contender)


def _kernel_step(backend: str, op: str, batch: int, args, dtype: torch.dtype,
                 device: torch.device) -> Callable[[], None]:
    """The backend's functions (the op contract of fastgan.ops), forward then backward."""
    K = importlib.import_module(f"fastgan.impl.{backend}")
    k, n, p = args.k, args.n, args.dropout
    dev = dict(device=device)
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


def build_step(op: str, contender: str, batch: int, args, dtype: torch.dtype,
               device: torch.device) -> Callable[[], None]:
    """One training step of ``op`` for ``contender`` (module docstring)."""
    base, _, mode = contender.partition("-")  # "triton-graph" -> ("triton", "graph")
    if mode == "kernels":
        return _kernel_step(base, op, batch, args, dtype, device)
    if op == "gan_bce":
        step = _bce_step(base, batch, dtype, device)
    else:
        step = _layer_step(op, base, batch, args, dtype, device)
    if mode == "graph":
        from fastgan.train.graphs import capture
        return capture(step, warmup=3, device=device).replay
    return step


# ------------------------------------------------------------------ measuring
def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"[:300]


def measure_group(op: str, batch: int, dt: str, args, device: torch.device) -> list[dict]:
    """The rows of every contender of one (op, batch, dtype), timed side by side.
    A contender that cannot run here gets a ``skipped`` row instead of timings."""
    import fastgan
    from fastgan.tools.benchmark.timing import measure_many, sample, warm

    rows, steps, reps = {}, {}, {}
    for c in args.contenders:
        rows[c] = row = dict(op=op, batch=batch, dtype=dt, contender=c, k=args.k, n=args.n,
                             dropout=args.dropout)
        backend = c.partition("-")[0]
        if backend in fastgan.unavailable():
            row["skipped"] = fastgan.unavailable()[backend]
            continue
        try:
            step = build_step(op, c, batch, args, DTYPES[dt], device)
            row["first_call_s"] = warm(step, device, max(args.warmup, 1)).first_call_s
            reps[c] = args.iters or max(1, int(SAMPLE_S * 1e3 / max(sample(step, device), 1e-3)))
            steps[c] = step
        except Exception as e:
            row["skipped"] = _error(e)
    for c, t in measure_many(steps, device, 0, args.samples, args.min_run_time, reps).items():
        rows[c].update(median_ms=t.median_ms, p20_ms=t.percentile(20), p80_ms=t.percentile(80),
                       samples=len(t.samples_ms), iters=reps[c])
    eager = rows.get("eager", {}).get("median_ms")
    for r in rows.values():
        if eager and "median_ms" in r:
            r["speedup_vs_eager"] = eager / r["median_ms"]
    return list(rows.values())


def _print_row(r: dict) -> None:
    what = f"{r['op']:<14} {r['batch']:>5} {r['dtype']:<5} {r['contender']:<15}"
    if "median_ms" not in r:
        print(f"{what} skipped: {r['skipped']}", flush=True)
        return
    vs = f"{r['speedup_vs_eager']:>8.2f}x" if "speedup_vs_eager" in r else f"{'-':>9}"
    print(f"{what} {r['median_ms']:>10.3f} {r['p20_ms']:>9.3f}-{r['p80_ms']:<9.3f} {vs}",
          flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(BACKENDS[args.backend]["device"])
    plan = [(op, b, dt, c) for op in args.ops for b in args.batch for dt in args.dtype
            for c in args.contenders]
    if args.dry_run:
        print(f"{len(plan)} measurements -> {args.json or '(no JSON file)'}")
        for row in plan:
            print("  op={} batch={} dtype={} contender={}".format(*row))
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"bench_ops.py --backend {args.backend} needs a CUDA GPU (use --dry-run to check "
              "the arguments)", file=sys.stderr)
        return 2

    import fastgan
    from fastgan.tools.benchmark import machine_info
    if args.backend not in fastgan.backends():
        print(f"the {args.backend} backend is unavailable: "
              f"{fastgan.unavailable().get(args.backend)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    machine = machine_info(device)
    print(f"# {machine['gpu'] or machine['cpu']}, torch {torch.__version__} "
          f"({torch.get_num_threads()} CPU threads), K={args.k} N={args.n} "
          f"dropout={args.dropout}, training forward+backward", flush=True)
    if args.backend == "triton":
        from fastgan.kernels import warmup
        print("# warming up the Triton kernels (compile + autotune)", flush=True)
        warmup([(b, args.k, args.n) for b in args.batch], dtypes=[DTYPES[d] for d in args.dtype],
               device=device, dropout=(args.dropout,), training=(True,))
    print(f"{'op':<14} {'B':>5} {'dtype':<5} {'contender':<15} {'median ms':>10} "
          f"{'p20-p80 ms':^19} {'vs eager':>9}")
    rows = []
    for op in args.ops:
        for batch in args.batch:
            for dt in args.dtype:
                for r in measure_group(op, batch, dt, args, device):
                    _print_row(r)
                    rows.append(r)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k not in ("json", "dry_run")}
        with open(args.json, "w") as f:
            json.dump(dict(backend=args.backend, machine=machine, config=config, rows=rows), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
