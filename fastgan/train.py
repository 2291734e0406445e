"""The training engine: one object runs a whole GAN step.

``GANStep`` runs: noise -> G; D on real and fake; D loss (``gan_bce_d``),
backward, Adam; G loss through D (``gan_bce_g``), backward, Adam. It returns the
losses and mean D(x), D(G(z)) as device tensors and never syncs the host.

* On CUDA (``graphs=None`` or ``True``) the step is warmed up on a side stream,
  captured once in a CUDA graph and replayed. Everything it reads is static:
  the real batch comes from ``ResidentBatches`` (the dataset on the GPU, batch
  indices gathered through a device-side cursor) or from a static buffer;
  noise is drawn from a ``torch.Generator`` registered with the graph, so each
  replay draws fresh noise and a run is reproducible from its seed; fused
  dropout layers advance their device counters; Adam must be
  ``capturable=True``. Warm-up changes state (BN running stats, Adam moments,
  counters, the noise generator), so the engine snapshots every parameter,
  buffer, optimizer state, RNG and cursor before it and restores them after:
  the first replay starts from exactly the state an eager run would.
* Elsewhere the same step runs eagerly.

``ReferenceStep`` is the straightforward plain-PyTorch loop (``nn`` modules,
``binary_cross_entropy_with_logits``): the baseline every speed-up is measured
against, and the ground truth of the engine's equivalence tests.

``Trainer`` puts models, optimizers, data and a step together, walks epochs and
holds the complete resumable state (``state_dict``/``load_state_dict``).

Distributed training plugs in here: the step takes already-wrapped modules and
``Trainer.is_main`` says which process logs and writes checkpoints.
Nothing here prints.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backend
from . import distributed as fdist
from . import functional as FG
from . import nn as fnn
from .models import Discriminator, Generator

STAT_NAMES = ("d_loss", "g_loss", "d_real", "d_fake")


class ConfigError(ValueError):
    """A training setting that cannot work (the message names it)."""


class GraphCaptureError(RuntimeError):
    """The step could not be captured in a CUDA graph (an op that is not capturable)."""


class StepStats(NamedTuple):
    """One step's diagnostics: 0-dim fp32 tensors on the training device.

    Under a CUDA graph they are the graph's static outputs, overwritten by the
    next replay: clone them to keep them.
    """
    d_loss: Tensor   # BCE(D(x), 1) + BCE(D(G(z)), 0)
    g_loss: Tensor   # non-saturating BCE(D(G(z)), 1)
    d_real: Tensor   # mean D(x)
    d_fake: Tensor   # mean D(G(z)) before the D update


def make_adam(params, lr: float = 2e-4, betas=(0.5, 0.999), device=None) -> torch.optim.Adam:
    """Adam set up for the engine: fused on CPU and CUDA, and capturable on CUDA
    (its step counter lives on the device, as a CUDA graph needs)."""
    params = list(params)
    device = torch.device(device) if device is not None else params[0].device
    kw = {"fused": True}
    if device.type == "cuda":
        kw["capturable"] = True
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), **kw)


def _mix(*ints: int) -> int:
    """A 63-bit seed from several integers (splitmix64-style), stable across runs."""
    h = 0x9E3779B97F4A7C15
    for v in ints:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class ResidentBatches:
    """The whole dataset on the training device, served in shuffled batches.

    Each epoch's order is a permutation drawn on the CPU from ``(seed, epoch)``,
    so it is the same on every device and after a resume. A batch is gathered
    on the device through ``cursor`` (a device tensor), so ``next()`` needs no
    host copy and can be captured in a CUDA graph. The last partial batch of
    an epoch is dropped (BatchNorm wants full batches).
    """

    def __init__(self, images: Tensor, batch_size: int, seed: int = 0, device=None):
        n = images.shape[0]
        if batch_size < 2:
            raise ConfigError(f"batch_size must be at least 2 (BatchNorm), got {batch_size}")
        if batch_size > n:
            raise ConfigError(f"batch_size {batch_size} is larger than the dataset ({n:,} images)")
        device = torch.device(device) if device is not None else images.device
        self.images = images.reshape(n, -1).to(device=device, dtype=torch.float32)
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_epoch = n // batch_size
        self.perm = torch.empty(n, dtype=torch.int64, device=device)
        self.cursor = torch.zeros(1, dtype=torch.int64, device=device)
        self._arange = torch.arange(batch_size, device=device)

    def __len__(self) -> int:
        return self.images.shape[0]

    def order(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(_mix(self.seed, epoch))
        return torch.randperm(len(self), generator=g)

    def start_epoch(self, epoch: int, step: int = 0) -> None:
        """Load ``epoch``'s order and point the cursor at batch ``step`` of it (eager)."""
        self.perm.copy_(self.order(epoch))
        self.cursor.fill_(step * self.batch_size)

    def next(self) -> Tensor:
        # The modulo wraps a caller that runs past the epoch (no Trainer to call
        # start_epoch) into a repeat of it instead of an out-of-bounds gather.
        idx = self.perm.index_select(0, (self.cursor + self._arange) % len(self))
        self.cursor.add_(self.batch_size)
        return self.images.index_select(0, idx)


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


