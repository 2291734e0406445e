"""What is timed: one whole GAN train step of the seed GAN, or one pass of one
fused op, built for a contender; and the GEMM FLOPs of each (see the package
docstring for the FLOP model)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...nn.fuse import speed
from ...nn.layers import LinearAct, LinearBNAct, linear_act_sequential, linear_bn_act_sequential
from ...nn.models import Discriminator, Generator
from ...ops import functional as FG
from .contenders import Contender, compiled, forced_backend, low_precision_training, precision

PASSES = ("forward", "backward", "both")
OPS = ("linear_bn_act", "linear_act", "gan_bce")
# The layer each op is measured on: the generator's widest BN block and the
# discriminator's first block, with the seed's dropout and slope.
OP_SHAPES = {"linear_bn_act": (512, 1024), "linear_act": (784, 1024), "gan_bce": (1, 1)}
OP_DROPOUT = 0.2


# ---------------------------------------------------------------------------- FLOPs
def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(in_features, out_features) of every nn.Linear of ``model``, in order."""
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def forward_flops(model: nn.Module, batch: int) -> int:
    return sum(2 * batch * k * n for k, n in linear_shapes(model))


def first_layer_flops(model: nn.Module, batch: int) -> int:
    k, n = linear_shapes(model)[0]
    return 2 * batch * k * n


def step_flops(G: nn.Module, D: nn.Module, batch: int, schedule: str | None = None) -> int:
    """GEMM FLOPs of one GAN train step (see the package docstring).

    ``schedule=None``: the nominal count, 3 G + 9 D forward FLOPs, the same
    for every contender and schedule. ``"alternating"`` / ``"simultaneous"``:
    the GEMMs that schedule's step needs, counted from the layer shapes, with
    F = ``forward_flops(., batch)`` and F1 its first layer:

    * G, both schedules: forward F, dW F, dX F - F1 (no dX into the noise).
    * alternating: D step over 2B rows: forward 2F, dW 2F, dX 2F - 2F1 (D's
      input needs none); G step through the updated D: forward F, dX F.
      D total 8F - 2F1. (The fused kernels also form a dW there that is
      thrown away: another F of work done but not needed.)
    * simultaneous: D once over 2B rows: forward 2F, dW 2F; dX of the D loss
      2F - 2F1 and of the G loss F, in one stacked GEMM per layer.
      D total 7F - 2F1: one D forward over the fakes less.
    """
    if schedule is None:
        return 3 * forward_flops(G, batch) + 3 * 3 * forward_flops(D, batch)
    g = 3 * forward_flops(G, batch) - first_layer_flops(G, batch)
    d, d1 = forward_flops(D, batch), first_layer_flops(D, batch)
    per_d = {"alternating": 8, "simultaneous": 7}
    if schedule not in per_d:
        raise ValueError(f"schedule must be alternating or simultaneous, got {schedule!r}")
    return g + per_d[schedule] * d - 2 * d1


def op_flops(op: str, pass_: str, batch: int) -> int:
    if op == "gan_bce":
        return 0
    k, n = OP_SHAPES[op]
    f = 2 * batch * k * n
    return {"forward": f, "backward": 2 * f, "both": 3 * f}[pass_]


_SEED_GAN: list = []


def seed_gan() -> list:
    """The seed GAN's G and D (plain layers), built once: its FLOPs are every step's."""
    if not _SEED_GAN:
        _SEED_GAN.extend([Generator(fused=False), Discriminator(fused=False)])
    return _SEED_GAN


# ---------------------------------------------------------------------------- train step
def _train_dtype(modules, dtype: str):
    """fastgan's low-precision training mode: the Linear weights in ``dtype``,
    BatchNorm in fp32 (``fastgan.train.precision``)."""
    from ...train.precision import to_train_dtype
    return [to_train_dtype(m, dtype) for m in modules]


def build_step(c: Contender, batch: int, device: torch.device, dtype: str = "fp32",
               seed: int = 0, latent_dim: int = 100, schedule: str | None = None):
    """A zero-argument callable running one whole GAN train step for contender ``c``
    (``schedule``: the engine's default when None) in compute dtype ``dtype``
    (``c.dtype`` if the contender has its own).

    The step is the training engine's (``fastgan.train``): ``ReferenceStep`` for
    the eager and compiled reference, ``GANStep`` for fastgan (CUDA graph on or
    off). The real batch is a fixed tensor on ``device`` (no data loading is
    timed); noise is drawn on the device inside the step. bf16 is autocast for
    the eager and compiled reference (fp32 weights, as their users write it)
    and fastgan's bf16 training mode for fastgan (bf16 weights, fp32 master
    weights in the optimizer, BN in fp32; no autocast).
    Returns ``(step, G, D)``; ``step.engine`` is the engine (its optimizers are
    ``g_opt`` and ``d_opt``).
    """
    from ...train import GANStep, ReferenceStep, make_adam

    dtype = c.dtype or dtype
    lowp = low_precision_training(c, dtype)
    torch.manual_seed(seed)
    G = Generator(latent_dim=latent_dim, fused=c.fused).to(device).train()
    D = Discriminator(fused=c.fused).to(device).train()
    if lowp:
        G, D = _train_dtype((G, D), dtype)
    if c.compile_mode is None and not c.fused:
        # The eager reference: Adam as a user writes it (what Trainer uses too),
        # or with fused=True, as a careful user writes it.
        kw = {"fused": True} if c.fused_adam else {}
        opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999), **kw)
        opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999), **kw)
    else:
        # torch.compile gets the engine's fused Adam as well, so the comparison
        # is about the layers and the step, not about an optimizer flag. For
        # bf16 parameters make_adam keeps fp32 master weights.
        opt_g, opt_d = make_adam(G.parameters(), device=device), make_adam(D.parameters(), device=device)
    kw = dict(batch_size=batch, latent_dim=latent_dim, seed=seed, device=device)
    if schedule is not None:
        kw["schedule"] = schedule
    if c.fused:
        engine = GANStep(G, D, opt_g, opt_d, graphs=c.cuda_graph, tape=c.tape, **kw)
    else:
        engine = ReferenceStep(compiled(G, c), compiled(D, c), opt_g, opt_d, **kw)
    # fp32, as a data loader gives it: the engine casts it to D's dtype.
    real = torch.rand(batch, 784, device=device) * 2 - 1

    # torch.compile's CUDA-graph modes need to be told where a step begins.
    mark = (c.compile_mode in ("reduce-overhead", "max-autotune") and device.type == "cuda")

    def step():
        if mark:
            torch.compiler.cudagraph_mark_step_begin()
        with forced_backend(c), precision(dtype, device, autocast=not lowp):
            return engine(real)

    step.engine = engine
    return step, G, D


