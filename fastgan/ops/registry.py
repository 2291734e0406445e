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
  gradient needs it (``compute_dx``). No mask is ever stored: backward
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

``gan_bce`` has no backward op: its forward already returns ``dloss/dlogits``
(the kernels compute loss and gradient in one pass), so its backward is
``dloss/dlogits * grad_loss``, two multiplies by a scalar. Plain tensor math
traces under ``torch.compile`` and fuses there; an op would add a backend
function to every ``fastgan.impl`` module for nothing.
"""
from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.library import custom_op, infer_schema, register_fake

from . import checks, dispatch, spec


def _eager(*args) -> bool:
    """Whether an autograd.Function may call an op's body directly.

    The custom-op round trip (Python -> dispatcher -> Python) costs tens of
    microseconds per call, as much as the fused kernels of a small layer on
    the CPU. In plain eager code on plain tensors the body (same check, same
    backend) runs directly; under torch.compile, or with fake, meta or
    subclass tensors among the arguments, the registered op is called.
    """
    if torch.compiler.is_compiling():
        return False
    for t in args:
        if isinstance(t, Tensor) and (type(t) is not Tensor or t.is_meta):
            return False
    return True


@dataclass(frozen=True)
class OpDef:
    """One op: everything ``define`` needs to register it and differentiate it.

    The backend functions are ``spec.OPS[name]``: a forward, and a backward
    unless the op's backward is plain tensor math (``backward_fake`` None).
    """
    name: str
    signature: Callable          # typed signature of fastgan::<name> (body unused): schema, names
    outputs: tuple[str, ...]     # names of its outputs; only the first gets a gradient
    fake: Callable               # (forward args) -> empty outputs, after the check
    grads: tuple[str, ...]       # inputs that get gradients, in the backward's output order
    backward: Callable           # typed signature of fastgan::<name>_backward, or its math
    backward_fake: Optional[Callable] = None
    mutates: tuple[str, ...] = ()
    contiguous: tuple[str, ...] = ()   # inputs made contiguous before the backend sees them
    results: Optional[int] = None      # leading outputs the Function returns (None: all)


def _register_forward(op: OpDef):
    """``fastgan::<name>`` and its fake; returns (its OpOverload, its body, the CustomOpDef)."""
    check = getattr(checks, op.name)
    forward_fn = spec.OPS[op.name][0]
    names = tuple(inspect.signature(op.signature).parameters)
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
    if len(functions) == 1:
        return op.backward, op.backward
    backward_fn = functions[1]

    def body(grad, *args):
        # autograd may hand us an expanded or strided gradient
        return dispatch.get(backward_fn, args[0].device)(grad.contiguous(), *args)

    qualname = f"fastgan::{op.name}_backward"
    custom_op(qualname, body, mutates_args=(), schema=infer_schema(op.backward, mutates_args=()))
    register_fake(qualname)(op.backward_fake)
    return getattr(torch.ops.fastgan, f"{op.name}_backward").default, body


def _saved(op: OpDef):
    """Where the backward's arguments come from, between the gradient and the
    trailing flag: each names a forward input or output. Returns the sources
    of the saved tensors (save_for_backward), of the saved constants (the
    hyper-parameters, kept on ctx), and for each argument (is_tensor, index)
    into one of the two."""
    inputs = tuple(inspect.signature(op.signature).parameters)
    hints = typing.get_type_hints(op.signature)
    tensors, constants, layout = [], [], []
    for name in tuple(inspect.signature(op.backward).parameters)[1:-1]:
        is_output = name in op.outputs
        is_tensor = is_output or hints[name] is Tensor
        into = tensors if is_tensor else constants
        layout.append((is_tensor, len(into)))
        into.append((is_output, op.outputs.index(name) if is_output else inputs.index(name)))
    return tuple(tensors), tuple(constants), tuple(layout)


def define(class_name: str, op: OpDef) -> type:
    """Register ``fastgan::<op.name>``, its backward op, their fakes and (for a
    functional op) its autograd formula; return the op's ``autograd.Function``."""
    forward_op, forward_body, custom = _register_forward(op)
    backward_op, backward_body = _register_backward(op)
    tensor_sources, constant_sources, layout = _saved(op)
    inputs = tuple(inspect.signature(op.signature).parameters)
    grad_index = tuple(inputs.index(n) for n in op.grads)

    def setup_context(ctx, inputs, output):
        outs = output if isinstance(output, tuple) else (output,)
        ctx.save_for_backward(*[outs[i] if out else inputs[i] for out, i in tensor_sources])
        ctx.constants = tuple(outs[i] if out else inputs[i] for out, i in constant_sources)

    def results(out):
        if op.results is None:
            return out
        return out[0] if op.results == 1 else out[:op.results]

    def forward(ctx, *args):
        out = (forward_body if _eager(*args) else forward_op)(*args)
        setup_context(ctx, args, out)
        return results(out)

    def backward(ctx, grad, *_not_differentiable):
        tensors, constants = ctx.saved_tensors, ctx.constants
        args = [tensors[k] if is_tensor else constants[k] for is_tensor, k in layout]
        needs = ctx.needs_input_grad
        out = (backward_body if _eager(grad, *tensors) else backward_op)(
            grad, *args, needs[grad_index[0]])
        grads = [None] * len(needs)
        for i, g in zip(grad_index, out):
            if needs[i]:
                grads[i] = g
        return tuple(grads)

    if not op.mutates:  # register_autograd refuses mutating ops
        custom.register_autograd(backward, setup_context=setup_context)

    def call(*args):
        """The op's results, differentiable: what ``fastgan.functional`` calls."""
        if not op.mutates and torch.compiler.is_compiling():
            # The registered op differentiates through this very Function's
            # setup_context and backward, and dynamo traces it where it cannot
            # trace Function.apply (one tensor passed as two arguments).
            return results(forward_op(*args))
        return function.apply(*args)

    function = type(class_name, (torch.autograd.Function,), {
        "__doc__": f"The autograd of ``torch.ops.fastgan.{op.name}``: its forward and "
                   "backward ops, or their bodies in plain eager code. Call it with ``call``.",
        "__module__": __name__,
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
        "call": staticmethod(call),
    })
    return function


