"""Triton-specific checks of the ``triton`` backend (fastgan.kernels).

The op-level comparisons with the reference live in the shared, backend-
parametrized tests (tests/ops/test_<op>.py, run with ``-k triton``). Here: every
activation of the table has a case in the kernels, which kernels actually ran
(the launch counter), both linear_bn_act paths (single tile and multi tile,
reached with small shapes by lowering the single-tile limit), the dropout mask
for large seeds/offsets, the warm-up entry point, the launchers' memory guards
(the op boundary checks everything else, once) and the ahead-of-time compile.
Without a GPU the kernels run in the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1), so shapes stay small.
"""
import pytest
import torch

import fastgan
from fastgan import reference as R
from fastgan.ops.spec import ACTIVATION_TABLE
from helpers import require

try:
    import triton
    import triton.language as tl

    from fastgan.kernels import common
except ImportError:  # no Triton: the backend's tests skip (fixture K)
    triton = None

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def K():
    require("triton", DEVICE)
    from fastgan.impl import triton as kernels
    return kernels


@pytest.fixture
def multi_tile(monkeypatch):
    """Lower the single-tile limit so small batches take the multi-tile path
    (rows in tiles of 16)."""
    from fastgan.kernels import configs
    monkeypatch.setattr(configs, "MAX_SINGLE_TILE_B", 8)
    monkeypatch.setattr(configs, "STATS_BLOCK_M", 16)


def launched(K, before):
    """Launch counts since the snapshot ``before``."""
    return {k: v - before.get(k, 0) for k, v in K.launches.items() if v - before.get(k, 0)}


def rng(seed=1234, offset=7):
    return (torch.tensor([seed], dtype=torch.int64, device=DEVICE),
            torch.tensor([offset], dtype=torch.int64, device=DEVICE))


