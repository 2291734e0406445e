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
