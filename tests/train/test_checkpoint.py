"""Checkpoint files: atomic writes that never damage the previous file, and
loading with weights_only=True that turns bad files into one-line errors."""
import os
import pickle

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
