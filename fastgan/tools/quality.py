"""Sample quality of an MNIST generator, measured with a small classifier.

Inception networks know nothing of digits, so fastgan trains its own judge once:
a LeNet-style CNN on the available MNIST data (a held-out, class-balanced part of
it is the "test" set), cached under ``cache_dir`` keyed by a hash of the data,
with the SHA-256 of its weights recorded and checked on load.

Metrics (all on the classifier's 84-wide penultimate features or its softmax):

* ``frechet_distance``: between Gaussians fitted to real and generated
  features, ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)``. The trace of the
  matrix square root is the sum of the square roots of the eigenvalues of
  ``S1 S2`` (real and non-negative for two PSD matrices), which needs no
  ``sqrtm`` and no complex clean-up.
* ``inception_score``: ``exp(E_x KL(p(y|x) || p(y)))``, at most 10 here.
* ``coverage``: how many of the 10 classes the generator produces and the KL
  divergence of its class histogram to uniform (0 = perfectly balanced).

Every number is printed next to the real-vs-real floor (held-out real images
against the training images) for scale. Nothing here prints or parses
arguments; ``log`` callbacks report progress.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_CLASSES = 10
FEATURE_DIM = 84
CACHE_ENV = "FASTGAN_CACHE"
CLASSIFIER_VERSION = 1   # bump when the architecture or its training changes


# ------------------------------------------------------------------ classifier
class LeNet(nn.Module):
    """LeNet-5 shaped: two 5x5 conv + max-pool stages, then 120 -> 84 -> 10.
    Takes (N, 784) or (N, 1, 28, 28) images in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(400, 120), nn.ReLU(),
                                nn.Linear(120, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x.reshape(-1, 1, 28, 28)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def split_real(images: Tensor, labels: Tensor, test_fraction: float = 0.2, seed: int = 0):
    """A class-balanced (stratified) split: ((train_x, train_y), (test_x, test_y))."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images and labels differ in length: {images.shape[0]} vs {labels.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    test_idx, train_idx = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        k = max(1, int(round(idx.numel() * test_fraction)))
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    return (images[tr], labels[tr]), (images[te], labels[te])


def data_hash(images: Tensor, labels: Tensor) -> str:
    """SHA-256 of the images (quantized to 8 bits, so float noise does not
    matter) and labels: the classifier cache key."""
    h = hashlib.sha256()
    q = ((images.detach().float().cpu().reshape(images.shape[0], -1) + 1) * 127.5).round()
    h.update(q.clamp(0, 255).to(torch.uint8).numpy().tobytes())
    h.update(labels.detach().cpu().to(torch.int64).numpy().tobytes())
    h.update(f"v{CLASSIFIER_VERSION}".encode())
    return h.hexdigest()


def weights_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_classifier(images: Tensor, labels: Tensor, epochs: int = 8, batch_size: int = 64,
                     lr: float = 2e-3, seed: int = 0, shift: int = 2,
                     log: Optional[Callable[[str], None]] = None) -> LeNet:
    """Train a LeNet on (N, 784) images in [-1, 1], CPU-friendly (seconds per epoch).

    Random shifts of up to ``shift`` pixels make it less brittle on generated
    digits that sit slightly off-centre.
    """
    if images.shape[0] < batch_size:
        raise ValueError(f"images: need at least batch_size={batch_size} images, got {images.shape[0]}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LeNet()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=epochs * (images.shape[0] // batch_size))
        x_all = images.reshape(-1, 1, 28, 28).float()
        for epoch in range(epochs):
            perm = torch.randperm(x_all.shape[0])
            total, correct = 0.0, 0
            for i in range(0, x_all.shape[0] - batch_size + 1, batch_size):
                idx = perm[i:i + batch_size]
                x, y = x_all[idx], labels[idx]
                if shift:
                    dx, dy = torch.randint(-shift, shift + 1, (2,)).tolist()
                    x = torch.roll(F.pad(x, (shift,) * 4, value=-1.0), (dy, dx), (2, 3))
                    x = x[:, :, shift:shift + 28, shift:shift + 28]
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * y.numel()
                correct += int((logits.argmax(1) == y).sum())
            if log:
                n = (x_all.shape[0] // batch_size) * batch_size
                log(f"classifier epoch {epoch + 1}/{epochs}: loss {total / n:.3f}, "
                    f"train accuracy {correct / n:.3f}")
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    preds = torch.cat([model(x).argmax(1) for x in images.split(1000)])
    return float((preds == labels).float().mean())


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fastgan")


@dataclass
class Judge:
    """The trained classifier and the real data it scores against."""
    model: LeNet
    train: tuple          # (images, labels): the classifier's training part
    test: tuple           # (images, labels): held out, the real "test" set
    info: dict            # data_hash, weights_sha256, test_accuracy, path, cached, ...


def load_judge(images: Tensor, labels: Tensor, cache_dir=None, test_fraction: float = 0.2,
               epochs: int = 8, source: str = "", retrain: bool = False,
               log: Optional[Callable[[str], None]] = None) -> Judge:
    """The classifier for this data: from the cache if its data hash and weights
    hash match, else trained now (and cached)."""
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError("labels: the classifier needs MNIST labels 0..9 (synthetic data has none)")
    train, test = split_real(images, labels, test_fraction)
    key = data_hash(images, labels)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"classifier-{key[:16]}.pt"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file() and not retrain:
        meta = json.loads(meta_path.read_text())
        model = LeNet()
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            ok = (meta.get("data_hash") == key and meta.get("epochs") == epochs
                  and meta.get("weights_sha256") == weights_hash(model))
        except (RuntimeError, OSError, ValueError) as e:
            ok = False
            if log:
                log(f"classifier cache {path} unreadable ({e}); retraining")
        if ok:
            return Judge(model.eval(), train, test, dict(meta, path=str(path), cached=True))
        if log:
            log(f"classifier cache {path} does not match (data hash, epochs or weights "
                "hash); retraining")
    t0 = time.perf_counter()
    model = train_classifier(*train, epochs=epochs, log=log)
    meta = {
        "data_hash": key, "data_source": source, "weights_sha256": weights_hash(model),
        "test_accuracy": accuracy(model, *test), "train_accuracy": accuracy(model, *train),
        "n_train": int(train[0].shape[0]), "n_test": int(test[0].shape[0]), "epochs": epochs,
        "train_seconds": time.perf_counter() - t0, "torch": torch.__version__,
        "version": CLASSIFIER_VERSION,
    }
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    meta_path.write_text(json.dumps(meta, indent=1))
    return Judge(model, train, test, dict(meta, path=str(path), cached=False))


# ------------------------------------------------------------------ metrics
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


def coverage(probs: np.ndarray, num_classes: int = NUM_CLASSES) -> dict:
    """Classes produced (argmax) and KL(class histogram || uniform), in nats."""
    preds = np.asarray(probs).argmax(1)
    hist = np.bincount(preds, minlength=num_classes) / max(len(preds), 1)
    nz = hist[hist > 0]
    kl = float((nz * np.log(nz * num_classes)).sum())
    return {"classes": int((hist > 0).sum()), "kl_uniform": kl, "histogram": hist.tolist()}


def scores(model: LeNet, images: Tensor, ref_features: np.ndarray) -> dict:
    """FD against ``ref_features``, inception-style score and coverage of ``images``."""
    feats, probs = features_and_probs(model, images)
    cov = coverage(probs)
    return {"fd": frechet_distance_features(feats, ref_features),
            "is": inception_score(probs), "classes": cov["classes"],
            "kl_uniform": cov["kl_uniform"], "histogram": cov["histogram"], "n": len(images)}


def real_floor(judge: Judge) -> dict:
    """The scores of held-out real images against the training images: the best
    a generator can hope for at this sample size."""
    train_feats, _ = features_and_probs(judge.model, judge.train[0])
    return scores(judge.model, judge.test[0], train_feats)


# ------------------------------------------------------------------ generators
def generator_from_state(state: dict):
    """A plain-PyTorch Generator built from a state_dict's shapes, weights loaded.

    Accepts a generator ``state_dict`` or a training checkpoint (a dict with a
    ``generator`` entry, as ``fastgan.train.Trainer.state_dict`` writes)."""
    from ..nn.models import Generator

    if "generator" in state and isinstance(state["generator"], dict):
        state = state["generator"]
    weights = sorted((k for k in state if k.endswith(".weight") and state[k].dim() == 2),
                     key=lambda k: [int(p) if p.isdigit() else p for p in k.split(".")])
    if not weights:
        raise ValueError("checkpoint: no generator Linear weights found (expected keys net.<i>.0.weight)")
    shapes = [tuple(state[k].shape) for k in weights]
    latent, hidden, out = shapes[0][1], tuple(s[0] for s in shapes[:-1]), shapes[-1][0]
    G = Generator(latent_dim=latent, hidden=hidden, out_dim=out, fused=False)
    try:
        G.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint: generator weights do not fit the seed GAN: "
                         f"{str(e).splitlines()[0]}") from None
    return G.eval()


@torch.no_grad()
def generate(G: nn.Module, n: int, seed: int = 0, batch: int = 1000, device="cpu") -> Tensor:
    """``n`` images from ``G`` in eval mode (running BN stats, no dropout), on the CPU."""
    latent = getattr(G, "latent_dim", None) or next(m for m in G.modules()
                                                    if isinstance(m, nn.Linear)).in_features
    g = torch.Generator().manual_seed(seed)
    was = G.training
    G.eval()
    try:
        out = [G(torch.randn(min(batch, n - i), latent, generator=g).to(device)).float().cpu()
               for i in range(0, n, batch)]
    finally:
        G.train(was)
    return torch.cat(out).reshape(n, -1)


def evaluate_generator(G: nn.Module, judge: Judge, n: int = 2000, seed: int = 0,
                       device="cpu") -> dict:
    """Scores of ``n`` generated images against the held-out real images."""
    test_feats, _ = features_and_probs(judge.model, judge.test[0])
    return scores(judge.model, generate(G, n, seed, device=device), test_feats)


# ------------------------------------------------------------------ time to quality
# The seed GAN passes it after about 1,000 steps of batch 64 on the 5,000-digit
# subset (FD 110 at step 1,092 in one run; the real-vs-real floor is 0.64).
DEFAULT_FD_THRESHOLD = 150.0


def train_curve(reference: bool, images: Tensor, judge: Judge, seed: int = 0,
                batch: int = 64, max_steps: int = 2000, eval_every: int = 250,
                threshold: Optional[float] = None, stop_at_threshold: bool = False,
                n_eval: int = 1000, device="cpu", backend: Optional[str] = None,
                log: Optional[Callable[[str], None]] = None) -> dict:
    """Train the seed GAN with the engine (``fastgan.train.Trainer``) and score it
    every ``eval_every`` steps. Wall-clock counts training steps only (evaluation
    time is excluded); returns the curve and the time the FD first reached
    ``threshold``."""
    from ..ops import dispatch as _backend
    from ..train import TrainConfig, Trainer

    cfg = TrainConfig(batch_size=batch, seed=seed, reference=reference)
    trainer = Trainer(cfg, images, device=device, graphs=None if not reference else False)
    test_feats, _ = features_and_probs(judge.model, judge.test[0])
    z = torch.randn(n_eval, cfg.latent_dim, generator=torch.Generator().manual_seed(10_000 + seed))
    curve, train_s, reached = [], 0.0, None
    dev = torch.device(device)
    with _backend.use_backend(backend) if backend else contextlib.nullcontext():
        for step in range(1, max_steps + 1):
            t0 = time.perf_counter()
            trainer.train_step()
            if step % eval_every == 0 or step == max_steps:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                train_s += time.perf_counter() - t0
                s = scores(judge.model, trainer.sample(z), test_feats)
                curve.append({"step": step, "train_s": train_s, "fd": s["fd"], "is": s["is"],
                              "classes": s["classes"], "kl_uniform": s["kl_uniform"]})
                if log:
                    log(f"{'reference' if reference else 'fastgan'} seed {seed} step {step}: "
                        f"FD {s['fd']:.2f}, IS {s['is']:.2f}, classes {s['classes']}, "
                        f"{train_s:.1f} s training")
                if threshold is not None and reached is None and s["fd"] <= threshold:
                    reached = {"step": step, "train_s": train_s}
                    if stop_at_threshold:
                        break
            else:
                train_s += time.perf_counter() - t0
    return {"contender": "eager" if reference else "fastgan", "seed": seed, "batch": batch,
            "backend": None if reference else (backend or _backend.select(dev)),
            "curve": curve, "final": curve[-1] if curve else None, "reached": reached,
            "threshold": threshold}


def time_to_quality_run(device="cpu", seeds=(0,), batch: int = 64, max_steps: int = 2000,
                        eval_every: int = 250, threshold: Optional[float] = None,
                        data=None, cache_dir=None, stop_at_threshold: bool = False,
                        log: Optional[Callable[[str], None]] = None) -> dict:
    """fastgan vs the eager reference, same hyper-parameters, each seed: the
    wall-clock to reach the FD threshold and the final scores. A JSON-able dict."""
    from .benchmark import machine_info
    from ..train.data import load_mnist

    ds = load_mnist(data)
    judge = load_judge(ds.images, ds.labels, cache_dir=cache_dir, source=ds.source, log=log)
    threshold = DEFAULT_FD_THRESHOLD if threshold is None else float(threshold)
    floor = real_floor(judge)
    runs = []
    for seed in seeds:
        for reference in (True, False):
            runs.append(train_curve(reference, judge.train[0], judge, seed=seed, batch=batch,
                                    max_steps=max_steps, eval_every=eval_every,
                                    threshold=threshold, stop_at_threshold=stop_at_threshold,
                                    device=device, log=log))
    return {"schema": "fastgan-quality/1", "machine": machine_info(torch.device(device)),
            "data": ds.source, "classifier": judge.info, "real_floor": _strip(floor),
            "threshold": threshold, "batch": batch, "max_steps": max_steps,
            "eval_every": eval_every, "runs": runs, "summary": summarize(runs)}


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "histogram"}


def summarize(runs: list) -> dict:
    """Per contender: final FD mean/std over seeds, median time to threshold."""
    out = {}
    for name in sorted({r["contender"] for r in runs}):
        rs = [r for r in runs if r["contender"] == name]
        fds = np.array([r["final"]["fd"] for r in rs if r["final"]])
        times = [r["reached"]["train_s"] for r in rs if r["reached"]]
        out[name] = {"seeds": len(rs), "final_fd_mean": float(fds.mean()) if fds.size else None,
                     "final_fd_std": float(fds.std(ddof=1)) if fds.size > 1 else None,
                     "final_fd": fds.tolist(),
                     "reached": f"{len(times)}/{len(rs)}",
                     "time_to_threshold_s_median": float(np.median(times)) if times else None,
                     "train_s_total_mean": float(np.mean([r["final"]["train_s"] for r in rs
                                                          if r["final"]])) if rs else None}
    return out


def format_time_to_quality(doc: dict) -> str:
    f = doc["real_floor"]
    lines = [f"data: {doc['data']}",
             f"classifier: test accuracy {doc['classifier']['test_accuracy']:.3f} "
             f"({doc['classifier']['path']})",
             f"real-vs-real floor: FD {f['fd']:.2f}, IS {f['is']:.2f}, classes {f['classes']}",
             f"threshold: FD <= {doc['threshold']}, batch {doc['batch']}, "
             f"up to {doc['max_steps']} steps",
             f"{'contender':<10} {'seeds':>5} {'final FD (mean ± std)':>24} {'reached':>8} "
             f"{'time to FD (median s)':>22} {'train s (mean)':>15}"]
    for name, s in doc["summary"].items():
        fd = "-" if s["final_fd_mean"] is None else (
            f"{s['final_fd_mean']:.2f} ± {s['final_fd_std']:.2f}" if s["final_fd_std"] is not None
            else f"{s['final_fd_mean']:.2f}")
        t = "-" if s["time_to_threshold_s_median"] is None else f"{s['time_to_threshold_s_median']:.1f}"
        lines.append(f"{name:<10} {s['seeds']:>5} {fd:>24} {s['reached']:>8} {t:>22} "
                     f"{s['train_s_total_mean']:>15.1f}")
    return "\n".join(lines)
