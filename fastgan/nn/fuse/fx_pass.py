"""The torch.fx pass, part two: rewrite a module whose forward has runs.

The rewritten module is a shallow copy of the original (same tensors, same
attributes, its own child table and hook tables) whose class is a subclass of
the original with the generated forward (``fx_class``).
"""
from __future__ import annotations

from collections import Counter, OrderedDict

from torch import nn

from .fx_class import fx_class, portable
from .fx_match import describe, dropout_modes, fx_run, trace
from .keys import add_key_hooks
from .report import FusedRun, FuseReport, LeftAlone, detail, join
from .wrap import make_fused


def fuse_fx(module: nn.Module, path: str, shared: set, report: FuseReport):
    """The module rewritten with torch.fx, or None (nothing to fuse / left alone, reported)."""
    if not any(type(c) is nn.Linear for c in module.children()):
        return None
    where = f"{path or '<root>'} ({type(module).__name__})"
    if module._forward_hooks or module._forward_pre_hooks:
        report.left_alone.append(LeftAlone(where, "has forward hooks, which torch.fx would drop"))
        return None
    try:
        graph = trace(module, True)
        modes = dropout_modes(graph, trace(module, False))
    except Exception as e:  # any tracing failure means: leave it alone
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        report.left_alone.append(LeftAlone(where, f"torch.fx cannot trace its forward "
                                                  f"({type(e).__name__}: {first})"))
        return None
    if isinstance(modes, str):
        report.left_alone.append(LeftAlone(where, modes))
        return None
    modules = dict(module.named_modules())
    uses = Counter(n.target for n in graph.nodes if n.op == "call_module")
    # Direct attribute reads (weight tying, self.fc.weight in forward) pin a module.
    for n in graph.nodes:
        if n.op == "get_attr":
            uses[n.target.rsplit(".", 1)[0]] += 2
    runs = []
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.Linear):
            run = fx_run(node, modules, uses, modes, shared)
            if isinstance(run, str):
                report.left_alone.append(LeftAlone(
                    f"{join(path, node.target)} ({type(modules[node.target]).__name__})", run))
            else:
                runs.append(run)
    for n, (train_flag, eval_flag) in modes.items():
        if train_flag is True and eval_flag is True:
            report.left_alone.append(LeftAlone(
                f"{path or '<root>'}: {describe(n, path)}",
                "F.dropout with training=True also drops in eval mode; kept as written"))
    if not runs:
        return None

    new = module.__class__.__new__(module.__class__)
    new.__dict__ = dict(module.__dict__)
    for key in ("_modules", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
        new.__dict__[key] = OrderedDict(module.__dict__[key])
    new._fastgan_fx_order = list(module._modules)  # unfuse restores this child order
    for nodes, lin, bn, act, drop, names in runs:
        lin_name = nodes[0].target
        fused = make_fused(lin, bn, act, drop, names)
        for n in names:
            if n is not None:
                del new._modules[n]
        new._modules[lin_name] = fused
        with graph.inserting_after(nodes[-1]):
            call = graph.call_module(lin_name, (nodes[0].args[0],))
        nodes[-1].replace_all_uses_with(call)
        for n in reversed(nodes):
            graph.erase_node(n)
        report.fused.append(FusedRun(
            join(path, lin_name), type(fused).__name__,
            tuple(describe(n, path) for n in nodes),
            detail([m for m in (lin, bn, act, drop) if m is not None])))
    graph.lint()
    # A fused layer sits where its Linear was, so keys keep their order.
    order = [n for n in new._fastgan_fx_order if n in new._modules]
    new._modules = OrderedDict((n, new._modules[n]) for n in order)
    code = graph.python_code(root_module="self")
    new.__class__ = fx_class(module.__class__, code.src, portable(code.globals))
    add_key_hooks(new)
    if list(new.state_dict()) != list(module.state_dict()):  # a safety net, not expected
        report.fused[-len(runs):] = []
        report.left_alone.append(LeftAlone(where, "the rewrite would change its state_dict keys"))
        return None
    return new
