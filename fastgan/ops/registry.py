"""``torch.library`` registration of the fused ops, namespace ``fastgan``.

Every op is wired the same way, by ``define`` from one ``OpDef`` row:

* ``fastgan::<op>``, a ``custom_op``: its body runs ``checks.<op>`` and hands
  the arguments to the backend chosen for the first argument's device
  (``dispatch.get("<op>_forward", ...)``); its fake runs the same check and
  returns empty outputs of the right shapes (``torch.compile``, meta tensors).
* ``fastgan::<op>_backward``, the same for the backend's backward function,
  unchecked: it only sees tensors its forward produced. It takes the gradient
  of the op's first output, then forward inputs and outputs *by name* (what
  the autograd Function saves), then whether the first input that gets a
  gradient needs it (``compute_dx``) and, for the Linear ops, whether the
  weight needs it (``compute_dw``: the G phase of a GAN step backpropagates
  through the frozen D, and dW is a whole GEMM), then the backend the
  forward ran on (``backend``, "" for the one chosen now). A gradient not
  asked for comes back as an empty tensor. No mask is ever stored: backward
  recomputes dropout from ``(seed, offset)`` and the activation's derivative
  from the saved tensors.
* ``<Op>Function``, the op's one ``autograd.Function`` over those two ops;
  ``fastgan.functional`` calls ``<Op>Function.call``. For functional ops its
  ``setup_context`` and ``backward`` are also the op's ``register_autograd``
  formula, so ``torch.ops.fastgan.<op>`` differentiates exactly as the
  Function does (and ``call`` uses the op under torch.compile).
  ``linear_bn_act`` updates the BatchNorm running statistics in place and
  ``register_autograd`` refuses mutating ops: it is differentiable through
  ``LinearBNActFunction`` only.

Backward runs on the backend the forward ran on: the Function keeps its name
on the autograd context, because ``use_backend`` is per thread and autograd
runs CUDA backward nodes on a worker thread of its own.

Double backward (gradient penalties: R1, WGAN-GP). The kernels return
gradients as numbers, with no graph behind them. So when a backward itself
builds a graph (``create_graph=True``; autograd runs the backward with grad
mode on exactly then), the Function computes the gradient with the plain,
differentiable formulas of ``fastgan.impl.reference`` (``<op>_grads``) from
the saved *inputs*, on the same device, with the forward's own dropout mask
(drawn by the forward's backend). Higher derivatives are then exact on every
backend; first-order backward keeps the fused kernels.

``gan_bce`` has no backward op: its forward already returns ``dloss/dlogits``
(the kernels compute loss and gradient in one pass), so its backward is
``dloss/dlogits * grad_loss``, two multiplies by a scalar. Plain tensor math
traces under ``torch.compile`` and fuses there; an op would add a backend
function to every ``fastgan.impl`` module for nothing.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import typing
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.library import custom_op, infer_schema, register_fake

from . import checks, dispatch, spec

# Plain eager tensors: an op's body may run on them directly (see ``_plain``).
_PLAIN = (Tensor, torch.nn.Parameter)
# Every backward (and differentiable backward) ends with flags saying whether the
# inputs that get gradients need them, in ``OpDef.grads`` order (``compute_dx`` for
# the first; the Linear ops add ``compute_dw`` for the weight), then the forward's
# backend. An op declares a prefix of _FLAGS; a gradient not asked for is empty.
_FLAGS = ("compute_dx", "compute_dw")
_BACKEND = "backend"


def _plain(tensors) -> bool:
    """Whether an autograd.Function may call an op's body directly on these.

    The custom-op round trip (Python -> dispatcher -> Python) costs tens of
    microseconds per call, as much as the fused kernels of a small layer on
    the CPU. On plain tensors and Parameters (not meta, not fake or other
    subclasses) the body (same check, same backend) runs directly; the caller
    also takes the op under torch.compile. ``tensors[0]`` (x, or the gradient)
    stands for the device: the check puts every tensor on its device.
    """
    for t in tensors:
        if t.__class__ not in _PLAIN and isinstance(t, Tensor):
            return False
    x = tensors[0]  # (non-tensors are left for the check to name)
    return not (x.__class__ in _PLAIN and x.is_meta)


def _eager(*tensors) -> bool:
    """Whether the Functions call an op's body (or a backend) directly: plain
    tensors (``_plain``), outside torch.compile."""
    return not torch.compiler.is_compiling() and _plain(tensors)


@dataclass(frozen=True)
class OpDef:
    """One op: everything ``define`` needs to register it and differentiate it.

    The backend functions are ``spec.OPS[name]``: a forward, and a backward
    unless the op's backward is plain tensor math (``backward_fake`` None).
    ``backward`` and ``double`` take the gradient, then forward inputs and
    outputs by name, then the flags (a prefix of ``_FLAGS``) and ``backend``.
    """
    name: str
    signature: Callable          # typed signature of fastgan::<name> (body unused): schema, names
    outputs: tuple[str, ...]     # names of its outputs; only the first gets a gradient
    fake: Callable               # (forward args) -> empty outputs, after the check
    grads: tuple[str, ...]       # inputs that get gradients, in the backward's output order
    backward: Callable           # typed signature of fastgan::<name>_backward, or its math
    double: Callable             # the backward in differentiable plain PyTorch (create_graph)
    backward_fake: Optional[Callable] = None
    mutates: tuple[str, ...] = ()
    contiguous: tuple[str, ...] = ()   # inputs made contiguous before the backend sees them
    results: Optional[int] = None      # leading outputs the Function returns (None: all)


def _params(fn: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _trailing(op: OpDef) -> tuple[str, ...]:
    """The flags and ``backend`` that end ``op.backward`` and ``op.double``."""
    params = _params(op.backward)
    flags = tuple(f for f in _FLAGS if f in params)
    trailing = (*flags, _BACKEND)
    assert flags == _FLAGS[:len(flags)] and len(flags) <= len(op.grads), op.name
    assert params[-len(trailing):] == _params(op.double)[-len(trailing):] == trailing, op.name
    return trailing


def _tensor_hint(hint) -> bool:
    return hint is Tensor or hint == Optional[Tensor]


def _register_forward(op: OpDef):
    """``fastgan::<name>`` and its fake; returns (its OpOverload, its body, the CustomOpDef)."""
    check = getattr(checks, op.name)
    forward_fn = spec.OPS[op.name][0]
    names = _params(op.signature)
    contiguous = tuple(names.index(n) for n in op.contiguous)

    def body(*args):
        check(*args)
        if contiguous:
            args = list(args)
            for i in contiguous:
                args[i] = None if args[i] is None else args[i].contiguous()
        return dispatch.get(forward_fn, args[0].device)(*args)

    def fake(*args):
        check(*args)
        return op.fake(*args)

    qualname = f"fastgan::{op.name}"
    custom = custom_op(qualname, body, mutates_args=op.mutates,
                       schema=infer_schema(op.signature, mutates_args=op.mutates))
    register_fake(qualname)(fake)
    return getattr(torch.ops.fastgan, op.name).default, body, custom


def _register_backward(op: OpDef):
    """``fastgan::<name>_backward`` and its fake; returns (its OpOverload, its body).
    Without a backend backward function, ``op.backward`` is plain math: both."""
    functions = spec.OPS[op.name]
    assert (len(functions) == 2) == (op.backward_fake is not None), op.name
    _trailing(op)
    if len(functions) == 1:
        return op.backward, op.backward
    backward_fn = functions[1]

    n = len(_params(op.backward)) - 2  # arguments between the gradient and `backend`

    def body(grad, *args):
        # `backend` has a default: the op's caller may leave it out
        backend = args[n] if len(args) > n else ""
        # autograd may hand us an expanded or strided gradient
        return dispatch.get(backward_fn, args[0].device, backend or None)(grad.contiguous(),
                                                                         *args[:n])

    qualname = f"fastgan::{op.name}_backward"
    custom_op(qualname, body, mutates_args=(), schema=infer_schema(op.backward, mutates_args=()))
    register_fake(qualname)(op.backward_fake)
    return getattr(torch.ops.fastgan, f"{op.name}_backward").default, body


def _saved(op: OpDef):
    """Where the arguments of ``op.backward`` and ``op.double`` come from, between
    the gradient and the trailing flags and backend: each names a forward input or output.
    Returns the sources of the saved tensors (save_for_backward) and of the
    saved constants (the hyper-parameters, kept on ctx), each an (is_output,
    index) pair, and for each of the two functions its arguments as
    (is_tensor, index) into one of the two."""
    inputs = _params(op.signature)
    hints = typing.get_type_hints(op.signature)
    tensors, constants, layouts = [], [], []
    trailing = len(_trailing(op))
    for fn in (op.backward, op.double):
        layout = []
        for name in _params(fn)[1:-trailing]:
            is_output = name in op.outputs
            source = (is_output, op.outputs.index(name) if is_output else inputs.index(name))
            into = tensors if is_output or _tensor_hint(hints[name]) else constants
            if source not in into:
                into.append(source)
            layout.append((into is tensors, into.index(source)))
        layouts.append(tuple(layout))
    return tuple(tensors), tuple(constants), *layouts


def _picker(indices) -> Callable[[tuple], tuple]:
    """``pool -> tuple(pool[i] for i in indices)``, at itemgetter's speed in eager
    code (dynamo cannot trace an itemgetter)."""
    indices = tuple(indices)
    getter = operator.itemgetter(*indices) if len(indices) > 1 else None

    def pick(pool):
        if getter is None or torch.compiler.is_compiling():
            return tuple(pool[i] for i in indices)
        return getter(pool)
    return pick


def _unpack(layout, tensors, constants) -> list:
    return [tensors[k] if is_tensor else constants[k] for is_tensor, k in layout]


def define(class_name: str, op: OpDef) -> type:
    """Register ``fastgan::<op.name>``, its backward op, their fakes and (for a
    functional op) its autograd formula; return the op's ``autograd.Function``."""
    forward_op, forward_body, custom = _register_forward(op)
    backward_op, backward_body = _register_backward(op)
    tensor_sources, constant_sources, layout, double_layout = _saved(op)
    inputs = _params(op.signature)
    hints = typing.get_type_hints(op.signature)
    grad_index = tuple(inputs.index(n) for n in op.grads)
    flag_index = grad_index[:len(_trailing(op)) - 1]   # the inputs the flags ask about
    check = getattr(checks, op.name)
    forward_fn = spec.OPS[op.name][0]
    tensor_args = _picker(i for i, n in enumerate(inputs) if _tensor_hint(hints[n]))
    contiguous = tuple(inputs.index(n) for n in op.contiguous)

    # what save() keeps, as indices into (*inputs, *outputs)
    pick_tensors = _picker([len(inputs) + i if out else i for out, i in tensor_sources])
    pick_constants = _picker([len(inputs) + i if out else i for out, i in constant_sources])

    def save(ctx, inputs, output, backend):
        pool = (*inputs, *output) if isinstance(output, tuple) else (*inputs, output)
        ctx.save_for_backward(*pick_tensors(pool))
        ctx.constants = pick_constants(pool)
        ctx.backend = backend

    def setup_context(ctx, inputs, output):
        # Under torch.compile the backward op dispatches when it runs.
        save(ctx, inputs, output, None if torch.compiler.is_compiling() else dispatch.forced())

    def results(out):
        if op.results is None:
            return out
        return out[0] if op.results == 1 else out[:op.results]

    def run_body(args):
        """The op's body, inlined: check, dispatch, backend; returns (backend, out)."""
        check(*args)
        backend, fn = dispatch.resolve(forward_fn, args[0].device)
        if contiguous:
            call_args = list(args)
            for i in contiguous:
                call_args[i] = None if args[i] is None else args[i].contiguous()
            return backend, fn(*call_args)
        return backend, fn(*args)

    def forward(ctx, *args):
        if not _eager(*tensor_args(args)):
            out = forward_op(*args)
            backend = None if torch.compiler.is_compiling() else dispatch.forced()
        else:
            backend, out = run_body(args)
        save(ctx, args, out, backend)
        return results(out)

    def backward(ctx, grad, *_not_differentiable):
        tensors, constants = ctx.saved_tensors, ctx.constants
        needs = ctx.needs_input_grad
        flags = [needs[i] for i in flag_index]
        if torch.is_grad_enabled():  # create_graph: the gradient must be differentiable
            with _no_autocast(grad.device.type):
                out = op.double(grad, *_unpack(double_layout, tensors, constants), *flags,
                                ctx.backend)
        else:
            args = _unpack(layout, tensors, constants)
            run = backward_body if _eager(grad, *tensors) else backward_op
            out = run(grad, *args, *flags, ctx.backend or "")
        grads = [None] * len(needs)
        for i, g in zip(grad_index, out):
            if needs[i]:
                grads[i] = g
        return tuple(grads)

    if not op.mutates:  # register_autograd refuses mutating ops
        custom.register_autograd(backward, setup_context=setup_context)

    def call(*args):
        """The op's results, differentiable: what ``fastgan.functional`` calls."""
        if torch.compiler.is_compiling():
            if not op.mutates:
                # The registered op differentiates through this very Function's
                # setup_context and backward, and dynamo traces it where it cannot
                # trace Function.apply (one tensor passed as two arguments).
                return results(forward_op(*args))
        elif _plain(tensor_args(args)):
            if torch.is_grad_enabled() and _any_requires_grad(args):
                return call_grad(*args)
            return call_no_grad(*args)
        return function.apply(*args)

    # -------------------------------------------------------------- one-call ops
    # A backend may run the op and its autograd in one call of its own (the cpu
    # backend: the kernels and a C++ autograd node, csrc/cpu/autograd.cpp), with
    # the op's arguments after the op's check: the Function's work without its
    # Python. It lists those ops in AUTOGRAD_OPS and defines each under the op's
    # name; its nodes call back here for a differentiable backward.
    natives: dict = {}   # backend -> its one-call op, or None
    activation_at = _params(op.double).index("activation") if "activation" in inputs else None

    def native_double(backend, *args):
        """``op.double`` for a backend's C++ node: its arguments without ``backend``,
        the activation as its integer code."""
        args = list(args)
        if activation_at is not None:
            args[activation_at] = spec.ACTIVATION_NAMES[args[activation_at]]
        with _no_autocast(args[0].device.type):
            return tuple(op.double(*args, backend))

    def native(backend: str):
        """``backend``'s one-call op, or None; looked up (and its double backward
        registered) at the first call on that backend."""
        mod = dispatch.module(backend)
        ops = getattr(mod, "AUTOGRAD_OPS", ())
        fn = natives[backend] = getattr(mod, op.name) if op.name in ops else None
        if fn is not None:
            mod.set_double_backward(op.name, functools.partial(native_double, backend))
        return fn

    def eager(fallback):
        def run(*args):
            if args[0].__class__ not in _PLAIN:  # (not a tensor: the fallback's check names it)
                return fallback(*args)
            backend = dispatch.select(args[0].device)
            fn = natives.get(backend) if backend in natives else native(backend)
            if fn is None:
                return fallback(*args)
            check(*args)
            dispatch.count(backend, forward_fn)
            return fn(*args)
        return run

    def body_no_grad(*args):
        return results(run_body(args)[1])

    call_no_grad = eager(body_no_grad)
    call_no_grad.__doc__ = """``call`` for plain eager tensors of which none needs a
        gradient (the caller knows): no autograd node; the backend's one-call op
        where it has one, else the op's body."""
    call_grad = eager(lambda *args: function.apply(*args))
    call_grad.__doc__ = """``call`` for plain eager tensors outside torch.compile
        where an input needs a gradient (the caller knows): the backend's one-call
        op where it has one, else the autograd Function."""

    def backward_call(grad, *args):
        """The op's backward (``fastgan::<name>_backward``'s arguments and results)
        outside autograd: its body in plain eager code, else the registered op.
        For callers that reuse the backward kernel on rows of their own (the
        simultaneous step's ghost rows, ``fastgan.nn.models.GhostRows``)."""
        if _eager(grad, *(a for a in args if isinstance(a, Tensor))):
            return backward_body(grad, *args)
        return backward_op(grad, *args)

    def tape_forward(*args):
        """The op's forward outside autograd, for callers that differentiate it
        themselves (``fastgan.train.tape``): its body on plain eager tensors (the
        same check, backend and outputs as ``call``), run with grad mode off.
        Returns ``(results, record)``; ``record`` holds what the autograd Function
        would save, for ``tape_backward``."""
        backend, out = run_body(args)
        pool = (*args, *out) if isinstance(out, tuple) else (*args, out)
        return results(out), (pick_tensors(pool), pick_constants(pool), dispatch.forced())

    n_flags = len(flag_index)

    def tape_backward(record, grad, compute_dx=True, compute_dw=True):
        """The gradients the Function's backward computes from ``record``
        (``tape_forward``'s) for the gradient ``grad`` of the first output: one
        per ``grads`` input, in that order (inputs ``grad_index``), empty where
        not needed (``compute_dx`` for the first; ``compute_dw``, for the Linear
        ops' weight, as the op's backward takes them)."""
        tensors, constants, backend = record
        flags = (compute_dx, compute_dw)[:n_flags]
        return backward_body(grad, *_unpack(layout, tensors, constants), *flags, backend or "")

    def _any_requires_grad(args) -> bool:
        for i in grad_index:
            t = args[i]
            if t.__class__ in _PLAIN and t.requires_grad:
                return True
            if t is not None and t.__class__ not in _PLAIN:
                return True   # (a subclass, or no tensor: Function.apply and the check decide)
        return False

    function = type(class_name, (torch.autograd.Function,), {
        "__doc__": f"The autograd of ``torch.ops.fastgan.{op.name}``: its forward and "
                   "backward ops, or their bodies in plain eager code; differentiable "
                   "twice. Call it with ``call``.",
        "__module__": __name__,
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
        "call": staticmethod(call),
        "call_no_grad": staticmethod(call_no_grad),
        "call_grad": staticmethod(call_grad),
        "backward_call": staticmethod(backward_call),
        "tape_forward": staticmethod(tape_forward),
        "tape_backward": staticmethod(tape_backward),
        "grads": op.grads,
        "grad_index": grad_index,
    })
    return function


