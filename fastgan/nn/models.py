"""The seed GAN: the MLP GAN of a TensorFlow tutorial this package grew from.

``fused=True`` builds it from fastgan's fused layers; ``fused=False`` builds
the plain-PyTorch reference. Both have identical ``state_dict`` keys
(``net.<i>.<j>.*``), so a checkpoint of one loads into the other.
"""
from __future__ import annotations

from torch import Tensor, nn

from .layers import LinearAct, LinearBNAct, linear_act_sequential, linear_bn_act_sequential


class Generator(nn.Module):
    """z(latent_dim) -> [Linear, BatchNorm1d, LeakyReLU, Dropout] x len(hidden) -> Linear -> tanh."""

    def __init__(self, latent_dim: int = 100, hidden=(256, 512, 1024), out_dim: int = 784,
                 dropout: float = 0.2, negative_slope: float = 0.2, fused: bool = True):
        super().__init__()
        self.latent_dim, self.out_dim, self.fused = latent_dim, out_dim, fused
        block = LinearBNAct if fused else linear_bn_act_sequential
        head = LinearAct if fused else linear_act_sequential
        layers, d = [], latent_dim
        for h in hidden:
            layers.append(block(d, h, negative_slope=negative_slope, dropout=dropout))
            d = h
        layers.append(head(d, out_dim, activation="tanh"))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    """x(in_dim) -> [Linear, LeakyReLU, Dropout] x len(hidden) -> Linear -> one logit."""

    def __init__(self, in_dim: int = 784, hidden=(1024, 512, 256), dropout: float = 0.2,
                 negative_slope: float = 0.2, fused: bool = True):
        super().__init__()
        self.in_dim, self.fused = in_dim, fused
        block = LinearAct if fused else linear_act_sequential
        layers, d = [], in_dim
        for h in hidden:
            layers.append(block(d, h, negative_slope=negative_slope, dropout=dropout))
            d = h
        layers.append(block(d, 1, activation="identity"))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))
