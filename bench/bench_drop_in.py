"""Drop-in costs of the fused layers, each side by side with plain PyTorch in one process.

    python bench/bench_drop_in.py overhead [out.json]   # Python + dispatch cost of one layer call
    python bench/bench_drop_in.py overhead --modes train --samples 9 --threads 1
    python bench/bench_drop_in.py wgan-gp [out.json]    # WGAN-GP critic step on the seed D
    python bench/bench_drop_in.py wgan-gp --batch 64 256 --penalty r1 --threads 2
    python bench/bench_drop_in.py public-gan [out.json] --threads 2   # gan.py, fused or not

``overhead`` (the one per-call overhead measurement; ``bench/bench_cpu_overhead.py``
runs it too): one forward of a tiny ``LinearAct`` / ``LinearBNAct``, dropout 0
and 0.2, in training (grad enabled, the eager fast path: layer -> route ->
check -> dispatch -> the backend's one-call op, on the cpu backend its kernels
and a C++ autograd node) and in eval under no_grad,
against the backend's C++ forward called directly on the same tensors, the
functional op, and the plain ``nn.Sequential``. layer - C++ forward is what
the Python layers cost per call; the target is 10 us or less. It needs only
the public layers, ``fastgan.functional`` and ``torch.ops.fastgan_C``, so the
same command measures an older checkout
(``PYTHONPATH=<checkout> python bench/bench_drop_in.py overhead``).

``public-gan``: one iteration of PyTorch-GAN's ``gan.py`` training loop (its
models and loop as that script writes them, BCELoss on a sigmoid), the plain
models against ``fastgan.fuse`` of the same models, with Adam as gan.py makes it
and with ``fused=True``.

``wgan-gp``: one critic step of WGAN-GP (Gulrajani et al.) on the seed
discriminator (``fastgan.nn.models.Discriminator``, dropout 0.2):
``D(fake).mean() - D(real).mean() + 10 * (||grad_x D(x_hat)|| - 1)^2`` with
``x_hat`` a random interpolate, ``autograd.grad(..., create_graph=True)``, one
backward and an Adam step; ``--penalty r1`` uses the R1 penalty
``||grad_x D(real)||^2`` on real data instead. Contenders: the plain
``nn.Sequential`` discriminator and the fused one (same weights), sampled
round-robin on fastgan's one timer. The fused run proves that its forwards and
its first-order backwards went to the fused backend (``dispatch.calls``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

MACHINE = "2-vCPU AMD EPYC Zen 5 VM, loaded by other jobs"


def _timing():
    from fastgan.tools.benchmark import timing
    return timing


def _machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "note": MACHINE,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "loadavg": os.getloadavg()}


# ------------------------------------------------------------------ overhead
def _cpu_us(fns: dict, calls: int, rounds: int) -> dict:
    """CPU time of this thread per call (us), the best round of each callable,
    rounds interleaved. On a loaded machine wall-clock time also counts the
    time the process waits for a core; thread CPU time counts only its work."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.thread_time_ns()
            for _ in range(calls):
                fn()
            best[k] = min(best[k], (time.thread_time_ns() - t0) / calls / 1e3)
    return best