def bn_case(b, k, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    f32 = dict(device=DEVICE, dtype=torch.float32)
    t = dict(x=torch.randn(b, k, generator=g).to(DEVICE, dtype),
             weight=(torch.randn(n, k, generator=g) * k ** -0.5).to(DEVICE, dtype),
             bias=(0.1 * torch.randn(n, generator=g)).to(DEVICE, dtype),
             bn_weight=(1 + 0.2 * torch.randn(n, generator=g)).to(**f32),
             bn_bias=(0.2 * torch.randn(n, generator=g)).to(**f32),
             running_mean=(0.1 * torch.randn(n, generator=g)).to(**f32),
             running_var=(0.5 + torch.rand(n, generator=g)).to(**f32),
             grad_y=torch.randn(b, n, generator=g).to(DEVICE, dtype))
    return t


def bn_both(mod, t, training=True, momentum=0.1, p=0.2, activation="leaky_relu", steps=1):
    """Forward (``steps`` times) and backward of backend module ``mod``."""
    rm, rv = t["running_mean"].clone(), t["running_var"].clone()
    nbt = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    s, o = rng()
    for _ in range(steps):
        y, h, mean, rstd = mod.linear_bn_act_forward(
            t["x"], t["weight"], t["bias"], t["bn_weight"], t["bn_bias"], rm, rv, nbt, training,
            momentum, 1e-5, activation, 0.2, p, s, o)
    grads = mod.linear_bn_act_backward(t["grad_y"], t["x"], t["weight"], t["bn_weight"],
                                       t["bn_bias"], h, mean, rstd, training, activation, 0.2,
                                       p, s, o, True)
    return dict(y=y, h=h, mean=mean, rstd=rstd, rm=rm, rv=rv, nbt=nbt, dx=grads[0], dw=grads[1],
                db=grads[2], dgamma=grads[3], dbeta=grads[4])


def assert_close_dict(got, ref, dtype, skip=()):
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for k in ref:
        if k in skip:
            continue
        torch.testing.assert_close(got[k].float(), ref[k].float(), **tol, msg=lambda m: f"{k}: {m}")


# ------------------------------------------------------------------ activations
if triton is not None:
    @triton.jit
    def _act_probe_kernel(v_ptr, out_ptr, n, slope, ACT: tl.constexpr, PART: tl.constexpr,
                          BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        ok = offs < n
        v = tl.load(v_ptr + offs, mask=ok, other=0.0)
        if PART == 0:
            r = common.act(v, ACT, slope)
        elif PART == 1:
            r = common.act_grad(v, ACT, slope)
        else:
            r = common.act_grad_from_output(v, ACT, slope)
        tl.store(out_ptr + offs, r, mask=ok)


@pytest.fixture(scope="module")
def act_probe(K):
    """Applies one of the activation helpers of kernels/common.py to a vector:
    part 0 act(z), 1 act'(z) from z, 2 act'(z) from a = act(z)."""
    def run(v, code, part, slope=0.2):
        out = torch.empty_like(v)
        _act_probe_kernel[(1,)](v, out, v.numel(), slope, ACT=code, PART=part, BLOCK=64)
        return out
    return run


@pytest.mark.parametrize("row", ACTIVATION_TABLE, ids=lambda r: r.name)
def test_every_activation_has_a_kernel_case(act_probe, row):
    """Each row of the table has a case in the kernels' activation switch,
    matching the row's torch functions (0 included: the kinks)."""
    z = torch.linspace(-3, 3, 61, device=DEVICE)
    a = row.fn(z, 0.2)
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(act_probe(z, row.code, 0), a, **close)
    torch.testing.assert_close(act_probe(z, row.code, 1), row.grad(z, 0.2), **close)
    if row.grad_from_output is not None:
        torch.testing.assert_close(act_probe(a, row.code, 2), row.grad_from_output(a, 0.2),
                                   **close)


def test_an_activation_code_without_a_case_does_not_compile(act_probe):
    unknown = max(row.code for row in ACTIVATION_TABLE) + 1
    with pytest.raises(Exception) as info:
        act_probe(torch.zeros(4, device=DEVICE), unknown, 0)
    # the compiler nests the static assertion in the errors of its callers
    err, seen = info.value, []
    while err is not None:
        seen.append(repr(err))
        err = err.__cause__ or err.__context__
    assert any("without a case" in m for m in seen), seen


def test_kernels_import_only_the_op_spec():
    """kernels/ reads the op contract (fastgan.ops.spec) and nothing else of
    fastgan: in particular not fastgan.ops.checks, which the op boundary runs."""
    import ast
    import pathlib

    import fastgan.kernels
    for path in pathlib.Path(fastgan.kernels.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and n.module and n.level == 0]
        assert {m for m in names if m.split(".")[0] == "fastgan"} <= {"fastgan.ops.spec"}, path


# ------------------------------------------------------------------ dispatch
def test_ops_dispatch_to_triton_kernels(K):
    """Through torch.ops with use_backend('triton'): the kernels themselves launch."""
    t = bn_case(4, 9, 5)
    before = dict(K.launches)
    s, o = rng()
    with fastgan.use_backend("triton"):
        y = fastgan.functional.linear_act(t["x"], t["weight"], t["bias"], "leaky_relu", 0.2,
                                          0.2, True, s, o)
        d = fastgan.functional.gan_bce_d(y[:, :1], y[:, 1:2])
    assert y.shape == (4, 5) and d.loss.dim() == 0
    ran = launched(K, before)
    assert ran.get("linear_act_fwd") == 1 and ran.get("gan_bce") == 1, ran


def test_gan_bce_is_one_launch(K):
    a = torch.randn(37, 1, device=DEVICE)
    b = torch.randn(37, 1, device=DEVICE)
    before = dict(K.launches)
    got = K.gan_bce_forward(a, b, 0.9, 0.0)
    assert launched(K, before) == {"gan_bce": 1}
    ref = R.gan_bce_forward(a, b, 0.9, 0.0)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ linear_bn_act paths
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
def test_single_tile_path(K, dtype, momentum):
    t = bn_case(20, 24, 40, dtype)
    before = dict(K.launches)
    got = bn_both(K, t, momentum=momentum, steps=2)
    ran = launched(K, before)
    assert ran.get("linear_bn_act_fwd_single") == 2 and ran.get("linear_bn_act_bwd_single") == 1
    assert "linear_bn_act_fwd_stats" not in ran and "linear_bn_act_bwd_reduce" not in ran
    ref = bn_both(R, t, momentum=momentum, steps=2)
    assert_close_dict(got, ref, dtype, skip=("db",))
    assert int(got["nbt"]) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_multi_tile_path(K, multi_tile, dtype, momentum, training):
    """B > the single-tile limit: partial statistics per row tile + second pass.
    40 rows in tiles of 16: two full tiles and a ragged one."""
    t = bn_case(40, 24, 40, dtype)
    before = dict(K.launches)
    got = bn_both(K, t, training=training, momentum=momentum, steps=2)
    ran = launched(K, before)
    if training:
        assert ran.get("linear_bn_act_fwd_stats") == 2 and ran.get("linear_bn_act_fwd_apply") == 2
        assert "linear_bn_act_fwd_single" not in ran
    else:
        assert ran.get("linear_bn_act_fwd_eval") == 2
    assert ran.get("linear_bn_act_bwd_reduce") == 1 and ran.get("linear_bn_act_bwd_apply") == 1
    assert ran.get("col_sum") == 1 and ran.get("matmul") == 2
    ref = bn_both(R, t, training=training, momentum=momentum, steps=2)
    assert_close_dict(got, ref, dtype, skip=("db",) if training else ())
    # db: zero up to round-off in training (BN cancels the bias)
    torch.testing.assert_close(got["db"].float(), ref["db"].float(), rtol=0,
                               atol=1e-4 if dtype == torch.float32 else 5e-2)
    assert torch.equal((got["y"] == 0), (ref["y"] == 0))


def test_multi_tile_variance_is_stable(K, multi_tile):
    """Columns with a large mean and a small spread: the combined per-tile
    centred sums must not cancel (no E[h^2] - mean^2)."""
    t = bn_case(48, 8, 16)
    t["bias"] = torch.full_like(t["bias"], 1000.0)
    t["x"] = t["x"] * 1e-2
    got = bn_both(K, t, p=0.0)
    ref = bn_both(R, t, p=0.0)
    torch.testing.assert_close(got["rstd"], ref["rstd"], rtol=2e-3, atol=0)
    torch.testing.assert_close(got["rv"], ref["rv"], rtol=1e-3, atol=1e-6)


def test_linear_act_multi_tile_backward(K, multi_tile):
    t = bn_case(40, 24, 40)
    s, o = rng()
    before = dict(K.launches)
    y = K.linear_act_forward(t["x"], t["weight"], t["bias"], "tanh", 0.2, 0.3, s, o)
    got = K.linear_act_backward(t["grad_y"], t["x"], t["weight"], y, "tanh", 0.2, 0.3, s, o, True)
    ran = launched(K, before)
    assert ran.get("linear_act_bwd_dz") == 1 and ran.get("col_sum") == 1
    ry = R.linear_act_forward(t["x"], t["weight"], t["bias"], "tanh", 0.2, 0.3, s, o)
    ref = R.linear_act_backward(t["grad_y"], t["x"], t["weight"], ry, "tanh", 0.2, 0.3, s, o, True)
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-5)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_compute_dx_false_skips_the_dx_gemm(K):
    t = bn_case(6, 10, 12)
    s, o = rng()
    y = K.linear_act_forward(t["x"], t["weight"], t["bias"], "relu", 0.0, 0.0, s, o)
    before = dict(K.launches)
    dx, dw, db = K.linear_act_backward(t["grad_y"], t["x"], t["weight"], y, "relu", 0.0, 0.0,
                                       s, o, False)
    assert dx.numel() == 0 and dw.shape == (12, 10) and db.shape == (12,)
    assert launched(K, before).get("matmul") == 1


# ------------------------------------------------------------------ dropout mask
@pytest.mark.parametrize("seed,offset", [(0, 0), (2**63 - 1, 2**62 + 12345), (-1, -2),
                                         (123456789012345, 2**32 + 5), (2**31, 2**32 - 1)])
def test_dropout_mask_matches_reference(K, seed, offset):
    """Identity activation, strictly positive pre-activations: y == 0 exactly
    where the reference's Philox mask drops."""
    b, k, n = 5, 3, 67
    x = torch.rand(b, k, device=DEVICE) + 0.5
    w = torch.rand(n, k, device=DEVICE) + 0.5
    s = torch.tensor([seed], dtype=torch.int64, device=DEVICE)
    o = torch.tensor([offset], dtype=torch.int64, device=DEVICE)
    y = K.linear_act_forward(x, w, None, "identity", 0.0, 0.5, s, o)
    keep = R.dropout_keep_mask(s.cpu(), o.cpu(), (b, n), 0.5)
    assert torch.equal((y != 0).cpu(), keep)
    # the same mask in linear_bn_act (BN output can be 0 only by the mask here)
    t = bn_case(b, k, n)
    t["x"], t["weight"] = x, w
    t["bn_bias"] = torch.full((n,), 50.0, device=DEVICE)
    nbt = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    y2 = K.linear_bn_act_forward(x, w, None, t["bn_weight"], t["bn_bias"], t["running_mean"],
                                 t["running_var"], nbt, True, 0.1, 1e-5, "identity", 0.0, 0.5,
                                 s, o)[0]
    assert torch.equal((y2 != 0).cpu(), keep)


def test_seed_and_offset_are_read_from_the_device_tensors(K):
    """Changing the tensors in place (as a CUDA graph replay would see) changes the mask."""
    x = torch.rand(4, 3, device=DEVICE) + 0.5
    w = torch.rand(64, 3, device=DEVICE) + 0.5
    s, o = rng(5, 0)
    y0 = K.linear_act_forward(x, w, None, "identity", 0.0, 0.5, s, o)
    o.add_(1)
    y1 = K.linear_act_forward(x, w, None, "identity", 0.0, 0.5, s, o)
    assert not torch.equal(y0 == 0, y1 == 0)
    assert torch.equal((y1 != 0).cpu(), R.dropout_keep_mask(s.cpu(), o.cpu(), (4, 64), 0.5))


# ------------------------------------------------------------------ warm-up
def test_warmup_compiles_without_touching_state(K):
    before = dict(K.launches)
    n = K.warmup([(3, 5, 7)], dtypes=(torch.float32,), device=DEVICE, dropout=(0.0, 0.2),
                 training=(True, False))
    # per dropout value: linear_act + linear_bn_act (train, eval); then gan_bce once
    assert n == 2 * (1 + 2) + 1
    ran = launched(K, before)
    for name in ("linear_act_fwd", "linear_act_bwd_dz", "linear_bn_act_fwd_single",
                 "linear_bn_act_fwd_eval", "linear_bn_act_bwd_single", "matmul", "gan_bce"):
        assert ran.get(name), (name, ran)
    with pytest.raises(ValueError, match="shapes"):
        K.warmup([(3, 5)], device=DEVICE)


# ------------------------------------------------------------------ validation
def test_rejects_float64_with_a_clear_error(K):
    t = bn_case(3, 4, 5)
    s, o = rng()
    with pytest.raises(TypeError, match="float64"):
        K.linear_act_forward(t["x"].double(), t["weight"].double(), None, "relu", 0.0, 0.0, s, o)
    with pytest.raises(TypeError, match="float64"):
        K.gan_bce_forward(torch.zeros(3, 1, dtype=torch.float64, device=DEVICE), None, 1.0, 0.0)


def _linear_act_args(t):
    s, o = rng()
    return dict(x=t["x"], weight=t["weight"], bias=None, activation="relu", negative_slope=0.0,
                dropout=0.0, seed=s, offset=o)


def _linear_bn_act_args(t):
    return dict(_linear_act_args(t), bn_weight=t["bn_weight"], bn_bias=t["bn_bias"],
                running_mean=t["running_mean"].clone(), running_var=t["running_var"].clone(),
                num_batches_tracked=torch.zeros(1, dtype=torch.int64, device=DEVICE))


# (the argument the error names, the bad value)
BAD_LINEAR = [
    ("weight", lambda t: dict(weight=t["weight"][:, :3])),
    ("bias", lambda t: dict(bias=t["bias"][:4])),
    ("seed", lambda t: dict(seed=rng()[0].int())),
    ("activation", lambda t: dict(activation="gelu")),
    ("negative_slope", lambda t: dict(negative_slope=-1.0)),
    ("dropout p", lambda t: dict(dropout=1.0)),
]
BAD_BN = [
    ("running_var", lambda t: dict(running_var=t["running_var"][:3])),
    ("eps", lambda t: dict(eps=0.0)),
    ("momentum", lambda t: dict(momentum=float("nan"))),
]


@pytest.mark.parametrize("op,name,bad",
                         [("linear_act", n, b) for n, b in BAD_LINEAR]
                         + [("linear_bn_act", n, b) for n, b in BAD_LINEAR + BAD_BN],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_op_boundary_rejects_bad_arguments(K, op, name, bad):
    """Shapes, rng tensors and hyper-parameters are checked once, at the op
    boundary (fastgan.ops.checks, before dispatch), not again by the launchers:
    under the triton backend a bad value is rejected, naming the argument,
    before any kernel launches."""
    t = bn_case(3, 4, 5)
    args = {**(_linear_act_args if op == "linear_act" else _linear_bn_act_args)(t), **bad(t)}
    before = dict(K.launches)
    with fastgan.use_backend("triton"), pytest.raises((TypeError, ValueError), match=name):
        getattr(fastgan.functional, op)(**args)
    assert launched(K, before) == {}


def test_backward_guards_the_shapes_it_indexes(K):
    """The backward ops get the forward's saved tensors (nothing checks them at
    the boundary), so their launchers guard the shapes the kernels index by."""
    t = bn_case(3, 4, 5)
    s, o = rng()
    y = K.linear_act_forward(t["x"], t["weight"], None, "relu", 0.0, 0.0, s, o)
    with pytest.raises(ValueError, match="grad_y"):
        K.linear_act_backward(t["grad_y"][:2], t["x"], t["weight"], y, "relu", 0.0, 0.0, s, o,
                              True)
    nbt = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    _, h, mean, rstd = K.linear_bn_act_forward(t["x"], t["weight"], None, t["bn_weight"],
                                               t["bn_bias"], t["running_mean"].clone(),
                                               t["running_var"].clone(), nbt, True, 0.1, 1e-5,
                                               "relu", 0.0, 0.0, s, o)
    with pytest.raises(ValueError, match="rstd"):
        K.linear_bn_act_backward(t["grad_y"], t["x"], t["weight"], t["bn_weight"], t["bn_bias"],
                                 h, mean, rstd[:3], True, "relu", 0.0, 0.0, s, o, True)
    with pytest.raises(ValueError, match="h must be contiguous"):
        K.linear_bn_act_backward(t["grad_y"], t["x"], t["weight"], t["bn_weight"], t["bn_bias"],
                                 h.t().contiguous().t(), mean, rstd, True, "relu", 0.0, 0.0, s, o,
                                 True)


def test_outputs_must_fit_32_bit_offsets():
    """The kernels store y and h with int32 offsets: B * N must stay below 2**31
    even where x and W are small."""
    from fastgan.kernels import guards
    guards.output((2**16, 2**15 - 1), "y")
    with pytest.raises(ValueError, match="y would have 2147483648 elements"):
        guards.output((2**16, 2**15), "y")


def test_rejects_cpu_tensors_without_the_interpreter(K, monkeypatch):
    from fastgan.kernels import runtime
    if DEVICE != "cpu":
        pytest.skip("checks the CPU-tensor error; this run has a GPU")
    monkeypatch.setattr(runtime, "INTERPRET", False)
    s, o = rng()
    with pytest.raises(ValueError, match="CUDA"):
        K.linear_act_forward(torch.zeros(2, 3), torch.zeros(4, 3), None, "relu", 0.0, 0.0, s, o)


# ------------------------------------------------------------------ GPU compile, no GPU
@pytest.mark.slow
def test_kernels_compile_for_sm90_and_sm80():
    """Ahead-of-time compile (PTX + ptxas) of every kernel for Hopper and Ampere:
    catches what the interpreter cannot (compiled-language typing, lowering)."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "fastgan.kernels.aot", "--arch", "90", "80",
                        "--dtype", "bf16"], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("kernels compiled") == 2, r.stdout


def test_strided_parameter_vectors(K):
    """Strided bias / BN vectors / logits are read correctly (the kernels index
    densely, so the launchers copy them); running statistics, updated in place,
    must be contiguous."""
    t = bn_case(6, 10, 12)
    strided = lambda v: torch.stack([v, torch.full_like(v, 1e6)], 1)[:, 0]  # noqa: E731
    for k in ("bias", "bn_weight", "bn_bias"):
        t2 = dict(t, **{k: strided(t[k])})
        assert not t2[k].is_contiguous()
        got, ref = bn_both(K, t2), bn_both(R, t)
        assert_close_dict(got, ref, torch.float32, skip=("db",))
    s, o = rng()
    y = K.linear_act_forward(t["x"], t["weight"], strided(t["bias"]), "relu", 0.0, 0.0, s, o)
    torch.testing.assert_close(y, R.linear_act_forward(t["x"], t["weight"], t["bias"], "relu",
                                                       0.0, 0.0, s, o))
    logits = torch.randn(6, 2, device=DEVICE)
    got = K.gan_bce_forward(logits[:, :1], logits[:, 1:], 1.0, 0.0)
    ref = R.gan_bce_forward(logits[:, :1], logits[:, 1:], 1.0, 0.0)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)
    nbt = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="running_mean must be contiguous"):
        K.linear_bn_act_forward(t["x"], t["weight"], None, t["bn_weight"], t["bn_bias"],
                                strided(t["running_mean"]), t["running_var"], nbt, True, 0.1,
                                1e-5, "relu", 0.0, 0.0, s, o)


# ------------------------------------------------------------------ TF32 opt-in
def _tf32(t):
    """fp32 -> the TF32 value the GPU's cvt.rna.tf32 gives (10 mantissa bits,
    ties away from zero), computed in integers."""
    bits = t.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    bits = (bits + 0x1000) & 0xFFFFE000
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


@pytest.fixture
def allow_tf32():
    prev = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev


def test_fp32_gemms_are_ieee_unless_tf32_is_allowed(K, allow_tf32):
    """fp32 is IEEE by default; torch's own TF32 switch for CUDA matmuls (what
    cuBLAS obeys) is the one opt-in, and it reaches the kernels: the GEMMs
    multiply TF32-rounded inputs (the interpreter emulates tl.dot's
    input_precision="tf32"); bf16 ignores it."""
    from fastgan.kernels import runtime
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 48, generator=g).to(DEVICE)
    w = torch.randn(24, 48, generator=g).to(DEVICE)
    s, o = rng()
    exact = x.double() @ w.double().T
    tf32_exact = _tf32(x).double() @ _tf32(w).double().T
    assert not torch.backends.cuda.matmul.allow_tf32 and not runtime.tf32(torch.float32)
    ieee = K.linear_act_forward(x, w, None, "identity", 0.0, 0.0, s, o)
    torch.backends.cuda.matmul.allow_tf32 = True
    assert runtime.tf32(torch.float32) and not runtime.tf32(torch.bfloat16)
    tf32 = K.linear_act_forward(x, w, None, "identity", 0.0, 0.0, s, o)
    dx, dw, _ = K.linear_act_backward(torch.ones_like(tf32), x, w, tf32, "identity", 0.0, 0.0,
                                      s, o, True)
    err = lambda a, b: float((a.double() - b).abs().max() / b.abs().max())  # noqa: E731
    assert err(ieee, exact) < 1e-6 < 1e-4 < err(ieee, tf32_exact) + err(tf32, exact)
    assert err(tf32, tf32_exact) < 1e-6, "TF32 opt-in did not reach the forward GEMM"
    ones = torch.ones(20, 24, dtype=torch.float64, device=DEVICE)
    assert err(dx, ones @ _tf32(w).double()) < 1e-6  # the backward GEMMs too
    assert err(dw, ones.T @ _tf32(x).double()) < 1e-6
    torch.backends.cuda.matmul.allow_tf32 = False
    assert torch.equal(K.linear_act_forward(x, w, None, "identity", 0.0, 0.0, s, o), ieee)


@pytest.mark.slow
def test_tf32_constexpr_selects_the_ptx_precision():
    """Compiled for sm_90 (no GPU: the AOT path), fp32 GEMMs run IEEE FMA by
    default and TF32 tensor-core MMAs with TF32=True: the opt-in reaches
    tl.dot's input_precision."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = """
