"""What defines a training run: ``TrainConfig`` (stored in checkpoints), the
presets, the error for settings that cannot work, and the seed mixer every
stream derives from."""
from __future__ import annotations

import dataclasses
from typing import Optional

SCHEDULES = ("alternating", "simultaneous")
INITS = ("torch", "keras")
DTYPES = ("fp32", "bf16")   # the training dtypes (fastgan.train.precision)


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
    """Everything that defines a run; stored in checkpoints.

    ``schedule``: ``"alternating"`` (a D step, then a G step through the
    updated D) or ``"simultaneous"`` (the seed GAN's step: both gradients from
    one forward, then both Adam steps); see ``fastgan.train.step``.
    ``init``: ``"torch"`` (``nn.Linear``'s own) or ``"keras"`` (Glorot-uniform
    weights, zero biases: Keras ``Dense``). ``g_negative_slope``: G's LeakyReLU
    slope (None: ``negative_slope``, which is D's). ``bn_eps``/``bn_momentum``:
    G's BatchNorm1d, in PyTorch's convention. ``dtype``: ``"fp32"``, or
    ``"bf16"``: the Linear weights in bf16 with fp32 master weights in the
    optimizer, BatchNorm in fp32 (``fastgan.train.precision``).
    """
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
    g_negative_slope: Optional[float] = None
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    adam_eps: float = 1e-8
    init: str = "torch"
    schedule: str = "alternating"
    dtype: str = "fp32"

    ARCH = ("latent_dim", "g_hidden", "d_hidden", "dropout", "negative_slope", "reference",
            "image_dim", "g_negative_slope", "bn_eps")

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, "
                              f"got {self.schedule!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def g_slope(self) -> float:
        """G's LeakyReLU slope."""
        return self.negative_slope if self.g_negative_slope is None else self.g_negative_slope

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


# The seed GAN's own settings wherever they are not bugs: what the TensorFlow
# original runs (Adam(1e-4) with Keras's defaults for both nets, Keras's Dense
# and BatchNormalization defaults, LeakyReLU() = slope 0.3 in G and 0.2 in D,
# batch 32, the simultaneous step). Its 100 epochs are the CLI's default.
# Keras's BatchNormalization(momentum=0.99, epsilon=1e-3) is PyTorch's
# momentum 0.01, eps 1e-3. Keras adds Adam's epsilon to sqrt(v) before the
# bias correction (PyTorch after it): the same eps differs by a factor
# sqrt(1 - beta2^t) early in training, which a 1e-7 eps never makes matter.
PRESETS = {
    "seed": dict(batch_size=32, lr=1e-4, betas=(0.9, 0.999), adam_eps=1e-7, dropout=0.2,
                 negative_slope=0.2, g_negative_slope=0.3, bn_eps=1e-3, bn_momentum=0.01,
                 init="keras", schedule="simultaneous"),
}


def preset(name: str) -> dict:
    """The ``TrainConfig`` fields a preset sets; ConfigError for an unknown name."""
    if name not in PRESETS:
        raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return dict(PRESETS[name])
