"""One table that ties the Python names of activations to the integer codes the
C++/CUDA and Triton kernels switch on. Add an activation here first, then to
``reference.act`` / ``act_grad`` and to every kernel."""

import torch

ACTIVATIONS = {
    "identity": 0,
    "relu": 1,
    "leaky_relu": 2,
    "tanh": 3,
}

# The ops and the functions every backend module defines for them.
OPS = {
    "linear_bn_act": ("linear_bn_act_forward", "linear_bn_act_backward"),
    "linear_act": ("linear_act_forward", "linear_act_backward"),
    "gan_bce": ("gan_bce_forward",),
}
BACKEND_FUNCTIONS = tuple(f for fns in OPS.values() for f in fns)


def dropout_scale(p: float) -> float:
    """The float32 factor kept values are multiplied by (inverted dropout)."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))
