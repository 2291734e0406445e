"""fastgan.fuse on public-style MLP GANs: a training step (forward + backward) of
the untouched model, of ``fuse(model)`` (the speed rule decides per run) and of
``fuse(model, only_if_faster=False)`` (every run fused), side by side in one
process with fastgan's one timer (samples taken round-robin).

    python bench/results/issue13_fuse_models.py [out.json] [--threads 1] [--batch 64]
        [--min-time 0.5]

The models are built as PyTorch-GAN's gan.py and cgan.py and the vanilla MNIST
GAN build theirs (the layer sizes of those scripts, MNIST images).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform

import torch
from torch import nn

from fastgan.fuse import fuse
from fastgan.tools.benchmark.timing import measure_many


def blocks(sizes, bn, tail):
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if bn and i > 0:
            layers.append(nn.BatchNorm1d(b, 0.8))
        layers.append(nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*layers, *tail)


def cgan_discriminator():
    layers = [nn.Linear(794, 512), nn.LeakyReLU(0.2, inplace=True)]
    for _ in range(2):
        layers += [nn.Linear(512, 512), nn.Dropout(0.4), nn.LeakyReLU(0.2, inplace=True)]
    return nn.Sequential(*layers, nn.Linear(512, 1))


def mnist_discriminator():
    layers = []
    for a, b in ((784, 1024), (1024, 512), (512, 256)):
        layers += [nn.Linear(a, b), nn.LeakyReLU(0.2), nn.Dropout(0.3)]
    return nn.Sequential(*layers, nn.Linear(256, 1), nn.Sigmoid())


MODELS = {   # name -> (builder, input width)
    "gan.py G": (lambda: blocks((100, 128, 256, 512, 1024), True,
                                (nn.Linear(1024, 784), nn.Tanh())), 100),
    "gan.py D": (lambda: blocks((784, 512, 256), False, (nn.Linear(256, 1), nn.Sigmoid())), 784),
    "cgan.py D": (cgan_discriminator, 794),
    "MNIST GAN D": (mnist_discriminator, 784),
}


def step(model, x):
    def fn():
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
    return fn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="?")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), batch {args.batch}, training forward+backward, median ms")
    for name, (build, width) in MODELS.items():
        torch.manual_seed(0)
        plain = build()
        rule, report = fuse(copy.deepcopy(plain))
        every, _ = fuse(copy.deepcopy(plain), only_if_faster=False)
        x = torch.randn(args.batch, width)
        t = measure_many({"plain": step(plain, x), "fuse()": step(rule, x),
                          "fuse(only_if_faster=False)": step(every, x)}, torch.device("cpu"),
                         warmup=3, iters=args.iters, min_time_s=args.min_time)
        base = t["plain"].median_ms
        for k, v in t.items():
            rows.append(dict(model=name, contender=k, median_ms=v.median_ms,
                             p20_ms=v.percentile(20), p80_ms=v.percentile(80),
                             vs_plain=base / v.median_ms, runs_fused=(
                                 len(report.fused) if k == "fuse()" else None)))
            print(f"{name:12s} {k:28s} {v.median_ms:8.3f} ({v.percentile(20):.3f}-"
                  f"{v.percentile(80):.3f})  {base / v.median_ms:5.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, threads=args.threads, batch=args.batch,
                           loadavg=os.getloadavg(), torch=torch.__version__), f, indent=1)


if __name__ == "__main__":
    main()
