"""The ``cuda`` backend: what is specific to the kernels of csrc/cuda.

The shared matrix (tests/ops/test_<op>.py over ``helpers.CASES``, which runs
the ``cuda`` backend on a GPU) compares every op with the reference. Here:

* On a GPU (marked ``gpu``, skipped without one): the cases of the kernels'
  own matrix that the shared one does not run (the column-tile edge shapes,
  momentum=None over several steps, fp16 throughout, every activation in eval
  and at low precision, a gan_bce batch of many elements per thread), the C++
  entry's checks on CUDA tensors, and CUDA graph capture + replay of each op,
  forward and backward, equal to eager (``fastgan.train.graphs.capture``).
* On the CPU, emulated (``slow``): the same kernel sources compiled as C++ with
  csrc/cuda/emulate.cuh (blocks of real threads, __syncthreads as a barrier)
  and compared with the reference; this checks indexing, reductions, numerics
  and argument checks of the kernels on machines without a GPU.
* On the CPU, built (``slow``): nvcc compiles the extension with its CUDA
  kernels in a temporary copy of the repository; the result loads on this
  machine, registers a CUDA kernel for every function of csrc/ops.cpp, and
  ``fastgan.backends()`` reports ``cuda`` unavailable without error.

Accuracy criterion (``helpers.assert_matches``): against a float64 "gold" run
of the reference, the cuda backend's error is at most twice the reference's own
error at the same dtype, plus ``helpers.FLOOR``.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastgan
from fastgan.impl import reference as R
from fastgan.ops import functional as FG
from fastgan.ops.spec import ACTIVATIONS
from helpers import FLOOR, HAS_CUDA, assert_matches, ran, rel_err, require

ROOT = Path(__file__).resolve().parents[2]
gpu = pytest.mark.gpu
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Column tiles are 32 features by 16 rows: batches below a tile's rows, N = 2 * 32 + 1.
TILE_EDGES = [(1, 33, 65), (2, 33, 65)]
SHAPES = [(2, 100, 256), (3, 784, 1024), (64, 1024, 784), (5, 7, 3), *TILE_EDGES, (3, 33, 65)]
SEED, OFFSET = 1234, 7


# ----------------------------------------------------------------- helpers
def bias_grad_scale(inputs, p) -> float:
    """In training, the bias gradient of linear_bn_act sums dh over the batch, which is
    exactly 0 but for round-off, so its max |gold| is no scale at all. Its error is
    measured against the magnitude of what is summed, sum_i rstd |gamma| |grad_y| / (1 - p)."""
    x, w, b = (inputs[k].double() for k in ("x", "weight", "bias"))
    h = x @ w.T + b
    rstd = (h.var(0, unbiased=False) + 1e-5).rsqrt()
    terms = rstd * inputs["bn_weight"].double().abs() * inputs["grad_y"].double().abs() / (1 - p)
    return float(terms.sum(0).max())


def assert_close_to_gold(what, got, ref, gold, dtype, bias=None):
    """``assert_matches`` on every key; ``bias = (key, scale)`` measures that key's
    error against max(max |gold|, scale) instead (see bias_grad_scale)."""
    keys = [k for k in gold if bias is None or k != bias[0]]
    assert_matches(what, got, ref, gold, dtype, keys)
    if bias is not None:
        key, scale = bias
        gmax = float(gold[key].abs().max())
        shrink = max(gmax, 1e-12) / max(gmax, scale, 1e-12)  # rel_err divides by max |gold|
        e_got, e_ref = (rel_err(r[key], gold[key]) * shrink for r in (got, ref))
        assert e_got <= 2 * e_ref + FLOOR[dtype], \
            f"{what}: {key} error {e_got:.3g} > 2 x reference error {e_ref:.3g} + {FLOOR[dtype]:g}"


def make_bn_inputs(b, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    bound = k ** -0.5
    return dict(
        x=torch.randn(b, k, generator=g),
        weight=(torch.rand(n, k, generator=g) * 2 - 1) * bound,
        bias=(torch.rand(n, generator=g) * 2 - 1) * bound,
        bn_weight=1 + 0.2 * torch.randn(n, generator=g),
        bn_bias=0.2 * torch.randn(n, generator=g),
        running_mean=0.1 * torch.randn(n, generator=g),
        running_var=0.5 + torch.rand(n, generator=g),
        grad_y=torch.randn(b, n, generator=g),
    )


def cast(inputs: dict, device, dtype) -> dict:
    """Inputs on ``device``; data tensors in ``dtype``, BN tensors in its stat dtype."""
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    return {k: v.to(device, dtype if k in ("x", "weight", "bias", "grad_y") else stat).clone()
            for k, v in inputs.items()}


def rng(device, seed=SEED, offset=OFFSET):
    return (torch.tensor([seed], dtype=torch.int64, device=device),
            torch.tensor([offset], dtype=torch.int64, device=device))


def _id(*parts):
    return "-".join("x".join(map(str, p)) if isinstance(p, tuple) else str(p) for p in parts)


# ------------------------------------------------- GPU: the public ops, eager
def run_linear_bn_act(name, inputs, device, dtype, training, momentum, p, activation,
                      steps=2):
    """``steps`` forwards (so momentum=None averages over several) + one backward."""
    t = cast(inputs, device, dtype)
    for k in ("x", "weight", "bias", "bn_weight", "bn_bias"):
        t[k].requires_grad_(True)
    nbt = torch.zeros(1, dtype=torch.int64, device=device)
    seed, offset = rng(device)
    with ran(name, "linear_bn_act_forward", "linear_bn_act_backward"):
        for _ in range(steps):
            y = FG.linear_bn_act(t["x"], t["weight"], t["bias"], t["bn_weight"], t["bn_bias"],
                                 t["running_mean"], t["running_var"], nbt, training, momentum,
                                 1e-5, activation, 0.2, p, seed, offset)
        y.backward(t["grad_y"])
    return dict(y=y, x_grad=t["x"].grad, weight_grad=t["weight"].grad,
                bias_grad=t["bias"].grad, bn_weight_grad=t["bn_weight"].grad,
                bn_bias_grad=t["bn_bias"].grad, running_mean=t["running_mean"],
                running_var=t["running_var"], num_batches_tracked=nbt)


def run_linear_act(name, inputs, device, dtype, p, activation, training=True):
    t = cast(inputs, device, dtype)
    for k in ("x", "weight", "bias"):
        t[k].requires_grad_(True)
    seed, offset = rng(device)
    with ran(name, "linear_act_forward", "linear_act_backward"):
        y = FG.linear_act(t["x"], t["weight"], t["bias"], activation, 0.2, p, training, seed,
                          offset)
        y.backward(t["grad_y"])
    return dict(y=y, x_grad=t["x"].grad, weight_grad=t["weight"].grad, bias_grad=t["bias"].grad)


def check_linear_bn_act(shape, training, momentum, p, dtype, activation="leaky_relu", seed=0):
    require("cuda", "cuda")
    inputs = make_bn_inputs(*shape, seed=seed)
    args = (training, momentum, p, activation)
    got = run_linear_bn_act("cuda", inputs, "cuda", dtype, *args)
    ref = run_linear_bn_act("reference", inputs, "cuda", dtype, *args)
    gold = run_linear_bn_act("reference", inputs, "cuda", torch.float64, *args)
    assert torch.equal(got.pop("num_batches_tracked"), gold.pop("num_batches_tracked"))
    ref.pop("num_batches_tracked")
    bias = ("bias_grad", bias_grad_scale(inputs, p)) if training else None
    assert_close_to_gold(f"linear_bn_act {shape} {activation}", got, ref, gold, dtype, bias)


BN_MODES = {"train-m0.1": (True, 0.1), "train-mNone": (True, None), "eval": (False, 0.1)}


def _bn_matrix():
    """The kernels' matrix less what tests/ops/test_linear_bn_act.py runs on every
    backend (one step with momentum 0.1 or eval, fp32 and bf16, its shapes):
    momentum=None over two steps, fp16, and the tile edges."""
    for shape, mode, p, dt in itertools.product(SHAPES, BN_MODES, (0.0, 0.2, 0.5), DTYPES):
        if mode == "train-mNone" or dt == "fp16" or shape in TILE_EDGES:
            yield pytest.param(shape, *BN_MODES[mode], p, DTYPES[dt], id=_id(shape, mode, p, dt))


@gpu
@pytest.mark.parametrize("shape,training,momentum,p,dtype", list(_bn_matrix()))
def test_linear_bn_act_matches_reference(shape, training, momentum, p, dtype):
    if training and shape[0] == 1:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            check_linear_bn_act(shape, training, momentum, p, dtype)
        return
    check_linear_bn_act(shape, training, momentum, p, dtype)


@gpu
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_linear_bn_act_activations(activation, training, dtype):
    """Every activation in train and eval at every dtype (the shared matrix: fp32, train)."""
    check_linear_bn_act((3, 33, 65), training, 0.1, 0.2, dtype, activation, seed=1)


def _act_matrix():
    """The kernels' matrix less what tests/ops/test_linear_act.py runs on every backend
    (leaky_relu over its shapes in fp32 and bf16; the other activations in fp32 at
    (3, 33, 65), p 0 or 0.2): fp16, the tile edges, and the other activations at low
    precision, at p=0.5 and on the largest shape."""
    for shape, p, act, dt in itertools.product(SHAPES, (0.0, 0.2, 0.5), sorted(ACTIVATIONS),
                                               DTYPES):
        if act != "leaky_relu" and shape not in ((3, 33, 65), (64, 1024, 784)):
            continue  # the other activations run on two shapes
        shared = dt != "fp16" and shape not in TILE_EDGES and (
            act == "leaky_relu" or (dt == "fp32" and shape == (3, 33, 65) and p < 0.5))
        if not shared:
            yield pytest.param(shape, p, act, DTYPES[dt], id=_id(shape, p, act, dt))


@gpu
@pytest.mark.parametrize("shape,p,activation,dtype", list(_act_matrix()))
def test_linear_act_matches_reference(shape, p, activation, dtype):
    require("cuda", "cuda")
    inputs = make_bn_inputs(*shape)
    got = run_linear_act("cuda", inputs, "cuda", dtype, p, activation)
    ref = run_linear_act("reference", inputs, "cuda", dtype, p, activation)
    gold = run_linear_act("reference", inputs, "cuda", torch.float64, p, activation)
    assert_close_to_gold(f"linear_act {shape} {activation}", got, ref, gold, dtype)


# The kernels' matrix less what tests/ops/test_gan_bce.py runs on every backend:
# 8192 logits (16 per thread of the kernel's one block), and the G loss in fp16.
GAN_BCE_MATRIX = [pytest.param(b, smoothing, DTYPES[dt], id=_id(b, smoothing, dt))
                  for b, smoothing, dt in itertools.product((1, 2, 3, 64, 1000, 8192), (0.0, 0.1),
                                                            DTYPES)
                  if b == 8192 or dt == "fp16"]


@gpu
@pytest.mark.parametrize("b,smoothing,dtype", GAN_BCE_MATRIX)
def test_gan_bce_matches_reference(b, smoothing, dtype):
    """The D and the G loss of the same logits, through one backward."""
    require("cuda", "cuda")
    g = torch.Generator().manual_seed(b)
    real, fake = 3 * torch.randn(b, 1, generator=g), 3 * torch.randn(b, 1, generator=g)

    def run(name, dt):
        r = real.to("cuda", dt).requires_grad_(True)
        f = fake.to("cuda", dt).requires_grad_(True)
        with ran(name, "gan_bce_forward"):
            d = FG.gan_bce_d(r, f, smoothing)
            gl = FG.gan_bce_g(f)
        (d.loss + 3.0 * gl.loss).backward()
        return dict(d_loss=d.loss, d_real=d.d_real, d_fake=d.d_fake, g_loss=gl.loss,
                    g_fake=gl.d_fake, real_grad=r.grad, fake_grad=f.grad)

    got, ref, gold = run("cuda", dtype), run("reference", dtype), run("reference", torch.float64)
    assert got["d_loss"].dtype == torch.float32 and got["d_loss"].dim() == 0
    assert_close_to_gold(f"gan_bce b={b}", got, ref, gold, dtype)


@gpu
def test_entry_checks_on_cuda_tensors():
    """What protects memory, at the C++ entry (csrc/checks.h), naming the argument."""
    require("cuda", "cuda")
    x = torch.randn(4, 8, device="cuda", dtype=torch.float64)
    w = torch.randn(5, 8, device="cuda", dtype=torch.float64)
    seed, offset = rng("cuda")
    C = torch.ops.fastgan_C
    with pytest.raises(RuntimeError, match="x: the cuda backend supports float32"):
        C.linear_act_forward(x, w, None, 2, 0.2, 0.0, seed, offset)
    with pytest.raises(RuntimeError, match="weight has in_features=7"):
        C.linear_act_forward(x.float(), w.float()[:, :7], None, 2, 0.2, 0.0, seed, offset)
    with pytest.raises(RuntimeError, match="seed must be on the device of x"):
        C.linear_act_forward(x.float(), w.float(), None, 2, 0.2, 0.0, seed.cpu(), offset)
    t = cast(make_bn_inputs(4, 8, 5), "cuda", torch.float32)
    strided = torch.ones(10, device="cuda")[::2]
    with pytest.raises(RuntimeError, match="running_var must be contiguous"):
        C.linear_bn_act_forward(t["x"], t["weight"], t["bias"], t["bn_weight"], t["bn_bias"],
                                t["running_mean"], strided,
                                torch.zeros(1, dtype=torch.int64, device="cuda"), True, 0.1,
                                1e-5, 2, 0.2, 0.0, seed, offset)


# ------------------------------------------------- GPU: CUDA graph capture
def _assert_same(replayed, eager, what):
    for i, (a, b) in enumerate(zip(replayed, eager)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}[{i}]: {m}")
        assert torch.equal(a == 0, b == 0), f"{what}[{i}]: different dropout mask"


@gpu
@pytest.mark.parametrize("momentum", [0.1, None])
def test_graph_replay_linear_bn_act(momentum):
    from fastgan.train.graphs import capture  # GPU only: not imported at collection
    require("cuda", "cuda")
    inputs = cast(make_bn_inputs(64, 100, 256, seed=3), "cuda", torch.float32)
    params = [inputs[k].requires_grad_(True) for k in ("x", "weight", "bias", "bn_weight",
                                                      "bn_bias")]
    stats0 = (inputs["running_mean"].clone(), inputs["running_var"].clone())
    stats = (inputs["running_mean"], inputs["running_var"],
             torch.zeros(1, dtype=torch.int64, device="cuda"))
    seed, offset = rng("cuda")

    def step(stats=stats, seed=seed, offset=offset):
        y = FG.linear_bn_act(*params, *stats, True, momentum, 1e-5, "leaky_relu", 0.2, 0.5,
                             seed, offset)
        return (y,) + torch.autograd.grad(y, params, inputs["grad_y"])

    with fastgan.use_backend("cuda"):
        graphed = capture(step, warmup=3)
        for new_seed, nbt in ((11, 4), (12, 9)):
            stats[0].copy_(stats0[0])
            stats[1].copy_(stats0[1])
            stats[2].fill_(nbt)
            seed.fill_(new_seed)  # a replay reads the seed from the device: a new mask
            out = graphed.replay()
            fresh = (stats0[0].clone(), stats0[1].clone(),
                     torch.full((1,), nbt, dtype=torch.int64, device="cuda"))
            eager = step(fresh, *rng("cuda", seed=new_seed))
            _assert_same(out, eager, "linear_bn_act")
            _assert_same(stats, fresh, "running stats")


@gpu
def test_graph_replay_linear_act():
    from fastgan.train.graphs import capture
    require("cuda", "cuda")
    inputs = cast(make_bn_inputs(64, 100, 256, seed=4), "cuda", torch.float32)
    params = [inputs[k].requires_grad_(True) for k in ("x", "weight", "bias")]
    seed, offset = rng("cuda")

    def step(seed=seed, offset=offset):
        y = FG.linear_act(*params, "leaky_relu", 0.2, 0.5, True, seed, offset)
        return (y,) + torch.autograd.grad(y, params, inputs["grad_y"])

    with fastgan.use_backend("cuda"):
        graphed = capture(step, warmup=3)
        for new_offset in (100, 200):
            offset.fill_(new_offset)
            _assert_same(graphed.replay(), step(*rng("cuda", offset=new_offset)), "linear_act")


@gpu
def test_graph_replay_gan_bce():
    from fastgan.train.graphs import capture
    require("cuda", "cuda")
    real = torch.randn(64, 1, device="cuda", requires_grad=True)
    fake = torch.randn(64, 1, device="cuda", requires_grad=True)

    def step():
        d = FG.gan_bce_d(real, fake, 0.1)
        return (d.loss, d.d_real, d.d_fake) + torch.autograd.grad(d.loss, [real, fake])

    with fastgan.use_backend("cuda"):
        graphed = capture(step, warmup=3)
        with torch.no_grad():
            real.mul_(-2.0)  # new inputs in the static buffers
        _assert_same(graphed.replay(), step(), "gan_bce")


# ------------------------------------------------- CPU: the kernels, emulated
EMULATED = ("linear_bn_act_forward", "linear_bn_act_backward", "linear_act_forward",
            "linear_act_backward", "gan_bce_forward", "set_row_chunking", "row_chunking")


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The kernels of csrc/cuda compiled as C++ (csrc/cuda/emulate.cuh), as
    ``torch.ops.fastgan_cuda_emu.*`` taking CPU tensors."""
    from torch.utils import cpp_extension
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    build = tmp_path_factory.mktemp("cuda_emulated")
    units = "\n".join(f'#include "cuda/{p.name}"' for p in sorted((ROOT / "csrc/cuda").glob("*.cu")))
    defs = "\n".join(f'  m.def("{f}", &fastgan::cuda::{f});' for f in EMULATED)
    src = build / "emulated.cpp"
    # row_chunking: (grid.y, rows per chunk) of the column-tile kernels at (B, N)
    chunking = ("namespace fastgan { namespace cuda {\n"
                "std::vector<int64_t> row_chunking(int64_t b, int64_t n) {\n"
                "  const RowChunks c = row_chunks(b, n); return {c.count, c.rows}; }\n}}\n")
    src.write_text(f"#define FASTGAN_CUDA_EMULATE\n{units}\n{chunking}"
                   f"TORCH_LIBRARY(fastgan_cuda_emu, m) {{\n{defs}\n}}\n")
    cpp_extension.load(name="fastgan_cuda_emu", sources=[str(src)],
                       extra_include_paths=[str(ROOT / "csrc")],
                       extra_cflags=["-O1", "-std=c++20"], build_directory=str(build),
                       is_python_module=False)
    return torch.ops.fastgan_cuda_emu


