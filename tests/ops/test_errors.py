"""Bad input gets a clear one-line error that names the argument, on every
entry point (eager, the registered op, its fake), checked once per call."""
import math

import pytest
import torch

from fastgan import functional as FG
from fastgan import nn as fnn
from fastgan.ops import checks

I64 = torch.int64


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
    (dict(activation=None), ValueError, "activation must be one of"),
    (dict(eps=math.inf), ValueError, "eps must be finite"),
    (dict(eps=math.nan), ValueError, "eps must be finite"),
    (dict(momentum=1.5), ValueError, "momentum must be None or in"),
    (dict(momentum=-0.1), ValueError, "momentum must be None or in"),
    (dict(dropout=math.nan), ValueError, "dropout p"),
    (dict(negative_slope=-0.1), ValueError, "negative_slope"),
    (dict(bias=torch.randn(5, 1)), ValueError, "bias must be 1-D"),
    (dict(weight=torch.randn(5)), ValueError, "weight must be 2-D"),
    (dict(x=[[1.0] * 6] * 4), TypeError, "x must be a torch.Tensor"),
    (dict(bn_bias=torch.zeros(5, dtype=torch.float64)), TypeError, "bn_bias must have dtype"),
    (dict(running_mean=torch.zeros(5, 1)), ValueError, "running_mean must be 1-D"),
    (dict(num_batches_tracked=torch.zeros(1)), TypeError, "num_batches_tracked must have dtype"),
    (dict(num_batches_tracked=torch.zeros(2, dtype=I64)), ValueError,
     "num_batches_tracked must have 1 elements"),
    (dict(seed=torch.zeros(1)), TypeError, "seed must have dtype"),
    (dict(seed=torch.zeros(2, dtype=I64)), ValueError, "seed must have 1 elements"),
    (dict(offset=torch.zeros(1, dtype=I64, device="meta")), ValueError, "offset is on meta"),
    (dict(seed=3), TypeError, "seed must be a torch.Tensor"),
])
def test_linear_bn_act_bad_input(over, exc, match):
    a = bn_args(**over)
    with pytest.raises(exc, match=match) as e:
        FG.linear_bn_act(a.pop("x"), a.pop("weight"), a.pop("bias"), a.pop("bn_weight"),
                         a.pop("bn_bias"), a.pop("running_mean"), a.pop("running_var"),
                         a.pop("num_batches_tracked"), **a)
    assert "\n" not in str(e.value)


def test_hyper_parameters_must_be_numbers():
    # The functional forms convert with float(); the check is what Function.apply sees.
    with pytest.raises(TypeError, match="negative_slope must be a float, got str"):
        checks.hyper("leaky_relu", "0.2", 0.0)
    with pytest.raises(TypeError, match="dropout p must be a float, got NoneType"):
        checks.hyper("leaky_relu", 0.2, None)


def test_linear_bn_act_fp64_needs_fp64_stats():
    a = bn_args(x=torch.randn(4, 6, dtype=torch.float64),
                weight=torch.randn(5, 6, dtype=torch.float64),
                bias=torch.randn(5, dtype=torch.float64))
    with pytest.raises(TypeError, match="bn_weight must have dtype torch.float64"):
        FG.linear_bn_act(*a.values())


@pytest.mark.parametrize("over,exc,match", [
    (dict(x=torch.randn(4)), ValueError, "x must be 2-D"),
    (dict(weight=torch.randn(3, 5)), ValueError, "K mismatch"),
    (dict(weight=torch.randn(3, 4, dtype=torch.bfloat16)), TypeError, "weight must have dtype"),
    (dict(dropout=1.5), ValueError, "dropout p"),
    (dict(negative_slope=-math.inf), ValueError, "negative_slope"),
    (dict(bias=torch.randn(3, dtype=torch.float16)), TypeError, "bias must have dtype"),
    (dict(activation="swish"), ValueError, "activation must be one of"),
    (dict(offset=torch.zeros(1, dtype=torch.int32)), TypeError, "offset must have dtype"),
])
def test_linear_act_bad_input(over, exc, match):
    a = dict(x=torch.randn(2, 4), weight=torch.randn(3, 4), bias=None, dropout=0.1)
    a.update(over)
    with pytest.raises(exc, match=match) as e:
        FG.linear_act(a.pop("x"), a.pop("weight"), a.pop("bias"), **a)
    assert "\n" not in str(e.value)


def _linear_act_args(**over):
    a = dict(x=torch.randn(2, 4), weight=torch.randn(3, 4), bias=None, activation="relu",
             negative_slope=0.0, p=0.0, seed=torch.zeros(1, dtype=I64),
             offset=torch.zeros(1, dtype=I64))
    a.update(over)
    return tuple(a.values())


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_registered_op_and_fake_check_too(device):
    """torch.ops.fastgan.* (and its fake, on meta tensors) raise the same errors."""
    z = torch.zeros(1, dtype=I64, device=device)
    with pytest.raises(ValueError, match="K mismatch"):
        torch.ops.fastgan.linear_act(torch.randn(2, 4, device=device),
                                     torch.randn(3, 5, device=device), None, "relu", 0.0, 0.0,
                                     z, z)
    with pytest.raises(ValueError, match="dropout p"):
        torch.ops.fastgan.linear_act(torch.randn(2, 4, device=device),
                                     torch.randn(3, 4, device=device), None, "relu", 0.0, 1.0,
                                     z, z)
    with pytest.raises(ValueError, match="target_b \\(label\\) must be in"):
        torch.ops.fastgan.gan_bce(torch.randn(3, 1, device=device),
                                  torch.randn(3, 1, device=device), 1.0, 1.5)


