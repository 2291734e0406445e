"""``fastgan eval``: how good are a checkpoint's digits?

    fastgan eval --checkpoint runs/fastgan/checkpoint.pt
    fastgan eval --checkpoint generator_state_dict.pt --n 5000 --json scores.json

Scores generated digits with a small MNIST classifier that fastgan trains once
on the available MNIST data and caches (``--cache-dir``, default
``$FASTGAN_CACHE`` or ``~/.cache/fastgan``): Fréchet distance of its features
to held-out real digits, an inception-style score, class coverage (a class
counts when at least 2.5% of the digits are classified as it); next to the same
numbers for as many real digits (the floor a perfect generator would reach)
and for an untrained generator. The first line is the verdict: the FD on a
0-100 scale from the untrained generator (0) to real digits (100), in words.

--checkpoint takes the seed GAN's generator: a `fastgan train` checkpoint, or a
bare state_dict of its layout (its LeakyReLU slope and BatchNorm eps are not in
a bare state_dict: --g-slope and --bn-eps, default 0.2 and 1e-5). A generator
of any other architecture is scored through the API, on the module itself:

    import fastgan.quality as Q
    G = MyGenerator(); G.load_state_dict(torch.load("g.pt"))
    print(Q.evaluate(G, n=2000, latent_dim=100)["verdict"])

(any module or callable mapping (N, latent_dim) noise to N images of 28 x 28
in [-1, 1]).
"""
from __future__ import annotations

import argparse
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="score a generator checkpoint (FD, IS, coverage, "
                                           "a verdict); other generators: fastgan.quality.evaluate",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a `fastgan train` checkpoint, or a seed-GAN generator state_dict (.pt); "
                        "any other generator: fastgan.quality.evaluate(module), see above")
    p.add_argument("--g-slope", type=float, default=None,
                   help="bare state_dict: G's LeakyReLU slope (default 0.2; a checkpoint "
                        "records its own)")
    p.add_argument("--bn-eps", type=float, default=None,
                   help="bare state_dict: G's BatchNorm eps (default 1e-5)")
    p.add_argument("--n", type=int, default=2000, help="digits to generate (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent noise")
    p.add_argument("--device", default="cpu", help="device the generator runs on")
    p.add_argument("--data", default=None, help="MNIST file or folder (see fastgan train)")
    p.add_argument("--cache-dir", default=None, help="where the classifier is cached")
    p.add_argument("--classifier-epochs", type=int, default=8,
                   help="epochs of the classifier's training (default 8; part of the cache key)")
    p.add_argument("--retrain-classifier", action="store_true",
                   help="ignore the cached classifier and train it again")
    p.add_argument("--json", default=None, help="also write the scores to this JSON file")
    p.add_argument("-q", "--quiet", action="store_true", help="no classifier training log")
    return p


def load_generator(path: str, negative_slope=None, bn_eps=None):
    """A Generator from a training checkpoint or a bare generator state_dict."""
    from ..tools import quality
    from ..train import checkpoint
    from . import CLIError

    try:
        state = checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        if "not a fastgan training checkpoint" not in str(e):
            raise
        # Not a training checkpoint: maybe a bare state_dict (still weights_only).
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
                zipfile.BadZipFile) as err:
            raise CLIError(f"{path}: not a readable checkpoint: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise CLIError(f"{path}: holds a {type(state).__name__}, not a checkpoint or state_dict")
    try:
        return quality.generator_from_state(state, negative_slope, bn_eps)
    except ValueError as e:
        raise CLIError(f"{path}: {e}") from None


def format_scores(gen: dict, floor: dict, info: dict, untrained: dict | None = None) -> str:
    cols = [gen, floor] + ([untrained] if untrained else [])
    share = gen.get("min_share", 0.0)
    rows = [("Fréchet distance (lower is better)", [f"{c['fd']:.3f}" for c in cols]),
            ("inception-style score (max 10)", [f"{c['is']:.3f}" for c in cols]),
            (f"classes covered (>= {share:.1%} each)", [str(c["classes"]) for c in cols]),
            ("KL(class histogram || uniform)", [f"{c['kl_uniform']:.4f}" for c in cols]),
            ("images", [str(c["n"]) for c in cols])]
    lines = [f"classifier: {info['path']} ({'cached' if info['cached'] else 'trained now'}), "
             f"held-out accuracy {info['test_accuracy']:.3f}, weights sha256 "
             f"{info['weights_sha256'][:16]}",
             f"{'metric':<36} {'generated':>10} {'real floor':>11}"
             + (f" {'untrained G':>12}" if untrained else "")]
    lines += [f"{a:<36} " + " ".join(f"{v:>{w}}" for v, w in zip(vals, (10, 11, 12)))
              for a, vals in rows]
    hist = " ".join(f"{i}:{h:.2f}" for i, h in enumerate(gen["histogram"]))
    lines.append(f"class histogram: {hist}")
    return "\n".join(lines)


def run(args) -> int:
    from ..tools import quality
    from ..train.data import load_mnist
    from . import CLIError
    from .train import check_seed, resolve_device

    if args.n < 2:
        raise CLIError(f"--n must be at least 2, got {args.n}")
    if args.classifier_epochs < 1:
        raise CLIError(f"--classifier-epochs must be at least 1, got {args.classifier_epochs}")
    check_seed(args.seed, "--seed")
    device = resolve_device(args.device)
    if args.json and not Path(args.json).parent.is_dir():  # before the minutes of scoring
        raise CLIError(f"--json {args.json}: folder {Path(args.json).parent} does not exist")
    G = load_generator(args.checkpoint, args.g_slope, args.bn_eps).to(device)
    ds = load_mnist(args.data)
    log = None if args.quiet else (lambda s: print(s, flush=True))
    judge = quality.load_judge(ds.images, ds.labels, cache_dir=args.cache_dir, source=ds.source,
                               retrain=args.retrain_classifier,
                               epochs=args.classifier_epochs, log=log)
    try:
        gen = quality.evaluate_generator(G, judge, n=args.n, seed=args.seed, device=device)
    except (ValueError, np.linalg.LinAlgError) as e:  # e.g. images that are not finite
        raise CLIError(f"{args.checkpoint}: its digits cannot be scored: {e}") from None
    scale = quality.calibrate(judge, args.n)
    line = quality.verdict(gen, scale)
    print(line)
    print(f"data: {ds.source}")
    print(f"generator: {quality.describe(G)}")
    print(format_scores(gen, scale.real, judge.info, scale.untrained))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "verdict": line,
                       "quality": quality.quality_score(gen["fd"], scale), "generated": gen,
                       "real_floor": scale.real, "untrained": scale.untrained,
                       "classifier": judge.info, "data": ds.source}, f, indent=1)
        print(f"wrote {args.json}")
    return 0