def emu_bn(E, inputs, dtype, training, momentum, p, activation, steps=2):
    """Backend-level forward (``steps`` times) + backward through the emulated kernels, or
    through the reference when ``E`` is None."""
    t = cast(inputs, "cpu", dtype)
    nbt = torch.zeros(1, dtype=torch.int64)
    seed, offset = rng("cpu")
    act = activation if E is None else ACTIVATIONS[activation]
    fwd = R.linear_bn_act_forward if E is None else E.linear_bn_act_forward
    bwd = R.linear_bn_act_backward if E is None else E.linear_bn_act_backward
    for _ in range(steps):
        y, h, mean, rstd = fwd(t["x"], t["weight"], t["bias"], t["bn_weight"], t["bn_bias"],
                               t["running_mean"], t["running_var"], nbt, training, momentum,
                               1e-5, act, 0.2, p, seed, offset)
    dx, dw, db, dg, dbeta = bwd(t["grad_y"], t["x"], t["weight"], t["bn_weight"], t["bn_bias"],
                                h, mean, rstd, training, act, 0.2, p, seed, offset, True, True)
    return dict(y=y, h=h, mean=mean, rstd=rstd, running_mean=t["running_mean"],
                running_var=t["running_var"], nbt=nbt, dx=dx, dw=dw, db=db, dgamma=dg,
                dbeta=dbeta)