class _Step:
    """What both steps share: noise, the real-batch source, stat accumulation."""

    def __init__(self, generator: nn.Module, discriminator: nn.Module,
                 g_opt: torch.optim.Optimizer, d_opt: torch.optim.Optimizer, *,
                 batch_size: int, latent_dim: int, batches: Optional[ResidentBatches] = None,
                 seed: int = 0, smoothing: float = 0.0, device=None):
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
        self.noise = torch.Generator(self.device).manual_seed(_mix(seed, 1))
        self.totals = torch.zeros(len(STAT_NAMES), device=self.device)
        self.count = 0
        self.steps_per_call = 1

    def _real(self, real: Optional[Tensor]) -> Tensor:
        if real is None:
            if self.batches is None:
                raise ValueError("real: a batch is required when the step has no ResidentBatches")
            return self.batches.next()
        if real.shape[0] != self.batch_size:
            raise ValueError(f"real: expected a batch of {self.batch_size}, got shape "
                             f"{tuple(real.shape)}")
        return real.reshape(self.batch_size, -1)

    def _noise(self) -> Tensor:
        return torch.randn(self.batch_size, self.latent_dim, generator=self.noise,
                           device=self.device)

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
    """The eager plain-PyTorch GAN step: the baseline and the ground truth."""

    def _step(self, real: Tensor) -> StepStats:
        G, D = self.G, self.D
        fake = G(self._noise())
        self.d_opt.zero_grad(set_to_none=True)
        real_logits, fake_logits = D(real), D(fake.detach())
        d_loss = (F.binary_cross_entropy_with_logits(
            real_logits, torch.full_like(real_logits, 1.0 - self.smoothing))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
        d_loss.backward()
        self.d_opt.step()
        self.g_opt.zero_grad(set_to_none=True)
        g_logits = D(fake)
        g_loss = F.binary_cross_entropy_with_logits(g_logits, torch.ones_like(g_logits))
        g_loss.backward()
        self.g_opt.step()
        return self._finish(d_loss, g_loss, torch.sigmoid(real_logits).mean(),
                            torch.sigmoid(fake_logits).mean())


class GANStep(_Step):
    """The engine's step; captured in a CUDA graph on CUDA (module docstring).

    ``generator``/``discriminator`` may be wrapped (e.g. DDP); ``g_opt``/``d_opt``
    come from ``make_adam`` or any optimizer that is ``capturable`` on CUDA.
    Call ``step()`` (batches from ``batches``) or ``step(real)`` (copied into a
    static buffer when graphed). ``warmup`` eager steps precede the capture.
    ``steps_per_call=k`` runs k steps per call (one graph replay of k steps on
    CUDA, fewer launches); it needs ``batches`` and returns the last step's stats.
    """

    def __init__(self, generator, discriminator, g_opt, d_opt, *, batch_size: int,
                 latent_dim: int, batches: Optional[ResidentBatches] = None, seed: int = 0,
                 smoothing: float = 0.0, device=None, graphs: Optional[bool] = None,
                 warmup: int = 3, steps_per_call: int = 1):
        super().__init__(generator, discriminator, g_opt, d_opt, batch_size=batch_size,
                         latent_dim=latent_dim, batches=batches, seed=seed,
                         smoothing=smoothing, device=device)
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
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._static_real: Optional[Tensor] = None
        self._out: Optional[StepStats] = None

    # ---------------------------------------------------------------- eager step
    def _step(self, real: Tensor) -> StepStats:
        B = self.batch_size
        fake = self.G(self._noise())
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
        self._graph.replay()
        self.count += self.steps_per_call
        return self._out

    # ---------------------------------------------------------------- CUDA graph
    def reset_graph(self) -> None:
        """Drop the captured graph (e.g. after loading new optimizer state); the
        next call captures again."""
        self._graph = self._out = self._static_real = None

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
                    if p in saved:
                        v.copy_(saved[p][k])
                    else:  # created by the warm-up: Adam's fresh state is all zeros
                        v.zero_()
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
        body = self._body
        snap = self._snapshot()
        # Warm-up on a side stream (the documented recipe): lazy initialisation
        # (optimizer state, autotuning, workspaces) happens outside the capture.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._restore(snap)
        # Gradients must be allocated inside the graph's private memory pool.
        self.g_opt.zero_grad(set_to_none=True)
        self.d_opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.noise)
        try:
            with torch.cuda.graph(graph):
                out = body()
        except RuntimeError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GraphCaptureError(f"capturing the train step in a CUDA graph failed ({reason}); "
                                    "run it eagerly with graphs=False (--no-graphs)") from e
        self._graph, self._out = graph, out