def _overhead_callables(cls, p: float, train: bool) -> dict:
    """The five ways to run one tiny fused layer's forward on the same tensors:
    ``layer`` (the fused module as the speed rule routes it: its fused op or, where
    that would lose, its plain children), ``fused`` (the module on its fused op,
    forced),
    ``functional`` (``fastgan.functional``: the
    argument check, dispatch and autograd.Function, no module), ``kernel`` (the
    backend's C++ forward alone: the floor) and ``plain`` (the same block as an
    ``nn.Sequential``, what the layer replaces)."""
    import importlib

    from fastgan import functional as FG
    from fastgan import nn as fnn
    from fastgan.nn import layers
    from fastgan.ops.spec import ACTIVATIONS

    importlib.import_module("fastgan._C")  # registers torch.ops.fastgan_C
    C = torch.ops.fastgan_C
    torch.manual_seed(0)
    bn = cls is fnn.LinearBNAct
    layer = cls(8, 8, dropout=p).train(train)
    plain = (layers.linear_bn_act_sequential if bn else layers.linear_act_sequential)(
        8, 8, dropout=p).train(train)
    x = torch.randn(4, 8)
    lin = layer[0]
    w, b = lin.weight, lin.bias
    seed = torch.zeros(1, dtype=torch.int64)
    offset = torch.zeros(1, dtype=torch.int64)
    code = ACTIVATIONS["leaky_relu"]
    q = p if train else 0.0   # an eval layer applies no dropout
    if bn:
        m = layer[1]
        # copies: the kernel and functional calls must not move the layer's statistics
        st = (m.weight, m.bias, m.running_mean.clone(), m.running_var.clone(),
              m.num_batches_tracked.clone())

        def kernel():
            return C.linear_bn_act_forward(x, w, b, *st, train, 0.1, 1e-5, code, 0.2, q, seed,
                                           offset)

        def functional():
            return FG.linear_bn_act(x, w, b, *st, train, 0.1, 1e-5, "leaky_relu", 0.2, q, seed,
                                    offset)
    else:
        def kernel():
            return C.linear_act_forward(x, w, b, code, 0.2, q, seed, offset)

        def functional():
            return FG.linear_act(x, w, b, "leaky_relu", 0.2, q, train, seed, offset)
    def fused():
        # the same layer with the fused path forced (whatever the speed rule picks):
        # the thread-local set directly, as fused_path does
        state = layers._path_state
        prev, state.path = state.path, "fused"
        try:
            return layer(x)
        finally:
            state.path = prev

    return {"layer": lambda: layer(x), "fused": fused, "functional": functional,
            "kernel": kernel, "plain": lambda: plain(x)}


def overhead(repeat: int = 2000, samples: int = 15, modes=("train", "eval")) -> list[dict]:
    """Per-call forward time (us) of a tiny fused layer (B=4, 8->8: the GEMM and
    epilogue cost ~1 us, so what is left is Python and dispatch), its
    functional op, its C++ forward alone and the plain block, side by side:
    wall clock on fastgan's timer (median) and thread CPU time (best round).
    ``train``: a training forward, parameters needing grad (the autograd graph
    is built); ``eval``: an eval-mode forward under no_grad (inference).
    ``overhead_us`` = layer - kernel: what the Python layers cost per call;
    ``fused_overhead_us`` = fused - kernel: what the fused call's Python (module,
    route, dropout key, autograd Function, check, dispatch) costs over its op."""
    from fastgan import nn as fnn

    timing = _timing()
    cpu = torch.device("cpu")
    rows = []
    for mode in modes:
        train = mode == "train"
        for cls in (fnn.LinearAct, fnn.LinearBNAct):
            for p in (0.0, 0.2):
                fns = _overhead_callables(cls, p, train)
                with torch.enable_grad() if train else torch.no_grad():
                    t = timing.measure_many(fns, cpu, warmup=50, iters=samples, repeat=repeat)
                    c = _cpu_us(fns, repeat, samples)
                us = {k: v.median_ms * 1e3 for k, v in t.items()}
                row = {"layer": cls.__name__, "shape": "B=4, 8->8", "dropout": p, "mode": mode}
                for k in fns:
                    row[f"{k}_us"] = round(us[k], 2)
                    row[f"{k}_cpu_us"] = round(c[k], 2)
                row["overhead_us"] = round(us["layer"] - us["kernel"], 2)
                row["overhead_cpu_us"] = round(c["layer"] - c["kernel"], 2)
                row["fused_overhead_us"] = round(us["fused"] - us["kernel"], 2)
                row["fused_overhead_cpu_us"] = round(c["fused"] - c["kernel"], 2)
                rows.append(row)
    return rows


# ------------------------------------------------------------------ wgan-gp
def _penalty(D, real, fake, kind: str, gen: torch.Generator):
    if kind == "r1":
        x = real.detach().requires_grad_(True)
    else:
        eps = torch.rand(real.shape[0], 1, generator=gen)
        x = (eps * real + (1 - eps) * fake).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
    norm2 = grad.pow(2).sum(1)
    return norm2.mean() if kind == "r1" else ((norm2 + 1e-12).sqrt() - 1).pow(2).mean()