def emu_act(E, inputs, dtype, p, activation):
    t = cast(inputs, "cpu", dtype)
    seed, offset = rng("cpu")
    act = activation if E is None else ACTIVATIONS[activation]
    fwd = R.linear_act_forward if E is None else E.linear_act_forward
    bwd = R.linear_act_backward if E is None else E.linear_act_backward
    y = fwd(t["x"], t["weight"], t["bias"], act, 0.2, p, seed, offset)
    dx, dw, db = bwd(t["grad_y"], t["x"], t["weight"], y, act, 0.2, p, seed, offset, True, True)
    return dict(y=y, dx=dx, dw=dw, db=db)


def assert_emu_bn(E, inputs, shape, dtype, mode, activation, what):
    """The emulated linear_bn_act (forward twice, backward) against the reference,
    each measured against the float64 gold run; h bit-identical (the same GEMM)."""
    args = mode + (activation,)
    got, ref = emu_bn(E, inputs, dtype, *args), emu_bn(None, inputs, dtype, *args)
    gold = emu_bn(None, inputs, torch.float64, *args)
    assert torch.equal(got["h"], ref["h"]), "h must be the reference's GEMM output"
    assert torch.equal(got.pop("nbt"), gold.pop("nbt"))
    ref.pop("nbt")
    if mode[2] > 0:
        keep = R.dropout_keep_mask(*rng("cpu"), shape[::2], mode[2])
        assert not got["y"][~keep].any(), "dropped elements must be zero"
    bias = ("db", bias_grad_scale(inputs, mode[2])) if mode[0] else None
    assert_close_to_gold(what, got, ref, gold, dtype, bias)


