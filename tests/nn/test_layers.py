"""Fused modules and models: state_dict compatibility with plain PyTorch both
ways, the fused GAN training exactly like the reference GAN, dropout streams
governed by torch's generator, and the children rule (their flags, edits,
hooks, dtypes and hyper-parameters)."""
from contextlib import nullcontext

import pytest
import torch
from torch import nn

import fastgan
from fastgan import functional as FG
from fastgan import nn as fnn
from fastgan.models import Discriminator, Generator
from helpers import ran


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


def _sgd(model):
    # SGD, not Adam: Adam's first steps move each weight by about lr whatever its
    # gradient's size, so a gradient within rounding of zero whose sign differs
    # between two GEMM kernels (the plain layers' and the fused op's calls of the
    # same BLAS) moves that weight by up to 2 lr; over 5 steps that reached 8e-5 in
    # G's loss on an AVX2 CPU, from identical first steps. SGD keeps an ulp an ulp.
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)


def _train(g, d, steps, batch=16, seed=0):
    torch.manual_seed(seed)
    real = torch.rand(steps, batch, 784) * 2 - 1
    z = torch.randn(steps, batch, 100)
    g_opt, d_opt = _sgd(g), _sgd(d)
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
    """Same seed and weights, dropout off: same losses and parameters after 5 SGD steps,
    every layer on its fused op (forced: the speed rule would run small ones plain)."""
    if name not in fastgan.backends():
        pytest.skip(f"backend {name} unavailable: {fastgan.unavailable().get(name)}")
    torch.manual_seed(1)
    g_ref, d_ref = Generator(dropout=0.0, fused=False), Discriminator(dropout=0.0, fused=False)
    g, d = Generator(dropout=0.0), Discriminator(dropout=0.0)
    g.load_state_dict(g_ref.state_dict())
    d.load_state_dict(d_ref.state_dict())
    # The plain-PyTorch GAN uses torch's own BCE-with-logits loss.
    torch.manual_seed(0)
    real = torch.rand(5, 16, 784) * 2 - 1
    z = torch.randn(5, 16, 100)
    bce = nn.functional.binary_cross_entropy_with_logits
    g_opt, d_opt = _sgd(g_ref), _sgd(d_ref)
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
    before = dict(fastgan.backend.calls)
    with fastgan.use_backend(name), fnn.fused_path("fused"):
        losses = _train(g, d, 5)
    assert fastgan.backend.calls[(name, "linear_bn_act_backward")] > \
        before.get((name, "linear_bn_act_backward"), 0)
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


# ------------------------------------------------------------------ dropout RNG
def _model(seed, **kw):
    torch.manual_seed(seed)
    return nn.Sequential(fnn.LinearBNAct(6, 8, dropout=0.5, **kw), fnn.LinearAct(8, 7, dropout=0.5))


def test_manual_seed_governs_fused_dropout():
    """The same model built twice under one seed gives the same fused outputs,
    call after call, as nn.Dropout does; another seed gives other masks."""
    x = torch.randn(5, 6)
    runs = []
    for seed in (0, 0, 1):
        m = _model(seed)
        runs.append([m(x) for _ in range(3)])
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[2][0])
    assert not torch.equal(runs[0][0], runs[0][1])  # each forward a fresh mask


def test_layers_of_one_model_draw_different_streams():
    m = _model(0)
    m(torch.randn(5, 6))
    assert m[0].dropout_rng[0] != m[1].dropout_rng[0]


def test_the_seed_is_drawn_at_the_first_forward_that_drops():
    """Building and eval forwards draw nothing from torch's generator (the
    weights of a fused model equal the plain model's under one seed, see
    test_building_a_fused_model_consumes_no_extra_randomness); the first
    training forward with dropout draws one number, so what the user draws
    next differs by exactly that."""
    m = _model(0)
    x = torch.randn(5, 6)
    m.eval()
    m(x)
    state = torch.get_rng_state()
    m.train()
    m(x)
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    torch.randint(0, 2**62, (1,))
    torch.randint(0, 2**62, (1,))  # one draw per layer
    assert torch.equal(after, torch.get_rng_state())
    m(x)  # later forwards advance on the device only
    assert torch.equal(after, torch.get_rng_state())


