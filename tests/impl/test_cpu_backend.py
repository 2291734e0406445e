"""What is specific to the C++ CPU kernels (csrc/cpu, backend ``cpu``).

The shared, backend-parametrized comparisons with the reference live in
tests/ops/test_<op>.py; here: float64 gradcheck through the cpu backend, the
argument checks (hyper-parameters at the op boundary in Python, before any
kernel runs; what protects memory again at the C++ entry, torch.ops.fastgan_C.*
called directly), non-contiguous inputs reaching the kernels, the dropout mask
bit for bit against the reference Philox, and results independent of the
thread count.
"""
import math
import os

import pytest
import torch

import fastgan
from fastgan.impl import reference
from fastgan.ops import dispatch
from fastgan.ops import functional as FG
from fastgan.ops.spec import ACTIVATIONS
from helpers import ran

if "cpu" not in fastgan.backends():
    pytest.skip(f"cpu backend unavailable: {dispatch.unavailable().get('cpu')}",
                allow_module_level=True)

C = torch.ops.fastgan_C
LEAKY = ACTIVATIONS["leaky_relu"]


def _key(seed, offset):
    return torch.tensor([seed], dtype=torch.int64), torch.tensor([offset], dtype=torch.int64)


# ------------------------------------------------------------------ gradcheck (float64)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation,p", [("leaky_relu", 0.0), ("tanh", 0.3), ("relu", 0.5),
                                          ("identity", 0.2)])
def test_gradcheck_linear_bn_act(training, activation, p):
    g = torch.Generator().manual_seed(1)
    d = dict(dtype=torch.float64)
    x = torch.randn(5, 4, generator=g, **d).requires_grad_()
    w = torch.randn(3, 4, generator=g, **d).requires_grad_()
    b = torch.randn(3, generator=g, **d).requires_grad_()
    gamma = (1 + 0.3 * torch.randn(3, generator=g, **d)).requires_grad_()
    beta = (0.3 * torch.randn(3, generator=g, **d)).requires_grad_()
    rm, rv = 0.1 * torch.randn(3, **d), 0.5 + torch.rand(3, **d)
    nbt = torch.zeros(1, dtype=torch.int64)
    seed, offset = _key(2**40 + 3, 11)

    def f(x, w, b, gamma, beta):
        # running stats are updated on every call; in training they do not feed y
        return FG.linear_bn_act(x, w, b, gamma, beta, rm, rv, nbt, training, 0.1, 1e-5,
                                activation, 0.2, p, seed, offset)

    with ran("cpu", "linear_bn_act_forward", "linear_bn_act_backward"):
        assert torch.autograd.gradcheck(f, (x, w, b, gamma, beta))


@pytest.mark.parametrize("activation,p", [("leaky_relu", 0.0), ("tanh", 0.3), ("relu", 0.2),
                                          ("identity", 0.0)])
