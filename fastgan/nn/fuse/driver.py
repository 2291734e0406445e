"""``fuse``: walk the model bottom-up, giving each module to the pass that reads it.

Plain Sequentials go to the Sequential pass, other user modules to the fx
pass; torch's own modules and fastgan's fused layers are left as they are.
Then every module no run took gets its line in the report.
"""
from __future__ import annotations

from torch import nn

from ..layers import _Fused
from . import hooks
from .checks import label, module_step, target
from .plan import is_planned, unplan
from .report import FusedRun, FuseReport, LeftAlone, detail, join
from .sequential import is_plain_sequential, plan_sequential
from .fx_pass import plan_fx


def library_module(m: nn.Module) -> bool:
    """One of torch's own modules (not a container): it runs its own forward."""
    return (type(m).__module__.startswith("torch.")
            and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)))


class Context:
    """What the passes report into."""

    def __init__(self, only_if_faster: bool):
        self.only_if_faster = only_if_faster
        self.report = FuseReport()
        self.reasons: dict = {}     # path -> (module, reason) of modules left alone
        self.covered: set = set()   # paths of modules inside a run
        self.seen: set = set()      # ids of the modules walked

    def left(self, path: str, module: nn.Module, reason: str) -> None:
        self.reasons.setdefault(path or "<root>", (module, reason))

    def blocked(self, path: str, step) -> None:
        """The module that stopped a run, with its own reason if it has one."""
        if step is not None and step.module is not None and step.problem:
            self.left(join(path, step.name), step.module, step.problem)

    def add_run(self, owner: nn.Module, path: str, run, steps) -> None:
        lin, bn, act, drop = run.modules(owner)
        self.covered.update(join(path, n) for n in run.spec.names())
        p_text = None
        if drop is not None:
            p_text = f"{drop.p:g}"
        elif run.spec.drop_call is not None:
            p, follows = run.spec.drop_call
            p_text = f"{p:g}" + ("" if follows else " (also in eval, as written)")
        notes = list(hooks.honoured(label(join(path, run.spec.linear), lin), lin))
        now = run.why_unfused(owner, path)
        other = run.why_unfused(owner, path, training=not lin.training)
        mode = "eval" if lin.training else "training"
        if now is None and other is not None:
            notes.append(f"in {mode} mode it runs unfused: {other}")
        elif now is not None and other is None:
            notes.append(f"in {mode} mode it runs fused")
        self.report.runs.append(FusedRun(
            join(path, run.spec.linear), tuple(s.label for s in steps),
            "linear_act" if bn is None else "linear_bn_act",
            detail(bn, run.activation(act), p_text, run.spec.dropout_first), now, tuple(notes)))

    def finish(self, model: nn.Module) -> FuseReport:
        """A line for every module no run took (its recorded reason, or its kind's)."""
        quiet: list = []   # paths whose descendants their line (or their run) speaks for
        for path, m in model.named_modules():
            if any(q == "" or path.startswith(q + ".") for q in quiet):
                continue
            key = path or "<root>"
            if isinstance(m, _Fused):
                why = "already a fused layer (it runs fastgan's op itself)"
            elif key in self.covered:
                why = None
            elif key in self.reasons:
                why = self.reasons[key][1]
            elif library_module(m):
                if next(m.children(), None) is not None:
                    why = f"{type(m).__name__} is a torch module with its own forward"
                elif isinstance(m, nn.Linear):
                    why = "not called as a run by its parent's forward"
                elif module_step("", path, m).kind == "other":
                    why = f"{type(m).__name__} is not a Linear run"
                else:
                    why = "not part of a fusable Linear run"
            else:
                continue  # a container, or a module the fx pass read: its children speak
            if why is not None:
                self.report.left_alone.append(LeftAlone(key, type(m).__name__, why))
            if isinstance(m, _Fused) or library_module(m):
                quiet.append(path)
        return self.report


def walk(module: nn.Module, path: str, ctx: Context) -> None:
    if isinstance(module, _Fused) or library_module(module) or id(module) in ctx.seen:
        return  # (a module used in two places is planned once, where it is met first)
    ctx.seen.add(id(module))
    for name, child in module._modules.items():
        if child is not None:
            walk(child, join(path, name), ctx)
    if is_plain_sequential(module):
        plan_sequential(module, path, ctx)
    elif not isinstance(module, (nn.ModuleList, nn.ModuleDict)) and \
            not type(module).__module__.startswith("torch."):
        plan_fx(module, path, ctx)


def fuse(model: nn.Module, inplace: bool | None = None, *, copy: bool | None = None,
         only_if_faster: bool = True) -> tuple[nn.Module, FuseReport]:
    """Run every fusable Linear [-> BatchNorm1d] -> activation / Dropout run of
    ``model`` as one fused op, without changing the model's tree.

    Returns ``(model, report)``; ``print(report)`` says, by module path, what
    runs fused, what stays unfused and why. Every module keeps its path,
    index, class (as ``repr`` and ``isinstance`` see it), Parameters, buffers
    and hooks, so ``named_parameters``, ``state_dict``, ``get_submodule``,
    indexing and optimizers built before ``fuse`` work unchanged; only how
    the runs execute changes. Calling ``fuse`` again re-plans from scratch.

    ``copy=True`` fuses a deep copy and leaves ``model`` alone (the copy has
    its own Parameters: build its optimizer after). ``inplace`` is the old
    spelling: ``inplace=True`` is now the default, ``inplace=False`` means
    ``copy=True``. ``only_if_faster=False`` fuses every run the kernels
    support, even where the speed rule (``fastgan.nn.fuse.speed``) says the
    fused op would not gain: to test or benchmark the kernels.
    """
    model = target(model, copy, inplace)
    for m in model.modules():
        if is_planned(m):
            unplan(m)
    ctx = Context(bool(only_if_faster))
    walk(model, "", ctx)
    return model, ctx.finish(model)