def test_the_first_draw_reads_nothing_on_the_host(monkeypatch):
    """The lazy draw is a device op (a CUDA graph could hold it): no .item(),
    .tolist(), .cpu() or int() of a tensor while it happens."""
    m = _model(0)

    def refuse(*a, **k):
        raise AssertionError("host read during the dropout seed draw")
    for name in ("item", "tolist", "cpu", "__int__", "__index__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    m[1].dropout_key(0.5)  # first use: draw, then the key
    monkeypatch.undo()
    assert m[1]._dropout_seeded


def test_seed_dropout_overrides_the_draw():
    x = torch.randn(5, 6)
    outs = []
    for seed in (0, 1):
        m = _model(seed)
        fnn.seed_dropout(m, 42)
        m.load_state_dict(_model(0).state_dict())
        outs.append(m(x))
    assert torch.equal(*outs)


def test_dropout_rng_state_round_trip_in_a_fresh_model():
    """A checkpoint's dropout_rng_state restored into a model that never ran
    continues the stream (it is not replaced by a draw at the first forward)."""
    x = torch.randn(5, 6)
    a = _model(0)
    a(x)
    state = fnn.dropout_rng_state(a)
    want = a(x)
    b = _model(1)
    b.load_state_dict(a.state_dict())
    fnn.set_dropout_rng_state(b, state)
    assert torch.equal(b(x), want)


# ------------------------------------------------------------------ the children rule
def test_eval_on_the_dropout_child_alone_turns_dropout_off():
    layer = fnn.LinearAct(6, 8, dropout=0.5)
    plain = layer.to_sequential()
    layer[2].eval()
    x = torch.randn(5, 6)
    assert layer.training and layer.dropout_p() == 0.0
    torch.testing.assert_close(layer(x), plain[1](plain[0](x)))
    bn_layer = fnn.LinearBNAct(6, 8, dropout=0.5)
    bn_layer[3].eval()
    ref = bn_layer.to_sequential()
    torch.testing.assert_close(bn_layer(x), ref(x))  # batch statistics, no dropout


def test_eval_on_the_batchnorm_child_alone_uses_running_stats():
    layer = fnn.LinearBNAct(6, 8)
    with torch.no_grad():
        layer[1].running_mean.uniform_(-1, 1)
        layer[1].running_var.uniform_(0.5, 2)
    layer[1].eval()
    ref = layer.to_sequential()
    x = torch.randn(5, 6)
    before = layer[1].running_mean.clone()
    torch.testing.assert_close(layer(x), ref(x))
    assert torch.equal(layer[1].running_mean, before)


def test_double_after_construction():
    """model.double() gives fp64 everywhere (BN too); half dtypes keep BN fp32."""
    layer = fnn.LinearBNAct(4, 3, dropout=0.2).double()
    assert layer[1].weight.dtype == torch.float64 and layer[1].running_var.dtype == torch.float64
    x = torch.randn(5, 4, dtype=torch.float64)
    assert layer(x).dtype == torch.float64
    layer.float()
    assert layer[0].weight.dtype == layer[1].weight.dtype == torch.float32
    layer.half()
    assert layer[0].weight.dtype == torch.float16 and layer[1].weight.dtype == torch.float32
    built = fnn.LinearBNAct(4, 3, dtype=torch.float64)
    assert built[1].weight.dtype == torch.float64
    assert fnn.linear_bn_act_sequential(4, 3, dtype=torch.float64)(x).dtype == torch.float64


@pytest.mark.parametrize("edit", ["append", "setitem", "insert", "swap_act", "delete"])
def test_structural_edits_take_effect(edit):
    """Edits of the children after construction are never ignored: the layer
    runs what its children now are (fusing the leading ones that still fit)."""
    torch.manual_seed(0)
    layer = fnn.LinearBNAct(6, 8) if edit == "setitem" else fnn.LinearAct(6, 8)
    if edit == "append":
        layer.append(nn.Sigmoid())
    elif edit == "setitem":
        layer[3] = nn.Sigmoid()
    elif edit == "insert":
        layer.insert(1, nn.Tanh())   # Linear, Tanh, LeakyReLU: fuses Linear+Tanh
    elif edit == "swap_act":
        layer[1] = nn.ReLU()
    else:
        del layer[1]                 # a bare Linear: runs as itself
    ref = nn.Sequential(*layer)
    x = torch.randn(5, 6)
    torch.testing.assert_close(layer(x), ref(x))
    plan = layer.plan()
    assert plan.n == {"append": 2, "setitem": 3, "insert": 2, "swap_act": 2, "delete": 0}[edit]


def test_children_with_hooks_run_as_themselves():
    layer = fnn.LinearAct(6, 8, dropout=0.0)
    seen = []
    h = layer[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(5, 6)
    y = layer(x)
    assert seen == [(5, 8)]
    h.remove()
    torch.testing.assert_close(y, layer.to_sequential()(x))
    layer(x)  # fused again
    assert seen == [(5, 8)]


@pytest.mark.parametrize("api", ["old", "parametrize"])
def test_spectral_norm_on_the_linear_takes_effect(api):
    torch.manual_seed(0)
    layer = fnn.LinearAct(6, 8, dropout=0.0)
    if api == "old":
        nn.utils.spectral_norm(layer[0])
    else:
        nn.utils.parametrizations.spectral_norm(layer[0])
    x = torch.randn(5, 6)
    layer.eval()  # no power iteration: both runs see the same normalized weight
    y = layer(x)
    torch.testing.assert_close(y, nn.functional.leaky_relu(layer[0](x), 0.2))
    y.sum().backward()
    orig = layer[0].weight_orig if api == "old" else \
        layer[0].parametrizations.weight.original
    assert orig.grad is not None and orig.grad.abs().sum() > 0


@pytest.mark.parametrize("kw,match", [
    (dict(dropout=-0.1), "dropout p must be in"), (dict(dropout=float("nan")), "dropout p"),
    (dict(dropout=1.0), "dropout p"), (dict(negative_slope=-0.2), "negative_slope"),
    (dict(negative_slope=float("inf")), "negative_slope"), (dict(activation="gelu"), "activation"),
    (dict(dropout="0.1"), "dropout p must be a float"),
])
@pytest.mark.parametrize("cls", [fnn.LinearAct, fnn.LinearBNAct])
def test_hyper_parameters_rejected_at_construction(cls, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cls(4, 3, **kw)


@pytest.mark.parametrize("kw,match", [(dict(eps=0.0), "eps"), (dict(eps=float("nan")), "eps"),
                                      (dict(momentum=1.5), "momentum")])
def test_batchnorm_hyper_parameters_rejected_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        fnn.LinearBNAct(4, 3, **kw)


def test_from_sequential_rejects_what_the_op_cannot_run():
    with pytest.raises(ValueError, match="negative_slope"):
        fnn.LinearAct.from_sequential(nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(-0.1)))
    with pytest.raises(ValueError, match="needs children"):
        fnn.LinearAct.from_sequential(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Tanh()))
    with pytest.raises(ValueError, match="not a fusable activation"):
        fnn.LinearBNAct.from_sequential(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4),
                                                      nn.GELU(), nn.Dropout(0.1)))


