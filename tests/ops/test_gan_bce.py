"""gan_bce: every backend against the reference and torch's BCE-with-logits."""
import pytest
import torch
import torch.nn.functional as F

from fastgan import functional as FG
from helpers import CASES, assert_matches, ran, require


def logits(b, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, generator=g) * scale


def run_d(real, fake, backend, device, dtype, smoothing=0.0):
    r = real.to(device, dtype).clone().requires_grad_(True)
    f = fake.to(device, dtype).clone().requires_grad_(True)
    with ran(backend, "gan_bce_forward"):
        out = FG.gan_bce_d(r, f, smoothing)
    out.loss.backward()
    return dict(loss=out.loss, d_real=out.d_real, d_fake=out.d_fake, real_grad=r.grad,
                fake_grad=f.grad)


def run_g(fake, backend, device, dtype):
    f = fake.to(device, dtype).clone().requires_grad_(True)
    with ran(backend, "gan_bce_forward"):
        out = FG.gan_bce_g(f)
    (3.0 * out.loss).backward()  # a non-unit upstream gradient
    return dict(loss=out.loss, d_fake=out.d_fake, fake_grad=f.grad)


BATCHES = [1, 2, 3, 64, 1000]


@pytest.mark.parametrize("bd", CASES)
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_d_loss(bd, b, smoothing, dtype):
    backend, device = bd
    require(backend, device)
    real, fake = logits(b, 1), logits(b, 2)
    got = run_d(real, fake, backend, device, dtype, smoothing)
    ref = run_d(real, fake, "reference", device, dtype, smoothing)
    gold = run_d(real, fake, "reference", "cpu", torch.float64, smoothing)
    assert_matches(backend, got, ref, gold, dtype)
    assert got["loss"].dtype == torch.float32 and got["loss"].dim() == 0


@pytest.mark.parametrize("bd", CASES)
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_g_loss(bd, b, dtype):
    backend, device = bd
    require(backend, device)
    fake = logits(b, 3)
    got = run_g(fake, backend, device, dtype)
    ref = run_g(fake, "reference", device, dtype)
    gold = run_g(fake, "reference", "cpu", torch.float64)
    assert_matches(backend, got, ref, gold, dtype)


@pytest.mark.parametrize("bd", CASES)
def test_extreme_logits_are_finite_and_exact(bd):
    """Softplus form: no overflow for |logit| up to 1e4; matches torch's BCE."""
    backend, device = bd
    require(backend, device)
    real = torch.tensor([[-1e4], [-100.0], [0.0], [30.0], [1e4]])
    fake = torch.tensor([[1e4], [100.0], [0.0], [-30.0], [-1e4]])
    got = run_d(real, fake, backend, device, torch.float32)
    expected = (F.binary_cross_entropy_with_logits(real.double(), torch.ones_like(real).double())
                + F.binary_cross_entropy_with_logits(fake.double(), torch.zeros_like(fake).double()))
    assert torch.isfinite(got["loss"]).all()
    torch.testing.assert_close(got["loss"].double().cpu(), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got["real_grad"]).all() and torch.isfinite(got["fake_grad"]).all()


def test_reference_equals_torch_bce():
    real, fake = logits(37, 5).double(), logits(37, 6).double()
    with ran("reference", "gan_bce_forward"):
        d = FG.gan_bce_d(real, fake, smoothing=0.1)
        g = FG.gan_bce_g(fake)
    exp_d = (F.binary_cross_entropy_with_logits(real, torch.full_like(real, 0.9))
             + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    exp_g = F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    torch.testing.assert_close(d.loss, exp_d)
    torch.testing.assert_close(g.loss, exp_g)
    torch.testing.assert_close(d.d_real, torch.sigmoid(real).mean())
    torch.testing.assert_close(d.d_fake, torch.sigmoid(fake).mean())


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_smoothing(bad):
    with pytest.raises(ValueError, match="label"):
        FG.gan_bce_d(logits(4, 1), logits(4, 2), smoothing=bad)


def test_probabilities_are_refused_logits_in_0_1_are_not():
    """A sigmoid's output (probabilities, e.g. a D ending in nn.Sigmoid) is
    refused, through reshapes and casts too, naming the argument; logits that
    merely lie in [0, 1] are legal."""
    z = torch.randn(6, 1, requires_grad=True)
    probs = torch.sigmoid(z)
    for bad, name in ((probs, "real_logits"), (probs.view(-1), "real_logits"),
                      (probs.double().squeeze(1)[:4], "real_logits")):
        with pytest.raises(ValueError, match=f"{name} is the output of a sigmoid"):
            FG.gan_bce_d(bad, z.detach())
    with pytest.raises(ValueError, match="fake_logits is the output of a sigmoid"):
        FG.gan_bce_d(z, torch.nn.Sigmoid()(z))
    with pytest.raises(ValueError, match="fake_logits is the output of a sigmoid"):
        FG.gan_bce_g(probs)
    in_unit = torch.rand(6, 1, requires_grad=True)
    FG.gan_bce_d(in_unit, in_unit * 0.5).loss.backward()
    FG.gan_bce_g(torch.sigmoid(z) * 4 - 2)  # logits computed from a sigmoid: fine


def test_d_loss_is_the_sum_of_the_real_and_fake_terms():
    """As the seed GAN computes it (many GAN codes average the two instead)."""
    real, fake = logits(9, 1), logits(9, 2)
    bce = F.binary_cross_entropy_with_logits
    terms = bce(real, torch.ones_like(real)), bce(fake, torch.zeros_like(fake))
    torch.testing.assert_close(FG.gan_bce_d(real, fake).loss, terms[0] + terms[1])
