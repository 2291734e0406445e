"""The fused layers' plain fallback (issue 11): where the speed rule says the fused
op would lose, a fused layer runs its children's plain computation.

* which path ran, on both sides of the rule (a table patched for the test, so
  the thresholds are known) and under the switch ``fused_path``;
* either path matches the reference: the plain nn.Sequential without dropout,
  the fused op (same mask: the layer's stream) with dropout, values and
  gradients, fp32 and bf16, train and eval, BatchNorm1d or not;
* the dropout stream advances alike on both paths, so a run that switches
  paths draws the masks an all-fused run draws;
* the same errors on both paths; fuse and the layers read one rule.
"""
import copy

import pytest
import torch
from torch import nn

from fastgan import backend
from fastgan import nn as fnn
from fastgan.fuse import fuse
from fastgan.nn import layers
from fastgan.nn.fuse import speed
from helpers import GEMM_PATHS, require

BACKENDS = [pytest.param("cpu", id="cpu"), pytest.param("reference", id="reference")]


@pytest.fixture
def table(monkeypatch):
    """A rule for the ``cpu`` backend with known thresholds: fp32 and bf16 calls fuse
    from batch 16 and B*K*N >= 16 * 8 * 8, in every kind."""
    here = speed.hardware("cpu")
    rows = {(dt, gemm, here, bn, d, g): (16, 16 * 8 * 8) for dt in ("float32", "bfloat16")
            for gemm in GEMM_PATHS for bn in ("none", "train", "eval") for d in (False, True)
            for g in (False, True)}
    monkeypatch.setitem(speed.TABLE, "cpu", rows)
    speed.reset()
    yield rows
    speed.reset()


def _calls(name):
    return {f: backend.calls[(name, f)] for f in ("linear_act_forward", "linear_bn_act_forward",
                                                  "linear_act_backward",
                                                  "linear_bn_act_backward")}


def _ran(name, before):
    now = _calls(name)
    return {f for f in now if now[f] > before[f]}


def _layer(bn, p=0.2, dtype=None):
    torch.manual_seed(0)
    return (fnn.LinearBNAct(8, 8, dropout=p, dtype=dtype) if bn
            else fnn.LinearAct(8, 8, dropout=p, dtype=dtype))


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_the_rule_picks_the_path(table, bn, grad):
    require("cpu", "cpu")
    layer = _layer(bn)
    forward = "linear_bn_act_forward" if bn else "linear_act_forward"
    with backend.use_backend("cpu"), layers.fused_path("auto"), torch.set_grad_enabled(grad):
        for b, fused in ((4, False), (15, False), (16, True), (64, True)):
            x = torch.randn(b, 8, requires_grad=grad)
            before = _calls("cpu")
            layer(x)
            assert _ran("cpu", before) == ({forward} if fused else set()), b


@pytest.mark.parametrize("bn", [False, True])
def test_a_layer_follows_a_new_rule(table, monkeypatch, bn):
    """A layer keeps its last answer for the same kind of call (``layers._route``), and
    asks again after the rule changes (``speed.reset``: a new table, a new GEMM
    policy), after a switch of the path, and for another kind of call."""
    require("cpu", "cpu")
    layer = _layer(bn)
    forward = "linear_bn_act_forward" if bn else "linear_act_forward"
    x = torch.randn(4, 8)

    def fused():
        before = _calls("cpu")
        layer(x)
        return _ran("cpu", before) == {forward}
    with backend.use_backend("cpu"), layers.fused_path("auto"), torch.no_grad():
        assert not fused() and not fused()           # below the table's batch 16
        monkeypatch.setitem(speed.TABLE, "cpu", {k: (1, 0) for k in table})
        assert not fused()                           # (the same answer until reset)
        speed.reset()
        assert fused()
        with layers.fused_path("plain"):
            assert not fused()
        assert fused()
        monkeypatch.setitem(speed.TABLE, "cpu", table)
        speed.reset()
        assert not fused()
        layer.eval()                                 # eval: another kind of call
        assert not fused()
        # no row for calls without BatchNorm1d with active dropout (unmeasured: plain)
        monkeypatch.setitem(speed.TABLE, "cpu", {k: (1, 0) for k in table if k[3] != "none"
                                                 or k[4] is False})
        speed.reset()
        assert fused()                               # eval: no active dropout, fuses
        layer.train()
        assert fused() is bn                         # LinearAct with training dropout: plain


def test_the_rule_reads_dtype_dropout_and_grad(monkeypatch):
    """Each kind of call has its own row; a kind with no row runs plain on a backend
    that has a table (not measured), fused on one without (CUDA, no GPU measured)."""
    here = (speed.gemm("cpu", torch.float32), speed.hardware("cpu"))
    monkeypatch.setitem(speed.TABLE, "cpu", {("float32", *here, "none", True, True): (1, 0),
                                             ("float32", *here, "none", False, True): (10**6, 0)})
    speed.reset()
    try:
        assert speed.no_gain("cpu", torch.float32, 4, 8, 8, None, 0.2, True) is None
        assert speed.no_gain("cpu", torch.float32, 4, 8, 8, None, 0.0, True) is not None
        assert speed.no_gain("cpu", torch.float32, 4, 8, 8, None, 0.2, False) == \
            speed.UNMEASURED
        assert speed.no_gain("cpu", torch.float64, 4, 8, 8, None, 0.2, True) == \
            speed.UNMEASURED
        assert speed.no_gain("cuda", torch.float32, 1, 8, 8, None, 0.0, True,
                             name="triton") is None
        assert speed.no_gain("cpu", torch.float32, 4, 8, 8, None, 0.2, True,
                             name="reference") == speed.REFERENCE
    finally:
        speed.reset()


