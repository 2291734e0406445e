"""fastgan: GANs that train at the speed of the hardware.

Three layers, dependencies pointing down (docs/design.md):

1. ``fastgan.ops``: the op contract (spec, checks, ``torch.library`` ops
   ``torch.ops.fastgan.*``, dispatch, ``fastgan.functional``);
2. ``fastgan.impl``: the backends (reference, cpu, cuda, triton);
3. what uses the ops: ``fastgan.nn`` (fused layers, models, ``fuse``),
   ``fastgan.train`` (step, trainer, data, checkpoints, distributed) and
   ``fastgan.tools`` (benchmark, quality); the CLI sits on top.
"""
from . import _compat
from . import ops  # registers torch.ops.fastgan.*
from .nn import fuse as _fuse_module
from .ops import functional
from .ops.dispatch import backends, unavailable, use_backend
from . import nn
from .nn import models
from .nn.fuse import fuse, unfuse

_compat.install(eager=("fastgan.spec", "fastgan._checks", "fastgan.backend",
                       "fastgan.functional", "fastgan.reference", "fastgan.models",
                       "fastgan.fuse"))
del _fuse_module

__all__ = ["backends", "functional", "fuse", "models", "nn", "ops", "unavailable", "unfuse",
           "use_backend"]
__version__ = "0.1.0"
