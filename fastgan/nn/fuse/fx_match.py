"""The torch.fx pass, part one: trace a module's own forward and find its runs.

Only the module's own code is traced (every child is a leaf), once with its
``training`` flag on and once off: the two graphs may differ only in the
``training`` argument of ``F.dropout``, which the fused layer takes over.
"""
from __future__ import annotations

import copy

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ...ops import spec
from ..layers import activation_of
from .checks import act_problem, bn_problem, dropout_ok, linear_problem
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


def arg(node: torch.fx.Node, index: int, name: str, default):
    """Argument ``name`` of a call node, passed by position ``index`` or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def only_input(node: torch.fx.Node, prev: torch.fx.Node) -> bool:
    """``node`` reads ``prev`` as its first argument and no other node."""
    first = node.args[0] if node.args else node.kwargs.get("input")
    others = [a for a in list(node.args[1:]) + list(node.kwargs.values())
              if isinstance(a, torch.fx.Node) and a is not first]
    return first is prev and not others


def single_user(node: torch.fx.Node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def describe(node: torch.fx.Node, path: str) -> str:
    """A node as the report names it: a module path, ``Tensor.m()`` or ``F.f()``."""
    if node.op == "call_module":
        return join(path, node.target)
    if node.op == "call_method":
        return f"Tensor.{node.target}()"
    target = node.target
    mod = "F." if target.__module__ == "torch.nn.functional" else "torch."
    return f"{mod}{target.__name__}()"


def functional_act(node, modules):
    """An activation module equivalent to node, or a reason it is not one (str), or None."""
    if node.op == "call_module":
        m = modules[node.target]
        try:
            activation_of(m)
        except ValueError:
            return None
        return act_problem(m) or m
    if node.op == "call_function" and node.target in FUNCTIONS:
        row, slope = FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in METHODS:
        row, slope = METHODS[node.target], 0.0
    else:
        return None
    if row.has_slope:
        slope = arg(node, 1, "negative_slope", slope)
    if not isinstance(slope, (int, float)):
        return "the activation's slope is computed at run time"
    m = row.make_module(float(slope))
    return act_problem(m) or m


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


def fx_run(lin_node, modules, uses, modes, shared):
    """Nodes and modules of the run at lin_node: ([nodes], lin, bn, act, drop, names) or a reason."""
    lin = modules[lin_node.target]
    why = linear_problem(lin)
    if why:
        return why
    if uses[lin_node.target] > 1 or id(lin) in shared:
        return "the Linear is used in more than one place"
    if "." in lin_node.target:
        return "the Linear is not a direct child of the module"
    if len(lin_node.args) != 1 or lin_node.kwargs:
        return "the Linear is called with extra arguments"
    nodes, names = [lin_node], [lin_node.target]
    node, bn = single_user(lin_node), None
    if node is None:
        return "the Linear's output is used more than once"
    if (node.op == "call_module" and "." not in node.target
            and isinstance(modules[node.target], nn.modules.batchnorm._NormBase)):
        bn = modules[node.target]
        why = bn_problem(lin, bn)
        if why is None and (uses[node.target] > 1 or id(bn) in shared):
            why = "the BatchNorm1d is used in more than one place"
        if why is None and not only_input(node, lin_node):
            why = "the BatchNorm1d is called with extra arguments"
        if why:
            return f"followed by {node.target}: {why}"
        nodes.append(node)
        names.append(node.target)
        node = single_user(node)
        if node is None:
            return "the BatchNorm1d's output is used more than once"
    act = functional_act(node, modules)
    if act is None:
        if node.op == "output":
            return "its output is returned as is (no activation to fuse)"
        return f"followed by {describe(node, '')}, not a fusable activation"
    if isinstance(act, str):
        return act
    if not only_input(node, nodes[-1]):
        return "the activation reads more than the Linear's output"
    if node.op == "call_module" and (uses[node.target] > 1 or "." in node.target):
        act = copy.deepcopy(act)  # a shared activation module: give the layer its own
        names.append(None)
    else:
        names.append(node.target if node.op == "call_module" else None)
    nodes.append(node)
    drop, node = None, single_user(node)
    if node is not None and only_input(node, nodes[-1]):
        if node.op == "call_module" and "." not in node.target and uses[node.target] == 1 \
                and dropout_ok(modules[node.target], lin):
            drop = modules[node.target]
            names.append(node.target)
            nodes.append(node)
        elif node.op == "call_function" and node.target is F.dropout:
            p = arg(node, 1, "p", 0.5)
            if modes.get(node) == (True, False) and isinstance(p, (int, float)) \
                    and 0 <= p < 1:
                drop = nn.Dropout(float(p))
                drop.training = lin.training
                names.append(None)
                nodes.append(node)
    return nodes, lin, bn, act, drop, names