def test_a_deep_copy_replays_the_original_masks():
    """copy.deepcopy gives a clone that behaves as the original, before the
    first draw (the copies share the seed to be drawn) and after it."""
    import copy
    x = torch.randn(5, 6)
    for warm in (False, True):
        m = _model(0)
        if warm:
            m(x)
        twin = copy.deepcopy(m)
        for _ in range(2):
            assert torch.equal(m(x), twin(x))


def test_global_module_hooks_keep_the_layer_fused():
    """A hook for every module (FlopCounterMode's tracker, profilers) sees the
    fused layer's own call; it does not turn the layer plain."""
    layer = fnn.LinearAct(6, 8)
    seen = []
    h = nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m)))
    try:
        with ran("cpu", "linear_act_forward") if "cpu" in fastgan.backends() else nullcontext():
            layer(torch.randn(5, 6))
    finally:
        h.remove()
    assert seen == [fnn.LinearAct]


@pytest.mark.slow
def test_compile_draws_the_seed_lazily_too():
    """Under torch.compile(fullgraph=True) the first training forward draws the
    seed from torch's generator as in eager code."""
    torch._dynamo.reset()
    x = torch.randn(4, 6)
    outs = []
    for compiled in (True, False):
        m = _model(0)
        run = torch.compile(m, fullgraph=True, backend="aot_eager") if compiled else m
        torch.manual_seed(5)
        outs.append((run(x), m[0].dropout_rng.clone()))
    assert torch.equal(outs[0][1], outs[1][1])
    torch.testing.assert_close(outs[0][0], outs[1][0])


def test_a_fused_layer_pickles_after_running():
    """torch.save of a whole model (its plan is a cache, rebuilt after loading)."""
    import io
    layer = fnn.LinearBNAct(4, 3, dropout=0.2)
    layer(torch.randn(5, 4))
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(5, 4)
    assert torch.equal(loaded(x), layer(x))  # the same stream, continued
    loaded.append(nn.Sigmoid())
    assert loaded(x).min() >= 0
