"""The reference backend against eager torch.nn, and its Philox RNG against
published Philox4x32-10 answers. Everything else is tested against it."""
import pytest
import torch
from torch import nn

from fastgan import functional as FG
from fastgan import reference as R
from helpers import ran


def _u32(*vals):
    return [torch.tensor([v], dtype=torch.int64) for v in vals]


@pytest.mark.parametrize("ctr,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(ctr, key, expected):
    """Random123's known-answer vectors for Philox4x32-10."""
    out = R.philox4x32(*_u32(*ctr), *_u32(*key))
    assert [int(o) for o in out] == list(expected)


def test_uniform_range_and_mean():
    u = R.philox_uniform(torch.tensor([123]), torch.tensor([0]), 100_000)
    assert u.dtype == torch.float32 and 0 <= u.min() and u.max() < 1
    assert abs(u.double().mean().item() - 0.5) < 0.005


def test_offset_and_seed_select_disjoint_streams():
    a = R.philox_uniform(torch.tensor([1]), torch.tensor([0]), 1000)
    b = R.philox_uniform(torch.tensor([1]), torch.tensor([1]), 1000)
    c = R.philox_uniform(torch.tensor([2]), torch.tensor([0]), 1000)
    d = R.philox_uniform(torch.tensor([1]), torch.tensor([2**32]), 1000)
    assert not torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def _eager(b, k, n, momentum, act=None):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(k, n), nn.BatchNorm1d(n, momentum=momentum),
                        act or nn.LeakyReLU(0.2)).double()
    with torch.no_grad():
        seq[1].weight.uniform_(0.5, 1.5)
        seq[1].bias.uniform_(-0.5, 0.5)
    return seq


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("act,name", [(nn.LeakyReLU(0.2), "leaky_relu"), (nn.ReLU(), "relu"),
                                      (nn.Tanh(), "tanh"), (nn.Identity(), "identity")])
def test_linear_bn_act_equals_eager(momentum, training, act, name):
    b, k, n = 6, 11, 7
    seq = _eager(b, k, n, momentum, act)
    seq.train(training)
    lin, bn = seq[0], seq[1]
    params = [p.detach().clone().requires_grad_() for p in (lin.weight, lin.bias, bn.weight, bn.bias)]
    stats = [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone().view(1)]
    zero = torch.zeros(1, dtype=torch.int64)
    for _ in range(3):
        x = torch.randn(b, k, dtype=torch.float64)
        xr = x.clone().requires_grad_()
        xe = x.clone().requires_grad_()
        with ran("reference", "linear_bn_act_forward", "linear_bn_act_backward"):
            y = FG.linear_bn_act(xr, *params, *stats, training, momentum, bn.eps, name, 0.2, 0.0,
                                 zero, zero)
            y.sum().backward()
        ye = seq(xe)
        ye.sum().backward()
        torch.testing.assert_close(y, ye)
        torch.testing.assert_close(xr.grad, xe.grad)
    for p, q in zip(params, (lin.weight, lin.bias, bn.weight, bn.bias)):
        torch.testing.assert_close(p.grad, q.grad)
    torch.testing.assert_close(stats[0], bn.running_mean)
    torch.testing.assert_close(stats[1], bn.running_var)
    assert int(stats[2]) == int(bn.num_batches_tracked)


