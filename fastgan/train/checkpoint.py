"""Checkpoint files: atomic, checksummed, read without running code.

``save`` adds a SHA-256 of every tensor (its dtype, shape and bytes) and one
of everything else (config, step count, optimizer settings) to the state,
writes it to a temp file next to the target, fsyncs it, then
``os.replace``s it over the target (and fsyncs the folder). A crash, a full
disk or Ctrl-C at any moment leaves either the old checkpoint or the new one,
never a torn file; a failed save removes its temp file. Files get mode
``0o666`` less the umask, as ``torch.save`` and ``open`` give them.

``load`` reads with ``torch.load(weights_only=True)`` (a checkpoint from
elsewhere cannot execute code), verifies the checksums, the layout a
``Trainer`` needs and that every floating-point tensor is finite (a diverged
run's checkpoint is refused). Files written before checksums existed load with
a warning. Every failure is a ``CheckpointError`` with a one-line message that
names the file.

A process killed during a save (SIGKILL, power loss) leaves its temp file
behind: ``remove_stale_temps`` deletes those whose writer is gone.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import secrets
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Iterator, Optional

import torch

# What ``Trainer.state_dict`` writes and ``load`` accepts.
CHECKPOINT_FORMAT = "fastgan-checkpoint"
CHECKPOINT_VERSION = 1
CHECKSUMS = "checksums"   # the entry ``save`` adds and ``load`` verifies and removes
TEMP_SUFFIX = ".tmp"

# The entries of a training checkpoint and their types (``Trainer.state_dict``).
LAYOUT = {"config": dict, "steps": int, "generator": dict, "discriminator": dict,
          "g_opt": dict, "d_opt": dict, "rng": dict}


class CheckpointError(RuntimeError):
    """An unreadable, corrupt, truncated or foreign checkpoint file, or one that
    cannot be written (the message names it)."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint without checksums (written before fastgan stored them)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ----------------------------------------------------------------------------- atomic files
def _temp_name(path: Path) -> Path:
    # The writer's pid is in the name, so remove_stale_temps can tell a live
    # save from one whose process died.
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


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


def write_atomic(path: str | os.PathLike, data) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, fsync, replace): bytes,
    or a function that writes to the binary file it is given.

    On any failure (``OSError`` such as ENOSPC, or a KeyboardInterrupt) the
    temp file is removed, ``path`` keeps its old contents and the exception
    propagates."""
    path = Path(path)
    tmp = _temp_name(path)
    # O_EXCL: never follow or reuse someone else's file; 0o666: the umask applies.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0   # someone else's process: leave its file alone
    return True


def stale_temps(folder: str | os.PathLike, name: str = "*") -> list[Path]:
    """Temp files ``write_atomic`` left in ``folder`` for targets matching
    ``name`` whose writing process is gone."""
    out = []
    for p in sorted(Path(folder).glob(f".{name}.*{TEMP_SUFFIX}")):
        parts = p.name[:-len(TEMP_SUFFIX)].rsplit(".", 2)
        pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
        if p.is_file() and (pid is None or not _alive(pid)):
            out.append(p)
    return out


def remove_stale_temps(folder: str | os.PathLike, name: str = "*") -> list[Path]:
    """Delete ``stale_temps(folder, name)``; returns the files removed."""
    removed = []
    for p in stale_temps(folder, name):
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


# ----------------------------------------------------------------------------- checksums
def _walk(obj, path: str = "") -> Iterator[tuple[str, object]]:
    """(path, leaf) of every tensor and plain value, containers included as
    ``("path", ("dict", len))`` so a changed structure changes the digest."""
    if isinstance(obj, dict):
        yield path, ("dict", len(obj))
        for k, v in obj.items():
            yield from _walk(v, f"{path}/{k!r}" if path else repr(k))
    elif isinstance(obj, (list, tuple)):
        yield path, (type(obj).__name__, len(obj))
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, obj


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _readable(path: str) -> str:
    """``'generator'/'net.0.0.weight'`` -> ``generator/net.0.0.weight`` for messages."""
    return path.replace("'", "")


def _tensor_digest(t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(_tensor_bytes(t))
    return h.hexdigest()


_POOL = None
_PARALLEL_BYTES = 1 << 20   # below this much tensor data a thread pool costs more than it saves


def _digests(leaves: list) -> list:
    """``_tensor_digest`` of each tensor, on a few threads when there is much to
    hash: hashlib releases the GIL over large buffers, and a seed-GAN checkpoint
    is ~35 MB (22 ms of SHA-256 on one core, a fifth of each epoch's save)."""
    global _POOL
    if sum(t.numel() * t.element_size() for t in leaves) < _PARALLEL_BYTES or \
            (os.cpu_count() or 1) < 2:
        return [_tensor_digest(t) for t in leaves]
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                   thread_name_prefix="fastgan-checksums")
    # the largest first, so the threads finish together
    order = sorted(range(len(leaves)), key=lambda i: -leaves[i].numel() * leaves[i].element_size())
    out = [None] * len(leaves)
    for i, digest in zip(order, _POOL.map(_tensor_digest, [leaves[i] for i in order])):
        out[i] = digest
    return out


