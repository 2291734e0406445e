"""One torch thread for every test here: the benchmark and quality tests run
tiny shapes and small convolutions, which gain nothing from threads, and on a
loaded shared machine two threads that wait on each other are many times
slower than one."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