def critic_step(D, opt, real, fake, kind: str = "wgan-gp", weight: float = 10.0, gen=None):
    """One WGAN-GP (or R1) critic step; returns the loss (detached)."""
    loss = D(fake).mean() - D(real).mean() + weight * _penalty(D, real, fake, kind, gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def wgan_gp(batches=(64, 256), kind: str = "wgan-gp", samples: int = 10,
            min_time_s: float = 1.0) -> list[dict]:
    """The critic step, plain against fused, side by side; ms per step and the ratio."""
    from fastgan.models import Discriminator
    from fastgan.ops import dispatch

    timing = _timing()
    cpu = torch.device("cpu")
    rows = []
    for batch in batches:
        torch.manual_seed(0)
        plain = Discriminator(fused=False)
        fused = Discriminator(fused=True)
        fused.load_state_dict(plain.state_dict())
        real = torch.rand(batch, 784) * 2 - 1
        fake = torch.rand(batch, 784) * 2 - 1
        steps = {}
        for name, D in (("eager", plain), ("fastgan", fused)):
            opt = torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.0, 0.9))
            gen = torch.Generator().manual_seed(1)
            steps[name] = (lambda D=D, opt=opt, gen=gen:
                           critic_step(D, opt, real, fake, kind, gen=gen))
        before = dict(dispatch.calls)
        t = timing.measure_many(steps, cpu, warmup=3, iters=samples, min_time_s=min_time_s)
        ran = {f"{b}.{f}": n - before.get((b, f), 0) for (b, f), n in dispatch.calls.items()
               if n != before.get((b, f), 0)}
        e, f = t["eager"], t["fastgan"]
        rows.append({"penalty": kind, "batch": batch, "eager_ms": round(e.median_ms, 3),
                     "fastgan_ms": round(f.median_ms, 3),
                     "eager_p20_p80": [round(e.percentile(20), 3), round(e.percentile(80), 3)],
                     "fastgan_p20_p80": [round(f.percentile(20), 3), round(f.percentile(80), 3)],
                     "speedup": round(e.median_ms / f.median_ms, 3), "dispatched": ran})
    return rows


# ------------------------------------------------------------------ public-gan
# PyTorch-GAN's gan.py (eriklindernoren/PyTorch-GAN, implementations/gan/gan.py),
# written as that script writes it: this file's own copy of its two models and
# of one iteration of its training loop.
def _block(in_feat, out_feat, normalize=True):
    from torch import nn
    layers = [nn.Linear(in_feat, out_feat)]
    if normalize:
        layers.append(nn.BatchNorm1d(out_feat, 0.8))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


def _gan_py_models():
    from torch import nn
    G = nn.Sequential(*_block(100, 128, normalize=False), *_block(128, 256),
                      *_block(256, 512), *_block(512, 1024), nn.Linear(1024, 784), nn.Tanh())
    D = nn.Sequential(nn.Linear(784, 512), nn.LeakyReLU(0.2, inplace=True),
                      nn.Linear(512, 256), nn.LeakyReLU(0.2, inplace=True),
                      nn.Linear(256, 1), nn.Sigmoid())
    return G, D


def _gan_py_iteration(G, D, opt_G, opt_D, real, z):
    """One iteration of gan.py's loop (its BCELoss on D's sigmoid, its loss averaging)."""
    loss = torch.nn.BCELoss()
    valid = torch.ones(real.shape[0], 1)
    fake = torch.zeros(real.shape[0], 1)
    opt_G.zero_grad()
    gen_imgs = G(z)
    g_loss = loss(D(gen_imgs), valid)
    g_loss.backward()
    opt_G.step()
    opt_D.zero_grad()
    real_loss = loss(D(real), valid)
    fake_loss = loss(D(gen_imgs.detach()), fake)
    d_loss = (real_loss + fake_loss) / 2
    d_loss.backward()
    opt_D.step()