EMU_SHAPES = [(5, 7, 3), (1, 33, 65), (2, 33, 65), (3, 33, 65), (17, 20, 40)]
EMU_MODES = [(True, 0.1, 0.0), (True, None, 0.5), (False, 0.1, 0.2)]
FP32_BF16 = pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                              pytest.param(torch.bfloat16, id="bf16")])
BN_MODES = pytest.mark.parametrize("mode", EMU_MODES,
                                   ids=["train-m0.1", "train-mNone-p0.5", "eval-p0.2"])


@pytest.mark.slow
@FP32_BF16
@BN_MODES
@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_linear_bn_act(emu, shape, mode, dtype):
    if shape[0] == 1 and mode[0]:
        pytest.skip("batch 1 cannot train BN (test_emulated_entry_checks checks the error)")
    inputs = make_bn_inputs(*shape, seed=5)
    for activation in ("leaky_relu", "tanh") if dtype == torch.float32 else ("relu",):
        assert_emu_bn(emu, inputs, shape, dtype, mode, activation,
                      f"emulated linear_bn_act {activation}")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_linear_act(emu, shape, p, dtype):
    inputs = make_bn_inputs(*shape, seed=6)
    for activation in sorted(ACTIVATIONS):
        got, ref = emu_act(emu, inputs, dtype, p, activation), emu_act(None, inputs, dtype, p,
                                                                       activation)
        gold = emu_act(None, inputs, torch.float64, p, activation)
        assert_close_to_gold(f"emulated linear_act {activation}", got, ref, gold, dtype)


