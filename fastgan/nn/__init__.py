"""Layer 3, modules that use the ops: fused layers, the seed GAN, ``fuse``.

``fastgan.nn.LinearBNAct`` / ``LinearAct`` (``layers``), the seed document's
MLP GAN (``models``) and the model rewriter ``fuse`` / ``unfuse`` (``fuse``).
"""
from .layers import (LinearAct, LinearBNAct, activation_module, activation_of,  # noqa: F401
                     dropout_rng_state, linear_act_sequential, linear_bn_act_sequential,
                     seed_dropout, set_dropout_rng_state, _Fused, _autocast)
