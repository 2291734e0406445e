"""Rewrite an existing model's Linear -> [BatchNorm1d ->] activation [-> Dropout]
runs into fastgan's fused layers, and back.

``fuse(model)`` finds runs in two places:

* ``nn.Sequential`` containers (nested ones too, and the flat ones GAN code
  builds with ``nn.Sequential(*block(...), *block(...))``): the run's children
  are wrapped, unchanged, in a ``LinearBNAct`` / ``LinearAct`` that takes the
  place of the run's first child.
* Modules whose ``forward`` calls ``self.fc(x)`` then ``F.leaky_relu`` /
  ``F.relu`` / ``torch.tanh`` / ``F.dropout`` ...: the forward is traced with
  ``torch.fx`` (each child module is a leaf, so only the module's own code is
  read) and the run's nodes become one call of the fused layer. The module
  keeps its class (its new class is a subclass with the generated forward),
  attributes and methods; Python values its forward read (``self.p``) are
  frozen at trace time, as with any fx graph. A forward that fx cannot trace,
  or whose graph depends on ``self.training`` beyond dropout, is left alone
  and reported.

Weights are never copied: the fused layer holds the very same Linear and
BatchNorm1d modules (on ``fuse``'s deep copy unless ``inplace=True``), so
device, dtype, eps, momentum, mode and running statistics carry over exactly.

State-dict keys do not change. A fused layer keeps its children under
``0``, ``1``...; a state-dict hook on its parent renames them back to the
original names (``model.3.weight``, ``fc1.weight``, ``bn1.running_var``) and a
load pre-hook maps them in, so checkpoints load both ways. ``unfuse`` puts the
original children back where they were and removes the hooks.
"""
from __future__ import annotations

import copy
import importlib
import math
import types
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .layers import LinearAct, LinearBNAct, _Fused, activation_of

__all__ = ["fuse", "unfuse", "FuseReport", "FusedRun", "LeftAlone"]

# Attributes of a fused layer made by ``fuse``. _ORIGIN: the original name of
# each child in the parent whose keys are renamed (None for a child ``fuse``
# made up, e.g. the module standing for ``F.leaky_relu``); absent when the
# layer replaced a whole Sequential (its keys are already the original ones).
# _FILLER: True where the child is a Dropout(0) filling LinearBNAct's fourth
# slot, which ``unfuse`` drops again.
_ORIGIN = "_fastgan_fuse_origin"
_FILLER = "_fastgan_fuse_filler"


# ----------------------------------------------------------------------------- report
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


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ----------------------------------------------------------------------------- checks
def _hooked(m: nn.Module) -> bool:
    # The fused layer reads its children's tensors without calling their
    # forward, so a hook (nn.utils.spectral_norm recomputes the weight in one)
    # would silently stop running.
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _linear_problem(lin: nn.Module) -> str | None:
    if type(lin) is not nn.Linear:
        return f"{type(lin).__name__} is not a plain nn.Linear"
    if _hooked(lin):
        return "the Linear has forward hooks (e.g. nn.utils.spectral_norm)"
    if not lin.weight.is_floating_point():
        return f"Linear weight has dtype {lin.weight.dtype}"
    return None


def _bn_problem(lin: nn.Linear, bn: nn.Module) -> str | None:
    if type(bn) is not nn.BatchNorm1d:
        return f"{type(bn).__name__} is not nn.BatchNorm1d"
    if _hooked(bn):
        return "the BatchNorm1d has forward hooks"
    if not bn.affine:
        return "BatchNorm1d(affine=False) is not supported by the fused kernels"
    if not bn.track_running_stats:
        return "BatchNorm1d(track_running_stats=False) is not supported by the fused kernels"
    if bn.num_features != lin.out_features:
        return f"BatchNorm1d({bn.num_features}) after Linear(out_features={lin.out_features})"
    stat = torch.float64 if lin.weight.dtype == torch.float64 else torch.float32
    if bn.weight.dtype != stat:
        return (f"BatchNorm1d is {bn.weight.dtype} with a {lin.weight.dtype} Linear; the kernels "
                f"keep statistics in {stat}")
    if bn.weight.device != lin.weight.device:
        return "Linear and BatchNorm1d are on different devices"
    if not (math.isfinite(bn.eps) and bn.eps > 0):
        return f"BatchNorm1d eps={bn.eps} is not finite and > 0"
    if bn.momentum is not None and not 0.0 <= bn.momentum <= 1.0:
        return f"BatchNorm1d momentum={bn.momentum} is not None or in [0, 1]"
    if bn.training != lin.training:
        return "Linear and BatchNorm1d are in different train/eval modes"
    return None


