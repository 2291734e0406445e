"""What ``fuse`` did: one line per fused run and per thing it left alone."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ...ops import spec


@dataclass
class FusedRun:
    path: str          # where the fused layer sits in the returned model
    kind: str          # "LinearBNAct" or "LinearAct"
    layers: tuple      # what it replaced, as written in the original model
    detail: str        # the hyper-parameters it carries

    def __str__(self):
        return f"fused  {self.path}: {' -> '.join(self.layers)} => {self.kind}({self.detail})"


@dataclass
class LeftAlone:
    path: str
    reason: str

    def __str__(self):
        return f"left   {self.path}: {self.reason}"


@dataclass
class FuseReport:
    fused: list = field(default_factory=list)
    left_alone: list = field(default_factory=list)

    def __str__(self):
        lines = [f"fastgan.fuse: {len(self.fused)} run(s) fused, "
                 f"{len(self.left_alone)} thing(s) left alone"]
        lines += [f"  {item}" for item in self.fused + self.left_alone]
        return "\n".join(lines)


def join(prefix: str, name: str) -> str:
    """The dotted path of child ``name`` under ``prefix`` ("" is the root)."""
    return f"{prefix}.{name}" if prefix else name


def detail(children) -> str:
    """The hyper-parameters a fused run carries, as the report prints them."""
    parts = []
    for m in children:
        if type(m) is nn.BatchNorm1d:
            parts.append(f"eps={m.eps:g}, momentum={m.momentum}")
        elif type(m) is nn.Dropout:
            parts.append(f"dropout={m.p:g}")
        elif not isinstance(m, nn.Linear):
            row = spec.activation_of_module(m)
            parts.append(f"{row.name}({row.slope_of(m):g})" if row.has_slope else row.name)
    return ", ".join(parts)
