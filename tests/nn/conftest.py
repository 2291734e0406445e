"""Fixtures of the nn tests."""
import pytest

from fastgan.nn.fuse import speed
from helpers import GEMM_PATHS


@pytest.fixture
def dropout_only_rule(monkeypatch):
    """A cpu speed rule with known answers (the shape of issue 13's measurements):
    fp32 runs with active dropout fuse from batch 64 and B*K*N >= 64 * 256 * 512;
    every other fp32 or bf16 kind never gains. Tests of what fuse does where the
    rule says yes or no use it, so they do not depend on the calibrated table."""
    rows = {}
    here = speed.hardware("cpu")   # this machine's kind of CPU
    for dtype in ("float32", "bfloat16"):
        for gemm in GEMM_PATHS:   # the same answers whichever GEMM path this machine has
            for bn in ("none", "train", "eval"):
                for dropout in (False, True):
                    for grad in (False, True):
                        fuses = dtype == "float32" and dropout
                        rows[(dtype, gemm, here, bn, dropout, grad)] = \
                            (64, 64 * 256 * 512) if fuses else None
    monkeypatch.setitem(speed.TABLE, "cpu", rows)
    speed.reset()
    yield rows
    speed.reset()
