"""``fastgan eval``: how good are a checkpoint's digits?

    fastgan eval --checkpoint runs/fastgan/checkpoint.pt
    fastgan eval --checkpoint generator_state_dict.pt --n 5000 --json scores.json

Scores generated digits with a small MNIST classifier that fastgan trains once
on the available MNIST data and caches (``--cache-dir``, default
``$FASTGAN_CACHE`` or ``~/.cache/fastgan``): Fréchet distance of its features
to held-out real digits, an inception-style score, class coverage; next to the
same numbers for held-out real digits against the classifier's training digits
(the floor a perfect generator would reach).
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
    p = subparsers.add_parser("eval", help="score a generator checkpoint (FD, IS, coverage)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a `fastgan train` checkpoint, or a generator state_dict (.pt)")
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


def load_generator(path: str):
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
        return quality.generator_from_state(state)
    except ValueError as e:
        raise CLIError(f"{path}: {e}") from None


def format_scores(gen: dict, floor: dict, info: dict) -> str:
    rows = [("Fréchet distance (lower is better)", f"{gen['fd']:.3f}", f"{floor['fd']:.3f}"),
            ("inception-style score (max 10)", f"{gen['is']:.3f}", f"{floor['is']:.3f}"),
            ("classes generated (of 10)", str(gen["classes"]), str(floor["classes"])),
            ("KL(class histogram || uniform)", f"{gen['kl_uniform']:.4f}", f"{floor['kl_uniform']:.4f}"),
            ("images", str(gen["n"]), str(floor["n"]))]
    lines = [f"classifier: {info['path']} ({'cached' if info['cached'] else 'trained now'}), "
             f"held-out accuracy {info['test_accuracy']:.3f}, weights sha256 "
             f"{info['weights_sha256'][:16]}",
             f"{'metric':<36} {'generated':>10} {'real floor':>11}"]
    lines += [f"{a:<36} {b:>10} {c:>11}" for a, b, c in rows]
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
    G = load_generator(args.checkpoint).to(device)
    ds = load_mnist(args.data)
    log = None if args.quiet else (lambda s: print(s, flush=True))
    judge = quality.load_judge(ds.images, ds.labels, cache_dir=args.cache_dir, source=ds.source,
                               retrain=args.retrain_classifier,
                               epochs=args.classifier_epochs, log=log)
    try:
        gen = quality.evaluate_generator(G, judge, n=args.n, seed=args.seed, device=device)
    except (ValueError, np.linalg.LinAlgError) as e:  # e.g. images that are not finite
        raise CLIError(f"{args.checkpoint}: its digits cannot be scored: {e}") from None
    floor = quality.real_floor(judge)
    print(f"data: {ds.source}")
    print(format_scores(gen, floor, judge.info))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "generated": gen, "real_floor": floor,
                       "classifier": judge.info, "data": ds.source}, f, indent=1)
        print(f"wrote {args.json}")
    return 0