@pytest.mark.parametrize("path", ["fused", "plain"])
def test_the_switch_forces_either_path(table, path):
    require("cpu", "cpu")
    layer = _layer(False)
    with backend.use_backend("cpu"), layers.fused_path(path):
        assert layers.current_path() == path
        for b in (4, 64):
            before = _calls("cpu")
            layer(torch.randn(b, 8, requires_grad=True)).sum().backward()
            want = {"linear_act_forward", "linear_act_backward"} if path == "fused" else set()
            assert _ran("cpu", before) == want
    with pytest.raises(ValueError, match="path must be one of"):
        with layers.fused_path("fast"):
            pass


def test_the_environment_sets_the_path(monkeypatch):
    monkeypatch.setenv("FASTGAN_FUSED_PATH", "plain")
    assert layers.current_path() == "plain"
    monkeypatch.setenv("FASTGAN_FUSED_PATH", "auto")
    assert layers.current_path() == "auto"
    with layers.fused_path("fused"):
        assert layers.current_path() == "fused"   # the context wins


def _run(layer, x, gy, path, name):
    layer.seed_dropout(7)
    x = x.detach().clone().requires_grad_(True)
    with backend.use_backend(name), layers.fused_path(path):
        y = layer(x)
        y.backward(gy)
    grads = [x.grad] + [t.grad.clone() for t in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("p", [0.0, 0.2, 0.3])   # 1 / (1 - p): exact in bf16 at 0.2, not at 0.3
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_paths_match(name, bn, mode, p, dtype):
    """The plain path equals the fused op's result (same dropout mask), and without
    active dropout the plain nn.Sequential's, values and gradients."""
    require(name, "cpu")
    torch.manual_seed(0)
    layer = (fnn.LinearBNAct(7, 5, dropout=p, dtype=dtype) if bn
             else fnn.LinearAct(7, 5, dropout=p, dtype=dtype)).train(mode == "train")
    x = torch.randn(6, 7, dtype=dtype)
    gy = torch.randn(6, 5, dtype=dtype)
    seq = copy.deepcopy(layer.to_sequential())
    fused = _run(copy.deepcopy(layer), x, gy, "fused", name)
    plain = _run(layer, x, gy, "plain", name)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    for a, b in zip((plain[0], *plain[1]), (fused[0], *fused[1])):
        torch.testing.assert_close(a, b, **tol)
    assert torch.equal(plain[0] == 0, fused[0] == 0)   # the same mask
    if p == 0.0 or mode == "eval":
        xs = x.clone().requires_grad_(True)
        ys = seq(xs)
        ys.backward(gy)
        torch.testing.assert_close(plain[0], ys.detach(), rtol=0, atol=0)
        torch.testing.assert_close(plain[1][0], xs.grad, rtol=0, atol=0)


@pytest.mark.parametrize("bn", [False, True])
def test_a_run_that_switches_paths_draws_the_same_masks(bn):
    """Call t of a layer uses key t of its stream on either path: masks (and the
    stream's state) do not depend on which path earlier calls took."""
    require("cpu", "cpu")
    a, b = _layer(bn, p=0.5), _layer(bn, p=0.5)
    a.seed_dropout(11)
    b.seed_dropout(11)
    x = torch.randn(6, 8)
    with backend.use_backend("cpu"):
        for path in ("plain", "fused", "plain", "plain", "fused"):
            with layers.fused_path("fused"):
                ya = a(x)
            with layers.fused_path(path):
                yb = b(x)
            assert torch.equal(ya == 0, yb == 0), path
            torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    assert torch.equal(a.dropout_rng, b.dropout_rng)


@pytest.mark.parametrize("path", ["fused", "plain"])
def test_errors_are_the_same_on_both_paths(path):
    layer = _layer(True)
    with layers.fused_path(path):
        with pytest.raises(TypeError, match="weight must have dtype"):
            layer(torch.randn(4, 8, dtype=torch.float64))
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            layer(torch.randn(1, 8))
        layer[3].p = 1.5
        with pytest.raises(ValueError, match="dropout p must be in"):
            layer(torch.randn(4, 8))


def test_fuse_and_the_layers_read_one_rule(table):
    """The same kind of call gets the same answer from fuse's runs and the layers."""
    require("cpu", "cpu")
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 8), nn.LeakyReLU(0.2))
    model, _ = fuse(copy.deepcopy(plain))
    layer = _layer(False, p=0.0)
    with backend.use_backend("cpu"), layers.fused_path("auto"):
        for b in (4, 64):
            x = torch.randn(b, 8, requires_grad=True)
            before = _calls("cpu")
            model(x)
            by_fuse = _ran("cpu", before)
            before = _calls("cpu")
            layer(x)
            assert by_fuse == _ran("cpu", before) == ({"linear_act_forward"} if b >= 16
                                                      else set())


