"""The torch.fx pass, part one: trace a module's own forward and read its nodes as steps.

Only the module's own code is traced (every child is a leaf), once with its
``training`` flag on and once off: the two graphs may differ only in the
``training`` argument of ``F.dropout``.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ...ops import spec
from .checks import Step, dropout_problem, module_step, not_fusable, slope_problem
from .report import join


class OwnCodeTracer(torch.fx.Tracer):
    """Traces only the root's own forward: every child module is one call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


# The activation table's functional targets (-> their default slope) and Tensor
# methods, the calls a traced forward may make for an activation.
FUNCTIONS = {fn: (row, slope) for row in spec.ACTIVATION_TABLE
             for fn, slope in row.functions.items()}
METHODS = {method: row for row in spec.ACTIVATION_TABLE for method in row.methods}
OTHER_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.elu, F.gelu, F.silu, F.softplus, F.selu,
                   F.hardtanh, F.relu6, F.mish}


def arg(node: torch.fx.Node, index: int, name: str, default):
    """Argument ``name`` of a call node, passed by position ``index`` or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def only_input(node: torch.fx.Node, prev: torch.fx.Node) -> bool:
    """``node`` reads ``prev`` as its first argument and no other node."""
    first = node.args[0] if node.args else node.kwargs.get("input")
    others = [a for a in list(node.args[1:]) + list(node.kwargs.values())
              if isinstance(a, torch.fx.Node)]
    return first is prev and not others


def describe(node: torch.fx.Node, path: str, modules: dict) -> str:
    """A node as the report names it: a module path, ``Tensor.m()`` or ``F.f()``."""
    if node.op == "call_module":
        return f"{join(path, node.target)} ({type(modules[node.target]).__name__})"
    if node.op == "call_method":
        return f"Tensor.{node.target}()"
    target = node.target
    mod = "F." if getattr(target, "__module__", "") == "torch.nn.functional" else "torch."
    return f"{mod}{getattr(target, '__name__', target)}()"


def node_step(node: torch.fx.Node, path: str, modules: dict, modes: dict) -> Step:
    """The step of one node of the traced forward."""
    where = describe(node, path, modules) if node.op != "output" else "the output"
    if node.op == "call_module":
        step = module_step(node.target, join(path, node.target), modules[node.target])
        step.label, step.node = where, node
        if step.kind == "linear" and step.problem is None and (len(node.args) != 1
                                                               or node.kwargs):
            step.problem = "the Linear is called with extra arguments"
        return step
    if node.op == "call_function" and node.target in FUNCTIONS:
        row, slope = FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in METHODS:
        row, slope = METHODS[node.target], 0.0
    elif node.op == "call_function" and node.target is F.dropout:
        return dropout_step(node, where, modes)
    elif node.op in ("call_function", "call_method") and node.target in OTHER_FUNCTIONS | {
            "sigmoid"}:
        return Step("other", where, node=node, problem=not_fusable(where))
    else:
        return Step("other", where, node=node)
    if row.has_slope:
        slope = arg(node, 1, "negative_slope", slope)
    if not isinstance(slope, (int, float)):
        return Step("act", where, node=node, act=(row, 0.0),
                    problem="the activation's slope is computed at run time")
    return Step("act", where, node=node, act=(row, float(slope)),
                problem=slope_problem(row, float(slope)))


def dropout_step(node, where, modes) -> Step:
    p = arg(node, 1, "p", 0.5)
    train_flag, eval_flag = modes.get(node, (None, None))
    problem = dropout_problem(p)
    if problem is None and arg(node, 3, "inplace", False) not in (False, True):
        problem = "F.dropout's inplace flag is computed at run time"
    if (train_flag, eval_flag) == (True, False):
        follows = True                       # training=self.training
    elif (train_flag, eval_flag) == (True, True):
        follows = False                      # F.dropout(h, p): drops in eval too
    else:
        follows, problem = True, problem or "its training flag is neither self.training nor True"
    return Step("dropout", where, node=node, p=float(p) if problem is None else None,
                follows_training=follows, problem=problem)


def trace(module: nn.Module, training: bool) -> torch.fx.Graph:
    """Trace with module's own flag set to ``training`` (children untouched)."""
    saved = module.training
    module.training = training
    try:
        return OwnCodeTracer().trace(module)
    finally:
        module.training = saved


def dropout_modes(train_graph, eval_graph) -> dict | str:
    """Map each functional-dropout node of the train graph to its (train, eval)
    ``training`` flags; a str if the graphs differ in anything else."""
    a, b = list(train_graph.nodes), list(eval_graph.nodes)
    if len(a) != len(b):
        return "its forward changes with self.training beyond dropout"
    modes = {}
    for na, nb in zip(a, b):
        if (na.op, na.target) != (nb.op, nb.target):
            return "its forward changes with self.training beyond dropout"
        if na.op == "call_function" and na.target is F.dropout:
            modes[na] = (arg(na, 2, "training", True), arg(nb, 2, "training", True))
        elif str(na.args) != str(nb.args) or str(na.kwargs) != str(nb.kwargs):
            return "its forward changes with self.training beyond dropout"
    return modes


def next_step_fn(path: str, modules: dict, modes: dict):
    """``checks.match``'s next_step over the graph: the one node that reads a step's output."""
    def next_step(step):
        node = step.node
        users = list(node.users)
        if not users:
            return None
        if len(users) > 1:
            return f"the output of {step.label} is used more than once"
        user = users[0]
        if user.op == "output":
            return None
        if not only_input(user, node):
            return f"{describe(user, path, modules)} reads more than the output of {step.label}"
        return node_step(user, path, modules, modes)
    return next_step