def checksums(state: dict) -> dict:
    """SHA-256 of every tensor of ``state`` (dtype, shape, bytes) keyed by its
    path, and ``rest``: one over every other value and the structure."""
    rest, paths, leaves = hashlib.sha256(), [], []
    for path, leaf in _walk({k: v for k, v in state.items() if k != CHECKSUMS}):
        if isinstance(leaf, torch.Tensor):
            paths.append(path)
            leaves.append(leaf)
            rest.update(f"{path}:tensor;".encode())
        else:
            rest.update(f"{path}:{type(leaf).__name__}:{leaf!r};".encode())
    tensors = dict(zip(paths, _digests(leaves)))
    return {"algorithm": "sha256", "tensors": tensors, "rest": rest.hexdigest()}


def _verify(state: dict, path: Path) -> None:
    stored = state.pop(CHECKSUMS)
    if not (isinstance(stored, dict) and isinstance(stored.get("tensors"), dict)):
        raise CheckpointError(f"{path}: its checksum entry is damaged (corrupt file?)")
    actual = checksums(state)
    for name, digest in actual["tensors"].items():
        if stored["tensors"].get(name) != digest:
            raise CheckpointError(f"{path}: checksum mismatch in {_readable(name)}: the file is "
                                  "corrupt (use an older copy, or start the run again)")
    if stored.get("rest") != actual["rest"] or len(stored["tensors"]) != len(actual["tensors"]):
        raise CheckpointError(f"{path}: checksum mismatch in its settings (config, steps, "
                              "optimizer options): the file is corrupt")