def _act_problem(act: nn.Module) -> str | None:
    try:
        name, slope = activation_of(act)
    except ValueError:
        return f"{type(act).__name__} is not a fusable activation"
    if _hooked(act):
        return f"the {type(act).__name__} has forward hooks"
    if name == "leaky_relu" and not (math.isfinite(slope) and slope >= 0):
        return f"LeakyReLU negative_slope={slope} < 0 is not supported by the fused kernels"
    return None


def _dropout_ok(drop: nn.Module, ref: nn.Module) -> bool:
    return (type(drop) is nn.Dropout and 0.0 <= drop.p < 1.0 and drop.training == ref.training
            and not _hooked(drop))


def _detail(children) -> str:
    parts = []
    for m in children:
        if type(m) is nn.BatchNorm1d:
            parts.append(f"eps={m.eps:g}, momentum={m.momentum}")
        elif type(m) is nn.Dropout:
            parts.append(f"dropout={m.p:g}")
        elif not isinstance(m, nn.Linear):
            name, slope = activation_of(m)
            parts.append(f"{name}({slope:g})" if name == "leaky_relu" else name)
    return ", ".join(parts)


def _make_fused(lin, bn, act, drop, origin) -> _Fused:
    """The fused layer around existing children; ``origin`` = their original names."""
    if bn is not None:
        fused = LinearBNAct.from_sequential(nn.Sequential(lin, bn, act, drop or nn.Dropout(0.0)))
        origin = tuple(origin) + ((None,) if drop is None else ())
        setattr(fused, _FILLER, (False, False, False, drop is None))
    else:
        layers = (lin, act) if drop is None else (lin, act, drop)
        fused = LinearAct.from_sequential(nn.Sequential(*layers))
    # A new Module starts in training mode; take the run's mode without
    # touching the children (they already have it).
    fused.training = lin.training
    setattr(fused, _ORIGIN, tuple(origin))
    return fused


# ----------------------------------------------------------------------------- state-dict keys
def _renames(parent: nn.Module):
    """(fused child name, child index, original name) for every fused child of parent."""
    for name, child in parent._modules.items():
        origin = getattr(child, _ORIGIN, None) if child is not None else None
        if origin:
            for i, orig in enumerate(origin):
                if orig is not None:
                    yield name, str(i), orig


def _state_dict_hook(module, state_dict, prefix, local_metadata):
    """Save fused children under their original names (``3.weight``, not ``3.0.weight``)."""
    mapping = {f"{prefix}{name}.{i}.": f"{prefix}{orig}." for name, i, orig in _renames(module)}
    if not mapping:
        return
    # This module's keys are the last ones in the dict; re-add them in order.
    mine = [k for k in state_dict if k.startswith(prefix)]
    items = [(k, state_dict.pop(k)) for k in mine]
    for k, v in items:
        for old, new in mapping.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        state_dict[k] = v


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
                   unexpected_keys, error_msgs):
    """Accept original-name keys for fused children (and fused-layout keys as they are)."""
    for name, i, orig in _renames(module):
        child = module._modules[name][int(i)]
        own = set(child.state_dict().keys())
        for k in [k for k in state_dict if k.startswith(f"{prefix}{orig}.")]:
            rest = k[len(f"{prefix}{orig}."):]
            if rest in own:
                state_dict[f"{prefix}{name}.{i}.{rest}"] = state_dict.pop(k)


def _add_key_hooks(parent: nn.Module) -> None:
    if not any(h is _state_dict_hook for h in parent._state_dict_hooks.values()):
        parent.register_state_dict_post_hook(_state_dict_hook)
        parent.register_load_state_dict_pre_hook(_load_pre_hook)


def _remove_key_hooks(parent: nn.Module) -> None:
    for hooks in (parent._state_dict_hooks, parent._load_state_dict_pre_hooks):
        for key, h in list(hooks.items()):
            if getattr(h, "hook", h) in (_state_dict_hook, _load_pre_hook):
                del hooks[key]