@pytest.mark.parametrize("bn", [False, True])
def test_a_forced_reference_backend_runs(bn):
    # The rule says the reference never gains when chosen automatically; forced (the
    # op benchmarks' fastgan-reference contender, gold runs) it is what runs.
    layer = _layer(bn)
    forward = "linear_bn_act_forward" if bn else "linear_act_forward"
    with backend.use_backend("reference"), layers.fused_path("auto"):
        before = _calls("reference")
        layer(torch.randn(4, 8))
        assert _ran("reference", before) == {forward}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.2, 0.3, 0.5])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 257), (5, 300)])
def test_cpu_dropout_mask_is_the_fused_mask(dtype, p, shape):
    """``cpu.dropout_mask`` (the plain path's mask on the CPU) equals the mask the
    cpu backend's fused op applies (its linear_act of two columns of ones, K = 1),
    element for element, and advances the stream by one key as ``next_key`` does."""
    require("cpu", "cpu")
    from fastgan.impl import cpu
    rows, cols = shape
    state = torch.tensor([123456789, 41], dtype=torch.int64)
    seed, offset = layers.next_key(state.clone())
    want = cpu.linear_act_forward(torch.ones(rows, 1), torch.ones(cols, 1), None, "identity",
                                  0.0, p, seed, offset)
    keep = cpu.dropout_mask(state, rows, cols, p, dtype)
    assert state.tolist() == [123456789, 42]
    exact = float(torch.tensor(1 / (1 - p), dtype=dtype)) == float(torch.tensor(1 / (1 - p)))
    assert keep.dtype == (dtype if exact else torch.float32)
    assert torch.equal(keep.float(), want)
    y = torch.randn(rows, cols, dtype=dtype)
    assert torch.equal(y * keep if keep.dtype == dtype else (y * keep).to(dtype),
                       (y.float() * want).to(dtype))   # one rounding of float(y) * scale


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_the_plain_path_draws_its_cpu_mask_in_one_call(monkeypatch, bn, grad):
    """On the CPU the plain path's mask comes from ``cpu.dropout_mask`` (not the
    K = 1 fused call of other devices), with and without autograd, and the
    result carries the fused path's mask."""
    require("cpu", "cpu")
    layer, twin = _layer(bn), _layer(bn)
    layer.seed_dropout(3)
    twin.seed_dropout(3)
    x = torch.randn(6, 8)

    def refuse(*args):
        raise AssertionError("the K = 1 mask ran on the CPU")

    with torch.set_grad_enabled(grad):
        with layers.fused_path("fused"):
            want = twin(x)
        monkeypatch.setattr(layers, "_dropout_mask", refuse)
        with layers.fused_path("plain"):
            got = layer(x)
    assert got.requires_grad == grad
    assert torch.equal(got == 0, want == 0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(layer.dropout_rng, twin.dropout_rng)


def test_the_plain_path_checks_a_replaced_bn_tensor_again():
    """The plain path checks BatchNorm1d's tensors once per kind of call; a tensor
    swapped in later is checked again (the op's error, not F.batch_norm's)."""
    layer = _layer(True)
    with layers.fused_path("plain"):
        layer(torch.randn(4, 8))
        layer[1].running_mean = torch.zeros(5)
        with pytest.raises(ValueError, match="running_mean"):
            layer(torch.randn(4, 8))


@pytest.mark.parametrize("bn", [False, True])
def test_the_plain_path_checks_a_replaced_linear_tensor_again(bn):
    """The plain path keeps the Linear's passed check on the layer (by tensor id); a
    weight swapped in later is checked again (the op's error, naming the argument)."""
    layer = _layer(bn, p=0.0)
    with layers.fused_path("plain"), torch.no_grad():
        layer(torch.randn(4, 8))
        assert "_route" in layer.__dict__
        layer[0].weight = nn.Parameter(torch.randn(8, 5))
        with pytest.raises(ValueError, match="weight"):
            layer(torch.randn(4, 8))


@pytest.mark.parametrize("bn", [False, True])
def test_the_plain_path_forgets_its_check_on_a_conversion(bn):
    """``.double()`` keeps the tensors' ids but changes their dtype: the passed check
    is dropped, and the converted layer runs as the converted plain block does."""
    layer = _layer(bn, p=0.0).eval()
    twin = copy.deepcopy(layer)
    with layers.fused_path("plain"), torch.no_grad():
        layer(torch.randn(4, 8))
        layer.double()
        assert "_route" not in layer.__dict__
        x = torch.randn(4, 8, dtype=torch.float64)
        got = layer(x)
        want = nn.Sequential(*twin.children()).double()(x)
    assert got.dtype is torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=0)
