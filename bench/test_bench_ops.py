"""pytest-benchmark suite: each fused op (forward, and forward+backward) and the
whole train step, every contender side by side in one group, small CPU shapes.

    python -m pytest bench --benchmark-only                  # measure
    python -m pytest bench --benchmark-only --benchmark-group-by=group
    python -m pytest bench -q --benchmark-disable            # CI smoke: each runs once

The callables come from ``fastgan.benchmark`` (the same code as ``fastgan bench``),
so the suite and the CLI cannot drift apart. The compiled reference is left
out here (its compile time dwarfs these shapes; ``fastgan bench`` has it).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastgan import backend
from fastgan import benchmark as B

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = 64
# eager reference + fastgan with every backend that runs here (the Triton
# interpreter on CPU tensors is a correctness tool, far too slow to time).
CONTENDERS = [c for c in B.contenders(DEVICE, ["eager", "fastgan"])
              if not (DEVICE.type == "cpu" and c.backend == "triton")]
IDS = [c.name for c in CONTENDERS]


def _ran(c, before, plain_reason=None):
    """The contender's backend ran, or, where the speed rule sends this call to the
    plain computation (``plain_reason``), it did not: either way the rule was obeyed."""
    if c.backend:
        ran = _count(c) > before
        if plain_reason:
            assert not ran, f"{c.name}: the speed rule said plain ({plain_reason}), but it fused"
        else:
            assert ran, f"{c.name}: backend {c.backend} never ran"


def _count(c):
    return sum(n for (b, _), n in backend.calls.items() if b == c.backend)


@pytest.mark.parametrize("contender", CONTENDERS, ids=IDS)
@pytest.mark.parametrize("pass_", ["forward", "both"])
@pytest.mark.parametrize("op", B.OPS)
def test_op(benchmark, op, pass_, contender):
    benchmark.group = f"{op} {pass_} B={BATCH}"
    fn = B.build_op(contender, op, pass_, BATCH, DEVICE)
    before = _count(contender)
    benchmark(fn)
    _ran(contender, before, B.op_plain_reason(contender, op, pass_, BATCH, DEVICE))


@pytest.mark.parametrize("contender", CONTENDERS, ids=IDS)
def test_train_step(benchmark, contender):
    benchmark.group = f"train step B={BATCH}"
    fn = B.build_step(contender, BATCH, DEVICE)[0]
    before = _count(contender)
    out = benchmark(fn)
    assert torch.isfinite(out.d_loss)
    _ran(contender, before)
