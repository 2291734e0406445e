"""torch.library contract: opcheck on every op for every backend that runs
here, gradcheck in float64 for the backends that support it, the registered
ops differentiating as their autograd Functions do, and fused modules under
torch.compile(fullgraph=True)."""
import pytest
import torch
from torch.library import opcheck

from fastgan import backend
from fastgan import functional as FG
from fastgan import nn as fnn
from fastgan import ops
from fastgan.ops import spec
from helpers import CASES, ran, require

ALL = [pytest.param(("reference", "cpu"), id="reference")] + CASES


def _bn_args(device, dtype=torch.float32, training=True, p=0.3, momentum=0.1):
    torch.manual_seed(0)
    b, k, n = 4, 6, 5
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(b, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype)
    bias = torch.randn(n, device=device, dtype=dtype)
    g, beta = torch.rand(n, device=device, dtype=stat), torch.randn(n, device=device, dtype=stat)
    rm, rv = torch.zeros(n, device=device, dtype=stat), torch.ones(n, device=device, dtype=stat)
    nbt = torch.zeros(1, dtype=torch.int64, device=device)
    s = torch.tensor([11], device=device)
    o = torch.tensor([2], device=device)
    return (x, w, bias, g, beta, rm, rv, nbt, training, momentum, 1e-5, "leaky_relu", 0.2, p, s, o)


@pytest.mark.parametrize("bd", ALL)
@pytest.mark.parametrize("training", [True, False])
def test_opcheck_linear_bn_act(bd, training):
    backend, device = bd
    require(backend, device)
    with ran(backend, "linear_bn_act_forward"):
        opcheck(torch.ops.fastgan.linear_bn_act, _bn_args(device, training=training))
    x, w, bias, g, beta, rm, rv, nbt, tr, m, eps, act, slope, p, s, o = _bn_args(device)
    y, h, mean, rstd = torch.ops.fastgan.linear_bn_act(x, w, bias, g, beta, rm, rv, nbt, tr, m,
                                                       eps, act, slope, p, s, o)
    gy = torch.randn_like(y)
    with ran(backend, "linear_bn_act_backward"):
        opcheck(torch.ops.fastgan.linear_bn_act_backward,
                (gy, x, w, g, beta, h, mean, rstd, True, act, slope, p, s, o, True))


@pytest.mark.parametrize("bd", ALL)
def test_opcheck_linear_act(bd):
    backend, device = bd
    require(backend, device)
    x, w, bias = (_bn_args(device)[i] for i in range(3))
    w.requires_grad_(True)
    bias.requires_grad_(True)
    s, o = torch.tensor([5], device=device), torch.tensor([1], device=device)
    with ran(backend, "linear_act_forward", "linear_act_backward"):
        opcheck(torch.ops.fastgan.linear_act, (x, w, bias, "leaky_relu", 0.2, 0.3, s, o))


@pytest.mark.parametrize("bd", ALL)
def test_opcheck_linear_act_backward(bd):
    backend, device = bd
    require(backend, device)
    x, w, bias = (_bn_args(device)[i] for i in range(3))
    s, o = torch.tensor([5], device=device), torch.tensor([1], device=device)
    y = torch.ops.fastgan.linear_act(x, w, bias, "tanh", 0.2, 0.3, s, o)
    with ran(backend, "linear_act_backward"):
        for compute_dx in (True, False):
            opcheck(torch.ops.fastgan.linear_act_backward,
                    (torch.randn_like(y), x, w, y, "tanh", 0.2, 0.3, s, o, compute_dx))


@pytest.mark.parametrize("bd", ALL)
def test_opcheck_gan_bce(bd):
    backend, device = bd
    require(backend, device)
    r = torch.randn(6, 1, device=device, requires_grad=True)
    f = torch.randn(6, 1, device=device, requires_grad=True)
    with ran(backend, "gan_bce_forward"):
        opcheck(torch.ops.fastgan.gan_bce, (r, f, 0.9, 0.0))
        opcheck(torch.ops.fastgan.gan_bce, (f, None, 1.0, 0.0))


def test_every_op_is_registered():
    """Each op of spec.OPS: the forward op, a backward op where the backends have
    a backward function (gan_bce's backward is plain math), one Function."""
    functions = {"linear_bn_act": ops.LinearBNActFunction, "linear_act": ops.LinearActFunction,
                 "gan_bce": ops.GanBCEFunction}
    assert set(functions) == set(spec.OPS)
    for name, fns in spec.OPS.items():
        assert hasattr(torch.ops.fastgan, name)
        assert hasattr(torch.ops.fastgan, f"{name}_backward") == (len(fns) == 2)
        assert issubclass(functions[name], torch.autograd.Function)


