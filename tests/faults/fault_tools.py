"""What the fault-injection tests share: tiny data, the run's flags, launching
``fastgan`` (through ``fault_driver.py``) as one process or as two gloo ranks,
and the checks every case makes on what a process printed."""
from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("fault_driver.py")
# A tiny GAN: the cost of a run is starting Python and torch, not training.
TINY = ["--batch-size", "16", "--latent-dim", "8", "--g-hidden", "16", "--d-hidden", "16",
        "--no-progress", "--no-verify", "--device", "cpu"]


def write_npz(path: Path, n: int) -> Path:
    """``n`` MNIST-format images of random pixels (used with --no-verify)."""
    x = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    np.savez(path, x_train=x, y_train=np.arange(n) % 10, x_test=x[:8], y_test=np.zeros(8))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    """The environment of a fastgan subprocess: this checkout, one thread, ``extra``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    for k in ("FAULT", "KEEP", "SAVE_AFTER", "FAULT_STAMP", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclasses.dataclass
class Exit:
    returncode: int
    stdout: str
    stderr: str
    seconds: float     # from the start of the run
    ended: float       # time.time() at its exit


def wait_all(procs, timeout: float, t0: float) -> list[Exit]:
    out = [None] * len(procs)
    deadline = time.monotonic() + timeout
    while any(o is None for o in out):
        for i, p in enumerate(procs):
            if out[i] is None and p.poll() is not None:
                out[i] = Exit(p.returncode, "", "", time.monotonic() - t0, time.time())
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise AssertionError(f"still running after {timeout} s: a hang")
        time.sleep(0.05)
    for o, p in zip(out, procs):
        o.stdout, o.stderr = p.stdout.read(), p.stderr.read()
        p.stdout.close()
        p.stderr.close()
    return out


def run_one(args, timeout: float = 120, **faults) -> Exit:
    """``fastgan ARGS`` in one process, with the ``faults`` of fault_driver.py."""
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, str(DRIVER), *map(str, args)], cwd=ROOT,
                         env=env(**faults), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return wait_all([p], timeout, t0)[0]


def start_pair(args, **faults) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(2):
        e = env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=rank, LOCAL_RANK=rank,
                WORLD_SIZE=2, **faults)
        procs.append(subprocess.Popen([sys.executable, str(DRIVER), *map(str, args)], cwd=ROOT,
                                      env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def run_pair(args, timeout: float = 150, **faults) -> list[Exit]:
    """``fastgan ARGS`` as ranks 0 and 1 of a 2-process gloo run (as torchrun
    starts them, without its own failure handling), with ``faults``."""
    t0 = time.monotonic()
    return wait_all(start_pair(args, **faults), timeout, t0)


def one_line(res: Exit, start: str) -> str:
    """The process printed exactly one error line, starting with ``start``, and no
    traceback (warnings aside); returns it."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()
             and not ln.startswith("fastgan: warning:")]
    assert "Traceback" not in res.stderr and "terminate called" not in res.stderr, res.stderr
    assert len(lines) == 1 and lines[0].startswith(start), res.stderr
    return lines[0]


def quiet(res: Exit) -> None:
    """Nothing on stderr but warnings."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()
             and not ln.startswith("fastgan: warning:")]
    assert not lines, res.stderr


def train_args(npz, out, *extra):
    return ["train", "--data", str(npz), *TINY, "--out", str(out), "--log-every", "2",
            *map(str, extra)]


def resume_to(npz, ckpt, steps, tmp_path, *extra) -> bytes:
    """Resume a copy of ``ckpt`` to ``steps`` in a fresh folder; its final checkpoint bytes."""
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copyfile(ckpt, out / "checkpoint.pt")
    from fastgan.cli import main
    assert main(train_args(npz, out, "--steps", steps, "--resume", *extra)) == 0
    return (out / "checkpoint.pt").read_bytes()


def cli_error(capsys, argv, *needles) -> str:
    """``fastgan ARGV`` in this process exits 1 with one stderr line that holds
    every needle (``main`` returning is the proof that no traceback escaped)."""
    from fastgan.cli import main
    code = main([str(a) for a in argv])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"fastgan {argv[0]}: error: "), err
    for n in needles:
        assert str(n) in err[0], err
    return err[0]
