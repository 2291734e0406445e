"""The dataset resident on the training device, served in shuffled batches
through a device-side cursor (capturable in a CUDA graph)."""
from __future__ import annotations

import torch
from torch import Tensor

from .config import ConfigError, mix_seed


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
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
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
