"""Layer 1, the op contract: what every fused op is, whatever runs it.

* ``spec``: the activation table and the op table, the facts every layer reads;
* ``checks``: the one argument check, run once per call at the op boundary;
* ``dispatch``: which backend (``fastgan.impl.<name>``) runs a call;
* ``registry``: the ``torch.library`` ops ``torch.ops.fastgan.*`` (custom op,
  fake kernel, one ``autograd.Function`` over the forward and backward ops);
* ``functional``: the public functional forms (``fastgan.functional``).

Importing this package registers the ops.
"""
from . import registry  # noqa: F401  (registers torch.ops.fastgan.*)
from .registry import GanBCEFunction, LinearActFunction, LinearBNActFunction  # noqa: F401
