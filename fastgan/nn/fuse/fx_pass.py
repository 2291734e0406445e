"""The torch.fx pass, part two: plan a module whose own forward has runs.

The module stays the same object with the same children. Its class becomes
the planned subclass whose forward is the traced forward with each run's
nodes replaced by one call, ``plan.run_call(self, i, x)``; everything else
the forward does is kept as traced. A ``F.dropout(..., training=self.training)``
outside any run reads ``self.training`` again when it runs (the trace saw
one value). Python values the forward read (``self.p``) are frozen at trace
time, as in any fx graph; the plan checks them before every call and runs
the original forward if one changed.
"""
from __future__ import annotations

import torch.fx
from torch import nn

from .checks import device_of, match
from .fx_match import dropout_modes, next_step_fn, node_step, trace
from .plan import PLAN, FxPlan, frozen_attrs, original_class, planned_class, portable, run_call
from .report import join
from .run import Run, RunSpec


def calls_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules() if m is not module)


def plan_fx(module: nn.Module, path: str, ctx) -> None:
    """Plan ``module`` if its forward has runs; report why not otherwise."""
    if not calls_linear(module):
        return
    direct = [n for n, c in module._modules.items() if isinstance(c, nn.Linear)]
    try:
        graph = trace(module, True)
        modes = dropout_modes(graph, trace(module, False))
    except Exception as e:  # any tracing failure means: leave it alone
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if direct:
            ctx.left(path, module, f"torch.fx cannot trace its forward ({type(e).__name__}: "
                                   f"{first}); it runs as written")
            for n in direct:
                ctx.left(join(path, n), module._modules[n],
                         f"inside {path or '<root>'}, whose forward runs as written")
        return
    if isinstance(modes, str):
        if direct:
            ctx.left(path, module, f"{modes}; it runs as written")
        return
    modules = dict(module.named_modules())
    next_step = next_step_fn(path, modules, modes)
    runs, taken = [], set()
    for node in list(graph.nodes):
        if node.op != "call_module" or node in taken \
                or not isinstance(modules.get(node.target), nn.Linear):
            continue
        run_steps, why, blocker = match(node_step(node, path, modules, modes), next_step)
        if run_steps is None:
            ctx.left(join(path, node.target), modules[node.target], why)
            ctx.blocked(path, blocker)
        else:
            runs.append(run_steps)
            taken.update(s.node for s in run_steps)
    if not runs:
        return
    rewrite(graph, runs, modes, taken)
    code = graph.python_code(root_module="self")
    plans = [Run(RunSpec.of(steps), ctx.only_if_faster, device_of(steps[0].module))
             for steps in runs]
    names = dict.fromkeys(n for r in plans for n in r.spec.names())
    children = tuple((n, original_class(type(modules[n]))) for n in names)
    module.__class__ = planned_class(type(module), code.src, portable(code.globals))
    module.__dict__[PLAN] = FxPlan(path, plans, children, frozen_attrs(module))
    for steps, run in zip(runs, plans):
        ctx.add_run(module, path, run, steps)


def rewrite(graph: torch.fx.Graph, runs: list, modes: dict, taken: set) -> None:
    """Each run's nodes become one ``run_call(owner, i, x)``; the owner comes in as a
    first argument of the generated forward (the planned class passes ``self``)."""
    first = next(iter(graph.nodes))
    with graph.inserting_before(first):
        owner = graph.placeholder("fastgan_module")
    for i, steps in enumerate(runs):
        nodes = [s.node for s in steps]
        with graph.inserting_after(nodes[-1]):
            call = graph.call_function(run_call, (owner, i, nodes[0].args[0]))
        nodes[-1].replace_all_uses_with(call)
        for n in reversed(nodes):
            graph.erase_node(n)
    # Dropout the runs did not take: training=self.training again (the trace froze True).
    training = None
    for node, flags in modes.items():
        if node in taken or flags != (True, False):
            continue
        if training is None:
            with graph.inserting_after(owner):
                training = graph.get_attr("training")
        if len(node.args) > 2:
            node.args = node.args[:2] + (training,) + node.args[3:]
        else:
            node.kwargs = {**node.kwargs, "training": training}
    graph.lint()
