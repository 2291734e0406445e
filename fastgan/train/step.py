"""The training step: one object runs a whole GAN step.

Two schedules (``schedule=``), both in ``GANStep`` and ``ReferenceStep``:

* ``"alternating"``: noise -> G; D on real and fake; D loss (``gan_bce_d``),
  backward, Adam; then the G loss through the *updated* D (``gan_bce_g``),
  backward, Adam. D runs forward on the fakes twice.
* ``"simultaneous"``: the seed GAN's step (two ``GradientTape``s in the
  TensorFlow original). G runs once, D runs once on [fake; real], both losses
  come from that forward, each network gets the gradient of its own loss, then
  both Adam steps. D's update does not affect G's gradient in this step. The
  engine's backward is one sweep: at each fused layer of D the D loss's
  gradient runs the op's own backward (D's weight and input gradients) and the
  G loss's, on ghost rows, only its input-gradient GEMM down to G
  (``fastgan.nn.models.GhostRows``): no second D forward, no D weight
  gradient of the G loss. A D that is not the fused ``Discriminator`` takes
  two backward passes over the one forward.

A step returns the losses and mean D(x), D(G(z)) as device tensors and never
syncs the host.

* On CUDA (``graphs=None`` or ``True``) the step is warmed up on a side stream,
  captured once in a CUDA graph (``fastgan.train.graphs.capture``) and
  replayed. Everything it reads is static: the real batch comes from
  ``ResidentBatches`` (the dataset on the GPU, batch indices gathered through
  a device-side cursor) or from a static buffer; noise is drawn from a
  ``torch.Generator`` registered with the graph, so each replay draws fresh
  noise and a run is reproducible from its seed; fused dropout layers advance
  their device counters; Adam must be ``capturable=True``. Warm-up changes
  state (BN running stats, Adam moments, counters, the noise generator), so
  the engine snapshots every parameter, buffer, optimizer state, RNG and
  cursor before it and restores them after (``capture``'s ``after_warmup``):
  the first replay starts from exactly the state an eager run would.
* Elsewhere the same step runs eagerly.

``ReferenceStep`` is the straightforward plain-PyTorch loop (``nn`` modules,
``binary_cross_entropy_with_logits``, ``autograd``): the baseline every
speed-up is measured against, and the ground truth of the engine's
equivalence tests.

Distributed training plugs in here: the step takes already-wrapped modules.
Nothing here prints.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import dispatch as backend
from ..ops import functional as FG
from . import distributed as fdist
from . import tape as _tape
from .adam import FusedAdam
from .batches import ResidentBatches
from .config import SCHEDULES, ConfigError, mix_seed
from .graphs import Graphed, GraphCaptureError, capture
from .precision import MasterWeightAdam, input_dtype, is_low_precision

STAT_NAMES = ("d_loss", "g_loss", "d_real", "d_fake")


class StepStats(NamedTuple):
    """One step's diagnostics: 0-dim fp32 tensors on the training device.

    Under a CUDA graph they are the graph's static outputs, overwritten by the
    next replay: clone them to keep them.
    """
    d_loss: Tensor   # BCE(D(x), 1) + BCE(D(G(z)), 0)
    g_loss: Tensor   # non-saturating BCE(D(G(z)), 1)
    d_real: Tensor   # mean D(x)
    d_fake: Tensor   # mean D(G(z)) before the D update


def make_adam(params, lr: float = 2e-4, betas=(0.5, 0.999), device=None,
              eps: float = 1e-8, fused: bool = True) -> torch.optim.Optimizer:
    """Adam set up for the engine: fused on CPU and CUDA, and capturable on CUDA
    (its step counter lives on the device, as a CUDA graph needs).

    bf16/fp16 parameters get ``MasterWeightAdam`` (fp32 master weights, the
    same Adam stepping them; ``fastgan.train.precision``); fp32 parameters
    ``FusedAdam`` (``torch.optim.Adam(fused=True)`` with a lean CPU step, the
    same numbers; ``fastgan.train.adam``). ``fused=False``: torch's default
    Adam (the reference loop's)."""
    params = list(params)
    device = torch.device(device) if device is not None else params[0].device
    kw = {"fused": True} if fused else {}
    if device.type == "cuda":
        kw["capturable"] = True
    if any(is_low_precision(p) for p in params):
        return MasterWeightAdam(params, lr=lr, betas=tuple(betas), eps=eps, **kw)
    if fused:
        return FusedAdam(params, lr=lr, betas=tuple(betas), eps=eps, **kw)
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps)


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """No parameter gradients for ``module`` inside the block (the G step through D)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _trainable(module: nn.Module) -> list[Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


class _Step:
    """What both steps share: noise, the real-batch source, the schedule, stat
    accumulation."""

    def __init__(self, generator: nn.Module, discriminator: nn.Module,
                 g_opt: torch.optim.Optimizer, d_opt: torch.optim.Optimizer, *,
                 batch_size: int, latent_dim: int, batches: Optional[ResidentBatches] = None,
                 seed: int = 0, smoothing: float = 0.0, device=None,
                 schedule: str = "alternating"):
        if schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if batches is not None and batches.batch_size != batch_size:
            raise ConfigError(f"batch_size {batch_size} differs from the batches' "
                              f"{batches.batch_size}")
        if not 0.0 <= smoothing < 1.0:
            raise ConfigError(f"smoothing must be in [0, 1), got {smoothing}")
        self.G, self.D, self.g_opt, self.d_opt = generator, discriminator, g_opt, d_opt
        self.device = torch.device(device) if device is not None else \
            next(generator.parameters()).device
        self.batch_size, self.latent_dim = batch_size, latent_dim
        self.batches, self.smoothing = batches, float(smoothing)
        self.schedule = schedule
        self.noise = torch.Generator(self.device).manual_seed(mix_seed(seed, 1))
        # The models are fed in their own dtype (bf16 training: bf16 noise and
        # images); the noise is drawn in fp32, so a run's latent vectors are
        # the fp32 run's, rounded.
        self.g_dtype = input_dtype(generator)
        self.d_dtype = input_dtype(discriminator)
        self.in_dim = getattr(fdist.unwrap(discriminator), "in_dim", None)
        self.totals = torch.zeros(len(STAT_NAMES), device=self.device)
        self.count = 0
        self.steps_per_call = 1

    def _real(self, real: Optional[Tensor]) -> Tensor:
        if real is None:
            if self.batches is None:
                raise ValueError("real: a batch is required when the step has no ResidentBatches")
            return self.batches.next().to(self.d_dtype)
        if real.shape[0] != self.batch_size:
            raise ValueError(f"real: expected a batch of {self.batch_size}, got shape "
                             f"{tuple(real.shape)}")
        real = real.reshape(self.batch_size, -1)
        if self.in_dim is not None and real.shape[1] != self.in_dim:
            raise ValueError(f"real: expected {self.in_dim} values per sample (the "
                             f"discriminator's in_dim), got shape {tuple(real.shape)}")
        return real.to(self.d_dtype)

    def _noise(self) -> Tensor:
        return torch.randn(self.batch_size, self.latent_dim, generator=self.noise,
                           device=self.device).to(self.g_dtype)

    def _fake(self) -> Tensor:
        """G(z) in D's input dtype."""
        return self.G(self._noise()).to(self.d_dtype)

    def _finish(self, d_loss, g_loss, d_real, d_fake) -> StepStats:
        stats = torch.stack([t.detach().float() for t in (d_loss, g_loss, d_real, d_fake)])
        self.totals.add_(stats)
        return StepStats(*stats.unbind())

    def read_means(self) -> dict[str, float]:
        """Mean of each stat since the last call (one host sync), then reset."""
        n = max(self.count, 1)
        values = (self.totals / n).tolist()
        self.totals.zero_()
        self.count = 0
        return dict(zip(STAT_NAMES, values))

    def __call__(self, real: Optional[Tensor] = None) -> StepStats:
        for _ in range(self.steps_per_call):
            out = self._step(self._real(real))
        self.count += self.steps_per_call
        return out


