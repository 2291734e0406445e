"""fastgan's Triton kernels (the ``triton`` backend, adapted by ``fastgan.impl.triton``).

One file per fused op (``linear_bn_act.py``, ``linear_act.py``, ``gan_bce.py``),
shared ``@triton.jit`` helpers in ``common.py``, the backward GEMMs in
``matmul.py``; tile sizes and autotune configs in ``configs.py``, the per-call
memory guards in ``guards.py``, the interpreter flag and launch counter in
``runtime.py``. ``warmup()`` compiles and tunes every kernel for given shapes;
``python -m fastgan.kernels.aot`` compiles them for sm_90/sm_80 without a GPU.
Nothing here imports more of fastgan than ``fastgan.ops.spec``.
"""
from .runtime import INTERPRET, launches
from .warmup import warmup

__all__ = ["INTERPRET", "launches", "warmup"]
