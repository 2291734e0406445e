"""Double backward (gradient penalties) through every fused op on every backend.

The kernels return first-order gradients as numbers; when a backward builds a
graph (``create_graph=True``) the ops' autograd Functions compute the gradient
with the reference's differentiable formulas instead, with the forward's own
dropout mask. Checked here: ``gradgradcheck`` in fp64 (reference and cpu),
R1 and WGAN-GP penalties in fp32 against plain PyTorch running the same masks
(cpu, and triton under the interpreter), and a WGAN-GP critic step on the
seed discriminator that runs fused.
"""
import contextlib
import copy
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgan
from fastgan import backend
from fastgan import functional as FG
from fastgan import nn as fnn
from fastgan import reference as R
from fastgan.models import Discriminator
from fastgan.ops.spec import dropout_scale
from helpers import CASES, ran, require

F64 = [pytest.param("reference", id="reference"), pytest.param("cpu", id="cpu")]
I64 = torch.int64


def _key(seed=11, offset=3):
    return torch.tensor([seed], dtype=I64), torch.tensor([offset], dtype=I64)


def _leaves(*shapes, dtype=torch.float64, scale=1.0):
    return tuple((torch.randn(*s, dtype=dtype) * scale).requires_grad_(True) for s in shapes)


# ------------------------------------------------------------------ gradgradcheck, fp64
@pytest.mark.parametrize("name", F64)
@pytest.mark.parametrize("activation", ["leaky_relu", "tanh"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradgradcheck_linear_act(name, activation, p):
    require(name, "cpu")
    torch.manual_seed(0)
    x, w, b = _leaves((5, 4), (3, 4), (3,))
    s, o = _key()

    def f(x, w, b):
        return FG.linear_act(x, w, b, activation, 0.2, p, True, s, o)

    with ran(name, "linear_act_forward"):
        assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("name", F64)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradgradcheck_linear_bn_act(name, training, p):
    require(name, "cpu")
    torch.manual_seed(0)
    x, w, b = _leaves((6, 4), (3, 4), (3,))
    gamma = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(True)
    beta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    nbt = torch.zeros(1, dtype=I64)
    s, o = _key()

    def f(x, w, b, gamma, beta):
        # fresh statistics per call: training forwards update them in place
        return FG.linear_bn_act(x, w, b, gamma, beta, rm.clone(), rv.clone(), nbt.clone(),
                                training, 0.1, 1e-5, "tanh", 0.0, p, s, o)

    with ran(name, "linear_bn_act_forward"):
        assert torch.autograd.gradgradcheck(f, (x, w, b, gamma, beta))


@pytest.mark.parametrize("name", F64)
def test_gradgradcheck_gan_bce(name):
    require(name, "cpu")
    torch.manual_seed(0)
    r, f = _leaves((5, 1), (7, 1), scale=2.0)
    with ran(name, "gan_bce_forward"):
        assert torch.autograd.gradgradcheck(lambda r, f: FG.gan_bce_d(r, f, 0.1).loss, (r, f))
        assert torch.autograd.gradgradcheck(lambda f: FG.gan_bce_g(f).loss, (f,))


@pytest.mark.parametrize("name", F64)
def test_gradgradcheck_registered_ops(name):
    """torch.ops.fastgan.* differentiate twice through the same formula."""
    require(name, "cpu")
    torch.manual_seed(0)
    x, w, b = _leaves((5, 4), (3, 4), (3,))
    s, o = _key()
    with ran(name, "linear_act_forward", "gan_bce_forward"):
        assert torch.autograd.gradgradcheck(
            lambda x, w, b: torch.ops.fastgan.linear_act(x, w, b, "tanh", 0.0, 0.3, s, o),
            (x, w, b))
        assert torch.autograd.gradgradcheck(
            lambda a: torch.ops.fastgan.gan_bce(a, None, 1.0, 0.0)[0], (x,))


@pytest.mark.parametrize("bd", CASES)
def test_gan_bce_second_derivative_is_torch_bce(bd):
    """Hessian-vector products of both losses equal torch's BCE-with-logits'
    (not zero, as when the backward was the forward's saved gradient)."""
    name, device = bd
    require(name, device)
    torch.manual_seed(0)
    r = torch.randn(6, 1, device=device, requires_grad=True)
    f = torch.randn(5, 1, device=device, requires_grad=True)
    v = torch.randn(6, 1, device=device), torch.randn(5, 1, device=device)

    def hvp(loss):
        grads = torch.autograd.grad(loss, (r, f), create_graph=True, materialize_grads=True)
        dot = sum((g * u).sum() for g, u in zip(grads, v))
        return torch.autograd.grad(dot, (r, f), materialize_grads=True)

    bce = F.binary_cross_entropy_with_logits
    with ran(name, "gan_bce_forward"):
        got_d = hvp(FG.gan_bce_d(r, f, 0.1).loss)
        got_g = hvp(FG.gan_bce_g(f).loss)
    want_d = hvp(bce(r, torch.full_like(r, 0.9)) + bce(f, torch.zeros_like(f)))
    want_g = hvp(bce(f, torch.ones_like(f)))
    assert got_d[0].abs().sum() > 0
    for a, b in zip(got_d + got_g, want_d + want_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ penalties, fp32
class _Masks(nn.Module):
    """Dropout with given masks, one per forward in order (the plain twin's)."""

    def __init__(self, masks):
        super().__init__()
        self.masks = list(masks)

    def forward(self, y):
        return y * self.masks.pop(0)


def plain_twin(model: nn.Sequential, batch: int, forwards: int) -> nn.Sequential:
    """The plain nn.Sequential of ``model``'s fused layers' children (the same
    parameters), each Dropout replaced by the masks the layer draws in its next
    ``forwards`` training forwards (from its seeded stream, by the reference)."""
    plain = []
    for layer in model:
        kids = list(layer)
        drop = kids[-1]
        if isinstance(drop, nn.Dropout) and drop.p > 0:
            seed, counter = layer.dropout_rng.tolist()
            n = kids[0].out_features
            masks = [R.dropout_keep_mask(torch.tensor([seed]), torch.tensor([counter + i]),
                                         (batch, n), drop.p).float() * dropout_scale(drop.p)
                     for i in range(forwards)]
            kids[-1] = _Masks([m.to(layer.dropout_rng.device) for m in masks])
        plain += kids
    return nn.Sequential(*plain)


def critic(kind: str, device: str) -> nn.Sequential:
    torch.manual_seed(0)
    first = (fnn.LinearBNAct(6, 9, dropout=0.25) if kind == "bn"
             else fnn.LinearAct(6, 9, dropout=0.25))
    model = nn.Sequential(first, fnn.LinearAct(9, 5, activation="tanh", dropout=0.3),
                          fnn.LinearAct(5, 1, activation="identity")).to(device)
    fnn.seed_dropout(model, 7)
    return model


def r1(model, real):
    x = real.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    return g.pow(2).sum(1).mean(), g


def wgan_gp(model, real, fake, eps):
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (g,) = torch.autograd.grad(model(x_hat).sum(), x_hat, create_graph=True)
    gp = ((g.pow(2).sum(1) + 1e-12).sqrt() - 1).pow(2).mean()
    return model(fake).mean() - model(real).mean() + 10 * gp, g


def _grads(model):
    """Each parameter's gradient; None where the loss does not depend on it."""
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("bd", CASES)
@pytest.mark.parametrize("kind", ["bn", "no-bn"])
@pytest.mark.parametrize("penalty", ["r1", "wgan-gp"])
def test_penalty_matches_plain_torch(bd, kind, penalty):
    """Penalty value, input gradient and every parameter's gradient equal plain
    PyTorch's on the same weights and dropout masks (fp32)."""
    name, device = bd
    require(name, device)
    model = critic(kind, device)
    b = 5
    torch.manual_seed(1)
    real, fake = torch.randn(b, 6, device=device), torch.randn(b, 6, device=device)
    eps = torch.rand(b, 1, device=device)
    forwards = 1 if penalty == "r1" else 3
    twin = plain_twin(model, b, forwards)
    run = (lambda m: r1(m, real)) if penalty == "r1" else (lambda m: wgan_gp(m, real, fake, eps))
    # R1's gradient reaches back through the first layer's output only (the
    # identity head's input gradient does not depend on its input): that
    # layer's first-order backward runs; WGAN-GP's loss runs all of them.
    first = "linear_bn_act" if kind == "bn" else "linear_act"
    fused_fns = ["linear_act_forward", f"{first}_forward", f"{first}_backward"]
    if penalty == "wgan-gp":
        fused_fns.append("linear_act_backward")
    with ran(name, *fused_fns):
        loss, g = run(model)
        loss.backward()
    got = _grads(model)
    model.zero_grad()
    want_loss, want_g = run(twin)
    want_loss.backward()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, want_g, rtol=1e-5, atol=1e-6)
    for (k, _), a, w in zip(model.named_parameters(), got, _grads(twin)):
        assert (a is None) == (w is None), k
        if a is not None:
            torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5, msg=k)


def test_create_graph_uses_the_differentiable_formulas_and_first_order_the_kernels():
    """A gradient with create_graph=True calls no backend backward function (its
    kernels give numbers, not graphs); a plain backward does."""
    require("cpu", "cpu")
    model = critic("bn", "cpu")
    x = torch.randn(4, 6, requires_grad=True)
    counted = ("linear_act_backward", "linear_bn_act_backward")
    before = {f: backend.calls[("cpu", f)] for f in counted}
    with fastgan.use_backend("cpu"):
        (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        assert {f: backend.calls[("cpu", f)] for f in counted} == before
        assert g.grad_fn is not None
        # the penalty's graph reaches the first layer's output: that layer's
        # first-order backward (a kernel) runs
        g.pow(2).sum().backward()
    assert backend.calls[("cpu", "linear_bn_act_backward")] > before["linear_bn_act_backward"]


def test_double_backward_under_autocast():
    """The differentiable backward recomputes in the forward's dtypes even when
    the penalty is taken inside the autocast region."""
    require("cpu", "cpu")
    model = critic("no-bn", "cpu")
    x = torch.randn(4, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (g,) = torch.autograd.grad(model(x).float().sum(), x, create_graph=True)
        pen = g.float().pow(2).sum()
    pen.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(pen) and len(grads) >= 4 and all(torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------ the seed D
def test_wgan_gp_step_on_the_seed_discriminator_runs_fused():
    """One WGAN-GP critic step (penalty, backward, Adam) on the seed D: its
    forwards and first-order backwards run on the cpu backend, and the weights
    after the step equal plain PyTorch's on the same masks."""
    require("cpu", "cpu")
    torch.manual_seed(0)
    D = Discriminator(in_dim=12, hidden=(16, 8), dropout=0.2)
    fnn.seed_dropout(D, 3)
    b = 6
    real, fake = torch.rand(b, 12) * 2 - 1, torch.rand(b, 12) * 2 - 1
    eps = torch.rand(b, 1)
    twin = plain_twin(copy.deepcopy(D.net), b, 3)  # its own weights: both take a step
    steps = []
    for model, runs in ((D, ran("cpu", "linear_act_forward", "linear_act_backward")),
                        (twin, contextlib.nullcontext())):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.0, 0.9))
        with runs:
            loss, _ = wgan_gp(model, real, fake, eps)
            opt.zero_grad()
            loss.backward()
        opt.step()
        steps.append([p.detach().clone() for p in model.parameters()])
    for a, w in zip(*steps):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)


def test_wgan_gp_benchmark_runs():
    """bench/bench_drop_in.py wgan-gp at a tiny size: both contenders run and the
    fused one dispatched its ops (no timing is asserted)."""
    require("cpu", "cpu")
    script = Path(__file__).resolve().parents[2] / "bench" / "bench_drop_in.py"
    bench = runpy.run_path(str(script))
    (row,) = bench["wgan_gp"](batches=(4,), samples=1, min_time_s=0.0)
    assert row["eager_ms"] > 0 and row["fastgan_ms"] > 0
    assert row["dispatched"].get("cpu.linear_act_forward", 0) > 0
    assert row["dispatched"].get("cpu.linear_act_backward", 0) > 0


def test_ghost_rows_refuse_double_backward():
    """The simultaneous step's ghost-row D has no differentiable backward: a
    gradient penalty through it raises instead of returning a wrong number."""
    require("cpu", "cpu")
    D = Discriminator(in_dim=12, hidden=(16, 8), dropout=0.0)
    x = torch.randn(6, 12, requires_grad=True)
    logits, ghost = D(x, ghost=x[:2])
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        torch.autograd.grad(logits.sum() + ghost.sum(), x, create_graph=True)