# ----------------------------------------------------------------------------- Sequential
def _is_plain_sequential(m: nn.Module) -> bool:
    return (isinstance(m, nn.Sequential) and not isinstance(m, _Fused)
            and type(m).forward is nn.Sequential.forward)


def _fuse_sequential(seq: nn.Sequential, path: str, shared: set, report: FuseReport) -> None:
    items = list(seq._modules.items())
    out, i, changed = [], 0, False
    while i < len(items):
        name, lin = items[i]
        run = _sequential_run(items, i, path, shared, report)
        if run is None:
            out.append((name, lin))
            i += 1
            continue
        names, mods = zip(*run)
        bn = mods[1] if type(mods[1]) is nn.BatchNorm1d else None
        rest = mods[2:] if bn is not None else mods[1:]
        act, drop = rest[0], (rest[1] if len(rest) > 1 else None)
        fused = _make_fused(lin, bn, act, drop, names)
        out.append((name, fused))
        report.fused.append(FusedRun(_join(path, name), type(fused).__name__,
                                     tuple(f"{_join(path, n)} ({type(m).__name__})"
                                           for n, m in run), _detail(mods)))
        i += len(run)
        changed = True
    if changed:
        seq._modules = OrderedDict(out)
        _add_key_hooks(seq)


def _whole_run(seq: nn.Sequential) -> _Fused | None:
    """The fused layer if it replaced every child of seq under names 0, 1, ...
    (then it can take seq's place: its own keys are seq's keys)."""
    if type(seq) is not nn.Sequential or len(seq._modules) != 1:
        return None  # (a Sequential subclass keeps its class)
    (child,) = seq._modules.values()
    origin = getattr(child, _ORIGIN, None)
    if origin and all(o in (str(i), None) for i, o in enumerate(origin)) and \
            all(o is not None or f for o, f in zip(origin, getattr(child, _FILLER, (False,) * 4))):
        delattr(child, _ORIGIN)
        return child
    return None