# ------------------------------------------------------------------ double backward
def _no_autocast(device_type: str):
    """The differentiable backward recomputes the forward's math in the forward's
    dtypes, whatever autocast region the backward was called from."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _reference():
    return dispatch.module("reference")


def _keep(backend: Optional[str], shape, p: float, seed: Tensor, offset: Tensor):
    """The forward's dropout multiplier, (B, N) fp32: ``1 / (1 - p)`` where its
    mask keeps an element, 0 where it drops it; None without dropout. It is the
    forward backend's own ``linear_act`` on a column of ones (K = 1, identity),
    so the mask comes from the same Philox call and element numbering."""
    if p == 0.0:
        return None
    rows = torch.ones(shape[0], 1, device=seed.device)
    cols = torch.ones(shape[1], 1, device=seed.device)
    args = (rows, cols, None, "identity", 0.0, p, seed, offset)
    with torch.no_grad():
        if _eager(seed, offset):
            return dispatch.get("linear_act_forward", seed.device, backend)(*args)
        return torch.ops.fastgan.linear_act(*args)


# ------------------------------------------------------------------ linear_bn_act
# Fakes return contiguous tensors, as every backend does (whatever the inputs' strides).
def _linear_grads_fake(x, weight, compute_dx, compute_dw):
    """Empty (dx, dW, db) of a Linear's backward; dx (dW) has no elements unless
    compute_dx (compute_dw)."""
    dx = x.new_empty(x.shape) if compute_dx else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if compute_dw else weight.new_empty(0)
    return dx, dw, x.new_empty(weight.shape[0])


def _linear_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Tensor,
                   bn_bias: Tensor, running_mean: Tensor, running_var: Tensor,
                   num_batches_tracked: Tensor, training: bool, momentum: Optional[float],
                   eps: float, activation: str, negative_slope: float, p: float, seed: Tensor,
                   offset: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = dropout(act(BN(x @ W.T + b))); returns (y, h, mean, rstd), see the reference."""