# ----------------------------------------------------------------------------- checks
def first_nonfinite(state) -> Optional[str]:
    """Path of the first floating-point tensor of ``state`` holding NaN or inf, or None.

    One min/max reduction per tensor (NaN and inf show in them), one host read
    per device: cheap enough before every save."""
    items = [(p, t.detach()) for p, t in _walk(state)
             if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    rows: dict = {}
    for i, (_, t) in enumerate(items):
        lo, hi = torch.aminmax(t.reshape(-1))
        rows.setdefault(t.device, []).append((i, torch.stack([lo.float(), hi.float()])))
    bad = set()
    for group in rows.values():
        finite = torch.isfinite(torch.stack([r for _, r in group])).all(1).tolist()
        bad.update(i for (i, _), ok in zip(group, finite) if not ok)
    return _readable(items[min(bad)][0]) if bad else None


def _check_layout(state: dict, path: Path) -> None:
    """The entries a Trainer reads are there, of the right kind (a hand-edited
    or damaged file fails here, not with a KeyError deep in a resume)."""
    for key, kind in LAYOUT.items():
        if key not in state:
            raise CheckpointError(f"{path}: no '{key}' entry (not a complete training checkpoint)")
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{path}: '{key}' is a {type(value).__name__}, expected "
                                  f"a {kind.__name__}")
    if state["steps"] < 0:
        raise CheckpointError(f"{path}: 'steps' is {state['steps']}, expected >= 0")
    for key in ("generator", "discriminator"):
        bad = next((k for k, v in state[key].items()
                    if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
        if bad is not None:
            raise CheckpointError(f"{path}: '{key}' entry {bad!r} is not a named tensor")
    for key in ("g_opt", "d_opt"):
        opt = state[key]
        if not (isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)):
            raise CheckpointError(f"{path}: '{key}' is not an optimizer state_dict")
    rng = state["rng"]
    for key in ("noise", "torch"):
        if not isinstance(rng.get(key), torch.Tensor) or rng[key].dtype != torch.uint8:
            raise CheckpointError(f"{path}: 'rng' entry '{key}' is not an RNG state "
                                  "(a uint8 tensor)")
    for key in ("g_dropout", "d_dropout"):
        if not (isinstance(rng.get(key), (list, tuple))
                and all(isinstance(t, torch.Tensor) for t in rng[key])):
            raise CheckpointError(f"{path}: 'rng' entry '{key}' is not a list of tensors")


# ----------------------------------------------------------------------------- save, load
class _Sink:
    """The file ``torch.save`` writes to, remembering a failed write's OSError:
    torch reports it as a RuntimeError ("unexpected pos") that names nothing."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def _canonical(obj):
    """``obj`` with fresh containers and interned strings: pickle then shares
    (memoizes) exactly the equal strings, so a checkpoint's bytes depend on its
    values only, not on which objects a run happened to share (a resumed run's
    optimizer settings are other objects than a fresh run's)."""
    if isinstance(obj, dict):  # OrderedDict state_dicts stay OrderedDicts, with their _metadata
        out = type(obj)()
        for k, v in obj.items():
            out[_canonical(k)] = _canonical(v)
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_canonical(v) for v in obj)
    if type(obj) is str:
        return sys.intern(obj)
    return obj


def save(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` with its checksums to ``path`` atomically; returns the path.

    A failed write (disk full, no permission) raises ``CheckpointError`` and
    leaves ``path`` as it was; other errors (a value that cannot be pickled,
    KeyboardInterrupt) propagate unchanged, the old file untouched too."""
    path = Path(path)
    obj = _canonical({**state, CHECKSUMS: checksums(state)})

    def write(f):
        sink = _Sink(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:  # the write's own error, not torch's echo of it
                raise sink.error from None
            raise

    try:
        return write_atomic(path, write)
    except OSError as e:
        kept = "the previous checkpoint is intact" if path.exists() else "nothing was written"
        reason = e.strerror or _first_line(e)
        if e.errno == errno.ENOSPC:
            reason = "no space left on device"
        raise CheckpointError(f"{path}: cannot write the checkpoint ({reason}); {kept}") from None


def load(path: str | os.PathLike, allow_nonfinite: bool = False) -> dict:
    """Read a fastgan checkpoint on the CPU (``weights_only=True``), verify its
    checksums, layout and (unless ``allow_nonfinite``) that its tensors are finite."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # its notes on odd pickles: the errors below say it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError,
            IndexError, UnicodeDecodeError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): "
                              f"{_first_line(e)}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a fastgan training checkpoint")
    if CHECKSUMS in state:
        _verify(state, path)
    else:
        warnings.warn(f"{path}: has no checksums (written by an older fastgan), so it cannot "
                      "be verified; checkpoints saved from now on have them",
                      UnverifiedCheckpointWarning, stacklevel=2)
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')} is not "
                              f"supported (this fastgan reads version {CHECKPOINT_VERSION})")
    _check_layout(state, path)
    if not allow_nonfinite:
        bad = first_nonfinite(state)
        if bad is not None:
            raise CheckpointError(f"{path}: {bad} holds NaN or inf (the run that wrote it had "
                                  "diverged); use an earlier checkpoint")
    return state