def _sequential_run(items, i, path, shared, report):
    """The run starting at items[i] as [(name, module)], or None (reported if it is a Linear)."""
    name, lin = items[i]
    if not isinstance(lin, nn.Linear):
        return None
    where = f"{_join(path, name)} ({type(lin).__name__})"
    why = _linear_problem(lin)
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
        why = _bn_problem(lin, nxt[1]) or ("the BatchNorm1d is used in more than one place"
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
    why = _act_problem(nxt[1])
    if why is None and nxt[1].training != lin.training:
        why = "activation in a different train/eval mode"
    if why:
        report.left_alone.append(LeftAlone(where, f"followed by {nxt[0]}: {why}"))
        return None
    run.append(nxt)
    j = i + len(run)
    if j < len(items) and _dropout_ok(items[j][1], lin):
        run.append(items[j])
    return run


# ----------------------------------------------------------------------------- torch.fx
class _OwnCodeTracer(torch.fx.Tracer):
    """Traces only the root's own forward: every child module is one call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


# Functional activations: target -> (activation, default negative_slope).
_FUNCTIONAL_ACTS = {
    F.leaky_relu: ("leaky_relu", 0.01),
    F.relu: ("relu", 0.0),
    torch.relu: ("relu", 0.0),
    torch.tanh: ("tanh", 0.0),
    F.tanh: ("tanh", 0.0),
}
_METHOD_ACTS = {"relu": ("relu", 0.0), "tanh": ("tanh", 0.0)}


def _arg(node: torch.fx.Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _only_input(node: torch.fx.Node, prev: torch.fx.Node) -> bool:
    """``node`` reads ``prev`` as its first argument and no other node."""
    first = node.args[0] if node.args else node.kwargs.get("input")
    others = [a for a in list(node.args[1:]) + list(node.kwargs.values())
              if isinstance(a, torch.fx.Node) and a is not first]
    return first is prev and not others


def _single_user(node: torch.fx.Node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _functional_act(node, modules):
    """An activation module equivalent to node, or a reason it is not one (str), or None."""
    if node.op == "call_module":
        m = modules[node.target]
        try:
            activation_of(m)
        except ValueError:
            return None
        return _act_problem(m) or m
    if node.op == "call_function" and node.target in _FUNCTIONAL_ACTS:
        name, slope = _FUNCTIONAL_ACTS[node.target]
        if name == "leaky_relu":
            slope = _arg(node, 1, "negative_slope", slope)
    elif node.op == "call_method" and node.target in _METHOD_ACTS:
        name, slope = _METHOD_ACTS[node.target]
    else:
        return None
    if not isinstance(slope, (int, float)):
        return "the activation's slope is computed at run time"
    m = {"leaky_relu": lambda: nn.LeakyReLU(float(slope)), "relu": nn.ReLU,
         "tanh": nn.Tanh}[name]()
    return _act_problem(m) or m


def _trace(module: nn.Module, training: bool) -> torch.fx.Graph:
    """Trace with module's own flag set to ``training`` (children untouched)."""
    saved = module.training
    module.training = training
    try:
        return _OwnCodeTracer().trace(module)
    finally:
        module.training = saved


def _dropout_modes(train_graph, eval_graph) -> dict | str:
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
            modes[na] = (_arg(na, 2, "training", True), _arg(nb, 2, "training", True))
        elif str(na.args) != str(nb.args) or str(na.kwargs) != str(nb.kwargs):
            return "its forward changes with self.training beyond dropout"
    return modes


def _fx_run(lin_node, modules, uses, dropout_modes, shared):
    """Nodes and modules of the run at lin_node: ([nodes], lin, bn, act, drop, names) or a reason."""
    lin = modules[lin_node.target]
    why = _linear_problem(lin)
    if why:
        return why
    if uses[lin_node.target] > 1 or id(lin) in shared:
        return "the Linear is used in more than one place"
    if "." in lin_node.target:
        return "the Linear is not a direct child of the module"
    if len(lin_node.args) != 1 or lin_node.kwargs:
        return "the Linear is called with extra arguments"
    nodes, names = [lin_node], [lin_node.target]
    node, bn = _single_user(lin_node), None
    if node is None:
        return "the Linear's output is used more than once"
    if (node.op == "call_module" and "." not in node.target
            and isinstance(modules[node.target], nn.modules.batchnorm._NormBase)):
        bn = modules[node.target]
        why = _bn_problem(lin, bn)
        if why is None and (uses[node.target] > 1 or id(bn) in shared):
            why = "the BatchNorm1d is used in more than one place"
        if why is None and not _only_input(node, lin_node):
            why = "the BatchNorm1d is called with extra arguments"
        if why:
            return f"followed by {node.target}: {why}"
        nodes.append(node)
        names.append(node.target)
        node = _single_user(node)
        if node is None:
            return "the BatchNorm1d's output is used more than once"
    act = _functional_act(node, modules)
    if act is None:
        if node.op == "output":
            return "its output is returned as is (no activation to fuse)"
        return f"followed by {_describe(node, '')}, not a fusable activation"
    if isinstance(act, str):
        return act
    if not _only_input(node, nodes[-1]):
        return "the activation reads more than the Linear's output"
    if node.op == "call_module" and (uses[node.target] > 1 or "." in node.target):
        act = copy.deepcopy(act)  # a shared activation module: give the layer its own
        names.append(None)
    else:
        names.append(node.target if node.op == "call_module" else None)
    nodes.append(node)
    drop, node = None, _single_user(node)
    if node is not None and _only_input(node, nodes[-1]):
        if node.op == "call_module" and "." not in node.target and uses[node.target] == 1 \
                and _dropout_ok(modules[node.target], lin):
            drop = modules[node.target]
            names.append(node.target)
            nodes.append(node)
        elif node.op == "call_function" and node.target is F.dropout:
            p = _arg(node, 1, "p", 0.5)
            if dropout_modes.get(node) == (True, False) and isinstance(p, (int, float)) \
                    and 0 <= p < 1:
                drop = nn.Dropout(float(p))
                drop.training = lin.training
                names.append(None)
                nodes.append(node)
    return nodes, lin, bn, act, drop, names


def _fuse_fx(module: nn.Module, path: str, shared: set, report: FuseReport):
    """The module rewritten with torch.fx, or None (nothing to fuse / left alone, reported)."""
    if not any(type(c) is nn.Linear for c in module.children()):
        return None
    where = f"{path or '<root>'} ({type(module).__name__})"
    if module._forward_hooks or module._forward_pre_hooks:
        report.left_alone.append(LeftAlone(where, "has forward hooks, which torch.fx would drop"))
        return None
    try:
        graph = _trace(module, True)
        modes = _dropout_modes(graph, _trace(module, False))
    except Exception as e:  # noqa: BLE001  any tracing failure means: leave it alone
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
            run = _fx_run(node, modules, uses, modes, shared)
            if isinstance(run, str):
                report.left_alone.append(LeftAlone(
                    f"{_join(path, node.target)} ({type(modules[node.target]).__name__})", run))
            else:
                runs.append(run)
    for n, (train_flag, eval_flag) in modes.items():
        if train_flag is True and eval_flag is True:
            report.left_alone.append(LeftAlone(
                f"{path or '<root>'}: {_describe(n, path)}",
                "F.dropout with training=True also drops in eval mode; kept as written"))
    if not runs:
        return None

    # The new module: a shallow copy of module (same tensors, same attributes,
    # its own child table and hook tables) whose class is a subclass of the
    # original with the rewritten forward.
    new = module.__class__.__new__(module.__class__)
    new.__dict__ = dict(module.__dict__)
    for key in ("_modules", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
        new.__dict__[key] = OrderedDict(module.__dict__[key])
    new._fastgan_fx_order = list(module._modules)
    for nodes, lin, bn, act, drop, names in runs:
        lin_name = nodes[0].target
        fused = _make_fused(lin, bn, act, drop, names)
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
            _join(path, lin_name), type(fused).__name__,
            tuple(_describe(n, path) for n in nodes),
            _detail([m for m in (lin, bn, act, drop) if m is not None])))
    graph.lint()
    # A fused layer sits where its Linear was, so keys keep their order.
    order = [n for n in new._fastgan_fx_order if n in new._modules]
    new._modules = OrderedDict((n, new._modules[n]) for n in order)
    code = graph.python_code(root_module="self")
    new.__class__ = _fx_class(module.__class__, code.src, _portable(code.globals))
    _add_key_hooks(new)
    if list(new.state_dict()) != list(module.state_dict()):  # a safety net, not expected
        report.fused[-len(runs):] = []
        report.left_alone.append(LeftAlone(where, "the rewrite would change its state_dict keys"))
        return None
    return new


