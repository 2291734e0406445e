"""``compute_dw``: the backward ops skip dW when the weight needs no gradient.

The G phase of a GAN step backpropagates through D with D's weights frozen
(``requires_grad`` False): every backward op then gets ``compute_dw=False``
(from ``ctx.needs_input_grad``) and returns an empty dW instead of computing a
whole GEMM. Checked on every backend here: the flag reaches the backend, dW
comes back empty, everything else equals the full backward's.
"""
import pytest
import torch
from torch.library import opcheck

from fastgan import backend
from fastgan import nn as fnn
from helpers import ran, require

BACKENDS = [pytest.param(("reference", "cpu"), id="reference"),
            pytest.param(("cpu", "cpu"), id="cpu"),
            pytest.param(("triton", "cpu"), id="triton")]
I64 = torch.int64


def _linear(device, b=5, k=7, n=6):
    torch.manual_seed(0)
    x = torch.randn(b, k, device=device)
    w, bias = torch.randn(n, k, device=device), torch.randn(n, device=device)
    return x, w, bias, torch.tensor([9], dtype=I64), torch.tensor([2], dtype=I64)


def _bn(n, device):
    return (torch.rand(n, device=device) + 0.5, torch.randn(n, device=device))


@pytest.mark.parametrize("bd", BACKENDS)
@pytest.mark.parametrize("compute_dx", [True, False])
def test_linear_act_backward_op_skips_dw(bd, compute_dx):
    name, device = bd
    require(name, device)
    x, w, bias, s, o = _linear(device)
    with ran(name, "linear_act_forward", "linear_act_backward"):
        y = torch.ops.fastgan.linear_act(x, w, bias, "leaky_relu", 0.2, 0.3, s, o)
        gy = torch.randn_like(y)
        args = (gy, x, w, y, "leaky_relu", 0.2, 0.3, s, o, compute_dx)
        full = torch.ops.fastgan.linear_act_backward(*args, True)
        part = torch.ops.fastgan.linear_act_backward(*args, False)
    assert full[1].shape == w.shape and part[1].numel() == 0
    torch.testing.assert_close(part[0], full[0], rtol=0, atol=0)
    torch.testing.assert_close(part[2], full[2], rtol=0, atol=0)
    with ran(name, "linear_act_backward"):
        opcheck(torch.ops.fastgan.linear_act_backward, (*args, False))


@pytest.mark.parametrize("bd", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_linear_bn_act_backward_op_skips_dw(bd, training):
    name, device = bd
    require(name, device)
    x, w, bias, s, o = _linear(device)
    g, beta = _bn(w.shape[0], device)
    stats = (torch.zeros(w.shape[0]), torch.ones(w.shape[0]), torch.zeros(1, dtype=I64))
    with ran(name, "linear_bn_act_forward", "linear_bn_act_backward"):
        y, h, mean, rstd = torch.ops.fastgan.linear_bn_act(x, w, bias, g, beta, *stats, training,
                                                           0.1, 1e-5, "relu", 0.0, 0.2, s, o)
        args = (torch.randn_like(y), x, w, g, beta, h, mean, rstd, training, "relu", 0.0, 0.2, s,
                o, True)
        full = torch.ops.fastgan.linear_bn_act_backward(*args, True)
        part = torch.ops.fastgan.linear_bn_act_backward(*args, False)
    assert full[1].shape == w.shape and part[1].numel() == 0
    for i in (0, 2, 3, 4):
        torch.testing.assert_close(part[i], full[i], rtol=0, atol=0)
    with ran(name, "linear_bn_act_backward"):
        opcheck(torch.ops.fastgan.linear_bn_act_backward, (*args, False))


class _Spy:
    """Records the compute_dx / compute_dw flags the reference backward gets."""

    def __init__(self, monkeypatch, function):
        mod = backend.module("reference")
        real = getattr(mod, function)
        self.flags = []

        def spy(*args):
            self.flags.append(tuple(args[-2:]))
            return real(*args)
        monkeypatch.setattr(mod, function, spy)
        backend._resolved.clear()   # the dispatcher caches the functions it found


@pytest.mark.parametrize("bn", [False, True])
def test_frozen_weights_skip_dw(monkeypatch, bn):
    """A layer whose Linear is frozen (D in the G phase): its backward op gets
    compute_dw=False from needs_input_grad, and x's gradient is unchanged."""
    spy = _Spy(monkeypatch, "linear_bn_act_backward" if bn else "linear_act_backward")
    torch.manual_seed(0)
    layer = (fnn.LinearBNAct(7, 6, dropout=0.2) if bn else fnn.LinearAct(7, 6, dropout=0.2))
    x = torch.randn(5, 7, requires_grad=True)
    try:
        with backend.use_backend("reference"):
            layer.seed_dropout(3)
            layer(x).square().sum().backward()
            want = x.grad.clone()
            x.grad = None
            for t in layer[0].parameters():
                t.requires_grad_(False)
            layer.seed_dropout(3)
            layer(x).square().sum().backward()
    finally:
        backend._resolved.clear()
    assert spy.flags == [(True, True), (True, False)]
    assert layer[0].weight.grad is not None   # from the first backward only
    torch.testing.assert_close(x.grad, want, rtol=0, atol=0)


def test_double_backward_with_frozen_weight_skips_dw(monkeypatch):
    """create_graph=True takes the differentiable formulas; they get the flag too."""
    mod = backend.module("reference")
    real, seen = mod.linear_act_grads, []

    def spy(*args):
        seen.append(args[-1])
        return real(*args)
    monkeypatch.setattr(mod, "linear_act_grads", spy)
    torch.manual_seed(0)
    layer = fnn.LinearAct(4, 3, activation="tanh")
    layer[0].weight.requires_grad_(False)
    x = torch.randn(3, 4, requires_grad=True)
    (g,) = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    g.square().sum().backward()
    assert seen and seen[0] is False
    assert layer[0].weight.grad is None and layer[0].bias.grad is not None
