"""The judge of sample quality: a LeNet-style CNN trained once on the available
MNIST data (a held-out, class-balanced part of it is the real "test" set),
cached under ``cache_dir`` keyed by a hash of the data, with the SHA-256 of its
weights recorded and checked on load."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_CLASSES = 10
FEATURE_DIM = 84
CACHE_ENV = "FASTGAN_CACHE"
CLASSIFIER_VERSION = 1   # bump when the architecture or its training changes


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
