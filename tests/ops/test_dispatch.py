"""Backend selection: availability, forcing, errors, fallback warning."""
import os

import pytest
import torch

import fastgan
from fastgan import backend


def test_reference_always_available():
    assert "reference" in fastgan.backends()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastgan.use_backend("nope"):
            pass


def test_forced_unavailable_backend_raises():
    missing = fastgan.unavailable()
    if not missing:
        pytest.skip("every backend is available here")
    name = next(iter(missing))
    with fastgan.use_backend(name):
        with pytest.raises(RuntimeError, match=f"{name}.*unavailable"):
            backend.select(torch.device("cpu"))


def test_forced_backend_is_used(monkeypatch):
    monkeypatch.setenv("FASTGAN_BACKEND", "reference")
    assert backend.select(torch.device("cpu")) == "reference"


def test_context_manager_restores():
    before = backend.forced()
    with fastgan.use_backend("reference"):
        assert backend.forced() == "reference"
    assert backend.forced() == before


def test_cpu_default_is_cpu_backend_when_available():
    chosen = backend.select(torch.device("cpu")) if backend.forced() is None else None
    if "cpu" in fastgan.backends() and chosen is not None:
        assert chosen == "cpu"


def test_expected_backends():
    """CI lists the backends that must be available (so they cannot silently skip)."""
    expected = [b for b in os.environ.get("FASTGAN_EXPECT_BACKENDS", "").split(",") if b]
    missing = {b: fastgan.unavailable().get(b) for b in expected if b not in fastgan.backends()}
    assert not missing, f"expected backends unavailable: {missing}"


def test_get_counts_and_returns_the_backend_function():
    from fastgan.ops import dispatch, spec
    assert backend is dispatch  # the old name is the same module
    assert set(backend.NAMES) == {"reference", "cpu", "triton", "cuda"}
    with fastgan.use_backend("reference"):
        before = backend.calls[("reference", "linear_act_forward")]
        fn = backend.get("linear_act_forward", torch.device("cpu"))
    assert fn is backend._load("reference")[0].linear_act_forward
    assert backend.calls[("reference", "linear_act_forward")] == before + 1
    for name in backend.backends():  # every available backend defines every function
        mod = backend._load(name)[0]
        assert all(callable(getattr(mod, f)) for f in spec.BACKEND_FUNCTIONS), name


def test_nested_use_backend_innermost_wins():
    with fastgan.use_backend("reference"):
        with fastgan.use_backend("cpu"):
            assert backend.forced() == "cpu"
        assert backend.forced() == "reference"


def test_backward_on_another_thread_runs_on_the_forward_backend():
    """Autograd runs the backward of CUDA tensors on a worker thread of its own,
    where use_backend's (per-thread) override is not set: the backward still
    goes to the backend the forward ran on. Here the backward runs on another
    thread, as the engine does, for the Function and the registered op."""
    import threading

    from fastgan import functional as FG

    I64 = torch.int64
    s, o = torch.tensor([3], dtype=I64), torch.tensor([1], dtype=I64)
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(5, 6, requires_grad=True)
    g, beta = torch.rand(5, requires_grad=True), torch.randn(5, requires_grad=True)
    stats = torch.zeros(5), torch.ones(5), torch.zeros(1, dtype=I64)
    with fastgan.use_backend("reference"):
        y = FG.linear_act(x, w, None, "tanh", 0.0, 0.2, True, s, o)
        yb = FG.linear_bn_act(x, w, None, g, beta, *stats, True, 0.1, 1e-5, "relu", 0.0, 0.2,
                              s, o)
        yo = torch.ops.fastgan.linear_act(x, w, None, "relu", 0.0, 0.0, s, o)
    keys = [(b, f) for b in backend.NAMES for f in ("linear_act_backward", "linear_bn_act_backward")]
    before = {k: backend.calls[k] for k in keys}
    errors = []

    def run():
        try:
            assert backend.forced() in (None, os.environ.get("FASTGAN_BACKEND"))
            (y.sum() + yb.sum() + yo.sum()).backward()
        except Exception as e:  # reported below, on the test's thread
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert not errors, errors
    ran = {k: backend.calls[k] - before[k] for k in keys if backend.calls[k] != before[k]}
    assert ran == {("reference", "linear_act_backward"): 2,
                   ("reference", "linear_bn_act_backward"): 1}


def test_backward_op_takes_the_backend():
    """fastgan::<op>_backward's trailing ``backend`` argument picks its backend;
    "" (the default) chooses as a forward would."""
    I64 = torch.int64
    s, o = torch.tensor([3], dtype=I64), torch.tensor([1], dtype=I64)
    x, w = torch.randn(4, 6), torch.randn(5, 6)
    y = torch.ops.fastgan.linear_act(x, w, None, "tanh", 0.0, 0.2, s, o)
    args = (torch.randn_like(y), x, w, y, "tanh", 0.0, 0.2, s, o, True)
    before = backend.calls[("reference", "linear_act_backward")]
    got = torch.ops.fastgan.linear_act_backward(*args, True, "reference")
    assert backend.calls[("reference", "linear_act_backward")] == before + 1
    default = backend.select(torch.device("cpu"))
    before = backend.calls[(default, "linear_act_backward")]
    want = torch.ops.fastgan.linear_act_backward(*args)
    assert backend.calls[(default, "linear_act_backward")] == before + 1
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
