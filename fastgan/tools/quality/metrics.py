"""The metrics, on the judge's 84-wide penultimate features or its softmax
(the package docstring has the formulas), and the scores of a set of images."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .judge import NUM_CLASSES, Judge, LeNet

# A class counts as covered when at least this share of the images is
# classified as it: a quarter of its fair share 1/10. A generator that makes
# 1 of 2,000 images look like a 7 does not cover 7s.
COVERAGE_MIN_SHARE = 0.025


@torch.no_grad()
def features_and_probs(model: LeNet, images: Tensor, batch: int = 1000):
    """(features float64 (N, 84), softmax probabilities float64 (N, 10)) as numpy."""
    feats, probs = [], []
    for x in images.float().cpu().split(batch):
        f = model.features(x)
        feats.append(f.double())
        probs.append(torch.softmax(model.head(f).double(), 1))
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def gaussian_stats(features: np.ndarray):
    """(mean, covariance) of (N, d) features; N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features: need shape (N >= 2, d), got {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes do not match: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    eig = np.linalg.eigvals(s1 @ s2).real
    tr_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt, 0.0))


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def inception_score(probs: np.ndarray, eps: float = 1e-12) -> float:
    """exp(E_x KL(p(y|x) || p(y))) of (N, C) class probabilities."""
    p = np.asarray(probs, np.float64)
    marginal = p.mean(0, keepdims=True)
    kl = (p * (np.log(p + eps) - np.log(marginal + eps))).sum(1)
    return float(np.exp(kl.mean()))


def coverage(probs: np.ndarray, num_classes: int = NUM_CLASSES,
             min_share: float = COVERAGE_MIN_SHARE) -> dict:
    """Classes covered (at least ``min_share`` of the argmax predictions each)
    and KL(class histogram || uniform), in nats."""
    preds = np.asarray(probs).argmax(1)
    hist = np.bincount(preds, minlength=num_classes) / max(len(preds), 1)
    nz = hist[hist > 0]
    kl = float((nz * np.log(nz * num_classes)).sum())
    return {"classes": int((hist >= min_share).sum()), "kl_uniform": kl,
            "histogram": hist.tolist(), "min_share": min_share}


def scores(model: LeNet, images: Tensor, ref_features: np.ndarray) -> dict:
    """FD against ``ref_features``, inception-style score and coverage of ``images``."""
    feats, probs = features_and_probs(model, images)
    cov = coverage(probs)
    return {"fd": frechet_distance_features(feats, ref_features),
            "is": inception_score(probs), "classes": cov["classes"],
            "kl_uniform": cov["kl_uniform"], "histogram": cov["histogram"],
            "min_share": cov["min_share"], "n": len(images)}


def real_sample(judge: Judge, n: int, seed: int = 0) -> Tensor:
    """``n`` real images the test set does not hold (drawn from the classifier's
    training part without replacement, at most all of it)."""
    pool = judge.train[0]
    idx = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))
    return pool[idx[:n]]


def real_floor(judge: Judge, n: int | None = None, seed: int = 0) -> dict:
    """The scores of ``n`` real images (default: as many as the test set holds),
    not in the test set, against the test set: what a perfect generator scores
    with ``n`` images, since FD's bias grows as ``n`` shrinks. Score a generator
    of ``n`` images against this floor of the same ``n``. ``n`` above the
    images available is cut to them (the result's ``n`` says how many)."""
    n = judge.test[0].shape[0] if n is None else n
    test_feats, _ = features_and_probs(judge.model, judge.test[0])
    return scores(judge.model, real_sample(judge, n, seed), test_feats)