# The rewritten forward lives in a subclass of the user's class, made at run
# time from the source torch.fx generates. The subclass pickles (and so
# deep-copies) as (base class, source, globals), rebuilt by ``_fx_class``.
_FX_CLASSES: dict = {}


def _portable(globals_: dict) -> tuple:
    """The generated code's globals with modules named, so they pickle."""
    items = []
    for k, v in sorted(globals_.items(), key=lambda kv: kv[0]):
        items.append((k, ("module", v.__name__) if isinstance(v, types.ModuleType)
                      else ("object", v)))
    return tuple(items)


def _fx_class(base: type, src: str, globals_: tuple) -> type:
    key = (base, src)
    if key not in _FX_CLASSES:
        namespace = {k: importlib.import_module(v) if kind == "module" else v
                     for k, (kind, v) in globals_}
        exec(compile(src, f"<fastgan.fuse {base.__qualname__}.forward>", "exec"), namespace)
        _FX_CLASSES[key] = type(base.__name__, (base,), {
            "forward": namespace["forward"],
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__reduce_ex__": _reduce_fx,
            "_fastgan_fx": (base, src, globals_),
        })
    return _FX_CLASSES[key]


def _reduce_fx(self, protocol):
    return _rebuild_fx, (*type(self)._fastgan_fx,), self.__dict__


def _rebuild_fx(base: type, src: str, globals_: tuple):
    cls = _fx_class(base, src, globals_)
    return cls.__new__(cls)


def _describe(node: torch.fx.Node, path: str) -> str:
    if node.op == "call_module":
        return _join(path, node.target)
    if node.op == "call_method":
        return f"Tensor.{node.target}()"
    target = node.target
    mod = "F." if target.__module__ == "torch.nn.functional" else "torch."
    return f"{mod}{target.__name__}()"


# ----------------------------------------------------------------------------- driver
def _shared_modules(model: nn.Module) -> set:
    """ids of modules that appear under more than one name (fusing them would
    change the other places they are used)."""
    counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    return {i for i, n in counts.items() if n > 1}


