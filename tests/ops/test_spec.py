"""The activation table (fastgan.ops.spec.ACTIVATION_TABLE) is consistent:
derivatives agree with autograd, modules round-trip, homogeneity is claimed
exactly where it holds, codes are dense. (tests/impl/test_csrc_spec.py checks
the C++ kernels' codes against the table; the Triton kernels read them from it.)"""
import pytest
import torch

from fastgan.ops import spec

ROWS = [pytest.param(a, id=a.name) for a in spec.ACTIVATION_TABLE]
SLOPE = 0.2


def _z(n=257, seed=0):
    # random fp64 pre-activations of both signs; none is exactly 0 (a kink)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dtype=torch.float64, generator=g) * 3


@pytest.mark.parametrize("row", ROWS)
def test_derivatives_match_autograd(row):
    z = _z().requires_grad_(True)
    a = row.fn(z, SLOPE)
    (expected,) = torch.autograd.grad(a.sum(), z)
    z = z.detach()
    torch.testing.assert_close(row.grad(z, SLOPE), expected, rtol=1e-12, atol=1e-12)
    if row.grad_from_output is not None:
        got = row.grad_from_output(row.fn(z, SLOPE), SLOPE)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("row", ROWS)
def test_module_round_trip(row):
    module = row.make_module(SLOPE)
    assert isinstance(module, row.module)
    assert spec.activation_of_module(module) is row
    if row.has_slope:
        assert row.slope_of(module) == SLOPE
    z = _z()
    slope = row.slope_of(module)
    torch.testing.assert_close(module(z), row.fn(z, slope), rtol=0, atol=0)


@pytest.mark.parametrize("row", ROWS)
def test_positive_homogeneity_as_claimed(row):
    z = _z()
    holds = all(torch.allclose(row.fn(c * z, SLOPE), c * row.fn(z, SLOPE), rtol=1e-12, atol=1e-12)
                for c in (0.25, 2.0, 3.7))
    assert holds == row.positively_homogeneous


def test_codes_are_unique_and_dense():
    codes = sorted(a.code for a in spec.ACTIVATION_TABLE)
    assert codes == list(range(len(spec.ACTIVATION_TABLE)))
    assert len(spec.ACTIVATION) == len(spec.ACTIVATION_TABLE)  # names are unique too
    assert spec.ACTIVATIONS == {a.name: a.code for a in spec.ACTIVATION_TABLE}


def test_unknown_activation_names_the_argument():
    with pytest.raises(ValueError, match="^activation must be one of"):
        spec.activation("bogus")
    with pytest.raises(ValueError, match="^activation must be one of"):
        spec.activation(None)
    assert spec.activation_of_module(torch.nn.GELU()) is None
