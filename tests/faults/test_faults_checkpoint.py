"""Checkpoint faults through the command line, one process.

Damaged files handed to ``sample``, ``train --resume`` and ``eval`` (truncated,
flipped bytes, empty, a malicious pickle, wrong contents, NaN weights), and
faults during a save (a full disk, a file-size limit the kernel enforces, a
SIGKILL, a second Ctrl-C, SIGTERM). Every case asserts the exit status, one
line naming the file, no traceback (``main`` returned, or the subprocess's
stderr), and that the run's last good checkpoint is untouched and resumes to
the uninterrupted run's checkpoint, byte for byte.
"""
import os
import pickle
import resource
import shutil
import signal
import stat
import subprocess
import sys

import pytest
import torch

from fault_tools import (DRIVER, ROOT, cli_error, env, one_line, resume_to, run_one,
                         train_args)

from fastgan.cli import main
from fastgan.train import checkpoint


@pytest.fixture
def run4(npz, reference, tmp_path):
    """A run stopped after its first epoch: its folder, checkpoint at step 4."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(reference[4])
    return out


def _good(reference, tmp_path):
    """A copy of the good checkpoint (step 4), loaded: the base of a damaged one."""
    path = tmp_path / "good.pt"
    path.write_bytes(reference[4])
    return checkpoint.load(path)


class _Marker:
    """Unpickling this would create a file: the proof that no code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _damaged(kind, reference, tmp_path):
    """A damaged copy of the good checkpoint, and the words its error must hold."""
    good = reference[4]
    bad = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        bad.write_bytes(good[: len(good) * 2 // 3])
        return bad, "not a readable checkpoint"
    if kind == "empty":
        bad.write_bytes(b"")
        return bad, "not a readable checkpoint"
    if kind == "flipped":
        data = bytearray(good)
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
        bad.write_bytes(data)
        return bad, "checksum mismatch"
    if kind == "pickle":
        with open(bad, "wb") as f:
            pickle.dump({"format": "fastgan-checkpoint", "x": _Marker(str(tmp_path / "ran"))}, f)
        return bad, "not a readable checkpoint"
    st = _good(reference, tmp_path)
    if kind == "no-config":
        del st["config"]
        words = "no 'config' entry"
    elif kind == "config-str":
        st["config"] = "latent_dim=8"
        words = "'config' is a str, expected a dict"
    elif kind == "latent-5":
        st["config"]["latent_dim"] = -5
        words = "its config has latent_dim=-5, which must be a whole number"
    elif kind == "lr-inf":
        st["config"]["lr"] = float("inf")
        words = "its config has lr=inf, which must be a finite number in (0, 1]"
    elif kind == "nan":
        st["generator"]["net.0.0.weight"][0, 0] = float("nan")
        words = "generator/net.0.0.weight holds NaN or inf"
    checkpoint.save(st, bad)  # valid checksums, wrong contents
    return bad, words


KINDS = ["truncated", "empty", "flipped", "pickle", "no-config", "config-str", "latent-5",
         "lr-inf", "nan"]


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_checkpoint_in_sample_resume_and_eval(npz, reference, run4, tmp_path, capsys,
                                                      kind):
    bad, words = _damaged(kind, reference, tmp_path)
    cli_error(capsys, ["sample", "--checkpoint", bad, "--out", tmp_path / "g.png"], bad, words)
    cli_error(capsys, train_args(npz, tmp_path / "new", "--steps", 8, "--resume", bad), bad, words)
    if kind not in ("latent-5", "lr-inf"):  # eval rebuilds G from the weights' shapes
        cli_error(capsys, ["eval", "--checkpoint", bad], bad)
    assert not (tmp_path / "ran").exists()      # the pickle's code never ran
    assert not (tmp_path / "g.png").exists()
    # The run's own checkpoint: untouched, and it resumes exactly.
    assert (run4 / "checkpoint.pt").read_bytes() == reference[4]
    assert main(train_args(npz, run4, "--steps", 8, "--resume")) == 0
    assert (run4 / "checkpoint.pt").read_bytes() == reference[8]


def test_bad_rng_state_on_resume(npz, reference, tmp_path, capsys):
    st = _good(reference, tmp_path)
    st["rng"]["noise"] = torch.zeros(7, dtype=torch.uint8)   # not a generator state
    bad = checkpoint.save(st, tmp_path / "rng.pt")
    cli_error(capsys, train_args(npz, tmp_path / "new", "--steps", 8, "--resume", bad),
           "checkpoint RNG state is not valid")
    # Sampling needs no RNG state: the same file still samples.
    assert main(["sample", "--checkpoint", str(bad), "--n", "4", "--out",
                 str(tmp_path / "g.png")]) == 0


def test_checkpoint_without_checksums_resumes_with_one_warning(npz, reference, tmp_path, capsys):
    st = _good(reference, tmp_path)
    out = tmp_path / "old"
    out.mkdir()
    torch.save(st, out / "checkpoint.pt")  # as fastgan wrote them before checksums
    assert main(train_args(npz, out, "--steps", 8, "--resume")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastgan: warning: ") and "has no checksums" in err[0]
    assert (out / "checkpoint.pt").read_bytes() == reference[8]  # and now it has them


# ----------------------------------------------------------------------------- faults in a save
def test_disk_full_during_a_save(npz, reference, run4, tmp_path):
    res = run_one(train_args(npz, run4, "--steps", 100000, "--resume"), FAULT="enospc:0:save",
                  SAVE_AFTER=5)
    assert res.returncode == 1
    line = one_line(res, "fastgan train: error: ")
    assert line.endswith(f"{run4 / 'checkpoint.pt'}: cannot write the checkpoint (no space left "
                         "on device); the previous checkpoint is intact")
    assert sorted(p.name for p in run4.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "samples"]
    assert (run4 / "checkpoint.pt").read_bytes() == reference[4]
    assert resume_to(npz, run4 / "checkpoint.pt", 8, tmp_path) == reference[8]


def test_file_size_limit_during_a_save(npz, reference, run4, tmp_path):
    """A write the kernel refuses (RLIMIT_FSIZE: EFBIG, no privileges needed)."""
    limit = len(reference[4]) // 2     # the checkpoint is the largest file written

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    p = subprocess.run([sys.executable, str(DRIVER), *train_args(npz, run4, "--steps", 8,
                                                                 "--resume")],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300,
                       preexec_fn=small_files)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0] == (f"fastgan train: error: {run4 / 'checkpoint.pt'}: cannot "
                                        "write the checkpoint (File too large); the previous "
                                        "checkpoint is intact"), err
    assert not list(run4.glob(".*.tmp"))
    assert (run4 / "checkpoint.pt").read_bytes() == reference[4]
    assert resume_to(npz, run4 / "checkpoint.pt", 8, tmp_path) == reference[8]


def test_sigkill_during_a_save_leaves_a_temp_file_the_next_run_removes(npz, reference, run4,
                                                                         tmp_path, capsys):
    res = run_one(train_args(npz, run4, "--steps", 100000, "--resume"), FAULT="sigkill:0:save",
                  SAVE_AFTER=5)
    assert res.returncode == -signal.SIGKILL
    temps = list(run4.glob(".checkpoint.pt.*.tmp"))
    assert len(temps) == 1 and temps[0].stat().st_size > len(reference[4]) // 2
    assert (run4 / "checkpoint.pt").read_bytes() == reference[4]
    assert main(train_args(npz, run4, "--steps", 8, "--resume")) == 0
    assert f"removed 1 temp file(s) of an interrupted save: {temps[0].name}" in \
        capsys.readouterr().out
    assert not list(run4.glob(".*.tmp"))
    assert (run4 / "checkpoint.pt").read_bytes() == reference[8]


def test_second_ctrl_c_during_a_save_lets_it_finish(npz, reference, run4, tmp_path):
    """Ctrl-C, then Ctrl-C again while the checkpoint is written: the write
    completes (atomic anyway), then the run stops: status 130, one line."""
    res = run_one(train_args(npz, run4, "--steps", 100000, "--resume"), FAULT="sigint2:0:save",
                  SAVE_AFTER=5)
    assert res.returncode == 130
    assert one_line(res, "fastgan train: interrupted") == "fastgan train: interrupted"
    assert not list(run4.glob(".*.tmp"))
    assert (run4 / "checkpoint.pt").read_bytes() == reference[8]


@pytest.mark.parametrize("sig", ["sigterm", "sigint"])
def test_signal_checkpoints_at_the_step_and_resumes_exactly(npz, reference, run4, tmp_path, sig):
    res = run_one(train_args(npz, run4, "--steps", 100000, "--resume"), FAULT=f"{sig}:0:5")
    assert res.returncode == 128 + (signal.SIGTERM if sig == "sigterm" else signal.SIGINT)
    assert f"interrupted at step 5 ({sig.upper()}); checkpoint saved to" in res.stdout
    assert not res.stderr.strip()
    assert checkpoint.load(run4 / "checkpoint.pt")["steps"] == 5
    assert resume_to(npz, run4 / "checkpoint.pt", 8, tmp_path) == reference[8]


# ----------------------------------------------------------------------------- files written
def test_files_honour_the_umask(npz, tmp_path):
    old = os.umask(0o027)
    try:
        assert main(train_args(npz, tmp_path / "run", "--steps", 4)) == 0
        assert main(["sample", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"),
                     "--n", "4", "--out", str(tmp_path / "g.png")]) == 0
    finally:
        os.umask(old)
    for p in (tmp_path / "run" / "checkpoint.pt", tmp_path / "run" / "samples" / "epoch_0001.png",
              tmp_path / "run" / "metrics.jsonl", tmp_path / "g.png"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p


def test_same_seed_runs_write_the_same_bytes(npz, reference, tmp_path):
    """A fresh process (its global RNG seeded by the OS) and this one (which ran
    other tests) write byte-identical checkpoints and grids."""
    res = run_one(train_args(npz, tmp_path / "a", "--steps", 8))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "a" / "checkpoint.pt").read_bytes() == reference[8]
    assert main(train_args(npz, tmp_path / "b", "--steps", 8)) == 0
    for name in ("checkpoint.pt", "samples/epoch_0001.png", "samples/epoch_0002.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    shutil.rmtree(tmp_path / "a")
