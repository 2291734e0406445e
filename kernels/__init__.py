"""fastgan's Triton kernels (the ``triton`` backend, adapted by ``fastgan.impl.triton``).

One file per fused op (``linear_bn_act.py``, ``linear_act.py``, ``gan_bce.py``),
shared ``@triton.jit`` helpers in ``common.py``, the backward GEMMs in
``matmul.py`` and launch machinery (launch counter, autotune configs) in
``runtime.py``. ``warmup()`` compiles and tunes every kernel for given shapes;
``python -m fastgan.kernels.aot`` compiles them for sm_90/sm_80 without a GPU.
Nothing here imports more of fastgan than ``fastgan.ops.spec``.
"""
from .runtime import INTERPRET, launches  # noqa: F401  (tests read ``launches``)
from .warmup import warmup  # noqa: F401