class ReferenceStep(_Step):
    """The eager plain-PyTorch GAN step: the baseline and the ground truth.

    D runs once over both batches in both schedules, in the engine's order
    ([real; fake] alternating, [fake; real] simultaneous): the seed GAN's D has
    no BatchNorm, so that is the same function as two forwards, and on fused
    layers it draws the same dropout masks as the engine.
    """

    def _step(self, real: Tensor) -> StepStats:
        fake = self._fake()
        if self.schedule == "simultaneous":
            return self._simultaneous(real, fake)
        return self._alternating(real, fake)

    # The losses reduce in fp32 whatever D's dtype (``gan_bce`` does the same).
    def _d_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        real_logits, fake_logits = real_logits.float(), fake_logits.float()
        return (F.binary_cross_entropy_with_logits(
            real_logits, torch.full_like(real_logits, 1.0 - self.smoothing))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))

    @staticmethod
    def _g_loss(fake_logits: Tensor) -> Tensor:
        fake_logits = fake_logits.float()
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))

    def _alternating(self, real: Tensor, fake: Tensor) -> StepStats:
        B, D = self.batch_size, self.D
        self.d_opt.zero_grad(set_to_none=True)
        logits = D(torch.cat([real, fake.detach()]))
        real_logits, fake_logits = logits[:B], logits[B:]
        d_loss = self._d_loss(real_logits, fake_logits)
        d_loss.backward()
        self.d_opt.step()
        self.g_opt.zero_grad(set_to_none=True)
        g_loss = self._g_loss(D(fake))
        g_loss.backward()
        self.g_opt.step()
        return self._finish(d_loss, g_loss, torch.sigmoid(real_logits.float()).mean(),
                            torch.sigmoid(fake_logits.float()).mean())

    def _simultaneous(self, real: Tensor, fake: Tensor) -> StepStats:
        B = self.batch_size
        logits = self.D(torch.cat([fake, real]))   # the engine's order (GANStep._simultaneous)
        fake_logits, real_logits = logits[:B], logits[B:]
        d_loss = self._d_loss(real_logits, fake_logits)
        g_loss = self._g_loss(fake_logits)
        # Each loss differentiated with respect to its own network's parameters
        # only, from the one forward: the seed GAN's two GradientTapes.
        for loss, net, retain in ((d_loss, self.D, True), (g_loss, self.G, False)):
            params = _trainable(net)
            for p, g in zip(params, torch.autograd.grad(loss, params, retain_graph=retain)):
                p.grad = g
        self.d_opt.step()
        self.g_opt.step()
        return self._finish(d_loss, g_loss, torch.sigmoid(real_logits.float()).mean(),
                            torch.sigmoid(fake_logits.float()).mean())


