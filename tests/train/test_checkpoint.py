"""Checkpoint files: atomic writes that never damage the previous file (a full
disk, an interrupt), checksums of every tensor, and loading with
weights_only=True that turns bad files into one-line errors."""
import errno
import os
import pickle
import stat

import pytest
import torch

from fastgan import checkpoint
from fastgan.checkpoint import CheckpointError
from fastgan.train import TrainConfig, Trainer

SMALL = dict(latent_dim=8, g_hidden=(16,), d_hidden=(16,), image_dim=48, batch_size=8)


def _state():
    tr = Trainer(TrainConfig(**SMALL), torch.rand(32, 48) * 2 - 1)
    tr.train_step()
    return tr.state_dict()


def test_roundtrip_weights_only(tmp_path):
    st = _state()
    path = checkpoint.save(st, tmp_path / "c.pt")
    back = checkpoint.load(path)
    assert back["steps"] == 1
    for k, v in st["generator"].items():
        assert torch.equal(v, back["generator"][k])
    # the file is a plain torch.save archive anyone can open safely
    assert torch.load(path, weights_only=True)["format"] == "fastgan-checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp files left


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    path = checkpoint.save(_state(), tmp_path / "c.pt")
    before = path.read_bytes()
    with pytest.raises(Exception):
        checkpoint.save({"format": "x", "bad": lambda: 0}, path)  # cannot be pickled
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_truncated_missing_and_foreign_files(tmp_path):
    path = checkpoint.save(_state(), tmp_path / "c.pt")
    data = path.read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="t.pt: not a readable checkpoint"):
        checkpoint.load(tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.load(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a fastgan training checkpoint"):
        checkpoint.load(tmp_path / "other.pt")
    st = _state()
    st["version"] = 99
    checkpoint.save(st, tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        checkpoint.load(tmp_path / "v.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_code_in_a_checkpoint_is_refused(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "fastgan-checkpoint", "x": _Evil()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        checkpoint.load(tmp_path / "evil.pt")


# ----------------------------------------------------------------------------- checksums
def _tensors(state, path=""):
    if isinstance(state, dict):
        for k, v in state.items():
            yield from _tensors(v, f"{path}/{k}")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from _tensors(v, f"{path}[{i}]")
    elif isinstance(state, torch.Tensor):
        yield path, state


def _skeleton(state):
    """``state`` with each tensor replaced by its dtype and shape."""
    if isinstance(state, dict):
        return {k: _skeleton(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_skeleton(v) for v in state)
    return (state.dtype, tuple(state.shape)) if isinstance(state, torch.Tensor) else state


def _same(a, b):
    """Equal values: every tensor bit for bit, every other entry."""
    assert _skeleton(a) == _skeleton(b)
    tb = dict(_tensors(b))
    assert all(torch.equal(x, tb[k]) for k, x in _tensors(a))


def test_every_tensor_has_a_checksum_and_load_removes_them(tmp_path):
    st = _state()
    path = checkpoint.save(st, tmp_path / "c.pt")
    raw = torch.load(path, weights_only=True)
    sums = raw["checksums"]
    assert sums["algorithm"] == "sha256" and len(sums["rest"]) == 64
    assert len(sums["tensors"]) == len(list(_tensors(st))) > 10
    back = checkpoint.load(path)
    assert "checksums" not in back
    _same(back, st)


def test_flipped_bytes_in_a_tensor_name_the_file_and_tensor(tmp_path):
    """The reported case: 64 bytes flipped mid-file used to load (Adam moments of -8000)."""
    st = _state()
    path = checkpoint.save(st, tmp_path / "c.pt")
    data = bytearray(path.read_bytes())
    w = st["discriminator"]["net.0.0.weight"]
    at = data.find(w.numpy().tobytes()[:256])
    assert at > 0
    mid = at + w.numel() * 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    (tmp_path / "bad.pt").write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(tmp_path / "bad.pt")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'bad.pt'}: checksum mismatch in discriminator/net.0.0.weight")
    assert "\n" not in msg


def test_no_flipped_byte_loads_different_values(tmp_path):
    """Anywhere in the file: one flipped byte is refused, or (zip padding and
    fields torch does not read) loads exactly the saved values."""
    st = _state()
    path = checkpoint.save(st, tmp_path / "c.pt")
    good = path.read_bytes()
    refused = 0
    for at in range(0, len(good), max(1, len(good) // 150)):
        data = bytearray(good)
        data[at] ^= 0x5A
        (tmp_path / "x.pt").write_bytes(data)
        try:
            back = checkpoint.load(tmp_path / "x.pt")
        except CheckpointError as e:
            assert str(e).startswith(str(tmp_path / "x.pt")) and "\n" not in str(e)
            refused += 1
            continue
        _same(back, st)
    assert refused > 100


def test_every_truncation_is_refused(tmp_path):
    good = checkpoint.save(_state(), tmp_path / "c.pt").read_bytes()
    for n in list(range(0, 200, 7)) + list(range(200, len(good), max(1, len(good) // 60))):
        (tmp_path / "t.pt").write_bytes(good[:n])
        with pytest.raises(CheckpointError, match="t.pt: not a readable checkpoint"):
            checkpoint.load(tmp_path / "t.pt")


def test_damaged_checksum_entry(tmp_path):
    st = _state()
    torch.save({**st, "checksums": "nope"}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="c.pt: its checksum entry is damaged"):
        checkpoint.load(tmp_path / "c.pt")
    sums = checkpoint.checksums(st)
    sums["rest"] = "0" * 64
    torch.save({**st, "checksums": sums}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="checksum mismatch in its settings"):
        checkpoint.load(tmp_path / "c.pt")
    st2 = dict(st, steps=st["steps"] + 1)  # a changed value, checksums of the old one
    torch.save({**st2, "checksums": checkpoint.checksums(st)}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="checksum mismatch in its settings"):
        checkpoint.load(tmp_path / "c.pt")


def test_checkpoint_without_checksums_loads_with_a_warning(tmp_path):
    """Written before checksums existed: loaded (so old runs still resume), with a warning."""
    st = _state()
    torch.save(st, tmp_path / "old.pt")
    with pytest.warns(checkpoint.UnverifiedCheckpointWarning, match="old.pt: has no checksums"):
        back = checkpoint.load(tmp_path / "old.pt")
    _same(back, st)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("config"), "no 'config' entry"),
    (lambda s: s.update(config="latent_dim=8"), "'config' is a str, expected a dict"),
    (lambda s: s.update(steps=-1), "'steps' is -1"),
    (lambda s: s.update(steps="3"), "'steps' is a str"),
    (lambda s: s.update(steps=True), "'steps' is a bool"),
    (lambda s: s["generator"].update(extra=5), "'generator' entry 'extra' is not a named tensor"),
    (lambda s: s.update(g_opt={}), "'g_opt' is not an optimizer state_dict"),
    (lambda s: s["rng"].update(noise="seed"), "'rng' entry 'noise' is not an RNG state"),
    (lambda s: s["rng"].pop("torch"), "'rng' entry 'torch' is not an RNG state"),
    (lambda s: s["rng"].update(g_dropout=3), "'rng' entry 'g_dropout' is not a list"),
])
def test_wrong_contents_are_one_line_errors(tmp_path, edit, message):
    st = _state()
    edit(st)
    checkpoint.save(st, tmp_path / "c.pt")  # valid checksums: the contents are wrong
    with pytest.raises(CheckpointError, match=message) as e:
        checkpoint.load(tmp_path / "c.pt")
    assert str(e.value).startswith(str(tmp_path / "c.pt")) and "\n" not in str(e.value)


def test_non_finite_tensors_are_refused(tmp_path):
    st = _state()
    st["g_opt"]["state"][0]["exp_avg"].view(-1)[3] = float("inf")
    checkpoint.save(st, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=r"nan.pt: g_opt/state/0/exp_avg holds NaN or inf"):
        checkpoint.load(tmp_path / "nan.pt")
    assert checkpoint.first_nonfinite(checkpoint.load(tmp_path / "nan.pt", allow_nonfinite=True)) \
        == "g_opt/state/0/exp_avg"


# ----------------------------------------------------------------------------- writing
class _FullDisk:
    """A file whose write lands half the bytes, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(bytes(memoryview(data)[: len(data) // 2]))
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_keeps_the_old_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = checkpoint.save(_state(), tmp_path / "c.pt")
    before = path.read_bytes()
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: _FullDisk(real(*a, **k)))
    with pytest.raises(CheckpointError) as e:
        checkpoint.save(_state(), path)
    monkeypatch.undo()
    assert str(e.value) == (f"{path}: cannot write the checkpoint (no space left on device); "
                            "the previous checkpoint is intact")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    checkpoint.load(path)


def test_interrupted_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = checkpoint.save(_state(), tmp_path / "c.pt")
    before = path.read_bytes()

    def interrupted(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(_state(), path)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = checkpoint.save(_state(), tmp_path / "c.pt")
        torch.save({}, tmp_path / "plain.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "plain.pt").stat().st_mode)


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = tmp_path / ".c.pt.99999999.0a1b2c3d.tmp"   # no such pid
    live = tmp_path / f".c.pt.{os.getpid()}.0a1b2c3d.tmp"
    older = tmp_path / ".c.pt.k2j4h5.tmp"               # an older fastgan's mkstemp name
    other = tmp_path / ".d.pt.99999999.0a1b2c3d.tmp"
    for p in (dead, live, older, other):
        p.write_bytes(b"x" * 10)
    assert checkpoint.stale_temps(tmp_path, "c.pt") == sorted([dead, older])
    assert checkpoint.remove_stale_temps(tmp_path, "c.pt") == sorted([dead, older])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_checksums_on_threads_equal_the_serial_ones(monkeypatch):
    """Large states are hashed on a thread pool: the same digests as one by one."""
    from fastgan.train import checkpoint as C
    g = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(600, 700, generator=g), "b": [torch.randn(3, generator=g), 5],
             "c": {"d": torch.randn(900, 400, generator=g).to(torch.bfloat16)}}
    monkeypatch.setattr(C, "_PARALLEL_BYTES", 1 << 62)
    serial = C.checksums(state)
    monkeypatch.setattr(C, "_PARALLEL_BYTES", 1)
    assert C.checksums(state) == serial
