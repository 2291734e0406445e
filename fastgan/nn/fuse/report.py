"""What ``fuse`` did: a line for every run it found and for every module it left alone.

``print(report)`` lists, by module path:

* ``fused``: runs that now run as one fused op (and, indented, notes: what
  happens in the other train/eval mode, which hooks or parametrizations
  the fused call honours);
* ``unfused``: runs ``fuse`` planned but that now run as plain PyTorch,
  with the reason: the speed rule says the fused op would not gain here, a
  hook needs a child's own output, a dtype the kernels do not take. They
  are decided again on every call, so a run fuses once the reason is gone
  (the model moved to a GPU, dropout turned on, the hook removed);
* ``left``: every other module and why (a Conv2d is not a Linear run, a
  Sigmoid is not a fused activation, a forward torch.fx cannot trace...).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ...ops import spec


@dataclass
class FusedRun:
    path: str           # the path of the run's Linear
    layers: tuple       # what the run is, in order: "model.3 (BatchNorm1d)", "F.leaky_relu()"
    op: str             # the fastgan op it calls: "linear_bn_act" or "linear_act"
    detail: str         # the hyper-parameters it carries
    reason: str | None = None   # why it runs unfused now (None: it runs fused)
    notes: tuple = ()

    @property
    def fused(self) -> bool:
        return self.reason is None

    @property
    def kind(self) -> str:
        """The fused layer the run is equivalent to (the name older reports used)."""
        return "LinearBNAct" if self.op == "linear_bn_act" else "LinearAct"

    def __str__(self):
        head = f"{' -> '.join(self.layers)} => {self.op}({self.detail})"
        line = f"fused    {head}" if self.fused else f"unfused  {head}\n             {self.reason}"
        return "\n".join([line] + [f"             {n}" for n in self.notes])


@dataclass
class LeftAlone:
    path: str           # the module's path ("<root>" for the model itself)
    kind: str           # its class name
    reason: str

    def __str__(self):
        return f"left     {self.path} ({self.kind}): {self.reason}"


@dataclass
class FuseReport:
    runs: list = field(default_factory=list)
    left_alone: list = field(default_factory=list)

    @property
    def fused(self) -> list:
        return [r for r in self.runs if r.fused]

    @property
    def unfused(self) -> list:
        return [r for r in self.runs if not r.fused]

    def __str__(self):
        lines = [f"fastgan.fuse: {len(self.fused)} run(s) fused, {len(self.unfused)} run(s) "
                 f"unfused for now, {len(self.left_alone)} module(s) left alone"]
        lines += [f"  {item}" for item in self.fused + self.unfused + self.left_alone]
        return "\n".join(lines)

    def reason(self, path: str) -> str | None:
        """Why the module at ``path`` is not fused (None if it is in a fused run)."""
        for r in self.runs:
            if any(layer.split(" ")[0] == path for layer in r.layers):
                return r.reason
        return next((a.reason for a in self.left_alone if a.path == path), None)


def join(prefix: str, name: str) -> str:
    """The dotted path of child ``name`` under ``prefix`` ("" is the root)."""
    return f"{prefix}.{name}" if prefix else name


def detail(bn: nn.Module | None, act: tuple, p_text: str | None, dropout_first: bool) -> str:
    """The hyper-parameters of a run as the report prints them."""
    parts = []
    if bn is not None:
        parts.append(f"eps={bn.eps:g}, momentum={bn.momentum}")
    name, slope = act
    act_text = f"{name}({slope:g})" if spec.activation(name).has_slope else name
    drop = [f"dropout={p_text}"] if p_text is not None else []
    parts += drop + [act_text] if dropout_first else [act_text] + drop
    return ", ".join(parts)
