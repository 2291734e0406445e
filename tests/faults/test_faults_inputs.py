"""Edge inputs at the layers and ops: infinite logits in the GAN loss, meta
tensors through the fused layers, float64 exactly float64. Each names the
backend it checks and proves it ran (``helpers.ran``)."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastgan
from fastgan import functional as FG
from fastgan.nn import LinearAct, LinearBNAct
from helpers import CASES, ran, require

INF = math.inf
# (real logits, fake logits, smoothing): each loss term at an infinite logit is
# its limit: inf where the logit is confidently wrong (or the target is smoothed
# below 1), 0 where it is confidently right.
LIMITS = [
    ([INF, 1.0], [0.0, -INF], 0.1),     # the reported case: torch gives inf, fastgan gave nan
    ([INF], [-INF], 0.0),               # both confidently right: 0
    ([-INF], [INF], 0.0),               # both confidently wrong: inf
    ([INF, -INF, 2.0], [INF, 0.5], 0.3),
]
BCE_BACKENDS = CASES + [pytest.param(("reference", "cpu"), id="reference")]


def _expected(real, fake, smoothing):
    def term(z, t):
        if z == INF:
            return INF if t < 1 else 0.0
        if z == -INF:
            return INF if t > 0 else 0.0
        return F.binary_cross_entropy_with_logits(torch.tensor(z, dtype=torch.float64),
                                                  torch.tensor(t, dtype=torch.float64)).item()
    return (sum(term(z, 1 - smoothing) for z in real) / len(real)
            + sum(term(z, 0.0) for z in fake) / len(fake))


@pytest.mark.parametrize("case", BCE_BACKENDS)
@pytest.mark.parametrize("real, fake, smoothing", LIMITS)
def test_gan_bce_infinite_logits_give_the_limit(case, real, fake, smoothing):
    name, device = case
    require(name, device)
    r, f = (torch.tensor(v, device=device) for v in (real, fake))
    with fastgan.use_backend(name), ran(name, "gan_bce_forward"):
        d = FG.gan_bce_d(r, f, smoothing)
    want = _expected(real, fake, smoothing)
    got = d.loss.item()
    assert (got == want) if math.isinf(want) else math.isclose(got, want, rel_tol=1e-6), (got, want)
    if smoothing == 0.1:  # torch's BCE of the smoothed real term: inf, as fastgan's
        assert F.binary_cross_entropy_with_logits(r, torch.full_like(r, 0.9)).item() == got
    assert 0 <= d.d_real.item() <= 1 and 0 <= d.d_fake.item() <= 1


@pytest.mark.parametrize("cls", [LinearAct, LinearBNAct])
@pytest.mark.parametrize("training", [True, False])
def test_meta_tensors_go_through_the_fused_layers(cls, training):
    """Shape inference on the meta device: the op's fake, not an autocast error."""
    layer = cls(5, 3, dropout=0.2).to("meta").train(training)
    y = layer(torch.empty(4, 5, device="meta"))
    assert y.device.type == "meta" and y.shape == (4, 3)


def _rel(a, b):
    return ((a - b).abs() / b.abs().clamp_min(1e-300)).max().item()


@pytest.mark.parametrize("cls", [LinearAct])
@pytest.mark.parametrize("slope", [0.1, 0.2, 0.3])
def test_float64_reference_is_exact(cls, slope):
    """The reference keeps the slope in float64: forward and gradient to the last bits."""
    torch.manual_seed(0)
    layer = cls(5, 7, negative_slope=slope).double()
    x = (torch.randn(3, 5, dtype=torch.float64) * 10).requires_grad_()
    plain = layer.to_sequential()
    want = plain(x)
    gwant, = torch.autograd.grad(want.sum(), x)
    with fastgan.use_backend("reference"), ran("reference", "linear_act_forward"):
        got = layer(x)
    g, = torch.autograd.grad(got.sum(), x)
    assert _rel(got, want) < 1e-15 and _rel(g, gwant) < 1e-14


@pytest.mark.parametrize("cls, fn", [(LinearAct, "linear_act"), (LinearBNAct, "linear_bn_act")])
def test_float64_cpu_backend_is_float64(cls, fn):
    """The C++ CPU kernels take float64 (gradcheck runs through them): the slope
    of the activation's derivative is the double, not its float rounding
    (relative error 3.4e-9 before), so they agree with the reference to fp64."""
    require("cpu", "cpu")
    torch.manual_seed(0)
    layer = cls(5, 7, negative_slope=0.1, dropout=0.0).double()
    x = (torch.randn(6, 5, dtype=torch.float64) * 10).requires_grad_()
    out = {}
    for name in ("reference", "cpu"):
        with ran(name, f"{fn}_forward", f"{fn}_backward"):
            y = layer(x)
            out[name] = (y, *torch.autograd.grad(y.sum(), [x, layer[0].weight]))
    for got, want in zip(out["cpu"], out["reference"]):
        assert _rel(got, want) < 1e-12, _rel(got, want)