# ------------------------------------------------------------------ trainer
@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run; stored in checkpoints."""
    latent_dim: int = 100
    g_hidden: tuple = (256, 512, 1024)
    d_hidden: tuple = (1024, 512, 256)
    dropout: float = 0.2
    negative_slope: float = 0.2
    lr: float = 2e-4
    betas: tuple = (0.5, 0.999)
    batch_size: int = 64
    smoothing: float = 0.0
    seed: int = 0
    reference: bool = False   # plain-PyTorch models and ReferenceStep
    sync_bn: bool = False     # G's BN statistics over all processes (torchrun)
    image_dim: int = 784

    ARCH = ("latent_dim", "g_hidden", "d_hidden", "dropout", "negative_slope", "reference",
            "image_dim")

    def arch(self) -> dict:
        return {k: getattr(self, k) for k in self.ARCH}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**kw)


def build_models(cfg: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """G and D of ``cfg``, initialised from ``cfg.seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_mix(cfg.seed, 0))
        G = Generator(cfg.latent_dim, cfg.g_hidden, cfg.image_dim, cfg.dropout,
                      cfg.negative_slope, fused=not cfg.reference)
        D = Discriminator(cfg.image_dim, cfg.d_hidden, cfg.dropout, cfg.negative_slope,
                          fused=not cfg.reference)
    fnn.seed_dropout(G, _mix(cfg.seed, 2))
    fnn.seed_dropout(D, _mix(cfg.seed, 3))
    return G, D


