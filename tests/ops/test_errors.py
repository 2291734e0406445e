"""Bad input gets a clear error that names the argument, on every entry point."""
import math

import pytest
import torch

from fastgan import functional as FG
from fastgan import nn as fnn


def bn_args(b=4, k=6, n=5, **over):
    a = dict(x=torch.randn(b, k), weight=torch.randn(n, k), bias=torch.randn(n),
             bn_weight=torch.ones(n), bn_bias=torch.zeros(n), running_mean=torch.zeros(n),
             running_var=torch.ones(n), num_batches_tracked=torch.zeros(1, dtype=torch.int64),
             training=True, momentum=0.1, eps=1e-5, activation="leaky_relu",
             negative_slope=0.2, dropout=0.2)
    a.update(over)
    return a


@pytest.mark.parametrize("over,exc,match", [
    (dict(x=torch.randn(4, 6, 1)), ValueError, "x must be 2-D"),
    (dict(x=torch.randn(6)), ValueError, "x must be 2-D"),
    (dict(weight=torch.randn(5, 7)), ValueError, "K mismatch"),
    (dict(weight=torch.randn(5, 6, dtype=torch.float64)), TypeError, "weight must have dtype"),
    (dict(x=torch.randint(0, 3, (4, 6))), TypeError, "x must be float32"),
    (dict(bias=torch.randn(4)), ValueError, "bias must have 5 elements"),
    (dict(bn_weight=torch.ones(5, dtype=torch.float16)), TypeError, "bn_weight must have dtype"),
    (dict(running_var=torch.ones(3)), ValueError, "running_var must have 5 elements"),
    (dict(weight=torch.randn(5, 6, device="meta")), ValueError, "weight is on meta"),
    (dict(x=torch.randn(1, 6)), ValueError, "more than 1 value per channel"),
    (dict(dropout=-0.1), ValueError, "dropout p"),
    (dict(dropout=1.0), ValueError, "dropout p"),
    (dict(negative_slope=math.nan), ValueError, "negative_slope"),
    (dict(negative_slope=math.inf), ValueError, "negative_slope"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(momentum=math.nan), ValueError, "momentum"),
    (dict(activation="gelu"), ValueError, "activation must be one of"),
])
def test_linear_bn_act_bad_input(over, exc, match):
    a = bn_args(**over)
    with pytest.raises(exc, match=match):
        FG.linear_bn_act(a.pop("x"), a.pop("weight"), a.pop("bias"), a.pop("bn_weight"),
                         a.pop("bn_bias"), a.pop("running_mean"), a.pop("running_var"),
                         a.pop("num_batches_tracked"), **a)


@pytest.mark.parametrize("over,exc,match", [
    (dict(x=torch.randn(4)), ValueError, "x must be 2-D"),
    (dict(weight=torch.randn(3, 5)), ValueError, "K mismatch"),
    (dict(weight=torch.randn(3, 4, dtype=torch.bfloat16)), TypeError, "weight must have dtype"),
    (dict(dropout=1.5), ValueError, "dropout p"),
    (dict(negative_slope=-math.inf), ValueError, "negative_slope"),
])
def test_linear_act_bad_input(over, exc, match):
    a = dict(x=torch.randn(2, 4), weight=torch.randn(3, 4), bias=None, dropout=0.1)
    a.update(over)
    with pytest.raises(exc, match=match):
        FG.linear_act(a.pop("x"), a.pop("weight"), a.pop("bias"), **a)


def test_gan_bce_bad_input():
    with pytest.raises(TypeError, match="fake_logits must have dtype"):
        FG.gan_bce_d(torch.randn(3, 1), torch.randn(3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="must not be empty"):
        FG.gan_bce_g(torch.randn(0, 1))
    with pytest.raises(TypeError, match="logits must be a float"):
        FG.gan_bce_g(torch.ones(3, 1, dtype=torch.int64))


def test_module_errors():
    with pytest.raises(ValueError, match="activation must be one of"):
        fnn.LinearBNAct(3, 4, activation="gelu")
    layer = fnn.LinearBNAct(3, 4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))
    layer.eval()
    assert layer(torch.randn(1, 3)).shape == (1, 4)  # B=1 is fine in eval
