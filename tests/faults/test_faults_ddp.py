"""Faults in a 2-process run (gloo on the CPU): SIGINT, SIGTERM, SIGKILL and
SIGSTOP of either rank, a rank that raises, a rank killed in the middle of a
checkpoint write, and the SIGINT-to-one-rank hang of torchrun itself.

The ranks are started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR),
without its failure handling, so each process's exit status and stderr are
its own and nothing but fastgan ends the run. Faults fire at a known step
(``fault_driver.py``), so every case knows which checkpoint must be left:

* a signal at step 5: the ranks agree at the next log line (step 6), save
  together and exit 128 + signal;
* a dead, failing or stalled rank at step 6: the other exits 1 within seconds
  (``BOUND_S``) with one line, the epoch-1 checkpoint (step 4) untouched.

Each case asserts the exit statuses, the one-line messages, no traceback, and
that the checkpoint left is the uninterrupted run's at that step, byte for
byte; ``test_killed_during_save_cleans_up_and_resumes_bit_exactly`` resumes
one and gets the uninterrupted run's next checkpoint, byte for byte.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from fault_tools import (ROOT, TINY, env, free_port, one_line, quiet, run_pair, start_pair,
                         wait_all, write_npz)

from fastgan import checkpoint

pytestmark = [pytest.mark.skipif(sys.platform != "linux", reason="signals and /proc: Linux"),
              pytest.mark.slow]   # 2 processes a case: most of the fault suite's time

BOUND_S = 30      # a fault to the exit of the last rank standing (Python teardown included)
STEPS_PER_EPOCH = 4   # 128 images, 2 ranks, batch 16


def _args(data, out, *extra):
    return ["train", "--data", str(data), *TINY, "--out", str(out), "--log-every", "2",
            *map(str, extra)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_npz(tmp_path_factory.mktemp("ddp_data") / "mnist.npz", 128)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted 2-rank run: its checkpoints at steps 4 and 6, as bytes."""
    out = tmp_path_factory.mktemp("ddp_ref")
    res = run_pair(_args(data, out, "--steps", 6), KEEP=1)
    assert [r.returncode for r in res] == [0, 0], res
    quiet(res[0])
    quiet(res[1])
    return {k: (out / f"checkpoint.step{k}.pt").read_bytes() for k in (4, 6)}


def _stamp(tmp_path):
    return tmp_path / "fault_time"


def _fault_to_exit(res, tmp_path) -> float:
    return max(r.ended for r in res) - float(_stamp(tmp_path).read_text())


@pytest.mark.parametrize("sig", ["sigint", "sigterm"])
@pytest.mark.parametrize("rank", [0, 1])
def test_signal_to_one_rank_stops_both_with_one_checkpoint(data, reference, tmp_path, sig, rank):
    out = tmp_path / "run"
    res = run_pair(_args(data, out, "--steps", 100000), FAULT=f"{sig}:{rank}:5",
                   FAULT_STAMP=_stamp(tmp_path))
    code = 128 + (signal.SIGINT if sig == "sigint" else signal.SIGTERM)
    assert [r.returncode for r in res] == [code, code], res
    assert f"interrupted at step 6 ({sig.upper()} on a rank); checkpoint saved" in res[0].stdout
    quiet(res[0])
    quiet(res[1])
    assert _fault_to_exit(res, tmp_path) < BOUND_S
    assert (out / "checkpoint.pt").read_bytes() == reference[6]
    assert checkpoint.load(out / "checkpoint.pt")["steps"] == 6


@pytest.mark.parametrize("fault, rank", [("sigkill", 0), ("sigkill", 1), ("raise", 1)])
def test_dead_or_failing_rank_ends_the_run_within_seconds(data, reference, tmp_path, fault, rank):
    out = tmp_path / "run"
    res = run_pair(_args(data, out, "--steps", 100000), FAULT=f"{fault}:{rank}:6",
                   FAULT_STAMP=_stamp(tmp_path))
    other = 1 - rank
    who = "rank 1: " if other else ""
    if fault == "sigkill":
        assert res[rank].returncode == -signal.SIGKILL
    else:
        assert res[rank].returncode == 1
        line = one_line(res[rank], f"fastgan train: error: {'rank 1: ' if rank else ''}")
        assert "No space left on device (injected on rank 1)" in line
    assert res[other].returncode == 1
    line = one_line(res[other], f"fastgan train: error: {who}lost contact with the other "
                                "processes after step 6")
    assert f"{out / 'checkpoint.pt'} (step 4) is intact" in line
    assert _fault_to_exit(res, tmp_path) < BOUND_S
    assert (out / "checkpoint.pt").read_bytes() == reference[4]


