"""linear_act: every backend against the reference (fastgan/reference.py)."""
import pytest
import torch

from fastgan import functional as FG
from helpers import CASES, assert_matches, ran, require

SHAPES = [(2, 100, 256), (3, 784, 1024), (64, 1024, 784), (5, 7, 3), (1, 7, 3), (3, 33, 65),
          (4, 256, 1)]
FWD, BWD = "linear_act_forward", "linear_act_backward"


def make_case(b, k, n, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    bound = k ** -0.5
    return dict(x=torch.randn(b, k, generator=g),
                weight=(torch.rand(n, k, generator=g) * 2 - 1) * bound,
                bias=((torch.rand(n, generator=g) * 2 - 1) * bound) if bias else None,
                grad_y=torch.randn(b, n, generator=g))


def run(case, backend, device, dtype, p=0.0, activation="leaky_relu", slope=0.2, seed=99,
        offset=3):
    t = {k: None if v is None else v.to(device=device, dtype=dtype).clone()
         for k, v in case.items()}
    for k in ("x", "weight", "bias"):
        if t[k] is not None:
            t[k].requires_grad_(True)
    s = torch.tensor([seed], dtype=torch.int64, device=device)
    o = torch.tensor([offset], dtype=torch.int64, device=device)
    with ran(backend, FWD, BWD):
        y = FG.linear_act(t["x"], t["weight"], t["bias"], activation, slope, p, True, s, o)
        y.backward(t["grad_y"])
    out = dict(y=y, x_grad=t["x"].grad, w_grad=t["weight"].grad)
    if t["bias"] is not None:
        out["b_grad"] = t["bias"].grad
    return out


def check(backend, device, dtype, shape, bias=True, **kw):
    require(backend, device)
    case = make_case(*shape, bias=bias)
    got = run(case, backend, device, dtype, **kw)
    ref = run(case, "reference", device, dtype, **kw)
    gold = run(case, "reference", "cpu", torch.float64, **kw)
    assert_matches(backend, got, ref, gold, dtype)
    if kw.get("p", 0) > 0:
        assert torch.equal((got["y"] == 0).cpu(), (gold["y"] == 0).cpu())


@pytest.mark.parametrize("bd", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.0, 0.2, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference(bd, shape, p, dtype):
    check(*bd, dtype, shape, p=p)


@pytest.mark.parametrize("bd", CASES)
@pytest.mark.parametrize("activation", ["relu", "tanh", "identity"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_activations(bd, activation, p):
    check(*bd, torch.float32, (3, 33, 65), activation=activation, p=p)


@pytest.mark.parametrize("bd", CASES)
def test_fp16_and_no_bias(bd):
    check(*bd, torch.float16, (3, 33, 65), p=0.2)
    check(*bd, torch.float32, (3, 33, 65), bias=False, p=0.2)


@pytest.mark.parametrize("bd", CASES)
def test_non_contiguous_input(bd):
    backend, device = bd
    require(backend, device)
    case = make_case(4, 9, 5)
    got = run(dict(case, x=case["x"].t().contiguous().t()), backend, device, torch.float32, p=0.2)
    gold = run(case, "reference", "cpu", torch.float64, p=0.2)
    ref = run(case, "reference", device, torch.float32, p=0.2)
    assert_matches(backend, got, ref, gold, torch.float32)
