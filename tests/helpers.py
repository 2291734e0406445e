"""Shared test helpers: which (backend, device) pairs the op tests run
(``CASES``), proof that a backend ran (``ran``), and comparison with the
reference (``rel_err``, ``assert_matches``).

Every op test is parametrized over ``CASES``: each backend on the device it
runs on here (Triton on CPU tensors through the interpreter when there is no
GPU). A backend that cannot run on this machine is skipped with its reason;
``tests/ops/test_dispatch.py::test_expected_backends`` turns "skipped" into
"failed" where a backend is expected (CI sets FASTGAN_EXPECT_BACKENDS).
"""
from __future__ import annotations


import pytest
import torch

import fastgan
from fastgan import backend

HAS_CUDA = torch.cuda.is_available()
# The cpu backend's GEMM paths (fastgan.impl.cpu.GEMM_PATHS; here too, for tests
# that must import where the extension is not built): the speed rule has rows per path.
GEMM_PATHS = ("aten", "onednn", "widened")


def _param(name, device, gpu=False):
    marks = [pytest.mark.gpu] if gpu else []
    return pytest.param((name, device), id=name if not gpu or name != "reference" else f"{name}-cuda",
                        marks=marks)


# The reference backend on CPU is the ground truth itself: it is checked against
# eager torch.nn in test_reference.py, not here.
CASES = [
    _param("cpu", "cpu"),
    _param("triton", "cuda" if HAS_CUDA else "cpu", gpu=HAS_CUDA),
    _param("cuda", "cuda", gpu=True),
    _param("reference", "cuda", gpu=True),
]


def require(name: str, device: str) -> None:
    """Skip unless backend ``name`` can run on ``device`` here."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA GPU")
    mod, why = backend._load(name)
    if mod is None:
        pytest.skip(f"backend {name} unavailable: {why}")
    if not mod.supports(torch.device(device)):
        pytest.skip(f"backend {name} cannot run on {device} here")


class ran:
    """Context: run under ``use_backend(name)`` and assert ``functions`` were dispatched to it."""

    def __init__(self, name: str, *functions: str):
        self.name, self.functions = name, functions

    def __enter__(self):
        self.before = {f: backend.calls[(self.name, f)] for f in self.functions}
        self.ctx = fastgan.use_backend(self.name)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        if exc[0] is None:
            for f in self.functions:
                assert backend.calls[(self.name, f)] > self.before[f], \
                    f"backend {self.name} did not run {f}"


def rel_err(actual: torch.Tensor, gold: torch.Tensor) -> float:
    """max |actual - gold| / max |gold| (gold in fp64)."""
    a = actual.detach().to("cpu", torch.float64)
    g = gold.detach().to("cpu", torch.float64)
    assert a.shape == g.shape, (a.shape, g.shape)
    if g.numel() == 0:
        return 0.0
    return float((a - g).abs().max() / g.abs().max().clamp_min(1e-12))


# Absolute floor added to "twice the reference's own error" per dtype.
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def assert_matches(name: str, got: dict, ref: dict, gold: dict, dtype: torch.dtype, keys=None,
                   floor: float = 0.0):
    """Each tensor in ``got`` is within twice the error the reference backend
    shows at the same dtype (both against the fp64 ``gold``), plus a floor
    (``FLOOR[dtype]`` or the conditioning-aware ``floor``, whichever is larger)."""
    floor = max(floor, FLOOR[dtype])
    for k in keys or gold:
        e_got = rel_err(got[k], gold[k])
        e_ref = rel_err(ref[k], gold[k])
        assert e_got <= 2 * e_ref + floor, \
            f"{name}: {k} error {e_got:.3g} > 2 x reference error {e_ref:.3g} + {floor:.3g}"
