"""`fastgan train` / `fastgan sample` end to end, bit-exact resume through the
CLI (also after a real Ctrl-C), and one clean error line for each user mistake."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastgan import checkpoint
from fastgan.cli import build_parser, main

TINY = ["--batch-size", "16", "--latent-dim", "8", "--g-hidden", "16", "--d-hidden", "16",
        "--no-progress"]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """A 64-image MNIST-format file (random pixels), used with --no-verify."""
    path = tmp_path_factory.mktemp("data") / "mnist.npz"
    x = np.random.default_rng(0).integers(0, 256, (64, 28, 28), dtype=np.uint8)
    np.savez(path, x_train=x, y_train=np.arange(64) % 10, x_test=x[:8], y_test=np.zeros(8))
    return path


def fastgan(*args, **kw):
    return subprocess.run([sys.executable, "-m", "fastgan", *map(str, args)],
                          capture_output=True, text=True, timeout=300, **kw)


def train_args(npz, out, *extra):
    return ["train", "--data", str(npz), "--no-verify", "--out", str(out), *TINY, *map(str, extra)]


def assert_same_checkpoint(a, b):
    sa, sb = checkpoint.load(a), checkpoint.load(b)
    assert sa["steps"] == sb["steps"]
    for part in ("generator", "discriminator"):
        for k, v in sa[part].items():
            assert torch.equal(v, sb[part][k]), (part, k)
    for part in ("g_opt", "d_opt"):
        for i, st in sa[part]["state"].items():
            for k, v in st.items():
                assert torch.equal(v, sb[part]["state"][i][k]), (part, i, k)
    for k in ("noise", "torch"):
        assert torch.equal(sa["rng"][k], sb["rng"][k])
    for k in ("g_dropout", "d_dropout"):
        assert all(torch.equal(x, y) for x, y in zip(sa["rng"][k], sb["rng"][k]))


def test_train_then_sample_subprocess(npz, tmp_path):
    out = tmp_path / "run"
    r = fastgan(*train_args(npz, out, "--steps", 10, "--log-every", 3))
    assert r.returncode == 0, r.stderr
    assert "data: MNIST train (64 images)" in r.stdout and "done: 10 steps" in r.stdout
    assert "Traceback" not in r.stderr
    # 4 steps an epoch: grids after epochs 1 and 2 and at the final step 10
    assert sorted(p.name for p in (out / "samples").iterdir()) == \
        ["epoch_0001.png", "epoch_0002.png", "step_0000010.png"]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [3, 4, 6, 8, 9, 10]
    assert {"d_loss", "g_loss", "d_real", "d_fake", "images_per_s"} <= recs[0].keys()
    assert all(np.isfinite(r["d_loss"]) and 0 < r["d_real"] < 1 for r in recs)
    assert recs[1]["kind"] == "epoch" and recs[1]["sample"].endswith("epoch_0001.png")
    st = torch.load(out / "checkpoint.pt", weights_only=True)
    assert st["steps"] == 10
    r = fastgan("sample", "--checkpoint", out / "checkpoint.pt", "--n", 10, "--out", tmp_path / "g.png")
    assert r.returncode == 0, r.stderr
    from PIL import Image
    img = Image.open(tmp_path / "g.png")
    assert img.size == (2 * (4 * 30 + 2), 2 * (3 * 30 + 2))  # 4 per row, 3 rows, 2x scale


def test_resume_through_cli_is_bit_exact(npz, tmp_path):
    assert main(train_args(npz, tmp_path / "a", "--steps", 11)) == 0
    assert main(train_args(npz, tmp_path / "b", "--steps", 6)) == 0
    assert main(train_args(npz, tmp_path / "b", "--steps", 11, "--resume")) == 0
    assert_same_checkpoint(tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt")
    assert (tmp_path / "a/samples/epoch_0002.png").read_bytes() == \
        (tmp_path / "b/samples/epoch_0002.png").read_bytes()
    steps = [json.loads(x)["step"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 6, 8, 11]  # the resumed run appended to the metrics


def test_ctrl_c_checkpoints_and_resumes_exactly(npz, tmp_path):
    out = tmp_path / "int"
    p = subprocess.Popen([sys.executable, "-m", "fastgan", *train_args(npz, out, "--steps", 100000,
                                                                       "--log-every", 1)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert "interrupted at step" in stdout and "Traceback" not in stderr
    k = checkpoint.load(out / "checkpoint.pt")["steps"]
    assert 0 < k < 100000
    assert main(train_args(npz, out, "--steps", k + 3, "--resume")) == 0
    assert main(train_args(npz, tmp_path / "straight", "--steps", k + 3)) == 0
    assert_same_checkpoint(out / "checkpoint.pt", tmp_path / "straight" / "checkpoint.pt")


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1, err
    assert len(err) == 1 and err[0].startswith(f"fastgan {argv[0]}: error: "), err
    return err[0]


def test_user_mistakes_give_one_line(npz, tmp_path, capsys):
    out = tmp_path / "o"
    assert "nope: no such file" in _error(capsys, ["train", "--data", str(tmp_path / "nope"),
                                                   "--out", str(out)])
    fake = tmp_path / "k" / "mnist.npz"  # named like Keras's file: the real checksum applies
    fake.parent.mkdir()
    fake.write_bytes(npz.read_bytes())
    msg = _error(capsys, ["train", "--data", str(fake), "--out", str(out)])
    assert "mnist.npz: sha256 checksum" in msg and "731c5ac6" in msg
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "--out" in _error(capsys, train_args(npz, blocker / "sub", "--steps", 1))
    assert "--batch-size 128 is larger than the dataset" in _error(
        capsys, train_args(npz, out, "--batch-size", 128))
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in _error(capsys, train_args(npz, out, "--device", "cuda"))
    assert "not a device" in _error(capsys, train_args(npz, out, "--device", "gpu7"))
    assert "--backend" in _error(capsys, train_args(npz, out, "--backend", "nope"))
    assert main(train_args(npz, out, "--steps", 2)) == 0
    capsys.readouterr()
    assert "already exists" in _error(capsys, train_args(npz, out, "--steps", 2))
    ckpt = out / "checkpoint.pt"
    good = ckpt.read_bytes()
    msg = _error(capsys, train_args(npz, out, "--steps", 4, "--resume", "--g-hidden", "32"))
    assert "--g-hidden 32 contradicts the checkpoint's 16" in msg
    # a checkpoint of another architecture, and a truncated one
    assert main(train_args(npz, tmp_path / "wide", "--steps", 1, "--g-hidden", "32")) == 0
    capsys.readouterr()
    other = tmp_path / "wide" / "checkpoint.pt"
    st = checkpoint.load(other)
    st["config"]["g_hidden"] = [16]  # a config that lies about its weights
    checkpoint.save(st, other)
    assert "do not fit the model: size mismatch" in _error(capsys, train_args(npz, out, "--resume", other))
    (tmp_path / "t.pt").write_bytes(good[:1000])
    assert "truncated or corrupt" in _error(capsys, train_args(npz, out, "--resume", tmp_path / "t.pt"))
    assert ckpt.read_bytes() == good  # no failed attempt touched the run's checkpoint
    assert "no such checkpoint" in _error(capsys, ["sample", "--checkpoint", str(tmp_path / "x.pt")])


def test_parser_registers_commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"train", "sample", "eval", "bench"}


def test_zero_valued_flags_are_values(npz, tmp_path):
    """--dropout 0 is a value, not "not given": it used to train with the default 0.2."""
    assert main(train_args(npz, tmp_path / "r", "--steps", 1, "--dropout", 0)) == 0
    assert checkpoint.load(tmp_path / "r" / "checkpoint.pt")["config"]["dropout"] == 0.0


@pytest.mark.parametrize("ranked", [False, True])
def test_command_exits_a_rank_without_teardown(monkeypatch, ranked):
    """``fastgan.cli.command``: a process that ran as a rank leaves through
    os._exit (gloo's threads outlive the process group, see
    ``train.distributed.left_a_group``); any other through sys.exit."""
    import os

    from fastgan import cli
    from fastgan.train import distributed
    calls = []
    monkeypatch.setattr(cli, "main", lambda argv=None: 7)
    monkeypatch.setattr(distributed, "_left_a_group", ranked)

    class Exited(Exception):
        pass

    def fake_exit(status):
        calls.append(("os._exit", status))
        raise Exited

    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr("atexit._run_exitfuncs", lambda: calls.append(("atexit",)))
    if ranked:
        with pytest.raises(Exited):
            cli.command([])
        assert calls == [("atexit",), ("os._exit", 7)]
    else:
        with pytest.raises(SystemExit) as e:
            cli.command([])
        assert e.value.code == 7 and calls == []


def test_train_freezes_its_setup_out_of_the_collector_during_the_run(npz, tmp_path, monkeypatch):
    # The run's long-lived objects are frozen before the first step (a full
    # collection over them costs ~150 ms) and unfrozen when main() returns.
    import gc

    from fastgan.cli import train as cli_train
    seen = []
    loop = cli_train._loop

    def spy(*a, **kw):
        seen.append(gc.get_freeze_count())
        return loop(*a, **kw)
    monkeypatch.setattr(cli_train, "_loop", spy)
    gc.unfreeze()
    assert main(train_args(npz, tmp_path / "run", "--steps", 2)) == 0
    assert seen and seen[0] > 1000
    assert gc.get_freeze_count() == 0


def test_rates_leave_out_the_checkpoint_writes(npz, tmp_path, monkeypatch):
    # A slow save (0.4 s here) shows in saving_s, not in the rate of the
    # interval that follows it: the rates are the steps' own.
    from fastgan.train import checkpoint
    save = checkpoint.save

    def slow(*a, **kw):
        time.sleep(0.4)
        return save(*a, **kw)
    monkeypatch.setattr(checkpoint, "save", slow)
    out = tmp_path / "run"
    assert main(train_args(npz, out, "--steps", 8, "--log-every", 3)) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["kind"]) for r in recs] == \
        [(3, "log"), (4, "epoch"), (6, "log"), (8, "epoch")]
    assert [r["saving_s"] >= w for r, w in zip(recs, (0, 0, 0.4, 0.4))] == [True] * 4
    # two steps after the epoch-4 save: at 0.2 s a step or faster, never the save's 0.4 s
    assert recs[2]["steps_per_s"] > 2 / 0.4
    assert recs[2]["elapsed_s"] >= recs[2]["saving_s"]
