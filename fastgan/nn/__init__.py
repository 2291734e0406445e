"""Layer 3, modules that use the ops: fused layers, the seed GAN, ``fuse``.

``fastgan.nn.LinearBNAct`` / ``LinearAct`` (``layers``); the seed GAN, the MLP
GAN of a TensorFlow tutorial this package grew from (``models``); and the model
rewriter ``fuse`` / ``unfuse`` (``fuse``).
"""
from .layers import (FusedInputs, LinearAct, LinearBNAct, activation_module, activation_of,
                     autocast_inputs, dropout_rng_state, fused_path, linear_act_sequential,
                     linear_bn_act_sequential, seed_dropout, set_dropout_rng_state)
# The base class of both fused layers, for isinstance checks.
from .layers import _Fused as _Fused

__all__ = ["FusedInputs", "LinearAct", "LinearBNAct", "activation_module", "activation_of",
           "autocast_inputs", "dropout_rng_state", "fused_path", "linear_act_sequential",
           "linear_bn_act_sequential", "seed_dropout", "set_dropout_rng_state"]