def _walk(module: nn.Module, path: str, shared: set, report: FuseReport) -> nn.Module:
    if isinstance(module, _Fused):
        report.left_alone.append(LeftAlone(f"{path or '<root>'} ({type(module).__name__})",
                                           "already a fused layer"))
        return module
    for name, child in list(module._modules.items()):
        if child is not None:
            new = _walk(child, _join(path, name), shared, report)
            if new is not child:
                module._modules[name] = new
    if _is_plain_sequential(module):
        _fuse_sequential(module, path, shared, report)
        whole = _whole_run(module)
        if whole is not None:
            _remove_key_hooks(module)
            for item in report.fused:
                if item.path == _join(path, "0"):
                    item.path = path or "<root>"
            return whole
        return module
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)) or type(module) is nn.Sequential:
        return module
    if type(module).__module__.startswith("torch."):
        return module  # a library module (nn.Linear, nn.LSTM...): nothing of ours inside
    return _fuse_fx(module, path, shared, report) or module


def fuse(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, FuseReport]:
    """Rewrite every fusable run of ``model`` into fastgan's fused layers.

    Returns ``(fused_model, report)``; ``print(report)`` says what was fused
    and what was left alone and why. With ``inplace=False`` (the default) the
    model is deep-copied first and the original is not touched; with
    ``inplace=True`` the fused layers take over the model's own modules (the
    returned model is ``model`` unless the root itself was rewritten by fx).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = FuseReport()
    model = _walk(model, "", _shared_modules(model), report)
    return model, report


# ----------------------------------------------------------------------------- unfuse
def _plain_children(fused: _Fused):
    """(original name or None, child) pairs, minus the children fuse made up
    that the original did not have (a Dropout(0) filler)."""
    origin = getattr(fused, _ORIGIN, None) or (None,) * len(fused)
    filler = getattr(fused, _FILLER, (False,) * len(fused))
    return [(o, c) for o, c, f in zip(origin, fused, filler) if not f]


def _unfuse_fx(module: nn.Module) -> None:
    """Give a module ``fuse`` rewrote with fx back its class and children."""
    base = type(module)._fastgan_fx[0]
    for name, child in list(module._modules.items()):
        if isinstance(child, _Fused) and getattr(child, _ORIGIN, None):
            del module._modules[name]
            for orig, plain in _plain_children(child):
                if orig is not None:
                    module._modules[orig] = plain
    order = module.__dict__.pop("_fastgan_fx_order")
    module._modules = OrderedDict(
        [(n, module._modules[n]) for n in order if n in module._modules] +
        [(n, m) for n, m in module._modules.items() if n not in order])
    module.__class__ = base


def _unfuse_walk(module: nn.Module) -> nn.Module:
    if isinstance(module, _Fused):
        return nn.Sequential(*(c for _, c in _plain_children(module)))
    if "_fastgan_fx" in type(module).__dict__:
        _unfuse_fx(module)
    for name, child in list(module._modules.items()):
        if child is not None:
            module._modules[name] = _unfuse_walk(child)
    if isinstance(module, nn.Sequential):
        # Put children fuse wrapped back, flat, under their original names.
        out = []
        for name, child in module._modules.items():
            origin = getattr(child, "_fastgan_unfused_from", None)
            out.extend(origin if origin else [(name, child)])
        module._modules = OrderedDict(out)
    _remove_key_hooks(module)
    return module


def unfuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The plain-PyTorch model: every fused layer becomes its Linear,
    BatchNorm1d, activation and Dropout again, with the same tensors.

    Layers ``fuse`` made go back exactly where they were (same names, same
    state-dict keys as the model ``fuse`` was given); fused layers built
    directly (``fastgan.nn.LinearBNAct(...)``) become an ``nn.Sequential`` of
    their children, the layout of ``fastgan.models``' ``fused=False`` models.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    _mark_flat_runs(model)
    return _unfuse_walk(model)


def _mark_flat_runs(model: nn.Module) -> None:
    """Before unfusing: note, on the Sequential that will replace each fused
    child of a plain Sequential, the original (name, child) pairs to splice back."""
    for parent in list(model.modules()):
        if not _is_plain_sequential(parent):
            continue
        for name, child in list(parent._modules.items()):
            if isinstance(child, _Fused) and getattr(child, _ORIGIN, None):
                plain = nn.Sequential(*(c for _, c in _plain_children(child)))
                plain._fastgan_unfused_from = [(n, c) for n, c in _plain_children(child)]
                parent._modules[name] = plain