@pytest.fixture
def row_chunks_on(emu):
    """The column-tile kernels split B across grid.y as on a big GPU with few
    columns: here for any batch (target 4 blocks, chunks of >= 1 row)."""
    emu.set_row_chunking(4, 1)
    yield emu
    emu.set_row_chunking(1, 2**40)  # back to the emulator's default: never split


# B 1, 2, 3 (chunks of one row, most threads idle), 1000+ (chunks of ~250 rows);
# N below, at and off a multiple of the 32-column tile.
CHUNK_SHAPES = [(2, 9, 5), (3, 9, 33), (1003, 12, 40), (1000, 6, 3), (1024, 5, 64)]


@pytest.mark.slow
@FP32_BF16
@BN_MODES
@pytest.mark.parametrize("shape", CHUNK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_row_chunks_linear_bn_act(row_chunks_on, shape, mode, dtype):
    """Row chunks (grid.y > 1, partial sums, a second pass) match the reference:
    BN statistics (Chan's combination), running statistics, dgamma, dbeta, db, dh."""
    E = row_chunks_on
    b, _, n = shape
    chunks, rows = E.row_chunking(b, n)
    cols = -(-n // 32)
    assert chunks == min(-(-4 // cols), b) > 1 and (chunks - 1) * rows < b <= chunks * rows
    assert_emu_bn(E, make_bn_inputs(*shape, seed=7), shape, dtype, mode, "leaky_relu",
                  f"row-chunked linear_bn_act {shape}")


@pytest.mark.slow
@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("shape", [(1, 9, 5)] + CHUNK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_row_chunks_linear_act(row_chunks_on, shape, p):
    E = row_chunks_on
    chunks, _ = E.row_chunking(shape[0], shape[2])
    assert chunks == min(-(-4 // -(-shape[2] // 32)), shape[0])
    inputs = make_bn_inputs(*shape, seed=8)
    for dtype in (torch.float32, torch.float16):
        got, ref = emu_act(E, inputs, dtype, p, "tanh"), emu_act(None, inputs, dtype, p, "tanh")
        gold = emu_act(None, inputs, torch.float64, p, "tanh")
        assert_close_to_gold(f"row-chunked linear_act {shape}", got, ref, gold, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("n", [1, 3, 700])
def test_emulated_gan_bce(emu, n, dtype):
    g = torch.Generator().manual_seed(n)
    a = 10 * torch.randn(n, 1, generator=g)  # large logits: the stable form matters
    b = 10 * torch.randn(n, 1, generator=g)
    for args in ((a, b, 0.9, 0.0), (b, None, 1.0, 0.0)):
        def run(fn, dt):
            out = fn(args[0].to(dt), None if args[1] is None else args[1].to(dt), *args[2:])
            return dict(zip(("loss", "prob_a", "prob_b", "grad_a", "grad_b"), out))
        got, ref = run(emu.gan_bce_forward, dtype), run(R.gan_bce_forward, dtype)
        gold = run(R.gan_bce_forward, torch.float64)
        assert got["loss"].dtype == torch.float32 and got["loss"].dim() == 0
        assert_close_to_gold(f"emulated gan_bce n={n}", got, ref, gold, dtype)


@pytest.mark.slow
def test_emulated_entry_checks(emu):
    """The CUDA entries' memory checks (csrc/checks.h), as the CPU emulation runs them."""
    t = cast(make_bn_inputs(4, 8, 5), "cpu", torch.float32)
    seed, offset = rng("cpu")
    nbt = torch.zeros(1, dtype=torch.int64)
    bn = (t["bn_weight"], t["bn_bias"], t["running_mean"], t["running_var"], nbt)

    def fwd(x=t["x"], w=t["weight"], b=t["bias"], bn=bn, training=True, act=2, p=0.0, s=seed):
        return emu.linear_bn_act_forward(x, w, b, *bn, training, 0.1, 1e-5, act, 0.2, p, s,
                                         offset)

    with pytest.raises(RuntimeError, match="x: the cuda backend supports float32, float16 and "
                                           "bfloat16, not float64"):
        fwd(x=t["x"].double(), w=t["weight"].double(), b=t["bias"].double())
    with pytest.raises(RuntimeError, match="weight has in_features=7"):
        fwd(w=t["weight"][:, :7])
    with pytest.raises(RuntimeError, match=r"bias must have shape \[5\], got \[3\]"):
        fwd(b=t["bias"][:3])
    with pytest.raises(RuntimeError, match="running_var must have shape"):
        fwd(bn=bn[:3] + (t["running_var"][:2], nbt))
    with pytest.raises(RuntimeError, match="running_var must be contiguous"):
        fwd(bn=bn[:3] + (torch.ones(10)[::2], nbt))
    with pytest.raises(RuntimeError, match="seed must have exactly 1 element"):
        fwd(s=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        fwd(x=t["x"][:1])
    with pytest.raises(RuntimeError, match="logits_b must have dtype Float, got Half"):
        emu.gan_bce_forward(torch.zeros(3), torch.zeros(3, dtype=torch.float16), 1.0, 0.0)
    with pytest.raises(RuntimeError, match="y must have shape"):
        emu.linear_act_backward(t["grad_y"], t["x"], t["weight"], t["grad_y"][:2], 2, 0.2, 0.0,
                                seed, offset, True, True)
    y, h, mean, rstd = fwd()
    with pytest.raises(RuntimeError, match="rstd must be contiguous"):
        emu.linear_bn_act_backward(t["grad_y"], t["x"], t["weight"], t["bn_weight"],
                                   t["bn_bias"], h, mean, torch.ones(10)[::2], True, 2, 0.2, 0.0,
                                   seed, offset, True, True)
    # Hyper-parameters are the op boundary's (Python): an unknown activation code
    # cannot move an index, and runs as identity.
    assert torch.equal(fwd(act=9)[0], fwd(act=ACTIVATIONS["identity"])[0])


# ------------------------------------------------- CPU: the build
def _extension_has_cuda_kernels():
    try:
        from fastgan.impl import cpu
    except ImportError:
        return None
    return cpu.registered("CUDA")


def test_built_extension_lists_cuda_kernels_and_backend_reports_availability():
    """Wherever fastgan._C was built with CUDA, all its CUDA kernels are
    registered; without a GPU, the cuda backend is reported unavailable (no error).
    FASTGAN_EXPECT_CUDA_BUILD=1 (CI, which builds with nvcc) turns a skip into a failure."""
    expected = os.environ.get("FASTGAN_EXPECT_CUDA_BUILD") == "1"
    registered = _extension_has_cuda_kernels()
    if not registered or not any(registered.values()):
        why = ("fastgan._C is not built" if registered is None else
               "fastgan._C here was built without CUDA kernels")
        assert not expected, f"FASTGAN_EXPECT_CUDA_BUILD=1 but {why}"
        pytest.skip(f"{why}; test_cuda_build_loads_without_gpu builds them")
    assert all(registered.values()), registered
    from fastgan.impl import cuda
    ok, why = cuda.available()
    assert ok == HAS_CUDA, why
    if not HAS_CUDA:
        assert "cuda" not in fastgan.backends()
        assert "no GPU" in fastgan.unavailable()["cuda"]


_LOAD_CHECK = textwrap.dedent("""
    import sys, torch
    import fastgan, fastgan._C
    from fastgan.impl import cpu
    assert fastgan._C.__file__.startswith(sys.argv[1]), fastgan._C.__file__
    missing = [f for f, ok in cpu.registered("CUDA").items() if not ok]
    assert not missing, f"no CUDA kernel registered for {missing}"
    assert all(cpu.registered("CPU").values())
    if not torch.cuda.is_available():
        assert "cuda" not in fastgan.backends(), fastgan.backends()
        assert "no GPU" in fastgan.unavailable()["cuda"], fastgan.unavailable()
    print("cuda-kernels-registered")
""")


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_cuda_build_loads_without_gpu(tmp_path):
    """setup.py compiles csrc/cuda with nvcc (one architecture, FASTGAN_TEST_CUDA_ARCHS,
    default 9.0) in a copy of the repository; the extension then loads with no
    visible GPU and registers a CUDA kernel for every function."""
    if torch.version.cuda is None:
        pytest.skip("this torch has no CUDA")
    registered = _extension_has_cuda_kernels()
    if registered and all(registered.values()) and os.environ.get("FASTGAN_TEST_CUDA_BUILD") != "1":
        pytest.skip("the installed fastgan._C already has its CUDA kernels (CI builds them): "
                    "test_built_extension_lists_cuda_kernels_... checks it; "
                    "FASTGAN_TEST_CUDA_BUILD=1 rebuilds anyway")
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc"
                                    if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        pytest.skip("nvcc not found: cannot compile the CUDA kernels here")
    # The working tree as it is: tracked files and untracked ones git does not ignore.
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if not (ROOT / f).is_file():
            continue  # tracked but deleted here
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, tmp_path / f)
    env = dict(os.environ, FASTGAN_BUILD_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"),
               FASTGAN_CUDA_ARCHS=os.environ.get("FASTGAN_TEST_CUDA_ARCHS", "9.0"))
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                           env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(tmp_path))
    check = subprocess.run([sys.executable, "-c", _LOAD_CHECK, str(tmp_path)], cwd=tmp_path,
                           env=env, capture_output=True, text=True)
    assert "cuda-kernels-registered" in check.stdout, check.stdout + check.stderr
