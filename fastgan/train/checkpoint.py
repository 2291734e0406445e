"""Checkpoint files: written atomically, read without running code.

``save`` writes to a temp file in the same folder, fsyncs it, then
``os.replace``s it over the target (and fsyncs the folder), so a crash or
Ctrl-C at any moment leaves either the old checkpoint or the new one, never a
torn file. ``load`` uses ``torch.load(weights_only=True)``: a checkpoint from
elsewhere cannot execute code. Both raise ``CheckpointError`` with a one-line
message naming the file.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch


# What ``Trainer.state_dict`` writes and ``load`` accepts.
CHECKPOINT_FORMAT = "fastgan-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """An unreadable, truncated or foreign checkpoint file (the message names it)."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported everywhere (e.g. Windows); the replace is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically; returns the path."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)
    return path


def load(path: str | os.PathLike) -> dict:
    """Read a fastgan checkpoint on the CPU (``weights_only=True``) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): "
                              f"{reason}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a fastgan training checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')} is not "
                              f"supported (this fastgan reads version {CHECKPOINT_VERSION})")
    return state
