"""``Trainer``: models, optimizers, data and a step put together; walks epochs
and holds the complete resumable state (``state_dict``/``load_state_dict``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..impl import keep_cpu_heap
from ..nn import layers as fnn
from ..nn.models import Discriminator, Generator, keras_init_
from . import distributed as fdist
from .batches import ResidentBatches
from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from .config import ConfigError, TrainConfig, mix_seed
from .precision import MasterWeightAdam, to_train_dtype
from .step import GANStep, ReferenceStep, StepStats, make_adam


def build_models(cfg: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """G and D of ``cfg``, initialised from ``cfg.seed`` without touching the global RNG,
    in ``cfg.dtype`` (bf16: the Linears' weights cast after the fp32 initialisation,
    BatchNorm fp32; ``fastgan.train.precision.to_train_dtype``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(cfg.seed, 0))
        G = Generator(cfg.latent_dim, cfg.g_hidden, cfg.image_dim, cfg.dropout, cfg.g_slope,
                      fused=not cfg.reference, eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        D = Discriminator(cfg.image_dim, cfg.d_hidden, cfg.dropout, cfg.negative_slope,
                          fused=not cfg.reference)
        if cfg.init == "keras":
            keras_init_(G)
            keras_init_(D)
    to_train_dtype(G, cfg.dtype)
    to_train_dtype(D, cfg.dtype)
    fnn.seed_dropout(G, mix_seed(cfg.seed, 2))
    fnn.seed_dropout(D, mix_seed(cfg.seed, 3))
    return G, D


def _first_reason(e: BaseException) -> str:
    """The informative line of a load_state_dict error (it starts with a generic one)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
        return lines[1]
    return lines[0] if lines else type(e).__name__


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
        keep_cpu_heap(self.device)   # no page faults re-touching each step's memory
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
        # The run owns torch's global generator (the reference's nn.Dropout draws
        # from it, checkpoints hold it): seeded, so same-seed runs save the same bytes.
        torch.manual_seed(mix_seed(cfg.seed, 4))
        if cfg.reference:
            # torch's default Adam; in bf16 over fp32 masters, as the engine's.
            adam = torch.optim.Adam if cfg.dtype == "fp32" else MasterWeightAdam
            self.g_opt = adam(self.G.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps)
            self.d_opt = adam(self.D.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps)
        else:
            self.g_opt = make_adam(self.G.parameters(), cfg.lr, cfg.betas, self.device,
                                   cfg.adam_eps)
            self.d_opt = make_adam(self.D.parameters(), cfg.lr, cfg.betas, self.device,
                                   cfg.adam_eps)
        self.batches = ResidentBatches(data, cfg.batch_size, mix_seed(cfg.seed, 5), self.device)
        kw = dict(batch_size=cfg.batch_size, latent_dim=cfg.latent_dim, batches=self.batches,
                  seed=self.dist.seed(cfg.seed), smoothing=cfg.smoothing, device=self.device,
                  schedule=cfg.schedule)
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
        g = torch.Generator().manual_seed(mix_seed(self.cfg.seed, 6))
        return torch.randn(n, self.cfg.latent_dim, generator=g).to(self.device)

    @torch.no_grad()
    def sample(self, z: Tensor) -> Tensor:
        """G(z) in eval mode (running BN statistics, no dropout), as fp32 (n, 784) on the
        CPU; ``z`` is fed in G's dtype."""
        self.G.eval()
        try:
            return self.G(z.to(self.device, self.step.g_dtype)).float().cpu()
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
        for k in TrainConfig.ARCH + ("batch_size", "dtype"):
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
            try:
                self.step.noise.set_state(rng["noise"])
                fnn.set_dropout_rng_state(self.G, rng["g_dropout"])
                fnn.set_dropout_rng_state(self.D, rng["d_dropout"])
                torch.set_rng_state(rng["torch"])
                if rng.get("cuda") is not None and self.device.type == "cuda":
                    torch.cuda.set_rng_state(rng["cuda"], self.device)
            except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as e:
                raise ConfigError(f"checkpoint RNG state is not valid: {_first_reason(e)}") from None
        self.steps = int(state["steps"])
        if self.steps % self.step.steps_per_call:
            raise ConfigError(f"checkpoint is at step {self.steps}, not a multiple of "
                              f"steps_per_call {self.step.steps_per_call}")
        self._loaded_epoch = None
        if isinstance(self.step, GANStep):
            self.step.reset_graph()  # optimizer state tensors were replaced