@pytest.mark.parametrize("op", ["linear_act", "linear_bn_act"])
def test_batch_times_out_features_limit(op):
    """One B * N limit for every backend (below 2**31: the Triton kernels' 32-bit
    offsets), checked at the op boundary before any backend sees the call. Meta
    tensors: the fake runs the check, nothing is allocated."""
    z = torch.zeros(1, dtype=I64, device="meta")

    def call(b, n):
        x, w = torch.empty(b, 8, device="meta"), torch.empty(n, 8, device="meta")
        if op == "linear_act":
            return FG.linear_act(x, w, None, "relu", 0.0, 0.0, True, z, z)
        v = torch.empty(n, device="meta")
        return FG.linear_bn_act(x, w, None, v, v, v.clone(), v.clone(), z.clone(), True, 0.1,
                                1e-5, "relu", 0.0, 0.0, z, z)

    assert call(2**16, 2**15 - 1).shape == (2**16, 2**15 - 1)  # 2**31 - 2**16: accepted
    for b, n in ((2**16, 2**15), (2**31, 1), (1, 2**31), (2**20 + 1, 2**11)):
        with pytest.raises(ValueError, match=f"^batch \\* out_features must be below 2\\*\\*31 "
                           f"\\(32-bit element offsets\\), got x with {b} rows and weight with "
                           f"{n} out_features$"):
            call(b, n)
    with pytest.raises(ValueError, match="below 2\\*\\*31"):  # through the op, as compile sees it
        torch.ops.fastgan.linear_act(torch.empty(2**16, 8, device="meta"),
                                     torch.empty(2**15, 8, device="meta"), None, "relu", 0.0, 0.0,
                                     z, z)


def test_gan_bce_bad_input():
    with pytest.raises(TypeError, match="fake_logits must have dtype"):
        FG.gan_bce_d(torch.randn(3, 1), torch.randn(3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="must not be empty"):
        FG.gan_bce_g(torch.randn(0, 1))
    with pytest.raises(ValueError, match="fake_logits must not be empty"):
        FG.gan_bce_d(torch.randn(3, 1), torch.randn(0, 1))
    with pytest.raises(TypeError, match="logits must be a float"):
        FG.gan_bce_g(torch.ones(3, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="fake_logits is on meta but real_logits is on cpu"):
        FG.gan_bce_d(torch.randn(3, 1), torch.randn(3, 1, device="meta"))
    with pytest.raises(ValueError, match="target_a \\(label\\) must be in \\[0, 1\\]"):
        FG.gan_bce_d(torch.randn(3, 1), torch.randn(3, 1), smoothing=1.5)
    with pytest.raises(TypeError, match="real_logits must be a torch.Tensor"):
        FG.gan_bce_d([0.5], torch.randn(3, 1))


def _count(monkeypatch, name):
    calls = []
    inner = getattr(checks, name)
    monkeypatch.setattr(checks, name, lambda *a, **k: calls.append(1) or inner(*a, **k))
    return calls


@pytest.mark.parametrize("path", ["functional", "registered op"])
def test_checked_once_per_call(monkeypatch, path):
    """Forward and backward of one call run the op's check exactly once."""
    hyper = _count(monkeypatch, "hyper")      # once per linear op check
    finite = _count(monkeypatch, "finite")    # gan_bce checks its two labels with it
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(5, 6, requires_grad=True)
    z = torch.zeros(1, dtype=I64)
    if path == "functional":
        FG.linear_act(x, w, None, "tanh", 0.0, 0.2, True, z, z).sum().backward()
    else:
        torch.ops.fastgan.linear_act(x, w, None, "tanh", 0.0, 0.2, z, z).sum().backward()
    assert len(hyper) == 1
    a = bn_args()
    a["x"].requires_grad_(True)
    FG.linear_bn_act(*a.values()).sum().backward()
    assert len(hyper) == 2
    finite.clear()
    r = torch.randn(3, 1, requires_grad=True)
    if path == "functional":
        FG.gan_bce_d(r, r.detach()).loss.backward()
    else:
        torch.ops.fastgan.gan_bce(r, r.detach(), 1.0, 0.0)[0].backward()
    assert len(finite) == 2


def test_module_errors():
    with pytest.raises(ValueError, match="activation must be one of"):
        fnn.LinearBNAct(3, 4, activation="gelu")
    layer = fnn.LinearBNAct(3, 4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))
    layer.eval()
    assert layer(torch.randn(1, 3)).shape == (1, 4)  # B=1 is fine in eval