def public_gan(batches=(64, 256), samples: int = 15, min_time_s: float = 1.0) -> list[dict]:
    """gan.py's training iteration on its plain models and on ``fastgan.fuse`` of the
    same models (same weights), side by side: ms per iteration and the ratio, with
    Adam as gan.py builds it (lr 2e-4, betas (0.5, 0.999)) and with ``fused=True``."""
    import copy

    from fastgan.fuse import fuse
    from fastgan.ops import dispatch

    timing = _timing()
    cpu = torch.device("cpu")
    rows = []
    for batch in batches:
        torch.manual_seed(0)
        G, D = _gan_py_models()
        models = {"eager": (G, D),
                  "fastgan": (fuse(copy.deepcopy(G))[0], fuse(copy.deepcopy(D))[0])}
        real = torch.rand(batch, 784) * 2 - 1
        z = torch.randn(batch, 100)
        steps = {}
        for fused_adam in (False, True):
            for name, (g, d) in models.items():
                kw = dict(lr=2e-4, betas=(0.5, 0.999), fused=fused_adam)
                opts = (torch.optim.Adam(g.parameters(), **kw),
                        torch.optim.Adam(d.parameters(), **kw))
                key = name + (" + fused Adam" if fused_adam else "")
                steps[key] = (lambda g=g, d=d, opts=opts: _gan_py_iteration(g, d, *opts, real, z))
        before = dict(dispatch.calls)
        t = timing.measure_many(steps, cpu, warmup=3, iters=samples, min_time_s=min_time_s)
        ran = {f"{b}.{f}": n - before.get((b, f), 0) for (b, f), n in dispatch.calls.items()
               if n != before.get((b, f), 0)}
        ms = {k: round(v.median_ms, 3) for k, v in t.items()}
        rows.append({"model": "PyTorch-GAN gan.py", "batch": batch, "ms": ms,
                     "speedup": round(ms["eager"] / ms["fastgan"], 3),
                     "speedup_fused_adam": round(ms["eager + fused Adam"]
                                                 / ms["fastgan + fused Adam"], 3),
                     "dispatched": ran})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("overhead", "wgan-gp", "public-gan"))
    ap.add_argument("json", nargs="?", help="also write the results (JSON) to this path")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--penalty", choices=("wgan-gp", "r1"), default="wgan-gp")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--modes", nargs="+", choices=("train", "eval"), default=["train", "eval"],
                    help="overhead: training forward (grad) and/or eval forward (no_grad)")
    ap.add_argument("--repeat", type=int, default=2000, help="overhead: calls per sample")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "overhead":
        rows = overhead(args.repeat, args.samples or 15, tuple(args.modes))
        for r in rows:
            print(f"{r['layer']:12s} {r['mode']:5s} dropout {r['dropout']:.1f}: "
                  f"wall: layer {r['layer_us']:7.2f} us, functional {r['functional_us']:7.2f} us, "
                  f"C++ forward {r['kernel_us']:6.2f} us, plain {r['plain_us']:7.2f} us, "
                  f"overhead {r['overhead_us']:6.2f} us; CPU time: layer "
                  f"{r['layer_cpu_us']:6.2f} us, C++ forward {r['kernel_cpu_us']:6.2f} us, "
                  f"overhead {r['overhead_cpu_us']:6.2f} us; fused path forced: layer "
                  f"{r['fused_cpu_us']:6.2f} us, overhead {r['fused_overhead_cpu_us']:6.2f} us "
                  "(CPU time)", flush=True)
    elif args.what == "public-gan":
        rows = public_gan(args.batch, args.samples or 15, args.min_run_time)
        for r in rows:
            print(f"gan.py iteration, B={r['batch']}: {r['ms']} ms; fastgan x{r['speedup']:.2f}, "
                  f"with fused Adam x{r['speedup_fused_adam']:.2f}; ran {r['dispatched']}")
    else:
        rows = wgan_gp(args.batch, args.penalty, args.samples or 10, args.min_run_time)
        for r in rows:
            print(f"{r['penalty']} critic step, B={r['batch']}: eager {r['eager_ms']:.2f} ms, "
                  f"fastgan {r['fastgan_ms']:.2f} ms, x{r['speedup']:.2f}; ran {r['dispatched']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"what": args.what, "command": " ".join(sys.argv), "machine": _machine(),
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