def test_dropout_equals_eager_with_the_same_mask():
    b, k, n, p = 8, 5, 13, 0.3
    x = torch.randn(b, k, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    seed, off = torch.tensor([77]), torch.tensor([5])
    with ran("reference", "linear_act_forward"):
        y = FG.linear_act(x, w, None, "leaky_relu", 0.2, p, True, seed, off)
    keep = R.dropout_keep_mask(seed, off, (b, n), p)
    expected = torch.nn.functional.leaky_relu(x @ w.t(), 0.2) * keep / (1 - p)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    xe = x.detach().clone().requires_grad_()
    (torch.nn.functional.leaky_relu(xe @ w.detach().t(), 0.2) * keep / (1 - p)).sum().backward()
    torch.testing.assert_close(x.grad, xe.grad)


def test_gradcheck_reference():
    torch.manual_seed(0)
    b, k, n = 4, 5, 3
    x = torch.randn(b, k, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n, dtype=torch.float64, requires_grad=True)
    g = torch.rand(n, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(n, dtype=torch.float64, requires_grad=True)
    s, o = torch.tensor([3]), torch.tensor([4])

    def f_bn(x, w, bias, g, beta):
        rm, rv = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
        nbt = torch.zeros(1, dtype=torch.int64)
        return FG.linear_bn_act(x, w, bias, g, beta, rm, rv, nbt, True, 0.1, 1e-5, "tanh", 0.2,
                                0.3, s, o)

    def f_act(x, w, bias):
        return FG.linear_act(x, w, bias, "tanh", 0.2, 0.3, True, s, o)

    with ran("reference", "linear_bn_act_backward", "linear_act_backward"):
        assert torch.autograd.gradcheck(f_bn, (x, w, bias, g, beta))
        assert torch.autograd.gradcheck(f_act, (x, w, bias))
    r = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: FG.gan_bce_d(a, b, 0.1).loss,
                                    (r, r.detach().clone().requires_grad_()))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_update_running_stats_is_batchnorm1d_update(momentum):
    """The public helper fastgan.distributed reuses: nn.BatchNorm1d's update, with the
    row count given as an int or as a tensor (the synchronized path's global count)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(5, momentum=momentum)
    for count_as_tensor in (False, True):
        rm, rv, nbt = bn.running_mean.clone(), bn.running_var.clone(), torch.tensor([0])
        bn_ref = nn.BatchNorm1d(5, momentum=momentum)
        for _ in range(3):
            h = torch.randn(6, 5)
            var, mean = torch.var_mean(h, dim=0, correction=0)
            count = torch.tensor([6.0], dtype=torch.float64) if count_as_tensor else 6
            R.update_running_stats(rm, rv, nbt, mean, var.double() if count_as_tensor else var,
                                   count, momentum)
            bn_ref(h)
        torch.testing.assert_close(rm, bn_ref.running_mean)
        torch.testing.assert_close(rv, bn_ref.running_var)
        assert rm.dtype == rv.dtype == torch.float32 and int(nbt) == 3


@pytest.mark.parametrize("name", ["identity", "relu", "leaky_relu", "tanh"])
def test_act_backward_is_autograd_in_fp64(name):
    """g * act'(z) in z's dtype: fp64 keeps the slope in fp64 (not rounded to fp32)."""
    z = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 7, dtype=torch.float64)
    R.act(z, name, 0.2).backward(g)
    got = R.act_backward(g, z.detach(), name, 0.2)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, z.grad, rtol=1e-15, atol=0)


def test_apply_dropout_uses_the_op_mask():
    a = torch.randn(6, 9)
    seed, offset = torch.tensor([5]), torch.tensor([2])
    assert R.apply_dropout(a, 0.0, seed, offset) is a
    keep = R.dropout_keep_mask(seed, offset, (6, 9), 0.4)
    torch.testing.assert_close(R.apply_dropout(a, 0.4, seed, offset),
                               torch.where(keep, a * R.dropout_scale(0.4), 0.0), rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_differentiable_grads_are_autograd_of_the_forward(training, p):
    """The ``*_grads`` formulas (what double backward differentiates) equal
    autograd of the reference forward, in fp64, with the forward's mask."""
    torch.manual_seed(0)
    d = dict(dtype=torch.float64)
    x, w, b = (torch.randn(*s, **d, requires_grad=True) for s in ((6, 5), (4, 5), (4,)))
    g = (torch.rand(4, **d) + 0.5).requires_grad_(True)
    beta = torch.randn(4, **d, requires_grad=True)
    stats = torch.randn(4, **d), torch.rand(4, **d) + 0.5, torch.zeros(1, dtype=torch.int64)
    s, o = torch.tensor([5]), torch.tensor([2])
    keep = R.apply_dropout(torch.ones(6, 4), p, s, o) if p else None
    y, h, mean, rstd = R.linear_bn_act_forward(x, w, b, g, beta, *stats, training, 0.1, 1e-5,
                                               "tanh", 0.0, p, s, o)
    gy = torch.randn_like(y)
    want = torch.autograd.grad(y, (x, w, b, g, beta), gy)
    got = R.linear_bn_act_grads(gy, x, w, b, g, beta, mean, rstd, training, 1e-5, "tanh", 0.0,
                                keep, True)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    y = R.linear_act_forward(x, w, b, "leaky_relu", 0.2, p, s, o)
    want = torch.autograd.grad(y, (x, w, b), gy)
    for a, e in zip(R.linear_act_grads(gy, x, w, b, "leaky_relu", 0.2, keep, True), want):
        torch.testing.assert_close(a, e)
    loss = R.gan_bce_forward(x[:, :1], x[:, 1:2], 0.9, 0.0)[0]
    want = torch.autograd.grad(3 * loss, x)[0][:, :2]
    got = R.gan_bce_grads(torch.tensor(3.0, **d), x[:, :1], x[:, 1:2], 0.9, 0.0, True)
    torch.testing.assert_close(torch.cat(got, 1), want)
