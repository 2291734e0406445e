"""Fused modules and models: state_dict compatibility with plain PyTorch both
ways, and the fused GAN training exactly like the reference GAN."""
import pytest
import torch
from torch import nn

import fastgan
from fastgan import functional as FG
from fastgan import nn as fnn
from fastgan.models import Discriminator, Generator


def test_linear_bn_act_state_dict_both_ways():
    fused = fnn.LinearBNAct(10, 6, eps=1e-3, momentum=0.3, dropout=0.2)
    seq = nn.Sequential(nn.Linear(10, 6), nn.BatchNorm1d(6, eps=1e-3, momentum=0.3),
                        nn.LeakyReLU(0.2), nn.Dropout(0.2))
    assert list(fused.state_dict()) == list(seq.state_dict())
    seq.load_state_dict(fused.state_dict())
    with torch.no_grad():
        seq[1].running_mean.uniform_(-1, 1)
        seq[0].weight.mul_(2)
    fused.load_state_dict(seq.state_dict())
    fused.eval(), seq.eval()
    x = torch.randn(3, 10)
    torch.testing.assert_close(fused(x), seq(x))


def test_linear_act_state_dict_both_ways():
    fused = fnn.LinearAct(10, 6, dropout=0.5)
    seq = nn.Sequential(nn.Linear(10, 6), nn.LeakyReLU(0.2), nn.Dropout(0.5))
    assert list(fused.state_dict()) == list(seq.state_dict())
    seq.load_state_dict(fused.state_dict())
    fused.load_state_dict(seq.state_dict())
    fused.eval(), seq.eval()
    x = torch.randn(3, 10)
    torch.testing.assert_close(fused(x), seq(x))


def test_dropout_rng_is_not_in_state_dict_and_advances():
    layer = fnn.LinearAct(4, 3, dropout=0.5)
    assert "dropout_rng" not in layer.state_dict()
    before = layer.dropout_rng.clone()
    layer(torch.randn(2, 4))
    assert int(layer.dropout_rng[1]) == int(before[1]) + 1
    layer.eval()
    layer(torch.randn(2, 4))
    assert int(layer.dropout_rng[1]) == int(before[1]) + 1  # no dropout in eval


