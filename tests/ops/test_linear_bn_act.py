"""linear_bn_act: every backend against the reference (fastgan/reference.py).

Gold = the reference backend in fp64 on the same (upcast) inputs; a backend
must be within twice the reference's own error at the same dtype.
"""
import pytest
import torch

from fastgan import functional as FG
from helpers import CASES, FLOOR, assert_matches, ran, require

SHAPES = [(2, 100, 256), (3, 784, 1024), (64, 1024, 784), (5, 7, 3), (2, 1, 1), (3, 33, 65)]
FWD, BWD = "linear_bn_act_forward", "linear_bn_act_backward"


def make_case(b, k, n, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    bound = k ** -0.5
    return dict(
        x=torch.randn(b, k, generator=g),
        weight=(torch.rand(n, k, generator=g) * 2 - 1) * bound,
        bias=((torch.rand(n, generator=g) * 2 - 1) * bound) if bias else None,
        bn_weight=1 + 0.2 * torch.randn(n, generator=g),
        bn_bias=0.2 * torch.randn(n, generator=g),
        running_mean=0.1 * torch.randn(n, generator=g),
        running_var=0.5 + torch.rand(n, generator=g),
        grad_y=torch.randn(b, n, generator=g),
    )


def run(case, backend, device, dtype, training=True, p=0.0, momentum=0.1, seed=1234, offset=7,
        activation="leaky_relu", slope=0.2, steps=1):
    """Forward (``steps`` times) + backward; returns outputs, grads and running stats."""
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    t = {}
    for k, v in case.items():
        if v is None:
            t[k] = None
            continue
        dt = dtype if k in ("x", "weight", "bias", "grad_y") else stat
        t[k] = v.to(device=device, dtype=dt).clone()
    for k in ("x", "weight", "bias", "bn_weight", "bn_bias"):
        if t[k] is not None:
            t[k].requires_grad_(True)
    nbt = torch.zeros(1, dtype=torch.int64, device=device)
    s = torch.tensor([seed], dtype=torch.int64, device=device)
    o = torch.tensor([offset], dtype=torch.int64, device=device)
    with ran(backend, FWD, BWD):
        for _ in range(steps):
            y = FG.linear_bn_act(t["x"], t["weight"], t["bias"], t["bn_weight"], t["bn_bias"],
                                 t["running_mean"], t["running_var"], nbt, training, momentum,
                                 1e-5, activation, slope, p, s, o)
        y.backward(t["grad_y"])
    out = dict(y=y, x_grad=t["x"].grad, w_grad=t["weight"].grad, g_grad=t["bn_weight"].grad,
               beta_grad=t["bn_bias"].grad, running_mean=t["running_mean"],
               running_var=t["running_var"], nbt=nbt)
    if t["bias"] is not None:
        out["b_grad"] = t["bias"].grad
    return out


def conditioning_floor(case, dtype, training=True, **_):
    """Round-off any correct fp32 kernel may show on top of the reference's.

    A GEMM's error in h (about u * sqrt(K) * |h|, its summation order is the
    kernel's own) is amplified by BN's 1/std: with B = 2 or 3 a column whose
    values nearly coincide has a tiny std, so two correct GEMMs can differ
    several-fold after BN. The bound scales with that amplification."""
    if dtype != torch.float32:
        return 0.0
    x, w = case["x"].double(), case["weight"].double()
    h = x @ w.t()
    if case["bias"] is not None:
        h = h + case["bias"].double()
    var = h.var(0, unbiased=False) if training else case["running_var"].double()
    amp = float(((var + 1e-5).rsqrt() * h.abs().amax(0)).max())
    return 2 * 2.0**-24 * x.shape[1] ** 0.5 * amp


def check(backend, device, dtype, shape, **kw):
    require(backend, device)
    case = make_case(*shape)
    got = run(case, backend, device, dtype, **kw)
    ref = run(case, "reference", device, dtype, **kw)
    gold = run(case, "reference", "cpu", torch.float64, **kw)
    assert torch.equal(got["nbt"].cpu(), gold["nbt"].cpu())
    keys = [k for k in gold if k != "nbt" and not (k == "b_grad" and kw.get("training", True))]
    floor = max(FLOOR[dtype], conditioning_floor(case, dtype, **kw))
    assert_matches(backend, got, ref, gold, dtype, keys, floor)
    if kw.get("training", True) and "b_grad" in got:
        # BN cancels the Linear bias: its gradient is zero up to round-off, so
        # compare absolute errors, on the scale of the weight gradient, with the
        # same conditioning floor (its round-off is BN's 1/std times h's too).
        def err(r):
            return float((r["b_grad"].double().cpu() - gold["b_grad"].cpu()).abs().max())

        scale = float(gold["w_grad"].abs().max())
        assert err(got) <= 2 * err(ref) + floor * scale, (err(got), err(ref), floor * scale)
    if kw.get("p", 0) > 0:
        # Same dropout mask as the reference, element for element.
        assert torch.equal((got["y"] == 0).cpu(), (gold["y"] == 0).cpu())
    return got


@pytest.mark.parametrize("bd", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.0, 0.2, 0.5])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference(bd, shape, p, training, dtype):
    check(*bd, dtype, shape, p=p, training=training)


