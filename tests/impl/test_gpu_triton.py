"""The triton backend on a real GPU (skipped without CUDA; run by bench/gpu_check.sh).

* Realistic shapes (B = 64, 1024, 8192; K = 784, 1024), fp32 and bf16, dropout
  on and off: every op forward + backward against the reference backend on the
  same GPU, with the error budget of the shared tests (twice the reference's
  own error against an fp64 gold, plus a floor).
* CUDA graph capture (``fastgan.train.graphs.capture``) + replay of each op's
  forward + backward matches eager execution, and each replay draws a new
  dropout mask because the offset tensor advances between replays.
Set FASTGAN_TRITON_AUTOTUNE=0 for a quick run with one config per kernel.
"""
import pytest
import torch

from fastgan import reference as R
from helpers import FLOOR, assert_matches, require

pytestmark = pytest.mark.gpu

BATCHES = [64, 1024, 8192]
FEATURES = [(784, 1024), (1024, 512)]  # (K, N): D's first layer, a G hidden layer
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def K():
    require("triton", "cuda")
    from fastgan.impl import triton as kernels
    return kernels


def inputs(b, k, n, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = dict(device="cuda")
    return dict(
        x=torch.randn(b, k, generator=g, **dev).to(dtype),
        weight=((torch.rand(n, k, generator=g, **dev) * 2 - 1) * k ** -0.5).to(dtype),
        bias=((torch.rand(n, generator=g, **dev) * 2 - 1) * k ** -0.5).to(dtype),
        bn_weight=1 + 0.2 * torch.randn(n, generator=g, **dev),
        bn_bias=0.2 * torch.randn(n, generator=g, **dev),
        running_mean=0.1 * torch.randn(n, generator=g, **dev),
        running_var=0.5 + torch.rand(n, generator=g, **dev),
        grad_y=torch.randn(b, n, generator=g, **dev).to(dtype),
    )


def upcast(t):
    return {k: v.double() for k, v in t.items()}


def rng(offset=3):
    return (torch.tensor([2**40 + 17], dtype=torch.int64, device="cuda"),
            torch.tensor([offset], dtype=torch.int64, device="cuda"))


def bn_run(mod, t, training, p, offset=3):
    rm, rv = t["running_mean"].clone(), t["running_var"].clone()
    nbt = torch.zeros(1, dtype=torch.int64, device="cuda")
    s, o = rng(offset)
    y, h, mean, rstd = mod.linear_bn_act_forward(
        t["x"], t["weight"], t["bias"], t["bn_weight"], t["bn_bias"], rm, rv, nbt, training, 0.1,
        1e-5, "leaky_relu", 0.2, p, s, o)
    dx, dw, db, dg, dbeta = mod.linear_bn_act_backward(
        t["grad_y"], t["x"], t["weight"], t["bn_weight"], t["bn_bias"], h, mean, rstd, training,
        "leaky_relu", 0.2, p, s, o, True)
    return dict(y=y, mean=mean, rstd=rstd, running_mean=rm, running_var=rv, dx=dx, dw=dw,
                dgamma=dg, dbeta=dbeta, db=db)


def la_run(mod, t, p, activation="leaky_relu", offset=3):
    s, o = rng(offset)
    y = mod.linear_act_forward(t["x"], t["weight"], t["bias"], activation, 0.2, p, s, o)
    dx, dw, db = mod.linear_act_backward(t["grad_y"], t["x"], t["weight"], y, activation, 0.2, p,
                                         s, o, True)
    return dict(y=y, dx=dx, dw=dw, db=db)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
@pytest.mark.parametrize("kn", FEATURES, ids=lambda kn: f"{kn[0]}x{kn[1]}")
@pytest.mark.parametrize("b", BATCHES)
def test_linear_bn_act_matches_reference(K, b, kn, p, dtype):
    t = inputs(b, *kn, dtype)
    got = bn_run(K, t, True, p)
    ref = bn_run(R, t, True, p)
    gold = bn_run(R, upcast(t), True, p)
    assert_matches("linear_bn_act", got, ref, gold, dtype, keys=[k for k in gold if k != "db"])
    scale = float(gold["dw"].abs().max())  # db is zero up to round-off in training
    err = lambda r: float((r["db"].double() - gold["db"]).abs().max())  # noqa: E731
    assert err(got) <= 2 * err(ref) + FLOOR[dtype] * scale
    if p > 0:
        assert torch.equal(got["y"] == 0, gold["y"] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("b", [64, 8192])
def test_linear_bn_act_eval_matches_reference(K, b, dtype):
    t = inputs(b, 784, 1024, dtype)
    assert_matches("linear_bn_act eval", bn_run(K, t, False, 0.0), bn_run(R, t, False, 0.0),
                   bn_run(R, upcast(t), False, 0.0), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
@pytest.mark.parametrize("kn", FEATURES + [(1024, 784)], ids=lambda kn: f"{kn[0]}x{kn[1]}")
@pytest.mark.parametrize("b", BATCHES)
def test_linear_act_matches_reference(K, b, kn, p, dtype):
    act = "tanh" if kn == (1024, 784) else "leaky_relu"  # G's output layer
    t = inputs(b, *kn, dtype)
    got, ref, gold = la_run(K, t, p, act), la_run(R, t, p, act), la_run(R, upcast(t), p, act)
    assert_matches("linear_act", got, ref, gold, dtype)
    if p > 0:
        assert torch.equal(got["y"] == 0, gold["y"] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("b", BATCHES)
def test_gan_bce_matches_reference(K, b, dtype):
    g = torch.Generator(device="cuda").manual_seed(b)
    real = (3 * torch.randn(b, 1, generator=g, device="cuda")).to(dtype)
    fake = (3 * torch.randn(b, 1, generator=g, device="cuda")).to(dtype)
    names = ("loss", "d_real", "d_fake", "grad_real", "grad_fake")
    got = dict(zip(names, K.gan_bce_forward(real, fake, 0.9, 0.0)))
    ref = dict(zip(names, R.gan_bce_forward(real, fake, 0.9, 0.0)))
    gold = dict(zip(names, R.gan_bce_forward(real.double(), fake.double(), 0.9, 0.0)))
    assert_matches("gan_bce", got, ref, gold, dtype)


# ------------------------------------------------------------------ CUDA graphs
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("b", [64, 1024])
def test_cuda_graph_replay_matches_eager(K, b, dtype):
    """Each op forward + backward captured once; three replays, the offset
    advanced by one before each: every replay equals an eager run at that
    offset (bit for bit: same kernels, same inputs) and draws a new mask."""
    from fastgan.train.graphs import capture
    t = inputs(b, 784, 512, dtype)
    p = 0.2
    seed, offset = rng(0)
    rm, rv = t["running_mean"].clone(), t["running_var"].clone()
    nbt = torch.zeros(1, dtype=torch.int64, device="cuda")
    logits = torch.randn(b, 1, device="cuda", dtype=dtype)

    def step():
        y, h, mean, rstd = K.linear_bn_act_forward(
            t["x"], t["weight"], t["bias"], t["bn_weight"], t["bn_bias"], rm, rv, nbt, True,
            None, 1e-5, "leaky_relu", 0.2, p, seed, offset)
        bn = (y,) + K.linear_bn_act_backward(
            t["grad_y"], t["x"], t["weight"], t["bn_weight"], t["bn_bias"], h, mean, rstd, True,
            "leaky_relu", 0.2, p, seed, offset, True)
        y2 = K.linear_act_forward(t["x"], t["weight"], t["bias"], "leaky_relu", 0.2, p, seed,
                                  offset)
        la = (y2,) + K.linear_act_backward(t["grad_y"], t["x"], t["weight"], y2, "leaky_relu",
                                           0.2, p, seed, offset, True)
        return dict(bn=bn, la=la, bce=K.gan_bce_forward(logits, y2[:, :1].contiguous(), 1.0, 0.0))

    graph = capture(step, warmup=1)
    masks = []
    for _ in range(3):
        offset.add_(1)
        state = (rm.clone(), rv.clone(), nbt.clone())
        replayed = {k: tuple(v.clone() for v in vs) for k, vs in graph.replay().items()}
        after = (rm.clone(), rv.clone(), nbt.clone())
        # eager at the same offset, from the same running statistics
        for live, saved in zip((rm, rv, nbt), state):
            live.copy_(saved)
        eager = step()
        for k in eager:
            for a, e in zip(replayed[k], eager[k]):
                assert torch.equal(a, e), k
        for a, e in zip(after, (rm, rv, nbt)):
            assert torch.equal(a, e)
        masks.append(replayed["la"][0] == 0)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    assert int(nbt) == 4  # the warm-up run, then one step per (replay, eager) pair


def test_warmup_then_capture(K):
    """After warmup() (compile + autotune), capture needs no benchmarking."""
    from fastgan.train.graphs import capture
    K.warmup([(256, 784, 1024)], dtypes=(torch.bfloat16,), device="cuda", dropout=(0.2,))
    t = inputs(256, 784, 1024, torch.bfloat16)
    seed, offset = rng(0)
    graph = capture(lambda: K.linear_act_forward(t["x"], t["weight"], t["bias"], "leaky_relu",
                                                 0.2, 0.2, seed, offset), warmup=1)
    y = graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, la_run(K, t, 0.2, offset=0)["y"])
