"""Bad values and failing runs through the command line, in this process
(``main`` returning is the proof that no traceback escaped).

Divergence (NaN losses, a NaN optimizer state), hyper-parameters that cannot
work, bad data files, ``sample`` and ``eval`` arguments, and a failing CUDA
graph replay (simulated: there is no GPU here). Each case: the exit status,
one line naming the argument or file, and for the failing runs that the last
good checkpoint is intact and resumes to the uninterrupted run's, byte for byte.
"""
import json
import math
import zipfile

import numpy as np
import pytest
import torch

from fault_tools import cli_error, resume_to, train_args

from fastgan.cli import main
from fastgan.train import checkpoint
from fastgan.train.trainer import Trainer


def _strict_json(line):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(line, parse_constant=refuse)


@pytest.fixture
def inject(monkeypatch):
    """inject(step, fn): call fn(trainer) right after the trainer's step ``step``."""
    def install(step, fn):
        real = Trainer.train_step

        def train_step(self):
            out = real(self)
            if self.steps == step:
                fn(self)
            return out
        monkeypatch.setattr(Trainer, "train_step", train_step)
    return install


# ----------------------------------------------------------------------------- divergence
def test_nan_losses_stop_the_run_and_keep_the_last_finite_checkpoint(npz, reference, tmp_path,
                                                                      capsys, inject,
                                                                      monkeypatch):
    def poison(trainer):
        with torch.no_grad():
            next(trainer.G.parameters()).view(-1)[0] = float("nan")
    inject(5, poison)
    out = tmp_path / "run"
    line = cli_error(capsys, train_args(npz, out, "--steps", 100000),
                  "training diverged at step 6: d_loss, g_loss", "not finite",
                  f"{out / 'checkpoint.pt'} (step 4) is intact", "lower --lr")
    recs = [_strict_json(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4, 6]
    bad = recs[-1]["nonfinite"]
    assert bad[:2] == ["d_loss", "g_loss"] and f"{', '.join(bad)} not finite" in line
    assert all(recs[-1][k] is None for k in bad)
    assert all(math.isfinite(r[k]) for r in recs[:-1] for k in ("d_loss", "g_loss"))
    assert (out / "checkpoint.pt").read_bytes() == reference[4]
    assert not (out / "samples" / "step_0000006.png").exists()
    monkeypatch.undo()
    assert resume_to(npz, out / "checkpoint.pt", 8, tmp_path) == reference[8]


def test_non_finite_state_is_never_saved(npz, tmp_path, capsys, inject):
    """Losses can stay finite while an optimizer state is not (inf in Adam's
    second moment makes its steps 0): the check before each save catches it."""
    def poison(trainer):
        next(iter(trainer.g_opt.state.values()))["exp_avg_sq"].view(-1)[0] = float("inf")
    inject(3, poison)
    out = tmp_path / "run"
    cli_error(capsys, train_args(npz, out, "--steps", 8),
           "training diverged at step 4: g_opt/state/0/exp_avg_sq not finite",
           "no checkpoint of this run was written before it")
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--lr", "inf"], "--lr must be a finite number in (0, 1], got inf"),
    (["--lr", "1e30"], "--lr must be a finite number in (0, 1], got 1e+30"),
    (["--lr", "nan"], "--lr must be a finite number in (0, 1], got nan"),
    (["--lr", "0"], "--lr must be"),
    (["--lr=-1e-4"], "--lr must be"),
    (["--betas", "1,0.9"], "--betas must be two numbers in [0, 1), got 1.0,0.9"),
    (["--betas", "0.5"], "--betas must be two numbers"),
    (["--betas", "nan,0.9"], "--betas must be two numbers"),
    (["--smoothing", "1"], "--smoothing must be a number in [0, 1), got 1.0"),
    (["--smoothing=-inf"], "--smoothing must be"),
    (["--dropout", "1"], "--dropout must be a number in [0, 1), got 1.0"),
    (["--dropout", "nan"], "--dropout must be"),
    (["--seed", str(2**64)], "--seed must be a whole number in [-2**63, 2**64)"),
    (["--latent-dim", "100000"], "--latent-dim must be a whole number in [1, 65536]"),
    (["--g-hidden", "16,100000"], "--g-hidden must be comma-separated whole numbers"),
    (["--dist-timeout", "0"], "--dist-timeout must be a number of seconds > 0, got 0.0"),
    (["--dist-timeout", "nan"], "--dist-timeout must be"),
    (["--batch-size", "1000"], "--batch-size 1000 is larger than the dataset (64 images)"),
    (["--lr", "0"], "--lr must be a finite number in (0, 1], got 0.0"),  # 0 is not "not given"
])
def test_hyper_parameters_are_checked_up_front(npz, tmp_path, capsys, flags, needle):
    cli_error(capsys, train_args(npz, tmp_path / "run", "--steps", 4, *flags), needle)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--steps", "0"], "argument --steps: must be at least 1"),
    (["--g-hidden", "0"], "argument --g-hidden: expected positive integers"),
    (["--lr", "fast"], "argument --lr: invalid float value"),
    (["--betas", "a,b"], "argument --betas: expected comma-separated numbers"),
])
def test_malformed_values_are_usage_errors(npz, tmp_path, capsys, flags, needle):
    with pytest.raises(SystemExit) as e:
        main(train_args(npz, tmp_path / "run", *flags))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and needle in err[-1] and "Traceback" not in "".join(err)