from fastgan.kernels import aot, matmul as MM
args = dict(a_ptr="*fp32", b_ptr="*fp32", c_ptr="*fp32", M=1, N=1, K=1, stride_am=1,
            stride_ak=1, stride_bk=1, stride_bn=1, stride_cm=1, stride_cn=1)
for tf32 in (False, True):
    ptx = aot.compile_one(MM._matmul_kernel, args, dict(TF32=tf32, BLOCK_M=64, BLOCK_N=64,
                          BLOCK_K=16), 90).asm["ptx"]
    print(tf32, "tf32" in ptx, ptx.count("fma.rn.f32") >= 64 * 64 * 16 // 128)
"""
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # IEEE: one FMA per product (a 64 x 64 x 16 tile over 128 threads); TF32: MMAs
    assert r.stdout.split("\n")[:2] == ["False False True", "True True False"], r.stdout


# ------------------------------------------------------------------ autotune configs
def test_config_tables_fit_the_registers():
    """Every GPU config list (built here without compiling anything): at most 16
    warps (at 32 the 64-register cap spills), tiles within the per-thread
    budget of their kind, every block size >= 16 (tl.dot's minimum), a config
    for every arch x dtype class at every tile height a launcher uses, and a
    sub-128-row tile first (what FASTGAN_TRITON_AUTOTUNE=0 runs)."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = """
from fastgan.kernels import configs as C, aot, resources as R
kernels = {R._name(k): k for k, _, _ in aot.jobs()}
heights = [2**i for i in range(4, 9)]  # 16 .. MAX_SINGLE_TILE_B
assert C.MAX_SINGLE_TILE_B == 256 and C.STATS_BLOCK_M == 128
for name, k in kernels.items():
    cfgs = getattr(k, "configs", None)
    if cfgs is None:
        continue
    for c in cfgs:
        arch, cls, cap, _ = C._TAG_OF_CONFIG[id(c)]
        assert 4 <= c.num_warps <= 16, (name, c)
        if "BLOCK_M" in c.kwargs:
            assert C.per_thread(0, c) <= cap, (name, c)
        assert all(v >= 16 for b, v in c.kwargs.items() if b.startswith("BLOCK")), (name, c)
    gemm = "TF32" in [p.name for p in k.fn.params]
    for arch in ("sm80", "sm90"):
        for cls in ("mma", "fp32") + (("tf32",) if gemm else ()):
            for h in ([None] if "BLOCK_M" in cfgs[0].kwargs else heights):
                kept = [c for c in cfgs if C.admits(c, arch, cls, h)]
                assert kept, (name, arch, cls, h)
                if h is None:
                    assert kept[0].kwargs["BLOCK_M"] <= 64, (name, kept[0])
mm, fwd = kernels["_matmul_kernel"], kernels["_fwd_kernel"]
big = lambda k: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in k.configs}
assert (128, 128) in big(mm) and (128, 128) not in big(fwd)  # no epilogue: a bigger tile
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr[-3000:]
