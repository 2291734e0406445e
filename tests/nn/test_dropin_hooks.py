"""Hooks and parametrizations on the children of a fused run take effect.

Spectral norm (both APIs) and weight norm (both APIs) run inside the fused
call: the same weights, gradients and power-iteration state as plain
PyTorch. A hook that needs a child's own output, input or gradient keeps the
run plain while it is registered, and the report says so. Each test compares
against an untouched copy of the model, fused with ``only_if_faster=False``
so the kernels run (proved by the dispatch counters)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgan
from fastgan import backend
from fastgan.fuse import fuse

CPU_BACKENDS = [b for b in ("reference", "cpu") if b in fastgan.backends()]
ALL = dict(only_if_faster=False)


def op_calls():
    return sum(n for (_, f), n in backend.calls.items()
               if f in ("linear_act_forward", "linear_bn_act_forward"))


def discriminator(norm=None):
    """A D of the kind spectral norm is used on: Linear -> LeakyReLU -> Dropout twice."""
    torch.manual_seed(0)
    wrap = norm or (lambda m: m)
    return nn.Sequential(wrap(nn.Linear(12, 32)), nn.LeakyReLU(0.2), nn.Dropout(0.0),
                         wrap(nn.Linear(32, 16)), nn.LeakyReLU(0.2),
                         nn.Linear(16, 1))


NORMS = {
    "spectral_norm": nn.utils.spectral_norm,
    "parametrizations.spectral_norm": nn.utils.parametrizations.spectral_norm,
    "weight_norm": lambda m: nn.utils.weight_norm(m),
    "parametrizations.weight_norm": nn.utils.parametrizations.weight_norm,
}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_weight_norms_take_effect_in_the_fused_run(norm, backend_name):
    plain = discriminator(NORMS[norm])
    model, report = fuse(discriminator(NORMS[norm]), **ALL)   # (old weight_norm cannot deepcopy)
    assert [r.path for r in report.fused] == ["0", "3"]
    assert any("parametrized" in n or "pre-hook" in n for n in report.fused[0].notes)
    for _ in range(3):
        x = torch.randn(8, 12)
        before = op_calls()
        with fastgan.use_backend(backend_name):
            y = model(x)
            y.square().mean().backward()
        assert op_calls() == before + 2
        y_ref = plain(x)
        y_ref.square().mean().backward()
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        got, want = grads(model), grads(plain)
        # weight_orig / weight_g, weight_v / parametrizations.weight.original*: the norm's own
        assert got.keys() == want.keys() and any(k.split(".")[-1] not in ("weight", "bias")
                                                 for k in got)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)
        for (k, b), (_, b_ref) in zip(model.named_buffers(), plain.named_buffers()):
            torch.testing.assert_close(b, b_ref, msg=k)   # spectral norm's u, v
        with torch.no_grad():
            for p, q in zip(model.parameters(), plain.parameters()):
                p.sub_(0.1 * p.grad)
                q.sub_(0.1 * q.grad)
        model.zero_grad()
        plain.zero_grad()


def test_spectral_norm_applied_after_fuse_takes_effect():
    model, _ = fuse(discriminator(), **ALL)
    plain = copy.deepcopy(model)
    for m in (model, plain):
        nn.utils.parametrizations.spectral_norm(m[0])
    plain[0].load_state_dict(model[0].state_dict())
    x = torch.randn(4, 12)
    with fastgan.use_backend("reference"):
        y = model.eval()(x)
    torch.testing.assert_close(y, fastgan.unfuse(plain).eval()(x))


def test_forward_hook_is_called_and_the_run_stays_plain_while_registered():
    model, _ = fuse(discriminator(), **ALL)
    seen = []
    handle = model[0].register_forward_hook(lambda m, args, out: seen.append(out.detach()))
    _, report = fuse(model, **ALL)
    assert "a forward hook on 0 (Linear) needs its own output" in report.unfused[0].reason
    x = torch.randn(5, 12)
    before = op_calls()
    with fastgan.use_backend("reference"):
        model(x)
    assert op_calls() == before + 1          # the other run still fuses
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], F.linear(x, model[0].weight, model[0].bias).detach())
    handle.remove()
    with fastgan.use_backend("reference"):
        model(x)
    assert op_calls() == before + 3 and len(seen) == 1


def test_hook_registered_after_fuse_takes_effect():
    model, _ = fuse(discriminator(), **ALL)
    calls = []
    model[4].register_forward_hook(lambda m, args, out: calls.append(out.shape))
    with fastgan.use_backend("reference"):
        model(torch.randn(3, 12))
    assert calls == [torch.Size([3, 16])]


def test_full_backward_hook_sees_the_plain_gradients():
    plain = discriminator()
    model, _ = fuse(copy.deepcopy(plain), **ALL)
    got, want = [], []
    model[3].register_full_backward_hook(lambda m, gi, go: got.append(go[0].clone()))
    plain[3].register_full_backward_hook(lambda m, gi, go: want.append(go[0].clone()))
    _, report = fuse(model, **ALL)
    assert "backward hook on 3 (Linear)" in report.unfused[0].reason
    x = torch.randn(6, 12, requires_grad=True)
    with fastgan.use_backend("reference"):
        model(x).sum().backward()
    plain(x).sum().backward()
    assert len(got) == 1
    torch.testing.assert_close(got[0], want[0])


def test_forward_pre_hook_on_a_later_child_keeps_the_run_plain():
    model, _ = fuse(discriminator(), **ALL)
    model[1].register_forward_pre_hook(lambda m, args: (args[0] * 0,))
    before = op_calls()
    with fastgan.use_backend("reference"):
        y = model(torch.randn(3, 12))
    assert op_calls() == before + 1
    torch.testing.assert_close(y, model[5](F.leaky_relu(model[3](torch.zeros(3, 32)), 0.2)))


@pytest.mark.parametrize("with_kwargs", [False, True])
def test_forward_pre_hook_on_the_linear_runs_inside_the_fused_call(with_kwargs):
    plain = discriminator()
    model, _ = fuse(copy.deepcopy(plain), **ALL)
    for m in (model, plain):
        if with_kwargs:
            m[0].register_forward_pre_hook(lambda mod, args, kw: ((args[0] * 2,), kw),
                                           with_kwargs=True)
        else:
            m[0].register_forward_pre_hook(lambda mod, args: args[0] * 2)
    x = torch.randn(4, 12)
    before = op_calls()
    with fastgan.use_backend("reference"):
        y = model.eval()(x)
    assert op_calls() == before + 2
    torch.testing.assert_close(y, plain.eval()(x))


def test_global_module_hook_keeps_every_run_plain():
    model, _ = fuse(discriminator(), **ALL)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.append(type(m).__name__))
    try:
        _, report = fuse(model, **ALL)
        before = op_calls()
        model(torch.randn(3, 12))
        assert op_calls() == before and "global module hook" in report.unfused[0].reason
        assert seen.count("Linear") == 3
    finally:
        handle.remove()


def test_parametrized_batchnorm_weight():
    class Positive(nn.Module):
        def forward(self, w):
            return F.softplus(w)

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU())
    nn.utils.parametrize.register_parametrization(plain[1], "weight", Positive())
    model, report = fuse(copy.deepcopy(plain), **ALL)
    assert report.fused[0].op == "linear_bn_act"
    x = torch.randn(6, 5)
    with fastgan.use_backend("reference"):
        model(x).sum().backward()
    plain(x).sum().backward()
    torch.testing.assert_close(model[1].parametrizations.weight.original.grad,
                               plain[1].parametrizations.weight.original.grad)