# ------------------------------------------------------------------ linear_bn_act
# Fakes return contiguous tensors, as every backend does (whatever the inputs' strides).
def _linear_grads_fake(x, weight, compute_dx):
    """Empty (dx, dW, db) of a Linear's backward; dx is empty unless compute_dx."""
    dx = x.new_empty(x.shape) if compute_dx else x.new_empty(0)
    return dx, weight.new_empty(weight.shape), x.new_empty(weight.shape[0])


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
                            seed: Tensor, offset: Tensor, compute_dx: bool
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dW, db, dgamma, dbeta); dx is empty unless compute_dx."""


def _linear_bn_act_backward_fake(grad_y, x, weight, bn_weight, bn_bias, *args):
    return (*_linear_grads_fake(x, weight, args[-1]), bn_weight.new_empty(bn_weight.shape),
            bn_bias.new_empty(bn_bias.shape))


LinearBNActFunction = define("LinearBNActFunction", OpDef(
    "linear_bn_act", _linear_bn_act, outputs=("y", "h", "mean", "rstd"),
    fake=_linear_bn_act_fake, grads=("x", "weight", "bias", "bn_weight", "bn_bias"),
    backward=_linear_bn_act_backward, backward_fake=_linear_bn_act_backward_fake,
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
                         compute_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dW, db); dx is empty unless compute_dx. The activation's
    derivative comes from the output y, so no pre-activation is stored."""


def _linear_act_backward_fake(grad_y, x, weight, *args):
    return _linear_grads_fake(x, weight, args[-1])


LinearActFunction = define("LinearActFunction", OpDef(
    "linear_act", _linear_act, outputs=("y",), fake=_linear_act_fake,
    grads=("x", "weight", "bias"),
    backward=_linear_act_backward, backward_fake=_linear_act_backward_fake))


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


def _gan_bce_backward(grad_loss: Tensor, grad_a: Tensor, grad_b: Tensor, compute_da: bool
                      ) -> tuple[Tensor, Tensor]:
    """(dlogits_a, dlogits_b): the forward's gradients scaled by the loss's.
    The mean probabilities are diagnostics: no gradient flows through them."""
    da = grad_a * grad_loss.to(grad_a.dtype) if compute_da else grad_a.new_empty(0)
    return da, grad_b * grad_loss.to(grad_b.dtype)


GanBCEFunction = define("GanBCEFunction", OpDef(
    "gan_bce", _gan_bce, outputs=("loss", "prob_a", "prob_b", "grad_a", "grad_b"),
    fake=_gan_bce_fake, grads=("logits_a", "logits_b"), backward=_gan_bce_backward,
    contiguous=("logits_a", "logits_b"),  # the kernels walk the logits as flat vectors
    results=3))  # dloss/dlogits are only saved for backward