def _linear_bn_act_fake(x, weight, bias, bn_weight, *_):
    b, n = x.shape[0], weight.shape[0]
    return (x.new_empty(b, n), x.new_empty(b, n), x.new_empty(n, dtype=bn_weight.dtype),
            x.new_empty(n, dtype=bn_weight.dtype))


def _linear_bn_act_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bn_weight: Tensor,
                            bn_bias: Tensor, h: Tensor, mean: Tensor, rstd: Tensor,
                            training: bool, activation: str, negative_slope: float, p: float,
                            seed: Tensor, offset: Tensor, compute_dx: bool,
                            compute_dw: bool = True, backend: str = ""
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dW, db, dgamma, dbeta); dx (dW) is empty unless compute_dx
    (compute_dw)."""


def _linear_bn_act_backward_fake(grad_y, x, weight, bn_weight, bn_bias, h, mean, rstd, training,
                                 activation, negative_slope, p, seed, offset, compute_dx,
                                 compute_dw=True, backend=""):
    return (*_linear_grads_fake(x, weight, compute_dx, compute_dw),
            bn_weight.new_empty(bn_weight.shape), bn_bias.new_empty(bn_bias.shape))


def _linear_bn_act_double(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                          bn_weight: Tensor, bn_bias: Tensor, mean: Tensor, rstd: Tensor,
                          training: bool, eps: float, activation: str, negative_slope: float,
                          p: float, seed: Tensor, offset: Tensor, compute_dx: bool,
                          compute_dw: bool, backend: Optional[str]):
    keep = _keep(backend, grad_y.shape, p, seed, offset)
    return _reference().linear_bn_act_grads(grad_y, x, weight, bias, bn_weight, bn_bias, mean,
                                            rstd, training, eps, activation, negative_slope,
                                            keep, compute_dx, compute_dw)


LinearBNActFunction = define("LinearBNActFunction", OpDef(
    "linear_bn_act", _linear_bn_act, outputs=("y", "h", "mean", "rstd"),
    fake=_linear_bn_act_fake, grads=("x", "weight", "bias", "bn_weight", "bn_bias"),
    backward=_linear_bn_act_backward, double=_linear_bn_act_double,
    backward_fake=_linear_bn_act_backward_fake,
    mutates=("running_mean", "running_var", "num_batches_tracked"),
    results=1))  # h, mean and rstd are only saved for backward


# ------------------------------------------------------------------ linear_act
def _linear_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
                negative_slope: float, p: float, seed: Tensor, offset: Tensor) -> Tensor:
    """y = dropout(act(x @ W.T + b))."""


def _linear_act_fake(x, weight, *_):
    return x.new_empty(x.shape[0], weight.shape[0])


def _linear_act_backward(grad_y: Tensor, x: Tensor, weight: Tensor, y: Tensor, activation: str,
                         negative_slope: float, p: float, seed: Tensor, offset: Tensor,
                         compute_dx: bool, compute_dw: bool = True, backend: str = ""
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dW, db); dx (dW) is empty unless compute_dx (compute_dw). The
    activation's derivative comes from the output y, so no pre-activation is stored."""


