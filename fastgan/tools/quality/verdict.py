"""What the numbers mean: a generator's Fréchet distance placed on a scale
calibrated against real data and an untrained generator, and a one-line verdict.

The scale is measured, not assumed, on as many images as the generator is
scored with (FD's bias grows as the sample shrinks): 0 is an untrained
seed-GAN generator (the MLP G of ``fastgan.nn.models``, default init, seed
0), 100 is real digits the judge has not been scored against. Between the two
it is linear in log FD, because FD falls by orders of magnitude as a GAN
trains: ``100 * log(FD_untrained / FD) / log(FD_untrained / FD_real)``,
clipped to [0, 100].

The words of the verdict were read off measured points (the 5,000-digit
subset, its cached judge, 1,000 images): real digits with 1% of pixels turned
white score 98, with 3% 71, with 10% 42; real digits under Gaussian noise of
sd 0.3 score 71, sd 0.6 45; blurred once by a 3x3 box 40, twice 26; real
digits of five classes only 38; the seed GAN after 2,000 steps of fastgan's
defaults about 32 (recognizable, speckled digits, ``docs/schedule_*.png``),
after 2,000 steps of ``--preset seed`` about 20 (digit-like blobs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .judge import NUM_CLASSES, Judge
from .metrics import features_and_probs, real_floor, scores

# (lowest score, words), best first.
BANDS = (
    (85.0, "as good as real digits to this judge"),
    (60.0, "good: clear digits, light noise or flaws"),
    (40.0, "fair: readable digits, visibly noisy or blurred"),
    (25.0, "poor: recognizable digits, speckled or blurred, or classes missing"),
    (10.0, "bad: digit-like blobs"),
    (0.0, "no better than an untrained generator"),
)
UNTRAINED_SEED = 0


def untrained_generator(seed: int = UNTRAINED_SEED) -> nn.Module:
    """The seed GAN's generator as built, before any training (plain layers, eval mode)."""
    from ...nn.models import Generator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Generator(fused=False).eval()


@dataclass
class Scale:
    """The two ends of the scale, each scored on ``n`` images."""
    n: int
    real: dict        # scores of n real images (the floor)
    untrained: dict   # scores of n images of an untrained seed-GAN generator


def calibrate(judge: Judge, n: int, seed: int = 0) -> Scale:
    """Real data and an untrained generator scored as a generator of ``n`` images is."""
    from .generators import generate
    test_feats, _ = features_and_probs(judge.model, judge.test[0])
    untrained = scores(judge.model, generate(untrained_generator(), n, seed), test_feats)
    return Scale(n, real_floor(judge, n), untrained)


def quality_score(fd: float, scale: Scale) -> float:
    """``fd`` on the 0 (untrained) .. 100 (real data) scale (module docstring)."""
    lo, hi = scale.untrained["fd"], scale.real["fd"]
    if not (math.isfinite(fd) and lo > hi > 0):
        return 0.0 if not math.isfinite(fd) else (100.0 if fd <= hi else 0.0)
    q = 100.0 * math.log(lo / max(fd, 1e-12)) / math.log(lo / hi)
    return min(max(q, 0.0), 100.0)


def words(q: float) -> str:
    return next(w for lo, w in BANDS if q >= lo)


def verdict(gen: dict, scale: Scale) -> str:
    """One line: the score, its words, the classes covered, and the numbers it
    stands on."""
    q = quality_score(gen["fd"], scale)
    missing = [i for i, h in enumerate(gen["histogram"]) if h < gen.get("min_share", 0.0)]
    covered = f"{gen['classes']}/{NUM_CLASSES} classes covered"
    if missing:
        covered += f" (missing {', '.join(map(str, missing))})"
    return (f"verdict: {q:.0f}/100, {words(q)}; {covered}; FD {gen['fd']:.1f} where real "
            f"digits score {scale.real['fd']:.1f} and an untrained generator "
            f"{scale.untrained['fd']:.0f} ({gen['n']} images)")