def test_resume_flags_are_checked_too(npz, reference, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(reference[4])
    cli_error(capsys, train_args(npz, out, "--resume", "--lr", "inf"), "--lr inf contradicts")
    assert (out / "checkpoint.pt").read_bytes() == reference[4]


# ----------------------------------------------------------------------------- data
def _npz_variants(npz, tmp_path):
    good = npz.read_bytes()
    (tmp_path / "cut.npz").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.npz").write_text("not an archive")
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    x = np.load(npz)["x_train"]
    np.savez(tmp_path / "float.npz", x_train=x.astype(np.float32) + 300, y_train=np.arange(64))
    np.savez(tmp_path / "nan.npz", x_train=np.full((64, 28, 28), np.nan), y_train=np.arange(64))
    np.savez(tmp_path / "shape.npz", x_train=x.reshape(64, 784), y_train=np.arange(64))
    return {"cut.npz": "cannot read x_train/y_train", "text.npz": "cannot read",
            "empty.npz": "cannot read x_train/y_train", "float.npz": "pixels 0..255",
            "nan.npz": "holds NaN or inf", "shape.npz": "expected (N, 28, 28)"}


def test_bad_data_files_unverified(npz, tmp_path, capsys):
    for name, needle in _npz_variants(npz, tmp_path).items():
        cli_error(capsys, train_args(tmp_path / name, tmp_path / "run", "--steps", 4),
               tmp_path / name, needle)
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 9)
    (tmp_path / "idx" / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01")
    cli_error(capsys, ["train", "--data", tmp_path / "idx", "--no-verify", "--out", tmp_path / "r"],
           "train-images-idx3-ubyte")


# ----------------------------------------------------------------------------- sample, eval
@pytest.mark.parametrize("flags, needle", [
    (["--nrow", "-1"], "--nrow must be at least 1, got -1"),
    (["--nrow", "0"], "--nrow must be at least 1"),
    (["--n", "0"], "--n must be in [1, 10,000], got 0"),
    (["--n", "1000000"], "--n must be in [1, 10,000]"),
    (["--seed", str(2**64)], "--seed must be a whole number"),
    (["--device", "meta"], "--device meta: only cpu and cuda are supported"),
    (["--device", "foo"], "--device 'foo' is not a device"),
    (["--out", "/nonexistent-folder/g.png"], "folder /nonexistent-folder does not exist"),
])
def test_sample_arguments(reference, tmp_path, capsys, flags, needle):
    good = tmp_path / "c.pt"
    good.write_bytes(reference[4])
    argv = ["sample", "--checkpoint", good, "--out", tmp_path / "g.png", *flags]
    cli_error(capsys, argv, needle)


@pytest.mark.parametrize("flags, needle", [
    (["--device", "foo"], "--device 'foo' is not a device"),
    (["--device", "meta"], "--device meta: only cpu and cuda are supported"),
    (["--json", "/nonexistent-folder/s.json"], "--json /nonexistent-folder/s.json: folder"),
    (["--seed", str(-2**70)], "--seed must be a whole number"),
])
def test_eval_arguments_fail_before_any_scoring(reference, tmp_path, capsys, flags, needle):
    good = tmp_path / "c.pt"
    good.write_bytes(reference[4])
    cli_error(capsys, ["eval", "--checkpoint", good, *flags], needle)


def test_eval_of_nan_weights(reference, tmp_path, capsys):
    st = checkpoint.load(_copy(reference, tmp_path))
    st["generator"]["net.1.0.weight"][1, 2] = float("nan")
    torch.save(st["generator"], tmp_path / "bare.pt")   # a bare generator state_dict
    cli_error(capsys, ["eval", "--checkpoint", tmp_path / "bare.pt"], tmp_path / "bare.pt",
           "generator weight net.1.0.weight holds NaN or inf")
    checkpoint.save(st, tmp_path / "full.pt")
    cli_error(capsys, ["eval", "--checkpoint", tmp_path / "full.pt"], tmp_path / "full.pt",
           "holds NaN or inf")


def _copy(reference, tmp_path):
    path = tmp_path / "good.pt"
    path.write_bytes(reference[4])
    return path


# ----------------------------------------------------------------------------- GPU paths
def test_cuda_graph_replay_error_names_the_step(npz, reference, tmp_path, capsys, monkeypatch):
    """No GPU here: a step that claims to be graphed fails as a replay does."""
    real = Trainer.train_step

    def train_step(self):
        if self.steps == 6:
            self.step.graphs = True
            raise RuntimeError("CUDA error: an illegal memory access was encountered\n"
                               "CUDA kernel errors might be asynchronously reported")
        return real(self)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    out = tmp_path / "run"
    cli_error(capsys, train_args(npz, out, "--steps", 8),
           "the CUDA graph replay failed in step 7 (CUDA error: an illegal memory access was "
           "encountered)", f"{out / 'checkpoint.pt'} (step 4) is intact", "--no-graphs")
    assert (out / "checkpoint.pt").read_bytes() == reference[4]