def test_registered_ops_differentiate_as_the_functions():
    """torch.ops.fastgan.linear_act / gan_bce (register_autograd) and the
    Functions behind fastgan.functional give the same values and gradients."""
    x, w, bias = (_bn_args("cpu", torch.float64)[i].requires_grad_(True) for i in range(3))
    s, o = torch.tensor([3]), torch.tensor([4])
    got = []
    for y in (torch.ops.fastgan.linear_act(x, w, bias, "leaky_relu", 0.2, 0.3, s, o),
              FG.linear_act(x, w, bias, "leaky_relu", 0.2, 0.3, True, s, o)):
        got.append((y, *torch.autograd.grad((y * y).sum(), (x, w, bias))))
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    r, f = x[:, :1], x[:, 1:2]
    got = []
    for loss in (torch.ops.fastgan.gan_bce(r, f, 0.9, 0.0)[0], FG.gan_bce_d(r, f, 0.1).loss):
        got.append((loss, *torch.autograd.grad(3 * loss, x)))
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_meta_tensors_take_the_registered_op():
    """Off plain eager tensors the Functions call the registered ops (here: their
    fakes), not the bodies: no backend function is dispatched."""
    before = dict(backend.calls)
    s = torch.zeros(1, dtype=torch.int64, device="meta")
    x = torch.empty(4, 6, device="meta", requires_grad=True)
    w = torch.empty(5, 6, device="meta", requires_grad=True)
    y = FG.linear_act(x, w, None, "relu", 0.0, 0.0, True, s, s)
    assert y.shape == (4, 5) and y.device.type == "meta"
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    assert dx.shape == x.shape and dw.shape == w.shape
    loss = FG.gan_bce_g(y[:, :1]).loss
    assert loss.shape == () and loss.device.type == "meta"
    assert dict(backend.calls) == before


@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_gradcheck_float64(name):
    require(name, "cpu")
    x, w, bias, g, beta, rm, rv, nbt, tr, m, eps, act, slope, p, s, o = _bn_args("cpu", torch.float64)
    leaves = [t.requires_grad_(True) for t in (x, w, bias, g, beta)]

    def f_bn(x, w, bias, g, beta):
        return FG.linear_bn_act(x, w, bias, g, beta, rm.clone(), rv.clone(), nbt.clone(), True,
                                0.1, 1e-5, "leaky_relu", 0.2, 0.3, s, o)

    def f_act(x, w, bias):
        return FG.linear_act(x, w, bias, "tanh", 0.2, 0.3, True, s, o)

    with ran(name, "linear_bn_act_backward", "linear_act_backward", "gan_bce_forward"):
        assert torch.autograd.gradcheck(f_bn, tuple(leaves))
        assert torch.autograd.gradcheck(f_act, tuple(leaves[:3]))
        r = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a: FG.gan_bce_g(a).loss, (r,))


@pytest.mark.parametrize("bd", ALL)
def test_compile_fullgraph_no_graph_break(bd):
    backend, device = bd
    require(backend, device)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(fnn.LinearBNAct(6, 8, dropout=0.2),
                                fnn.LinearAct(8, 3, activation="tanh")).to(device)
    eager = torch.nn.Sequential(fnn.LinearBNAct(6, 8, dropout=0.2),
                                fnn.LinearAct(8, 3, activation="tanh")).to(device)
    eager.load_state_dict(model.state_dict())
    fnn.seed_dropout(model, 3)
    fnn.seed_dropout(eager, 3)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 6, device=device)
    with ran(backend, "linear_bn_act_forward", "linear_bn_act_backward"):
        y = compiled(x)
        y.sum().backward()
        ye = eager(x)
        ye.sum().backward()
    torch.testing.assert_close(y, ye)
    torch.testing.assert_close(model[0][0].weight.grad, eager[0][0].weight.grad)
    torch.testing.assert_close(model[0][1].running_var, eager[0][1].running_var)
    # Dropout advanced its device-side counter inside the compiled graph too.
    assert torch.equal(model[0].dropout_rng, eager[0].dropout_rng)
    assert int(model[0].dropout_rng[1]) == 1


def test_compile_one_tensor_as_two_arguments():
    """Dynamo cannot trace Function.apply with one tensor passed twice; the
    functional ops go through the registered op under torch.compile."""
    torch._dynamo.reset()
    z = torch.zeros(1, dtype=torch.int64)   # seed and offset: the same tensor
    x = torch.randn(6, 4).t().requires_grad_(True)  # strided too
    w = torch.randn(5, 6, requires_grad=True)

    def f(x, w):
        y = FG.linear_act(x, w, None, "tanh", 0.0, 0.0, True, z, z)
        return y.sum() + FG.gan_bce_d(y[:, :1], y[:, :1]).loss

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w)
    (gx,) = torch.autograd.grad(got, x)
    want = f(x, w)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, torch.autograd.grad(want, x)[0])
