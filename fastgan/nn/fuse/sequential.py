"""The Sequential pass: runs of consecutive children of a plain ``nn.Sequential``.

The run's children are wrapped, unchanged, in one fused layer that takes the
place (and the name) of the run's first child; the parent's key hooks keep
the state-dict keys of the children where they were.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..layers import _Fused
from .checks import act_problem, bn_problem, dropout_ok, linear_problem
from .keys import add_key_hooks
from .report import FusedRun, FuseReport, LeftAlone, detail, join
from .wrap import FILLER, ORIGIN, make_fused


def is_plain_sequential(m: nn.Module) -> bool:
    """An ``nn.Sequential`` (or subclass) whose forward is Sequential's own: its
    children run in order, so consecutive ones form a run."""
    return (isinstance(m, nn.Sequential) and not isinstance(m, _Fused)
            and type(m).forward is nn.Sequential.forward)


def fuse_sequential(seq: nn.Sequential, path: str, shared: set, report: FuseReport) -> None:
    items = list(seq._modules.items())
    out, i, changed = [], 0, False
    while i < len(items):
        name, lin = items[i]
        run = sequential_run(items, i, path, shared, report)
        if run is None:
            out.append((name, lin))
            i += 1
            continue
        names, mods = zip(*run)
        bn = mods[1] if type(mods[1]) is nn.BatchNorm1d else None
        rest = mods[2:] if bn is not None else mods[1:]
        act, drop = rest[0], (rest[1] if len(rest) > 1 else None)
        fused = make_fused(lin, bn, act, drop, names)
        out.append((name, fused))
        report.fused.append(FusedRun(join(path, name), type(fused).__name__,
                                     tuple(f"{join(path, n)} ({type(m).__name__})"
                                           for n, m in run), detail(mods)))
        i += len(run)
        changed = True
    if changed:
        seq._modules = OrderedDict(out)
        add_key_hooks(seq)


def whole_run(seq: nn.Sequential) -> _Fused | None:
    """The fused layer if it replaced every child of seq under names 0, 1, ...
    (then it can take seq's place: its own keys are seq's keys)."""
    if type(seq) is not nn.Sequential or len(seq._modules) != 1:
        return None  # (a Sequential subclass keeps its class)
    (child,) = seq._modules.values()
    origin = getattr(child, ORIGIN, None)
    if origin and all(o in (str(i), None) for i, o in enumerate(origin)) and \
            all(o is not None or f for o, f in zip(origin, getattr(child, FILLER, (False,) * 4))):
        delattr(child, ORIGIN)
        return child
    return None


def sequential_run(items, i, path, shared, report):
    """The run starting at items[i] as [(name, module)], or None (reported if it is a Linear)."""
    name, lin = items[i]
    if not isinstance(lin, nn.Linear):
        return None
    where = f"{join(path, name)} ({type(lin).__name__})"
    why = linear_problem(lin)
    if why is None and id(lin) in shared:
        why = "the Linear is used in more than one place"
    nxt = items[i + 1] if i + 1 < len(items) else None
    if why is None and nxt is None:
        why = "nothing follows the Linear"
    if why:
        report.left_alone.append(LeftAlone(where, why))
        return None
    run = [items[i]]
    if isinstance(nxt[1], nn.modules.batchnorm._NormBase):
        why = bn_problem(lin, nxt[1]) or ("the BatchNorm1d is used in more than one place"
                                          if id(nxt[1]) in shared else None)
        if why:
            report.left_alone.append(LeftAlone(where, f"followed by {nxt[0]}: {why}"))
            return None
        run.append(nxt)
        nxt = items[i + 2] if i + 2 < len(items) else None
        if nxt is None:
            report.left_alone.append(LeftAlone(where, "Linear -> BatchNorm1d with no activation "
                                                      "after it"))
            return None
    why = act_problem(nxt[1])
    if why is None and nxt[1].training != lin.training:
        why = "activation in a different train/eval mode"
    if why:
        report.left_alone.append(LeftAlone(where, f"followed by {nxt[0]}: {why}"))
        return None
    run.append(nxt)
    j = i + len(run)
    if j < len(items) and dropout_ok(items[j][1], lin):
        run.append(items[j])
    return run