def test_gradcheck_linear_act(activation, p):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(5, 6, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_()
    seed, offset = _key(-7, 2**33)

    def f(x, w, b):
        return FG.linear_act(x, w, b, activation, 0.2, p, True, seed, offset)

    with ran("cpu", "linear_act_forward", "linear_act_backward"):
        assert torch.autograd.gradcheck(f, (x, w, b))


def test_gradcheck_gan_bce():
    g = torch.Generator().manual_seed(3)
    real = (3 * torch.randn(6, 1, generator=g, dtype=torch.float64)).requires_grad_()
    fake = (3 * torch.randn(4, 1, generator=g, dtype=torch.float64)).requires_grad_()
    with ran("cpu", "gan_bce_forward"):
        assert torch.autograd.gradcheck(lambda r, f: FG.gan_bce_d(r, f, smoothing=0.1).loss,
                                        (real, fake))
        assert torch.autograd.gradcheck(lambda f: FG.gan_bce_g(f).loss, (fake,))


# ------------------------------------------------------------------ hyper-parameters: Python
# The op boundary (fastgan/ops/checks.py) rejects a bad hyper-parameter before
# any backend runs: no kernel call is counted and no running statistic moves.
# The C++ entries do not check them again (a bad one cannot move an index).
def _assert_rejected(op, args, name, value, exc, message):
    """``op`` on ``args`` with ``name`` set to ``value`` raises ``exc`` matching
    ``message`` and leaves the running statistics as they were."""
    args = dict(args, **{name: value})
    stats = {k: args[k].clone() for k in ("running_mean", "num_batches_tracked") if k != name}
    with pytest.raises(exc, match=message):
        op(*args.values())
    for k, before in stats.items():
        assert torch.equal(args[k], before), f"{k} changed"


def _op_args(b=4, k=3, n=5):
    a = _bn_args(b, k, n)
    a["activation"] = "leaky_relu"
    return a


BN_HYPER_BAD = [
    ("p", 1.0, "dropout p"),
    ("p", -0.1, "dropout p"),
    ("p", math.nan, "dropout p"),
    ("activation", "gelu", "activation must be one of"),
    ("negative_slope", math.nan, "negative_slope"),
    ("negative_slope", -0.2, "negative_slope"),
    ("eps", 0.0, "eps"),
    ("momentum", 1.5, "momentum"),
]


@pytest.mark.parametrize("name,value,message", BN_HYPER_BAD,
                         ids=[f"{n}={v}" for n, v, _ in BN_HYPER_BAD])
def test_op_boundary_rejects_linear_bn_act_hyper(name, value, message):
    before = dispatch.calls[("cpu", "linear_bn_act_forward")]
    with fastgan.use_backend("cpu"):
        _assert_rejected(torch.ops.fastgan.linear_bn_act, _op_args(), name, value, ValueError,
                         message)
    assert dispatch.calls[("cpu", "linear_bn_act_forward")] == before


@pytest.mark.parametrize("name,value,message", [
    ("activation", "swish", "activation must be one of"),
    ("negative_slope", -math.inf, "negative_slope"),
    ("p", 1.0, "dropout p"),
])
def test_op_boundary_rejects_linear_act_hyper(name, value, message):
    seed, offset = _key(1, 2)
    args = dict(x=torch.randn(4, 3), weight=torch.randn(5, 3), bias=torch.randn(5),
                activation="leaky_relu", negative_slope=0.2, p=0.1, seed=seed, offset=offset)
    args[name] = value
    before = dispatch.calls[("cpu", "linear_act_forward")]
    with fastgan.use_backend("cpu"):
        with pytest.raises(ValueError, match=message):
            torch.ops.fastgan.linear_act(*args.values())
        functional = {k: v for k, v in args.items() if k != "p"}
        with pytest.raises(ValueError, match=message):
            FG.linear_act(**functional, dropout=args["p"])
    assert dispatch.calls[("cpu", "linear_act_forward")] == before


@pytest.mark.parametrize("targets,message", [((1.5, 0.0), "target_a"),
                                             ((1.0, math.nan), "target_b"),
                                             ((-0.1, 0.0), "target_a")])
def test_op_boundary_rejects_gan_bce_labels(targets, message):
    a = torch.randn(4, 1)
    before = dispatch.calls[("cpu", "gan_bce_forward")]
    with fastgan.use_backend("cpu"), pytest.raises(ValueError, match=message):
        torch.ops.fastgan.gan_bce(a, a, *targets)
    assert dispatch.calls[("cpu", "gan_bce_forward")] == before


# ------------------------------------------------------------------ memory invariants: C++
# What a kernel indexes with, checked at the C++ entry (csrc/checks.h) however
# it is called; messages name the argument as the schema does (csrc/ops.cpp).
def _bn_args(b=4, k=3, n=5, dtype=torch.float32):
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    seed, offset = _key(1, 2)
    return dict(x=torch.randn(b, k, dtype=dtype), weight=torch.randn(n, k, dtype=dtype),
                bias=torch.randn(n, dtype=dtype), bn_weight=torch.ones(n, dtype=stat),
                bn_bias=torch.zeros(n, dtype=stat), running_mean=torch.zeros(n, dtype=stat),
                running_var=torch.ones(n, dtype=stat),
                num_batches_tracked=torch.zeros(1, dtype=torch.int64), training=True,
                momentum=0.1, eps=1e-5, activation=LEAKY, negative_slope=0.2, p=0.1,
                seed=seed, offset=offset)


BN_FORWARD_BAD = [
    ("x", torch.randn(4), "x must be 2-D"),
    ("x", torch.randint(0, 3, (4, 3)), "x must be float32"),
    ("weight", torch.randn(5, 3, dtype=torch.float64), "weight must have dtype Float"),
    ("weight", torch.randn(5), "weight must be 2-D"),
    ("weight", torch.randn(5, 4), "K mismatch"),
    ("bias", torch.randn(6), "bias must have shape \\[5\\], got \\[6\\]"),
    ("bn_weight", torch.ones(4), "bn_weight must have shape \\[5\\]"),
    ("bn_bias", torch.zeros(5, dtype=torch.float16), "bn_bias must have dtype Float"),
    ("running_mean", torch.zeros(5, 1), "running_mean must have shape \\[5\\], got \\[5, 1\\]"),
    ("running_var", torch.ones(5, dtype=torch.float64), "running_var must have dtype Float"),
    ("num_batches_tracked", torch.zeros(2, dtype=torch.int64), "num_batches_tracked must have exactly 1"),
    ("num_batches_tracked", torch.zeros(1), "num_batches_tracked must have dtype Long"),
    ("seed", torch.tensor([1], dtype=torch.int32), "seed must have dtype Long"),
    ("offset", torch.zeros(0, dtype=torch.int64), "offset must have exactly 1"),
    ("x", torch.randn(1, 3), "Expected more than 1 value per channel"),
]


@pytest.mark.parametrize("name,value,message", BN_FORWARD_BAD,
                         ids=[f"{n}-{m[:20]}" for n, _, m in BN_FORWARD_BAD])
def test_linear_bn_act_forward_rejects(name, value, message):
    _assert_rejected(C.linear_bn_act_forward, _bn_args(), name, value, RuntimeError, message)


def _bn_backward_args(b=4, k=3, n=5):
    a = _bn_args(b, k, n)
    y, h, mean, rstd = C.linear_bn_act_forward(*a.values())
    return dict(grad_y=torch.randn_like(y), x=a["x"], weight=a["weight"], bn_weight=a["bn_weight"],
                bn_bias=a["bn_bias"], h=h, mean=mean, rstd=rstd, training=True,
                activation=LEAKY, negative_slope=0.2, p=0.1, seed=a["seed"], offset=a["offset"],
                compute_dx=True, compute_dw=True)


BN_BACKWARD_BAD = [
    ("grad_y", torch.randn(4, 6), "grad_y must have shape \\[4, 5\\], got \\[4, 6\\]"),
    ("grad_y", torch.randn(4, 5, dtype=torch.float64), "grad_y must have dtype Float"),
    ("h", torch.randn(3, 5), "h must have shape \\[4, 5\\]"),
    ("mean", torch.zeros(5, dtype=torch.float16), "mean must have dtype Float"),
    ("rstd", torch.ones(4), "rstd must have shape \\[5\\]"),
    ("bn_weight", torch.ones(5, 5), "bn_weight must have shape \\[5\\]"),
    ("weight", torch.randn(5, 2), "K mismatch"),
    ("seed", torch.tensor([1.0]), "seed must have dtype Long"),
]


@pytest.mark.parametrize("name,value,message", BN_BACKWARD_BAD,
                         ids=[f"{n}-{m[:20]}" for n, _, m in BN_BACKWARD_BAD])
def test_linear_bn_act_backward_rejects(name, value, message):
    args = _bn_backward_args()
    args[name] = value
    with pytest.raises(RuntimeError, match=message):
        C.linear_bn_act_backward(*args.values())


def test_linear_act_rejects():
    x, w, b = torch.randn(4, 3), torch.randn(5, 3), torch.randn(5)
    seed, offset = _key(1, 2)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        C.linear_act_forward(x[0], w, b, LEAKY, 0.2, 0.0, seed, offset)
    with pytest.raises(RuntimeError, match="bias must have dtype"):
        C.linear_act_forward(x, w, b.half(), LEAKY, 0.2, 0.0, seed, offset)
    with pytest.raises(RuntimeError, match="seed must have exactly 1"):
        C.linear_act_forward(x, w, b, LEAKY, 0.2, 0.0, torch.zeros(2, dtype=torch.int64), offset)
    y = C.linear_act_forward(x, w, b, LEAKY, 0.2, 0.0, seed, offset)
    with pytest.raises(RuntimeError, match="y must have shape \\[4, 5\\]"):
        C.linear_act_backward(y, x, w, y[:3], LEAKY, 0.2, 0.0, seed, offset, True)
    with pytest.raises(RuntimeError, match="grad_y must have dtype"):
        C.linear_act_backward(y.double(), x, w, y, LEAKY, 0.2, 0.0, seed, offset, True)
    with pytest.raises(RuntimeError, match="offset must have dtype Long"):
        C.linear_act_backward(y, x, w, y, LEAKY, 0.2, 0.0, seed, offset.int(), True)


@pytest.mark.parametrize("rows,split", [(1, 1), (2, 1), (3, 2), (3, 3), (7, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gan_bce_rows_is_gan_bce_forward_bit_for_bit(rows, split, dtype):
    # The taped step's losses (fastgan.train.tape): one call over [first; second]
    # rows, both gradients in one tensor; the same bits as gan_bce_forward's.
    z = (torch.randn(rows, 1) * 4).to(dtype)
    z[0, 0] = float("inf") if rows > 1 else z[0, 0]
    second = z[split:] if split < rows else None
    loss, pa, pb, grad = C.cpu_gan_bce_rows(z, split, 0.9, 0.0)
    want = C.gan_bce_forward(z[:split], second, 0.9, 0.0)
    for got, ref in zip((loss, pa, pb), want[:3]):
        assert torch.equal(got, ref)
    ref_grad = want[3] if second is None else torch.cat([want[3], want[4]])
    assert grad.shape == z.shape and torch.equal(grad, ref_grad)


def test_gan_bce_rows_rejects_a_split_outside_the_rows():
    with pytest.raises(RuntimeError, match=r"split must be in \[1, 3\], got 4"):
        C.cpu_gan_bce_rows(torch.randn(3, 1), 4, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="logits_a must be float32"):
        C.cpu_gan_bce_rows(torch.ones(3, 1, dtype=torch.int64), 1, 1.0, 0.0)


def test_gan_bce_rejects():
    a = torch.randn(4, 1)
    with pytest.raises(RuntimeError, match="logits_a must be float32"):
        C.gan_bce_forward(torch.ones(4, dtype=torch.int64), None, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="logits_a must not be empty"):
        C.gan_bce_forward(torch.zeros(0), None, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="logits_b must have dtype Float, got Double"):
        C.gan_bce_forward(a, a.double(), 1.0, 0.0)
    with pytest.raises(RuntimeError, match="logits_b must not be empty"):
        C.gan_bce_forward(a, torch.zeros(0), 1.0, 0.0)


def test_messages_are_one_line():
    with pytest.raises(RuntimeError) as info:
        C.linear_act_forward(torch.randn(4, 3), torch.randn(5, 4), None, LEAKY, 0.2, 0.0,
                             *_key(1, 2))
    first = str(info.value).splitlines()[0]
    assert first.startswith("weight has in_features=4 but x has 3 columns"), first


# ------------------------------------------------------------------ non-contiguous inputs
def _close(a, b, tol=1e-5):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("training", [True, False])
def test_linear_bn_act_non_contiguous(training):
    """Strided views go straight to the C++ kernels (no .contiguous() in Python)."""
    g = torch.Generator().manual_seed(4)
    b, k, n = 6, 9, 300
    x = torch.randn(k, b, generator=g).t()                       # transposed
    w = torch.randn(n, 2 * k, generator=g)[:, ::2]               # every other column
    bias = torch.randn(2 * n, generator=g)[::2]
    gamma = (1 + 0.2 * torch.randn(2 * n, generator=g))[1::2]
    beta = (0.2 * torch.randn(n, 2, generator=g))[:, 0]
    stats = torch.stack([0.1 * torch.randn(n, generator=g), 0.5 + torch.rand(n, generator=g)], 1)
    gy = torch.randn(n, b, generator=g).t()
    seed, offset = _key(99, 5)
    assert not any(t.is_contiguous() for t in (x, w, bias, gamma, beta, stats[:, 0], gy))
    outs = []
    for fn in (reference.linear_bn_act_forward, C.linear_bn_act_forward):
        st = stats.clone()  # running_mean/var as strided views, updated in place
        nbt = torch.zeros(1, dtype=torch.int64)
        act = "leaky_relu" if fn is reference.linear_bn_act_forward else LEAKY
        y, h, mean, rstd = fn(x, w, bias, gamma, beta, st[:, 0], st[:, 1], nbt, training, None,
                              1e-5, act, 0.2, 0.25, seed, offset)
        bwd = (reference.linear_bn_act_backward if fn is reference.linear_bn_act_forward
               else C.linear_bn_act_backward)
        grads = bwd(gy, x, w, gamma, beta, h.t().contiguous().t(), mean, rstd, training, act,
                    0.2, 0.25, seed, offset, True)
        outs.append((y, h, mean, rstd, st, nbt) + tuple(grads))
    for r, c in zip(*outs):
        _close(c, r)


def test_linear_act_and_gan_bce_non_contiguous():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, generator=g).t()
    w = torch.randn(20, 14, generator=g)[:, ::2]
    bias = torch.randn(40, generator=g)[::2]
    gy = torch.randn(20, 3, generator=g).t()
    seed, offset = _key(3, 4)
    y_ref = reference.linear_act_forward(x, w, bias, "tanh", 0.2, 0.3, seed, offset)
    y = C.linear_act_forward(x, w, bias, ACTIVATIONS["tanh"], 0.2, 0.3, seed, offset)
    _close(y, y_ref)
    ref = reference.linear_act_backward(gy, x, w, y_ref, "tanh", 0.2, 0.3, seed, offset, True)
    got = C.linear_act_backward(gy, x, w, y_ref.t().contiguous().t(), ACTIVATIONS["tanh"], 0.2,
                                0.3, seed, offset, True)
    for r, c in zip(ref, got):
        _close(c, r)
    logits = torch.randn(4, 6, generator=g).t()[:, :3]
    for r, c in zip(reference.gan_bce_forward(logits, logits.t(), 0.9, 0.0),
                    C.gan_bce_forward(logits, logits.t(), 0.9, 0.0)):
        _close(c, r)


# ------------------------------------------------------------------ dropout mask, bit for bit
SEEDS_OFFSETS = [(0, 0), (1234, 7), (2**32 - 1, 1), (2**32 + 5, 2**32), (2**62 + 11, 3),
                 (-1, 0), (-(2**40) - 3, 2**33 + 3), (987654321, -5), (-2**63, 2**63 - 1)]


@pytest.mark.parametrize("seed,offset", SEEDS_OFFSETS)
@pytest.mark.parametrize("shape", [(3, 1000), (70, 1030)])  # tiles of 256; 2+ threads
def test_dropout_mask_bit_exact(seed, offset, shape):
    b, n = shape
    p = 0.3
    s, o = _key(seed, offset)
    keep = reference.dropout_keep_mask(s, o, shape, p)
    scale = reference.dropout_scale(p)
    # identity activation of z == 1 (zero weight, unit bias): y is the scaled mask itself
    x = torch.randn(b, 4)
    w, bias = torch.zeros(n, 4), torch.ones(n)
    y = C.linear_act_forward(x, w, bias, ACTIVATIONS["identity"], 0.0, p, s, o)
    assert torch.equal(y != 0, keep)
    assert torch.equal(y[keep], torch.full_like(y[keep], scale))
    # backward draws the same mask: dz = scale * grad_y where kept, 0 elsewhere
    _, _, db = C.linear_act_backward(torch.ones(b, n), x, w, y, ACTIVATIONS["identity"], 0.0, p,
                                     s, o, False)
    assert torch.equal(db, keep.sum(0).to(torch.float32) * scale)
    # linear_bn_act: BN output of a constant column is beta; with beta = 1 y is the mask again
    n_ = torch.zeros(1, dtype=torch.int64)
    y2, *_ = C.linear_bn_act_forward(x, w, bias, torch.ones(n), torch.ones(n), torch.zeros(n),
                                     torch.ones(n), n_, True, 0.1, 1e-5,
                                     ACTIVATIONS["identity"], 0.0, p, s, o)
    assert torch.equal(y2 != 0, keep)


@pytest.mark.parametrize("seed,offset", SEEDS_OFFSETS)
def test_next_key_in_cpp_is_the_aten_next_key(seed, offset, monkeypatch):
    """fastgan.nn.layers.next_key on a CPU stream runs one C++ call (cpu_next_key):
    the same key and the same advance as its clone/add_/unbind path, and keys
    that do not alias the stream."""
    from fastgan.nn import layers
    fast, slow = torch.tensor([seed, offset]), torch.tensor([seed, offset])
    calls = []
    real = fastgan._C.cpu_next_key
    monkeypatch.setattr(dispatch, "_OPTIONAL", {})   # a fresh lookup, restored after
    monkeypatch.setattr(fastgan.impl.cpu, "next_key", lambda st: calls.append(1) or real(st))
    key = layers.next_key(fast)
    assert calls == [1]
    monkeypatch.setitem(dispatch._OPTIONAL, ("cpu", "next_key"), None)   # the ATen path
    want = layers.next_key(slow)
    assert [k.shape for k in key] == [k.shape for k in want] == [(), ()]
    assert [k.item() for k in key] == [k.item() for k in want] == [seed, offset]
    assert torch.equal(fast, slow)   # the same advance (int64 wraps at 2**63 - 1)
    fast[0] += 1
    assert key[0].item() == seed   # a copy, not a view of the stream


# ------------------------------------------------------------------ threads
def test_results_do_not_depend_on_thread_count():
    g = torch.Generator().manual_seed(6)
    a = _bn_args(b=96, k=40, n=700)
    a["x"] = torch.randn(96, 40, generator=g)
    gy = torch.randn(96, 700, generator=g)
    prev = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            args = dict(a, running_mean=a["running_mean"].clone(),
                        running_var=a["running_var"].clone(),
                        num_batches_tracked=a["num_batches_tracked"].clone())
            y, h, mean, rstd = C.linear_bn_act_forward(*args.values())
            grads = C.linear_bn_act_backward(gy, args["x"], args["weight"], args["bn_weight"],
                                             args["bn_bias"], h, mean, rstd, True, LEAKY, 0.2,
                                             args["p"], args["seed"], args["offset"], True)
            bce = C.gan_bce_forward(torch.randn(40000, generator=torch.Generator().manual_seed(0)),
                                    None, 1.0, 0.0)
            results.append((y, mean, rstd, args["running_var"]) + tuple(grads[2:]) + bce[:2])
    finally:
        torch.set_num_threads(prev)
    for other in results[1:]:
        for r, c in zip(results[0], other):
            assert torch.equal(r, c)


@pytest.mark.parametrize("path", ["avx2", "scalar"])
def test_dropout_mask_bit_exact_on_narrower_philox_paths(path):
    """The widest Philox path the CPU has runs above; FASTGAN_CPU_PHILOX selects the
    AVX2 and scalar ones (csrc/cpu/dropout.cpp) in a fresh process."""
    import subprocess
    import sys
    code = (
        "import torch, fastgan._C\n"
        "from fastgan import reference as R\n"
        "C = torch.ops.fastgan_C\n"
        "for seed, offset in [(0, 0), (2**32 + 5, 2**32), (-(2**40) - 3, -5)]:\n"
        "    s, o = torch.tensor([seed]), torch.tensor([offset])\n"
        "    y = C.linear_act_forward(torch.randn(5, 2), torch.zeros(333, 2), torch.ones(333),\n"
        "                             0, 0.0, 0.4, s, o)\n"
        "    assert torch.equal(y != 0, R.dropout_keep_mask(s, o, (5, 333), 0.4)), (seed, offset)\n"
        "print('ok')\n")
    env = dict(__import__("os").environ, FASTGAN_CPU_PHILOX=path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# ------------------------------------------------------------------ GEMM paths (csrc/cpu/gemm.h)
# The shared matrix of tests/ops (shapes, dropout, train/eval, fp32/bf16) once
# per GEMM path, each run proving through the per-path counters that every
# GEMM took that path and no other.
def _load_ops_test(name):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parents[1] / "ops" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_cpu_gemm_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


OPS_LA, OPS_LBA = _load_ops_test("test_linear_act"), _load_ops_test("test_linear_bn_act")
cpu_impl = dispatch._load("cpu")[0]


class gemm_path:
    """Context: the cpu backend's GEMMs forced onto ``path``; asserts they all ran there."""

    POLICY = {"onednn": "onednn", "aten": "aten", "widened": "widen"}

    def __init__(self, path, dtype=torch.float32):
        if path == "onednn" and not cpu_impl.gemm_info()["onednn"][str(dtype)[6:]]:
            pytest.skip(f"oneDNN GEMM not usable for {dtype} on this CPU/torch")
        if path == "widened" and dtype not in (torch.bfloat16, torch.float16):
            pytest.skip("only bf16 and fp16 products are widened")
        self.path, self.others = path, [p for p in cpu_impl.GEMM_PATHS if p != path]

    def __enter__(self):
        self.before = cpu_impl.gemm_info()["calls"]
        self.ctx = cpu_impl.gemm_policy(self.POLICY[self.path])
        self.ctx.__enter__()

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        after = cpu_impl.gemm_info()["calls"]
        if exc[0] is None:
            assert after[self.path] > self.before[self.path], f"no GEMM took the {self.path} path"
            # the reference runs plain torch (no fastgan._C): every counted call is ours
            for other in self.others:
                assert after[other] == self.before[other], \
                    f"a GEMM took the {other} path under policy {self.POLICY[self.path]}"


PATHS = ["onednn", "aten", "widened"]
DT = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", OPS_LA.SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", DT, ids=["fp32", "bf16"])
def test_linear_act_on_each_gemm_path(path, shape, p, dtype):
    with gemm_path(path, dtype):
        OPS_LA.check("cpu", "cpu", dtype, shape, p=p)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", OPS_LBA.SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DT, ids=["fp32", "bf16"])
def test_linear_bn_act_on_each_gemm_path(path, shape, p, training, dtype):
    with gemm_path(path, dtype):
        OPS_LBA.check("cpu", "cpu", dtype, shape, p=p, training=training)


@pytest.mark.parametrize("path", PATHS)
def test_no_bias_and_fp16_on_each_gemm_path(path):
    with gemm_path(path, torch.bfloat16 if path == "widened" else torch.float32):
        OPS_LA.check("cpu", "cpu", torch.bfloat16 if path == "widened" else torch.float32,
                     (3, 33, 65), bias=False, p=0.2)
    # fp16 takes oneDNN only with AVX512_FP16, else it is widened (or ATen when forced)
    with gemm_path(path, torch.float16):
        OPS_LBA.check("cpu", "cpu", torch.float16, (3, 33, 65), p=0.2)


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_fp32_stays_ieee_under_a_reduced_onednn_mode(precision):
    # A user's reduced oneDNN fp32 mode must not reach our fp32 GEMMs: at
    # 64x1024x784 bf16 products would miss the fp32 tolerance by ~100x. (oneDNN
    # honours the mode only on CPUs with AMX / AVX512_FP16; elsewhere this
    # passes either way, and it guards those CPUs.)
    mm = torch.backends.mkldnn.matmul
    old = mm.fp32_precision
    try:
        mm.fp32_precision = precision
        with gemm_path("onednn"):
            OPS_LBA.check("cpu", "cpu", torch.float32, (64, 1024, 784), p=0.2)
        assert mm.fp32_precision == precision  # restored after each call
    finally:
        mm.fp32_precision = old


def _linear_act_once(b, k, n, dtype=torch.float32):
    x = torch.randn(b, k, dtype=dtype, requires_grad=True)
    w = torch.randn(n, k, dtype=dtype, requires_grad=True)
    s, o = _key(1, 0)
    with ran("cpu", "linear_act_forward", "linear_act_backward"):
        FG.linear_act(x, w, None, "leaky_relu", 0.2, 0.0, True, s, o).sum().backward()


def test_auto_policy_picks_by_size_and_dtype():
    def calls():
        return cpu_impl.gemm_info()["calls"]

    with cpu_impl.gemm_policy("auto"):
        info = cpu_impl.gemm_info()
        assert info["min_work"] > 2 * 7 * 3
        before = calls()
        _linear_act_once(2, 7, 3)  # tiny: oneDNN's fixed cost would dominate
        after = calls()
        assert after["aten"] == before["aten"] + 3 and after["onednn"] == before["onednn"]
        _linear_act_once(64, 512, 1024)
        grew = "onednn" if info["onednn"]["float32"] and not info["aten_fp32_avx512"] else "aten"
        assert calls()[grew] == after[grew] + 3
        with cpu_impl.gemm_policy("onednn"):  # oneDNN has no fp64 GEMM: ATen under any policy
            before = calls()
            _linear_act_once(64, 512, 1024, torch.float64)
            assert calls()["aten"] == before["aten"] + 3
        assert cpu_impl.gemm_info()["policy"] == "auto"  # the inner context restored it


def _cpuinfo(field: str) -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    return ""


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU vendor from /proc")
def test_auto_leaves_fp32_to_mkl_on_an_intel_cpu():
    """MKL runs AVX-512 kernels on Intel CPUs only: there its fp32 GEMM is as fast as
    oneDNN's and "auto" keeps ATen; on an AMD CPU with AVX-512, oneDNN (2x faster)."""
    info = cpu_impl.gemm_info()
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(_cpuinfo("flags").split())
    intel_mkl = (_cpuinfo("vendor_id") == "GenuineIntel" and torch.backends.mkl.is_available()
                 and avx512)
    assert info["aten_fp32_avx512"] == intel_mkl
    want = "onednn" if info["onednn"]["float32"] and not intel_mkl else "aten"
    with cpu_impl.gemm_policy("auto"):
        assert cpu_impl.gemm_path(torch.float32) == want
        assert cpu_impl.gemm_path(torch.bfloat16) != "aten"  # bf16 is not MKL's
    if info["onednn"]["float32"]:
        with cpu_impl.gemm_policy("onednn"):  # forcing it still runs it (the tests do)
            assert cpu_impl.gemm_path(torch.float32) == "onednn"


def test_auto_widens_bf16_where_onednn_cannot_run_it():
    """Under "auto" a bf16 / fp16 product takes oneDNN where this CPU runs the dtype
    natively, else it is computed in fp32 (widened), at every size; fp32 and fp64
    never widen, under any policy."""
    for dtype in (torch.bfloat16, torch.float16):
        want = "onednn" if cpu_impl.gemm_info()["onednn"][str(dtype)[6:]] else "widened"
        with cpu_impl.gemm_policy("auto"):
            assert cpu_impl.gemm_path(dtype) == want
            if want == "widened":
                assert cpu_impl.gemm_path(dtype, 1, 2, 3) == "widened"
                before = cpu_impl.gemm_info()["calls"]["widened"]
                _linear_act_once(2, 7, 3, dtype)
                assert cpu_impl.gemm_info()["calls"]["widened"] == before + 3
        with cpu_impl.gemm_policy("widen"):
            assert cpu_impl.gemm_path(dtype, 1, 2, 3) == "widened"
        with cpu_impl.gemm_policy("aten"):
            assert cpu_impl.gemm_path(dtype) == "aten"
    for policy in cpu_impl.GEMM_POLICIES:
        with cpu_impl.gemm_policy(policy):
            assert cpu_impl.gemm_path(torch.float32) != "widened"
            assert cpu_impl.gemm_path(torch.float64) == "aten"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bias", [True, False])
def test_widened_product_is_the_fp32_product_rounded_once(dtype, bias):
    """bf16 (fp16) products are exact in fp32: the widened GEMM is the fp32 GEMM of
    the same values, rounded once, bit for bit (identity, no dropout: the op's output
    is the GEMM's). On odd shapes, with a transposed operand (the backward's dz @ W)."""
    g = torch.Generator().manual_seed(3)
    for b, k, n in [(1, 5, 3), (3, 33, 65), (64, 100, 257)]:
        x = torch.randn(b, k, generator=g).to(dtype)
        w = torch.randn(n, k, generator=g).to(dtype)
        bb = torch.randn(n, generator=g).to(dtype) if bias else None
        seed, offset = _key(1, 0)
        with gemm_path("widened", dtype):
            y = C.linear_act_forward(x, w, bb, ACTIVATIONS["identity"], 0.0, 0.0, seed, offset)
        want = torch.nn.functional.linear(x.float(), w.float(),
                                          None if bb is None else bb.float()).to(dtype)
        if not cpu_impl.gemm_info()["onednn"]["float32"]:
            assert torch.equal(y, want), (b, k, n)
        else:   # the inner fp32 product may be oneDNN's: another summation order
            torch.testing.assert_close(y.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_set_gemm_rejects_bad_values():
    with pytest.raises(ValueError, match="policy"):
        cpu_impl.set_gemm("mkl")
    with pytest.raises(ValueError, match="min_work"):
        cpu_impl.set_gemm(min_work=-1)
    with pytest.raises(RuntimeError, match="policy"):
        torch.ops.fastgan_C.cpu_gemm_set(7, 0)
    with pytest.raises(ValueError, match="policy"):
        cpu_impl.set_gemm("widened")   # the path's name, not the policy's


def _bf16_specials(n: int) -> torch.Tensor:
    """n bf16 values: random magnitudes over the whole range, +-0, +-inf, NaN and the
    largest finite value (products with it overflow in the epilogue)."""
    g = torch.Generator().manual_seed(7)
    v = torch.randn(n, generator=g) * torch.exp2(torch.randint(-60, 60, (n,), generator=g).float())
    v[:6] = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 3.3895e38])
    return v.bfloat16()


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_bf16_epilogue_rounds_as_torch(p):
    # The bf16 tile loops convert with csrc/cpu/cpu_common.h's widen/narrow (written
    # out so they vectorize); they must round exactly as torch's fp32 -> bf16 cast
    # does, NaN and infinities included. With x = 0 and W = 0 the pre-activation z
    # is the bias in every row; the identity op without dropout returns z itself,
    # and the expected output is the reference's fp32 epilogue of z rounded by torch.
    b, n = 3, 1500
    bias = _bf16_specials(n)
    x, w = torch.zeros(b, 4, dtype=torch.bfloat16), torch.zeros(n, 4, dtype=torch.bfloat16)
    seed, offset = _key(5, 2)
    z = C.linear_act_forward(x, w, bias, ACTIVATIONS["identity"], 0.0, 0.0, seed, offset)
    assert z.isnan().any() and z.isinf().any()
    slope = 0.3
    y = C.linear_act_forward(x, w, bias, LEAKY, slope, p, seed, offset)
    a = reference.act(z.float(), "leaky_relu", slope)
    want = reference.apply_dropout(a, p, seed, offset).bfloat16()
    # NaN payloads differ inside torch itself (its scalar cast gives 0x7FC0, its
    # vectorized one 0xFFFF): NaN where the reference has NaN, the same bits elsewhere.
    nan = want.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.parametrize("op", ["linear_act", "linear_bn_act"])
def test_compute_dw_false_skips_the_dw_gemm(op):
    # The GEMM counters of csrc/cpu/gemm.cpp prove the product is not formed.
    from fastgan.impl import cpu
    b, k, n = 4, 3, 5
    x, w = torch.randn(b, k), torch.randn(n, k)
    seed, offset = _key(1, 0)
    if op == "linear_act":
        y = C.linear_act_forward(x, w, None, LEAKY, 0.2, 0.0, seed, offset)
        args = (torch.ones(b, n), x, w, y, LEAKY, 0.2, 0.0, seed, offset, True)
        run = C.linear_act_backward
    else:
        a = _bn_backward_args(b, k, n)
        args = tuple(v for key, v in a.items() if key not in ("compute_dx", "compute_dw")) + (True,)
        run = C.linear_bn_act_backward

    def gemms(compute_dw):
        before = sum(cpu.gemm_info()["calls"].values())
        out = run(*args, compute_dw)
        return sum(cpu.gemm_info()["calls"].values()) - before, out

    n_with, full = gemms(True)
    n_without, skipped = gemms(False)
    assert (n_with, n_without) == (2, 1)   # dX and dW, then dX only
    assert skipped[1].numel() == 0 and skipped[1].dtype == w.dtype
    for i in (0, 2):
        assert torch.equal(full[i], skipped[i])


def test_keep_freed_memory_is_opt_in_and_sticky(monkeypatch):
    from fastgan.impl import cpu
    monkeypatch.setenv("FASTGAN_CPU_MALLOC", "0")
    assert cpu.keep_freed_memory() is False
    monkeypatch.delenv("FASTGAN_CPU_MALLOC")
    import platform
    on_glibc = platform.libc_ver()[0] == "glibc"
    assert cpu.keep_freed_memory() is on_glibc
    assert cpu.keep_freed_memory() is on_glibc   # once per process
    with pytest.raises(RuntimeError, match="mmap_threshold must be"):
        C.cpu_malloc_keep(0, 1 << 20)


def test_bf16_backward_products_take_onednn_under_auto():
    # dW = dz^T x: the backward pass writes dz^T contiguous (oneDNN's linear
    # would otherwise need ATen's slow bf16 transposing copy), so under "auto"
    # both products run on oneDNN.
    from fastgan.impl import cpu
    if not cpu.gemm_info()["onednn"]["bfloat16"]:
        pytest.skip("no oneDNN bf16 GEMM on this CPU")
    b, k, n = 64, 256, 512   # M*K*N above min_work for both products
    x, w = torch.randn(b, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    seed, offset = _key(1, 0)
    y = C.linear_act_forward(x, w, None, LEAKY, 0.2, 0.0, seed, offset)
    with cpu.gemm_policy("auto"):
        before = cpu.gemm_info()["calls"]
        dx, dw, _ = C.linear_act_backward(torch.ones_like(y), x, w, y, LEAKY, 0.2, 0.0, seed,
                                          offset, True)
        after = cpu.gemm_info()["calls"]
    assert (after["aten"] - before["aten"], after["onednn"] - before["onednn"]) == (0, 2)
    dz = torch.where(y > 0, 1.0, 0.2).bfloat16()
    torch.testing.assert_close(dw.float(), dz.float().t() @ x.float(), rtol=2e-2, atol=1e-1)


@pytest.mark.parametrize("shape", [(1, 5, 3), (3, 17, 33), (2, 40, 300)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_tanh_epilogue_is_torch_tanh_bit_for_bit(shape, p):
    # The fp32 epilogues call torch's own vector tanh (MKL's vmsTanh, csrc/cpu/vec_math.cpp)
    # where torch has it: the fused tanh then equals torch.tanh of the same
    # pre-activation exactly, tails of the 256-wide tiles included (300 columns).
    from fastgan.impl import cpu
    if not torch.backends.mkl.is_available():
        pytest.skip("this torch has no MKL: the epilogue keeps tanhf")
    assert cpu.vector_tanh()
    b, k, n = shape
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(b, k, generator=g), torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g) * 3
    seed, offset = _key(7, 1)
    z = C.linear_act_forward(x, w, bias, ACTIVATIONS["identity"], 0.0, 0.0, seed, offset)
    y = C.linear_act_forward(x, w, bias, ACTIVATIONS["tanh"], 0.0, p, seed, offset)
    assert torch.equal(y, reference.apply_dropout(torch.tanh(z), p, seed, offset))
    # linear_bn_act: the same for tanh after BatchNorm (training statistics).
    gamma, beta = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)

    def bn(act, p_):
        stats = torch.zeros(n), torch.ones(n), torch.zeros((), dtype=torch.int64)
        return C.linear_bn_act_forward(x, w, bias, gamma, beta, *stats, True, 0.1, 1e-5,
                                       ACTIVATIONS[act], 0.0, p_, seed, offset)[0]
    if b > 1:  # BatchNorm in training needs two rows
        assert torch.equal(bn("tanh", p), reference.apply_dropout(torch.tanh(bn("identity", 0.0)),
                                                                   p, seed, offset))
