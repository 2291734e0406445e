"""fastgan: GANs that train at the speed of the hardware.

Fused Linear+BatchNorm1d+activation+dropout, Linear+activation+dropout and
GAN BCE ops (``torch.ops.fastgan.*``) with reference, C++ CPU, Triton and CUDA
backends; drop-in layers (``fastgan.nn``), the seed GAN (``fastgan.models``).
"""
from . import ops  # noqa: F401  (registers torch.ops.fastgan.*)
from . import functional, models, nn  # noqa: F401
from .backend import backends, unavailable, use_backend  # noqa: F401
from .fuse import fuse, unfuse  # noqa: F401

__version__ = "0.1.0"
