"""What defines a training run: ``TrainConfig`` (stored in checkpoints), the
error for settings that cannot work, and the seed mixer every stream derives from."""
from __future__ import annotations

import dataclasses


class ConfigError(ValueError):
    """A training setting that cannot work (the message names it)."""


def mix_seed(*ints: int) -> int:
    """A 63-bit seed from several integers (splitmix64-style), stable across runs."""
    h = 0x9E3779B97F4A7C15
    for v in ints:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


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