def _linear_act_backward_fake(grad_y, x, weight, y, activation, negative_slope, p, seed, offset,
                              compute_dx, compute_dw=True, backend=""):
    return _linear_grads_fake(x, weight, compute_dx, compute_dw)


def _linear_act_double(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                       activation: str, negative_slope: float, p: float, seed: Tensor,
                       offset: Tensor, compute_dx: bool, compute_dw: bool,
                       backend: Optional[str]):
    keep = _keep(backend, grad_y.shape, p, seed, offset)
    return _reference().linear_act_grads(grad_y, x, weight, bias, activation, negative_slope,
                                         keep, compute_dx, compute_dw)


LinearActFunction = define("LinearActFunction", OpDef(
    "linear_act", _linear_act, outputs=("y",), fake=_linear_act_fake,
    grads=("x", "weight", "bias"), backward=_linear_act_backward, double=_linear_act_double,
    backward_fake=_linear_act_backward_fake))


# ------------------------------------------------------------------ gan_bce
def _gan_bce(logits_a: Tensor, logits_b: Optional[Tensor], target_a: float, target_b: float
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """mean BCE(a, target_a) [+ mean BCE(b, target_b)] from logits; returns
    (loss, mean sigmoid(a), mean sigmoid(b), dloss/da, dloss/db)."""


def _gan_bce_fake(logits_a, logits_b, target_a, target_b):
    scalar = logits_a.new_empty((), dtype=spec.acc_dtype(logits_a))
    grad_b = logits_a.new_empty(0) if logits_b is None else logits_b.new_empty(logits_b.shape)
    return (scalar, torch.empty_like(scalar), torch.empty_like(scalar),
            logits_a.new_empty(logits_a.shape), grad_b)


def _gan_bce_backward(grad_loss: Tensor, grad_a: Tensor, grad_b: Tensor, compute_dx: bool,
                      backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """(dlogits_a, dlogits_b): the forward's gradients scaled by the loss's
    (``compute_dx``: whether logits_a needs its gradient; no backend runs).
    The mean probabilities are diagnostics: no gradient flows through them."""
    da = grad_a * grad_loss.to(grad_a.dtype) if compute_dx else grad_a.new_empty(0)
    return da, grad_b * grad_loss.to(grad_b.dtype)


def _gan_bce_double(grad_loss: Tensor, logits_a: Tensor, logits_b: Optional[Tensor],
                    target_a: float, target_b: float, compute_dx: bool,
                    backend: Optional[str]) -> tuple[Tensor, Tensor]:
    return _reference().gan_bce_grads(grad_loss, logits_a, logits_b, target_a, target_b,
                                      compute_dx)


GanBCEFunction = define("GanBCEFunction", OpDef(
    "gan_bce", _gan_bce, outputs=("loss", "prob_a", "prob_b", "grad_a", "grad_b"),
    fake=_gan_bce_fake, grads=("logits_a", "logits_b"), backward=_gan_bce_backward,
    double=_gan_bce_double,
    contiguous=("logits_a", "logits_b"),  # the kernels walk the logits as flat vectors
    results=3))  # dloss/dlogits are only saved for backward