def test_stalled_rank_times_out(data, reference, tmp_path):
    """SIGSTOP: a rank alive but silent. The other waits --dist-timeout, not 30 minutes."""
    out = tmp_path / "run"
    t0 = time.monotonic()
    procs = start_pair(_args(data, out, "--steps", 100000, "--dist-timeout", 3),
                       FAULT="sigstop:1:6", FAULT_STAMP=_stamp(tmp_path))
    try:
        while procs[0].poll() is None and time.monotonic() - t0 < 150:
            time.sleep(0.05)
        ended = time.time()
        assert procs[0].poll() == 1
    finally:
        os.kill(procs[1].pid, signal.SIGCONT)  # let it find its peer gone, and exit
    res = wait_all(procs, 60, t0)
    assert ended - float(_stamp(tmp_path).read_text()) < 3 + BOUND_S
    line = one_line(res[0], "fastgan train: error: lost contact with the other processes "
                            "after step 6 (Timed out")
    assert "--dist-timeout 3 s" in line
    assert res[1].returncode == 1
    one_line(res[1], "fastgan train: error: rank 1: lost contact")
    assert (out / "checkpoint.pt").read_bytes() == reference[4]


def test_killed_during_save_cleans_up_and_resumes_bit_exactly(data, reference, tmp_path):
    """Rank 0 dies while writing the epoch-2 checkpoint: its temp file stays, the
    epoch-1 one is intact; the next run removes the temp file (and says so) and
    resumes to the uninterrupted run's checkpoint, byte for byte."""
    out = tmp_path / "run"
    res = run_pair(_args(data, out, "--steps", 100000), FAULT="sigkill:0:save", SAVE_AFTER=5,
                   FAULT_STAMP=_stamp(tmp_path))
    assert res[0].returncode == -signal.SIGKILL and res[1].returncode == 1
    one_line(res[1], "fastgan train: error: rank 1: lost contact")
    assert _fault_to_exit(res, tmp_path) < BOUND_S
    temps = list(out.glob(".checkpoint.pt.*.tmp"))
    assert len(temps) == 1 and temps[0].stat().st_size > 0
    assert (out / "checkpoint.pt").read_bytes() == reference[4]

    res = run_pair(_args(data, out, "--steps", 6, "--resume"))
    assert [r.returncode for r in res] == [0, 0], res
    assert f"removed 1 temp file(s) of an interrupted save: {temps[0].name}" in res[0].stdout
    assert not list(out.glob(".checkpoint.pt.*.tmp"))
    quiet(res[0])
    quiet(res[1])
    assert (out / "checkpoint.pt").read_bytes() == reference[6]


def test_torchrun_sigint_to_one_rank_does_not_hang(data, tmp_path):
    """The reported hang, through torchrun: Ctrl-C to rank 1 alone of a long run."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastgan", *_args(data, out, "--steps", 100000)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.monotonic() + 150
        while not (out / "checkpoint.pt").exists():
            assert time.monotonic() < deadline and p.poll() is None, "no checkpoint came"
            time.sleep(0.1)
        kids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(p.pid)], capture_output=True,
                              text=True).stdout.split()
        rank1 = [int(k) for k in kids
                 if b"RANK=1" in open(f"/proc/{k}/environ", "rb").read().split(b"\0")]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGINT)
        t0 = time.monotonic()
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert time.monotonic() - t0 < BOUND_S
    assert "interrupted at step" in stdout and "(SIGINT on a rank); checkpoint saved" in stdout
    # torchrun reports the non-zero exits with its own traceback; none is fastgan's.
    assert "fastgan/" not in stderr, stderr
    st = checkpoint.load(out / "checkpoint.pt")
    assert st["steps"] % 2 == 0 and st["steps"] > STEPS_PER_EPOCH - 1


def test_gloo_threads_outlive_the_group_so_ranks_leave_with_os_exit(tmp_path):
    """Why ``fastgan.cli.command`` ends a rank with os._exit: after a
    DistributedDataParallel was built, ``destroy_process_group`` leaves gloo's
    threads running (c10d keeps the backend). One rank in about a thousand
    then aborted in the interpreter's teardown of those threads, after its
    run had finished and saved. If this starts failing, torch stops the
    threads itself and the os._exit in ``command`` can go."""
    script = tmp_path / "ddp_threads.py"
    script.write_text(
        "import os, torch, torch.distributed as dist\n"
        "from fastgan.train import distributed\n"
        "dist.init_process_group('gloo')\n"
        "m = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3))\n"
        "del m\n"
        "distributed.shutdown()\n"
        "names = {open(f'/proc/self/task/{t}/comm').read().strip()"
        " for t in os.listdir('/proc/self/task')}\n"
        "print(distributed.left_a_group(), 'pt_gloo_runloop' in names)\n")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=r,
                                      WORLD_SIZE=2))
             for r in range(2)]
    res = wait_all(procs, 120, time.monotonic())
    assert [r.returncode for r in res] == [0, 0], res
    assert [r.stdout.split() for r in res] == [["True", "True"]] * 2, res
