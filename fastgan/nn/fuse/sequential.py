"""The Sequential pass: runs of consecutive children of a plain ``nn.Sequential``.

The Sequential keeps its children, names and order; its plan says, for each
position, "call this child" or "run these children as one fused op"
(``plan.SequentialPlan``), and its class becomes the planned subclass whose
forward follows the plan.
"""
from __future__ import annotations

from torch import nn

from ..layers import _Fused
from .checks import device_of, match, module_step
from .plan import PLAN, SequentialPlan, original_class, planned_class
from .report import join
from .run import Run, RunSpec


def is_plain_sequential(m: nn.Module) -> bool:
    """An ``nn.Sequential`` (or subclass) whose forward is Sequential's own: its
    children run in order, so consecutive ones form a run."""
    return (isinstance(m, nn.Sequential) and not isinstance(m, _Fused)
            and type(m).forward is nn.Sequential.forward)


def plan_sequential(seq: nn.Sequential, path: str, ctx) -> None:
    items = list(seq._modules.items())
    steps = [None if m is None else module_step(name, join(path, name), m) for name, m in items]
    position = {id(s): i for i, s in enumerate(steps) if s is not None}

    def next_step(step):
        i = position[id(step)] + 1
        return steps[i] if i < len(steps) else None

    plan_steps, runs, i = [], [], 0
    while i < len(items):
        step = steps[i]
        if step is None or step.kind != "linear":
            plan_steps.append(items[i][0])
            i += 1
            continue
        run_steps, why, blocker = match(step, next_step)
        if run_steps is None:
            ctx.left(join(path, items[i][0]), items[i][1], why)
            ctx.blocked(path, blocker)
            plan_steps.append(items[i][0])
            i += 1
            continue
        run = Run(RunSpec.of(run_steps), ctx.only_if_faster, device_of(step.module))
        runs.append(run)
        plan_steps.append(run)
        ctx.add_run(seq, path, run, run_steps)
        i += len(run_steps)
    if runs:
        children = tuple((name, original_class(type(m))) for name, m in items)
        seq.__class__ = planned_class(type(seq))
        seq.__dict__[PLAN] = SequentialPlan(path, runs, children, plan_steps)