@pytest.mark.parametrize("bd", CASES)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
def test_running_stats_over_steps(bd, momentum):
    got = check(*bd, torch.float32, (5, 7, 3), momentum=momentum, steps=3)
    assert int(got["nbt"]) == 3


@pytest.mark.parametrize("bd", CASES)
@pytest.mark.parametrize("activation", ["relu", "tanh", "identity"])
def test_other_activations(bd, activation):
    check(*bd, torch.float32, (3, 33, 65), activation=activation, p=0.2)


@pytest.mark.parametrize("bd", CASES)
def test_fp16(bd):
    check(*bd, torch.float16, (3, 33, 65), p=0.2)


@pytest.mark.parametrize("bd", CASES)
def test_no_bias(bd):
    backend, device = bd
    require(backend, device)
    case = make_case(3, 33, 65, bias=False)
    got = run(case, backend, device, torch.float32, p=0.2)
    gold = run(case, "reference", "cpu", torch.float64, p=0.2)
    ref = run(case, "reference", device, torch.float32, p=0.2)
    assert_matches(backend, got, ref, gold, torch.float32, ["y", "x_grad", "w_grad", "g_grad"])


@pytest.mark.parametrize("bd", CASES)
def test_dropout_statistics(bd):
    """Keep rate within 5 sigma of 1 - p; a new offset draws a new mask."""
    backend, device = bd
    require(backend, device)
    b, k, n = 64, 16, 784
    case = make_case(b, k, n)
    for p in (0.2, 0.5):
        y0 = run(case, backend, device, torch.float32, p=p, offset=0)["y"]
        y1 = run(case, backend, device, torch.float32, p=p, offset=1)["y"]
        keep = (y0 != 0).double().mean().item()
        sigma = (p * (1 - p) / y0.numel()) ** 0.5
        assert abs(keep - (1 - p)) < 5 * sigma, (p, keep)
        differ = ((y0 == 0) != (y1 == 0)).double().mean().item()
        assert abs(differ - 2 * p * (1 - p)) < 0.05, (p, differ)


@pytest.mark.parametrize("bd", CASES)
def test_batch_one_eval_and_error_in_training(bd):
    backend, device = bd
    check(backend, device, torch.float32, (1, 7, 3), training=False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        check(backend, device, torch.float32, (1, 7, 3), training=True)


@pytest.mark.parametrize("bd", CASES)
def test_non_contiguous_input(bd):
    backend, device = bd
    require(backend, device)
    case = make_case(4, 9, 5)
    x_t = case["x"].t().contiguous().t()  # same values, column-major strides
    assert not x_t.is_contiguous()
    got = run(dict(case, x=x_t), backend, device, torch.float32, p=0.2)
    gold = run(case, "reference", "cpu", torch.float64, p=0.2)
    ref = run(case, "reference", device, torch.float32, p=0.2)
    assert_matches(backend, got, ref, gold, torch.float32, ["y", "x_grad", "w_grad", "g_grad"])