def _first_reason(e: BaseException) -> str:
    """The informative line of a load_state_dict error (it starts with a generic one)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
        return lines[1]
    return lines[0] if lines else type(e).__name__


CHECKPOINT_FORMAT = "fastgan-checkpoint"
CHECKPOINT_VERSION = 1


class Trainer:
    """Models, optimizers, data and a step; counts steps and epochs.

    ``data`` is an ``(N, 784)`` tensor in [-1, 1] (``fastgan.data.Dataset.images``).
    ``train_step()`` runs one step and returns its ``StepStats``; ``state_dict``
    holds everything a bit-exact resume needs.
    """

    def __init__(self, cfg: TrainConfig, data: Tensor, device="cpu",
                 graphs: Optional[bool] = None, data_id: str = "", rank: int = 0,
                 steps_per_call: int = 1,
                 dist: Optional[fdist.Context] = None):
        self.cfg, self.device = cfg, torch.device(device)
        # Under torchrun (fastgan.distributed): this rank's shard, noise and
        # dropout streams; G and D in DDP; rank 0 logs and checkpoints.
        self.dist = dist if dist is not None else fdist.Context(rank=rank, device=self.device)
        self.rank = self.dist.rank
        if self.dist.distributed and cfg.reference:
            raise ConfigError("reference: the plain-PyTorch loop runs in one process only "
                              "(drop --reference under torchrun)")
        if self.dist.distributed:
            data = self.dist.shard(data)
        self.data_id = data_id
        if data.dim() < 2 or data[0].numel() != cfg.image_dim:
            raise ConfigError(f"data: images of {cfg.image_dim} values expected, got shape "
                              f"{tuple(data.shape)}")
        self.G, self.D = build_models(cfg)
        if self.dist.distributed:
            fnn.seed_dropout(self.G, self.dist.seed(cfg.seed, 2))
            fnn.seed_dropout(self.D, self.dist.seed(cfg.seed, 3))
        fdist.convert_sync_batchnorm(self.G, enabled=cfg.sync_bn)
        self.G.to(self.device).train()
        self.D.to(self.device).train()
        if cfg.reference:
            # nn.Dropout draws from torch's global generator: seed it for the run.
            torch.manual_seed(_mix(cfg.seed, 4))
            self.g_opt = torch.optim.Adam(self.G.parameters(), lr=cfg.lr, betas=cfg.betas)
            self.d_opt = torch.optim.Adam(self.D.parameters(), lr=cfg.lr, betas=cfg.betas)
        else:
            self.g_opt = make_adam(self.G.parameters(), cfg.lr, cfg.betas, self.device)
            self.d_opt = make_adam(self.D.parameters(), cfg.lr, cfg.betas, self.device)
        self.batches = ResidentBatches(data, cfg.batch_size, _mix(cfg.seed, 5), self.device)
        kw = dict(batch_size=cfg.batch_size, latent_dim=cfg.latent_dim, batches=self.batches,
                  seed=self.dist.seed(cfg.seed), smoothing=cfg.smoothing, device=self.device)
        if cfg.reference:
            if graphs or steps_per_call != 1:
                raise ConfigError("the reference step runs eagerly, one step a call: "
                                  "graphs and steps_per_call must be off")
            self.step = ReferenceStep(self.G, self.D, self.g_opt, self.d_opt, **kw)
        else:
            warmup = fdist.GRAPH_WARMUP if self.dist.distributed else 3
            if self.batches.steps_per_epoch % steps_per_call:
                raise ConfigError(f"steps_per_call {steps_per_call} must divide the "
                                  f"{self.batches.steps_per_epoch} steps of an epoch")
            self.step = GANStep(fdist.wrap(self.G, self.dist), fdist.wrap(self.D, self.dist),
                                self.g_opt, self.d_opt, graphs=graphs, warmup=warmup,
                                steps_per_call=steps_per_call, **kw)
        self.steps = 0               # steps done, over all epochs
        self._loaded_epoch = None    # which epoch's order the batches hold

    @property
    def is_main(self) -> bool:
        """The process that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def steps_per_epoch(self) -> int:
        return self.batches.steps_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch the next step belongs to (0-based)."""
        return self.steps // self.steps_per_epoch

    def train_step(self) -> StepStats:
        """One call of the step: ``steps_per_call`` steps (1 unless asked otherwise)."""
        epoch, i = divmod(self.steps, self.steps_per_epoch)
        if self._loaded_epoch != epoch:
            self.batches.start_epoch(epoch, i)
            self._loaded_epoch = epoch
        stats = self.step()
        self.steps += self.step.steps_per_call
        return stats

    def fixed_noise(self, n: int = 64) -> Tensor:
        """The same ``n`` latent vectors for every sample grid of a run."""
        g = torch.Generator().manual_seed(_mix(self.cfg.seed, 6))
        return torch.randn(n, self.cfg.latent_dim, generator=g).to(self.device)

    @torch.no_grad()
    def sample(self, z: Tensor) -> Tensor:
        """G(z) in eval mode (running BN statistics, no dropout), as (n, 784) on the CPU."""
        self.G.eval()
        try:
            return self.G(z.to(self.device)).float().cpu()
        finally:
            self.G.train()

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Plain containers and tensors only: loads with torch.load(weights_only=True).

        Under torchrun every rank must call it (it gathers all ranks' RNG
        streams into ``rng_ranks``); ``rng`` is this rank's, so a checkpoint
        saved by rank 0 also loads in one process."""
        cuda = self.device.type == "cuda"
        state = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "config": self.cfg.to_dict(),
            "data": self.data_id,
            "steps": self.steps,
            "generator": self.G.state_dict(), "discriminator": self.D.state_dict(),
            "g_opt": self.g_opt.state_dict(), "d_opt": self.d_opt.state_dict(),
            "rng": {
                "noise": self.step.noise.get_state(),
                "g_dropout": fnn.dropout_rng_state(self.G),
                "d_dropout": fnn.dropout_rng_state(self.D),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if cuda else None,
            },
        }
        if self.dist.distributed:
            state["rng_ranks"] = self.dist.gather(state["rng"])
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; ConfigError if it belongs to another architecture or data."""
        saved = TrainConfig.from_dict(state["config"])
        for k in TrainConfig.ARCH + ("batch_size",):
            if getattr(saved, k) != getattr(self.cfg, k):
                raise ConfigError(f"checkpoint has {k}={getattr(saved, k)!r}, this run "
                                  f"{k}={getattr(self.cfg, k)!r}")
        if state.get("data") != self.data_id:
            raise ConfigError(f"checkpoint was trained on data {state.get('data')!r}, "
                              f"this run uses {self.data_id!r}")
        try:
            self.G.load_state_dict(state["generator"])
            self.D.load_state_dict(state["discriminator"])
            self.g_opt.load_state_dict(state["g_opt"])
            self.d_opt.load_state_dict(state["d_opt"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(f"checkpoint weights do not fit the model: {_first_reason(e)}") from None
        rng = state["rng"]
        if self.dist.distributed:  # this rank's streams, or fresh per-rank ones if the
            ranks = state.get("rng_ranks") or []  # checkpoint had another number of ranks
            rng = ranks[self.rank] if len(ranks) == self.dist.world_size else None
        if rng is None:
            steps = int(state["steps"])
            self.step.noise.manual_seed(self.dist.seed(self.cfg.seed, 1, steps))
            fnn.seed_dropout(self.G, self.dist.seed(self.cfg.seed, 2, steps))
            fnn.seed_dropout(self.D, self.dist.seed(self.cfg.seed, 3, steps))
        else:
            self.step.noise.set_state(rng["noise"])
            fnn.set_dropout_rng_state(self.G, rng["g_dropout"])
            fnn.set_dropout_rng_state(self.D, rng["d_dropout"])
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.steps = int(state["steps"])
        if self.steps % self.step.steps_per_call:
            raise ConfigError(f"checkpoint is at step {self.steps}, not a multiple of "
                              f"steps_per_call {self.step.steps_per_call}")
        self._loaded_epoch = None
        if isinstance(self.step, GANStep):
            self.step.reset_graph()  # optimizer state tensors were replaced
