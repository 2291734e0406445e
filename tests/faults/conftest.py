"""Fixtures of the fault-injection suite: the tiny data, a single-process
reference run, and resuming a checkpoint to compare it with that run."""
import pytest
import torch

from fault_tools import train_args, write_npz

from fastgan.cli import main


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as the subprocesses run (OMP_NUM_THREADS=1): the
    in-process reference and the subprocesses then compute the same bits."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def npz(tmp_path_factory):
    return write_npz(tmp_path_factory.mktemp("fault_data") / "mnist.npz", 64)


@pytest.fixture(scope="session")
def reference(npz, tmp_path_factory):
    """The uninterrupted single-process run: its checkpoint bytes at steps 4 and 8."""
    from fastgan.train import checkpoint
    out = tmp_path_factory.mktemp("fault_ref")
    kept = {}
    real = checkpoint.save

    def save(state, path):
        p = real(state, path)
        kept[state["steps"]] = p.read_bytes()
        return p

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    checkpoint.save = save
    try:
        assert main(train_args(npz, out, "--steps", 8)) == 0
    finally:
        checkpoint.save = real
        torch.set_num_threads(old)
    assert sorted(kept) == [4, 8]
    return kept
