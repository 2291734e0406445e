"""A fused layer around a run's own children, and the marks ``unfuse`` reads back.

ORIGIN: the original name of each child in the parent whose keys are renamed
(None for a child ``fuse`` made up, e.g. the module standing for a functional
activation); absent when the layer replaced a whole Sequential (its keys are
already the original ones). FILLER: True where the child is a Dropout(0)
filling LinearBNAct's fourth slot, which ``unfuse`` drops again.
"""
from __future__ import annotations

from torch import nn

from ..layers import LinearAct, LinearBNAct, _Fused

ORIGIN = "_fastgan_fuse_origin"
FILLER = "_fastgan_fuse_filler"


def make_fused(lin, bn, act, drop, origin) -> _Fused:
    """The fused layer around existing children; ``origin`` = their original names."""
    if bn is not None:
        fused = LinearBNAct.from_sequential(nn.Sequential(lin, bn, act, drop or nn.Dropout(0.0)))
        origin = tuple(origin) + ((None,) if drop is None else ())
        setattr(fused, FILLER, (False, False, False, drop is None))
    else:
        layers = (lin, act) if drop is None else (lin, act, drop)
        fused = LinearAct.from_sequential(nn.Sequential(*layers))
    # A new Module starts in training mode; take the run's mode without
    # touching the children (they already have it).
    fused.training = lin.training
    setattr(fused, ORIGIN, tuple(origin))
    return fused


def plain_children(fused: _Fused):
    """(original name or None, child) pairs, minus the children fuse made up
    that the original did not have (a Dropout(0) filler)."""
    origin = getattr(fused, ORIGIN, None) or (None,) * len(fused)
    filler = getattr(fused, FILLER, (False,) * len(fused))
    return [(o, c) for o, c, f in zip(origin, fused, filler) if not f]
