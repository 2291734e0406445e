"""The ``cuda`` backend: the same ``torch.ops.fastgan_C`` functions as the
``cpu`` backend (``fastgan.impl.cpu``), dispatched to the CUDA kernels of csrc/cuda."""
from __future__ import annotations

import torch

from .cpu import (gan_bce_forward, linear_act_backward, linear_act_forward,  # noqa: F401
                   linear_bn_act_backward, linear_bn_act_forward, registered)

name = "cuda"


def available() -> tuple[bool, str]:
    missing = [f for f, ok in registered("CUDA").items() if not ok]
    if missing:
        return False, "fastgan._C was built without CUDA kernels"
    if not torch.cuda.is_available():
        return False, "CUDA kernels are built but no GPU is visible"
    return True, "CUDA kernels (fastgan._C, CUDA)"


def supports(device: torch.device) -> bool:
    return device.type == "cuda"