class GANStep(_Step):
    """The engine's step; captured in a CUDA graph on CUDA (module docstring).

    ``generator``/``discriminator`` may be wrapped (e.g. DDP); ``g_opt``/``d_opt``
    come from ``make_adam`` or any optimizer that is ``capturable`` on CUDA.
    Call ``step()`` (batches from ``batches``) or ``step(real)`` (copied into a
    static buffer when graphed). ``warmup`` eager steps precede the capture.
    ``steps_per_call=k`` runs k steps per call (one graph replay of k steps on
    CUDA, fewer launches); it needs ``batches`` and returns the last step's stats.
    ``schedule``: ``"alternating"`` or ``"simultaneous"`` (module docstring).
    ``tape``: on the CPU, run the step without autograd where the networks allow
    it (``fastgan.train.tape``: the same numbers, less overhead); False always
    runs it under autograd. ``taped`` counts the steps that ran without it.
    """

    def __init__(self, generator, discriminator, g_opt, d_opt, *, batch_size: int,
                 latent_dim: int, batches: Optional[ResidentBatches] = None, seed: int = 0,
                 smoothing: float = 0.0, device=None, graphs: Optional[bool] = None,
                 warmup: int = 3, steps_per_call: int = 1, schedule: str = "alternating",
                 tape: bool = True):
        super().__init__(generator, discriminator, g_opt, d_opt, batch_size=batch_size,
                         latent_dim=latent_dim, batches=batches, seed=seed,
                         smoothing=smoothing, device=device, schedule=schedule)
        # The one-sweep simultaneous backward needs the fused Discriminator.
        self.ghost = bool(getattr(fdist.unwrap(discriminator), "supports_ghost", False))
        cuda = self.device.type == "cuda"
        if graphs is None:
            # The reference backend creates tensors from Python numbers inside its
            # ops (host-to-device copies), which a CUDA graph cannot capture.
            graphs = cuda and backend.select(self.device) != "reference"
        self.graphs = bool(graphs)
        if self.graphs and not cuda:
            raise ConfigError(f"graphs=True needs a CUDA device, got {self.device}")
        if self.graphs:
            for name, opt in (("g_opt", g_opt), ("d_opt", d_opt)):
                if not all(grp.get("capturable", False) for grp in opt.param_groups):
                    raise ConfigError(f"{name}: a CUDA graph needs an optimizer with "
                                      "capturable=True (see fastgan.train.make_adam)")
        if steps_per_call < 1 or (steps_per_call > 1 and batches is None):
            raise ConfigError(f"steps_per_call={steps_per_call}: must be >= 1, and > 1 only "
                              "with ResidentBatches (each step needs its own batch)")
        self.warmup, self.steps_per_call = warmup, steps_per_call
        self._graph: Optional[Graphed] = None
        self._static_real: Optional[Tensor] = None
        # The eager CPU step without autograd where both networks allow it
        # (fastgan.train.tape); ``taped`` counts the steps it ran.
        self._chains = _tape.chains(self) if tape and not self.graphs else None
        self.taped = 0

    # ---------------------------------------------------------------- eager step
    def _step(self, real: Tensor) -> StepStats:
        if self._chains is not None and _tape.ready(self, *self._chains, real):
            run = _tape.simultaneous if self.schedule == "simultaneous" else _tape.alternating
            with torch.no_grad():
                out = run(self, *self._chains, real)
            self.taped += 1
            return self._finish(*out)
        fake = self._fake()
        if self.schedule == "simultaneous":
            return self._simultaneous(real, fake)
        return self._alternating(real, fake)

    def _alternating(self, real: Tensor, fake: Tensor) -> StepStats:
        B = self.batch_size
        # D step. D has no BatchNorm, so real and fake go through it as one
        # batch: one GEMM per layer instead of two.
        self.d_opt.zero_grad(set_to_none=True)
        logits = self.D(torch.cat([real, fake.detach()]))
        d = FG.gan_bce_d(logits[:B], logits[B:], self.smoothing)
        d.loss.backward()
        self.d_opt.step()
        # G step through the updated D; D's weights get no gradient here.
        self.g_opt.zero_grad(set_to_none=True)
        with _frozen(self.D):
            # D unwrapped: its frozen weights get no gradient for DDP to reduce.
            g = FG.gan_bce_g(fdist.unwrap(self.D)(fake))
            g.loss.backward()
        self.g_opt.step()
        return self._finish(d.loss, g.loss, d.d_real, d.d_fake)

    def _simultaneous(self, real: Tensor, fake: Tensor) -> StepStats:
        B = self.batch_size
        self.d_opt.zero_grad(set_to_none=True)
        self.g_opt.zero_grad(set_to_none=True)
        # D's batch is [fake; real]: the fakes first, so that the ghost rows
        # are rows 0..B-1 of each layer, whose dropout masks the layer's own
        # backward kernel recomputes (fastgan.nn.models.GhostRows).
        if self.ghost:
            # One forward of D over [fake; real]; the fakes again as ghost rows,
            # which carry the G loss's gradient down to G (and none to D's
            # weights): one backward sweep for both losses.
            logits, g_logits = self.D(torch.cat([fake.detach(), real]), ghost=fake)
            d = FG.gan_bce_d(logits[B:], logits[:B], self.smoothing)
            g = FG.gan_bce_g(g_logits)
            (d.loss + g.loss).backward()
        else:
            # Any other D: one forward, then each loss's backward into its own
            # network's parameters only.
            logits = self.D(torch.cat([fake, real]))
            d = FG.gan_bce_d(logits[B:], logits[:B], self.smoothing)
            g = FG.gan_bce_g(logits[:B])
            torch.autograd.backward(d.loss, inputs=_trainable(self.D), retain_graph=True)
            torch.autograd.backward(g.loss, inputs=_trainable(self.G))
        self.d_opt.step()
        self.g_opt.step()
        return self._finish(d.loss, g.loss, d.d_real, d.d_fake)

    def __call__(self, real: Optional[Tensor] = None) -> StepStats:
        if not self.graphs:
            return super().__call__(real)
        if real is None and self.batches is None:
            raise ValueError("real: a batch is required when the step has no ResidentBatches")
        if self._graph is not None and (real is None) != (self._static_real is None):
            raise ValueError("real: pass a batch on every call or on none (the CUDA graph "
                             "was captured for one of the two)")
        if self._graph is None:
            self._capture(real)
        if real is not None:
            self._static_real.copy_(self._real(real))
        out = self._graph.replay()
        self.count += self.steps_per_call
        return out

    # ---------------------------------------------------------------- CUDA graph
    def reset_graph(self) -> None:
        """Drop the captured graph (e.g. after loading new optimizer state); the
        next call captures again."""
        self._graph = self._static_real = None

    def _state_tensors(self) -> list[Tensor]:
        """Every tensor a step mutates, except optimizer state and the noise RNG."""
        ts = [t for m in (self.G, self.D) for t in (*m.parameters(), *m.buffers())]
        ts.append(self.totals)
        if self.batches is not None:
            ts.append(self.batches.cursor)
        return ts

    def _snapshot(self):
        tensors = [t.detach().clone() for t in self._state_tensors()]
        opts = [{p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                 for p, st in opt.state.items()} for opt in (self.g_opt, self.d_opt)]
        return tensors, opts, self.noise.get_state()

    @torch.no_grad()
    def _restore(self, snap) -> None:
        tensors, opts, noise = snap
        for t, saved in zip(self._state_tensors(), tensors):
            t.copy_(saved)
        for opt, saved in zip((self.g_opt, self.d_opt), opts):
            for p, st in opt.state.items():
                for k, v in st.items():
                    if not torch.is_tensor(v):
                        continue
                    if p in saved and k in saved[p]:
                        v.copy_(saved[p][k])
                    else:  # created by the warm-up: Adam's fresh state is all zeros
                        v.zero_()   # (a MasterWeightAdam's master was there before it)
        self.noise.set_state(noise)

    def _body(self) -> StepStats:
        """What the graph holds: ``steps_per_call`` steps, each on the static
        batch (``step(real)``) or on one gathered from ResidentBatches."""
        for _ in range(self.steps_per_call):
            out = self._step(self._real(self._static_real))
        return out

    def _capture(self, real: Optional[Tensor]) -> None:
        if real is not None:
            self._static_real = self._real(real).clone()
        snap = self._snapshot()

        def after_warmup():
            self._restore(snap)
            # Gradients must be allocated inside the graph's private memory pool.
            self.g_opt.zero_grad(set_to_none=True)
            self.d_opt.zero_grad(set_to_none=True)

        try:
            self._graph = capture(self._body, warmup=self.warmup, generators=(self.noise,),
                                  after_warmup=after_warmup, device=self.device)
        except GraphCaptureError as e:
            raise GraphCaptureError(f"capturing the train step in a CUDA graph failed "
                                    f"({e.reason}); run it eagerly with graphs=False "
                                    "(--no-graphs)", e.reason) from e.__cause__