def test_bn_stays_fp32_when_model_is_cast():
    layer = fnn.LinearBNAct(4, 3).to(torch.bfloat16)
    assert layer[0].weight.dtype == torch.bfloat16
    assert layer[1].weight.dtype == torch.float32 and layer[1].running_var.dtype == torch.float32
    y = layer(torch.randn(3, 4, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_autocast_bf16():
    layer = fnn.LinearBNAct(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(3, 4))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer[0].weight.grad.dtype == torch.float32


@pytest.mark.parametrize("cls,act_index", [(fnn.LinearBNAct, 2), (fnn.LinearAct, 1)])
def test_op_inputs_is_what_the_forward_passes(cls, act_index):
    """The public view fastgan.distributed builds its sync-BN call from."""
    layer = cls(4, 3, activation="tanh", dropout=0.25)
    assert layer.activation() == ("tanh", 0.0) and layer.act_index == act_index
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = layer.op_inputs(x)
    assert (a.x.dtype, a.weight.dtype, a.bias.dtype) == (torch.bfloat16,) * 3
    assert (a.activation, a.negative_slope, a.p) == ("tanh", 0.0, 0.25)
    assert (int(a.seed), int(a.offset)) == (int(layer.dropout_rng[0]), 0)
    assert int(layer.dropout_rng[1]) == 1  # the key was drawn: the stream moved on
    layer.eval()
    assert layer.dropout_p() == 0.0
    seed, offset = layer.dropout_key(0.0)
    assert int(layer.dropout_rng[1]) == 1  # p == 0 draws nothing
    assert layer.dropout_key(0.0) == (seed, offset)  # one shared key: no allocation per call
    assert fnn.autocast_inputs(x, layer[0].weight, None)[2] is None


@pytest.mark.parametrize("cls", [Generator, Discriminator])
def test_models_have_identical_state_dict_keys(cls):
    fused, ref = cls(fused=True), cls(fused=False)
    assert list(fused.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(fused.state_dict())
    fused.load_state_dict(ref.state_dict())


def test_building_a_fused_model_consumes_no_extra_randomness():
    torch.manual_seed(0)
    a = Generator(fused=True)
    ta = torch.rand(1)
    torch.manual_seed(0)
    b = Generator(fused=False)
    tb = torch.rand(1)
    assert torch.equal(ta, tb)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_model_shapes():
    g, d = Generator(), Discriminator()
    z = torch.randn(5, 100)
    img = g(z)
    assert img.shape == (5, 784) and img.abs().max() <= 1
    assert d(img).shape == (5, 1)
    assert d(img.view(5, 1, 28, 28)).shape == (5, 1)


def _train(g, d, steps, batch=16, seed=0):
    torch.manual_seed(seed)
    real = torch.rand(steps, batch, 784) * 2 - 1
    z = torch.randn(steps, batch, 100)
    g_opt = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    losses = []
    for i in range(steps):
        fake = g(z[i])
        d_loss = FG.gan_bce_d(d(real[i]), d(fake.detach())).loss
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        g_loss = FG.gan_bce_g(d(fake)).loss
        g_opt.zero_grad()
        g_loss.backward()
        g_opt.step()
        losses.append((d_loss.detach(), g_loss.detach()))
    return losses


@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_fused_gan_trains_like_the_reference_gan(name):
    """Same seed and weights, dropout off: same losses and parameters after 5 Adam steps."""
    if name not in fastgan.backends():
        pytest.skip(f"backend {name} unavailable: {fastgan.unavailable().get(name)}")
    g_ref, d_ref = Generator(dropout=0.0, fused=False), Discriminator(dropout=0.0, fused=False)
    g, d = Generator(dropout=0.0), Discriminator(dropout=0.0)
    g.load_state_dict(g_ref.state_dict())
    d.load_state_dict(d_ref.state_dict())
    # The plain-PyTorch GAN uses torch's own BCE-with-logits loss.
    torch.manual_seed(0)
    real = torch.rand(5, 16, 784) * 2 - 1
    z = torch.randn(5, 16, 100)
    bce = nn.functional.binary_cross_entropy_with_logits
    g_opt = torch.optim.Adam(g_ref.parameters(), lr=2e-4, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(d_ref.parameters(), lr=2e-4, betas=(0.5, 0.999))
    ref_losses = []
    for i in range(5):
        fake = g_ref(z[i])
        rl, fl = d_ref(real[i]), d_ref(fake.detach())
        d_loss = bce(rl, torch.ones_like(rl)) + bce(fl, torch.zeros_like(fl))
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        fl = d_ref(fake)
        g_loss = bce(fl, torch.ones_like(fl))
        g_opt.zero_grad()
        g_loss.backward()
        g_opt.step()
        ref_losses.append((d_loss.detach(), g_loss.detach()))
    with fastgan.use_backend(name):
        losses = _train(g, d, 5)
    for (a, b), (c, e) in zip(losses, ref_losses):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, e, rtol=1e-5, atol=1e-5)
    for m, r in ((g, g_ref), (d, d_ref)):
        for (k, v), (_, w) in zip(m.state_dict().items(), r.state_dict().items()):
            torch.testing.assert_close(v, w, rtol=1e-4, atol=1e-5, msg=k)


def test_fused_layer_called_twice_before_backward():
    """The seed's loop runs D on real and on fake, then backward: the dropout
    counter advancing between the two calls must not break the first graph."""
    d = Discriminator(in_dim=12, hidden=(8, 6))
    real, fake = torch.randn(4, 12), torch.randn(4, 12)
    loss = d(real).sum() + d(fake).sum()
    d.eval()
    loss = loss + d(real).sum()
    d.train()
    loss = loss + d(fake).sum()
    loss.backward()
    assert all(p.grad is not None for p in d.parameters())
