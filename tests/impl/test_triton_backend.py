"""Triton-specific checks of the ``triton`` backend (fastgan.kernels).

The op-level comparisons with the reference live in the shared, backend-
parametrized tests (tests/test_<op>.py, run with ``-k triton``). Here: which
kernels actually ran (the launch counter), both linear_bn_act paths (single
tile and multi tile, reached with small shapes by lowering the single-tile
limit), the dropout mask for large seeds/offsets, the warm-up entry point and
input validation. Without a GPU the kernels run in the Triton interpreter
(conftest.py sets TRITON_INTERPRET=1), so shapes stay small.
"""
import pytest
import torch

import fastgan
from fastgan import reference as R
from helpers import require

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def K():
    require("triton", DEVICE)
    from fastgan.impl import triton as kernels
    return kernels


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
def test_multi_tile_path(K, monkeypatch, dtype, momentum, training):
    """B > the single-tile limit: partial statistics per row tile + second pass.
    40 rows in tiles of 16: two full tiles and a ragged one."""
    from fastgan.kernels import runtime
    monkeypatch.setattr(runtime, "MAX_SINGLE_TILE_B", 8)
    monkeypatch.setattr(runtime, "STATS_BLOCK_M", 16)
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


def test_multi_tile_variance_is_stable(K, monkeypatch):
    """Columns with a large mean and a small spread: the combined per-tile
    centred sums must not cancel (no E[h^2] - mean^2)."""
    from fastgan.kernels import runtime
    monkeypatch.setattr(runtime, "MAX_SINGLE_TILE_B", 8)
    monkeypatch.setattr(runtime, "STATS_BLOCK_M", 16)
    t = bn_case(48, 8, 16)
    t["bias"] = torch.full_like(t["bias"], 1000.0)
    t["x"] = t["x"] * 1e-2
    got = bn_both(K, t, p=0.0)
    ref = bn_both(R, t, p=0.0)
    torch.testing.assert_close(got["rstd"], ref["rstd"], rtol=2e-3, atol=0)
    torch.testing.assert_close(got["rv"], ref["rv"], rtol=1e-3, atol=1e-6)


def test_linear_act_multi_tile_backward(K, monkeypatch):
    from fastgan.kernels import runtime
    monkeypatch.setattr(runtime, "MAX_SINGLE_TILE_B", 8)
    monkeypatch.setattr(runtime, "STATS_BLOCK_M", 16)
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


def test_rejects_bad_shapes_and_rng(K):
    t = bn_case(3, 4, 5)
    s, o = rng()
    with pytest.raises(ValueError, match="weight"):
        K.linear_act_forward(t["x"], t["weight"][:, :3], None, "relu", 0.0, 0.0, s, o)
    with pytest.raises(ValueError, match="bias"):
        K.linear_act_forward(t["x"], t["weight"], t["bias"][:4], "relu", 0.0, 0.0, s, o)
    with pytest.raises(ValueError, match="seed"):
        K.linear_act_forward(t["x"], t["weight"], None, "relu", 0.0, 0.0, s.int(), o)
    y = K.linear_act_forward(t["x"], t["weight"], None, "relu", 0.0, 0.0, s, o)
    with pytest.raises(ValueError, match="grad_y"):
        K.linear_act_backward(t["grad_y"][:2], t["x"], t["weight"], y, "relu", 0.0, 0.0, s, o,
                              True)
    nbt = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="running_var"):
        K.linear_bn_act_forward(t["x"], t["weight"], None, t["bn_weight"], t["bn_bias"],
                                t["running_mean"], t["running_var"][:3], nbt, True, 0.1, 1e-5,
                                "relu", 0.0, 0.0, s, o)


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


def test_bench_script_parses_its_arguments(tmp_path, capsys):
    """bench/bench_triton_ops.py runs on a GPU; here: its plan and its errors."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "bench_triton_ops.py")
    spec = importlib.util.spec_from_file_location("bench_triton_ops", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = str(tmp_path / "r.json")
    assert bench.main([out, "--dry-run", "--batch", "64", "8192", "--dtype", "bf16"]) == 0
    assert "30 measurements" in capsys.readouterr().out  # 3 ops x 2 batches x 5 contenders
    with pytest.raises(SystemExit):
        bench.parse_args([out, "--batch", "1"])
    if not torch.cuda.is_available():
        assert bench.main([out]) == 2 and not os.path.exists(out)


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