# ---------------------------------------------------------------------------- ops
def _ref_loss_d(real_logits, fake_logits):
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def _fused_loss_d(real_logits, fake_logits):
    return FG.gan_bce_d(real_logits, fake_logits).loss


def _op_module(op: str, c: Contender, device: torch.device) -> nn.Module:
    k, n = OP_SHAPES[op]
    if op == "linear_bn_act":
        m = (LinearBNAct(k, n, dropout=OP_DROPOUT) if c.fused
             else linear_bn_act_sequential(k, n, dropout=OP_DROPOUT))
    elif op == "linear_act":
        m = (LinearAct(k, n, dropout=OP_DROPOUT) if c.fused
             else linear_act_sequential(k, n, dropout=OP_DROPOUT))
    else:
        m = _GanBCE(c.fused)
    return m.to(device).train()


def op_plain_reason(c: Contender, op: str, pass_: str, batch: int, device: torch.device,
                    dtype: str = "fp32") -> Optional[str]:
    """Why the speed rule sends contender ``c``'s fused layer of ``op`` at ``batch``
    to the plain computation (``fastgan.nn.fuse.speed``), or None when it runs
    fused. The fused layers ask the same question on every forward: a contender
    whose backend never ran is either this (what a user of the layer gets here)
    or a bug."""
    if not (c.fused and c.backend) or op == "gan_bce":
        return None
    k, n = OP_SHAPES[op]
    dt = ({"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.dtype or dtype, torch.float32)
          if low_precision_training(c, c.dtype or dtype) else torch.float32)
    bn_training = True if op == "linear_bn_act" else None   # _op_module's layers train
    with forced_backend(c):   # as the layer asks it, in build_op's block
        return speed.plain_reason(speed.backend(device.type), dt, batch, k, n, bn_training,
                                  OP_DROPOUT > 0, grad=pass_ != "forward")


class _GanBCE(nn.Module):
    """The D loss (real and fake logits -> loss): fused op or two BCE-with-logits."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused

    def forward(self, logits):
        real, fake = logits.chunk(2, dim=0)
        return _fused_loss_d(real, fake) if self.fused else _ref_loss_d(real, fake)


def build_op(c: Contender, op: str, pass_: str, batch: int, device: torch.device,
             dtype: str = "fp32", seed: int = 0):
    """A zero-argument callable running ``pass_`` of ``op`` once for contender ``c``
    in compute dtype ``dtype`` (``c.dtype`` if it has its own; bf16 as in
    ``build_step``: autocast for the reference, the layer and its input in bf16
    for fastgan)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    if c.cuda_graph:
        raise ValueError("op benchmarks have no CUDA-graph contender")
    dtype = c.dtype or dtype
    lowp = low_precision_training(c, dtype) and op != "gan_bce"
    torch.manual_seed(seed)
    m = _op_module(op, c, device)
    if lowp:
        (m,) = _train_dtype((m,), dtype)
    m = compiled(m, c)
    k = OP_SHAPES[op][0]
    rows = 2 * batch if op == "gan_bce" else batch
    # x needs a gradient: inside a network every layer computes dX as well.
    # In the bf16 training mode it comes from a bf16 layer, so it is bf16.
    x = torch.randn(rows, k, device=device)
    if lowp:
        x = x.to(next(m.parameters()).dtype)
    x.requires_grad_(True)
    params = [x] + list(m.parameters())

    def forward():
        with forced_backend(c), precision(dtype, device, autocast=not lowp):
            return m(x)

    if pass_ == "forward":
        def run():
            with torch.no_grad():
                return forward()
        return run
    if pass_ == "both":
        def run():
            y = forward()
            with forced_backend(c):
                return torch.autograd.grad(y, params, torch.ones_like(y))
        return run
    # backward alone: one forward graph, differentiated again and again
    y = forward()
    gy = torch.ones_like(y)

    def run():
        with forced_backend(c):
            return torch.autograd.grad(y, params, gy, retain_graph=True)
    return run
