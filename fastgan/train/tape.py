"""The engine's eager CPU step without autograd: chains of fused layers
differentiated by hand.

Why. On the CPU at batch 64 the seed GAN's step spent ~2.5 ms of ~12 around
its kernels in autograd's machinery: ``Function.apply`` and its saved tensors,
the engine's nodes, ``AccumulateGrad``, the slice and cat nodes over D's
[real; fake] batch, freezing D for the G step. It all runs serially in Python
and dispatch while the second core waits. A network that is a chain of fused
layers needs none of it: each layer's backward is its op's backward kernel,
called in reverse order.

What runs. On the cpu backend one C++ call runs a whole chain forward, and one
its backward (``fastgan.impl.cpu.chain_forward`` / ``chain_backward``,
csrc/cpu/chain.cpp): the same op calls as below, in the same order, without
the Python around each (~30 us a layer, several times that in a real step,
whose tensors push the interpreter's data out of the caches). Elsewhere
``Chain.forward`` calls each layer's op through its Function's
``tape_forward`` (the op's own check, backend and kernel; the record holds what
the autograd Function would save) with the arguments the layer's forward would
pass (``tape_args``: the same dropout key, BatchNorm1d tensors and running
statistics). ``Chain.backward`` calls ``tape_backward`` (the backward kernel
autograd would call, with the same ``compute_dx`` / ``compute_dw`` flags)
layer by layer from the top and sets each parameter's ``.grad`` as
``AccumulateGrad`` does. The losses are ``gan_bce``'s, through the same two
calls. Every layer runs its fused op: the speed rule's plain fallback exists
because a tiny layer's fused autograd Function costs more than its children's
autograd, and without autograd the fused op is the cheaper at every size
(D's 256 -> 1 head: 6 + 9 us of kernels against ~100 us of autograd around
the plain layer). So a taped step's losses, gradients, parameters,
BatchNorm statistics and dropout streams are bit for bit the autograd step's
under ``fused_path("fused")`` (``tests/train/test_tape.py``); under the
default rule they differ from the autograd step's by the rounding of the
layers the rule would have run plain.

When. ``GANStep`` on a CPU device takes it where both networks are chains
(``Chain.of``: a fastgan ``Generator`` / ``Discriminator`` or an
``nn.Sequential``, exactly those classes, of fused layers) and ``ready`` holds
for the step: grad mode on, no autocast, no anomaly detection, no saved-tensor
hooks, no module hook (the networks', a layer's, a child's, a global one) or
parameter hook, every
layer fusing all its children (plain ``nn.Linear`` / ``nn.BatchNorm1d``), no
cross-process BatchNorm statistics, not ``fused_path("plain")``. Wrapped
networks (DDP reduces gradients from autograd hooks) are not chains. The
simultaneous schedule also needs a Discriminator of ``LinearAct`` layers (its
ghost rows; ``fastgan.nn.models.GhostRows``). Anything else runs the autograd
step, unchanged. ``GANStep.taped`` counts the steps that were taped.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..nn import layers as _layers
from ..ops import dispatch
from ..nn.models import Discriminator, Generator, ghost_dx
from ..ops.registry import GanBCEFunction

_Fused = _layers._Fused
_module = nn.modules.module


def _global_hooks() -> bool:
    return bool(_module._global_forward_pre_hooks or _module._global_forward_hooks
                or _module._global_backward_pre_hooks or _module._global_backward_hooks
                or getattr(_module, "_global_forward_hooks_always_called", None))


def _accumulate(t: Optional[Tensor], g: Tensor) -> None:
    """``t.grad += g`` as ``AccumulateGrad`` does it for a leaf (``g`` is fresh)."""
    if t is None or not t.requires_grad:
        return
    if t.grad is None:
        t.grad = g
    else:
        t.grad += g


_saved_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks",
                       lambda ignore_is_tracing: (None,))   # (unknown: assume some)


def tape_mode_ok() -> bool:
    """Whether the thread's modes let a step run without autograd: grad mode on
    (the autograd step needs it too), no autocast, no anomaly detection, no
    global module hooks, no saved-tensor hooks (``saved_tensors_hooks``: a user's
    offloading or recomputation wants to see what autograd saves)."""
    return (torch.is_grad_enabled() and not _layers._any_autocast()
            and not torch.is_anomaly_enabled() and not _global_hooks()
            and _saved_hooks(False) is None)


class Chain:
    """A network whose forward is its fused layers in sequence, run by hand."""

    def __init__(self, module: nn.Module, seq: nn.Sequential, flatten: bool):
        self.module, self.seq, self.flatten = module, seq, flatten
        self.layers = tuple(seq._modules.values())

    @classmethod
    def of(cls, module: nn.Module) -> Optional["Chain"]:
        """The chain of ``module``, or None when its forward is not one: a fastgan
        ``Generator`` (``net(z)``), ``Discriminator`` (``net(x.flatten(1))``) or
        ``nn.Sequential``, exactly those classes, of fused layers only."""
        if type(module) is Generator:
            seq, flatten = module.net, False
        elif type(module) is Discriminator:
            seq, flatten = module.net, True
        else:
            seq, flatten = module, False
        if type(seq) is not nn.Sequential or len(seq) == 0 or \
                not all(isinstance(m, _Fused) for m in seq._modules.values()):
            return None
        return cls(module, seq, flatten)

    def ready(self) -> bool:
        """Whether a forward runs here as the module's would, every layer its fused op
        (the module docstring's conditions; the thread's modes are ``tape_mode_ok``'s)."""
        if tuple(self.seq._modules.values()) != self.layers or \
                _layers._hooked((self.module, self.seq)):
            return False
        for layer in self.layers:
            if not layer.tape_ready():
                return False
        return True

    def forward(self, x: Tensor):
        """The network's output and its tape, under grad mode off. On the cpu backend
        one C++ call runs the whole chain (``fastgan.impl.cpu.chain_forward``): the
        tape is then ``(specs, saved)``; elsewhere one op call per layer, and the
        tape a list of them."""
        if self.flatten:
            x = x.flatten(1)
        if dispatch.select(x.device) == "cpu" and _fits(x, self.layers[0]):
            specs = [layer.tape_spec() for layer in self.layers]
            y, saved = dispatch.get("chain_forward", x.device)(x, specs)
            _count(specs, "forward")
            return y, (specs, saved)
        tape = []
        for layer in self.layers:
            args = layer.tape_args(x)
            fn = layer.function
            x, record = fn.tape_forward(*args)
            tape.append((fn, record, args, x))
        return x, tape

    @staticmethod
    def backward(tape, grad: Tensor, dx: bool, dw: bool = True) -> Tensor:
        """Backpropagate ``grad`` (of the output) through ``tape``: the parameters'
        ``.grad`` (``dw``) and the input's gradient, returned (empty unless ``dx``)."""
        if isinstance(tape, tuple):   # the C++ chain's
            specs, saved = tape
            compute_dw = [dw and spec.weight.requires_grad for spec in specs]
            grads = dispatch.get("chain_backward", grad.device)(grad, saved, specs, compute_dw,
                                                                dx)
            _count(specs, "backward")
            if dw:
                _assign(specs, grads)
            return grads[-1]
        for i in range(len(tape) - 1, -1, -1):
            fn, record, args, _ = tape[i]
            inputs = [args[j] for j in fn.grad_index]
            grads = fn.tape_backward(record, grad, i > 0 or dx, dw and inputs[1].requires_grad)
            if dw:
                for t, g in zip(inputs[1:], grads[1:]):
                    _accumulate(t, g)
            grad = grads[0]
        return grad

    @staticmethod
    def backward_ghost(tape: list, grad: Tensor, ghost_grad: Tensor) -> Tensor:
        """The simultaneous sweep over a Discriminator of LinearAct layers: ``grad``
        (of all rows' logits) into D's parameters, and ``ghost_grad`` (of the first
        ``len(ghost_grad)`` rows' logits) down to D's input only, as GhostRows
        does. Returns the ghost rows' input gradient."""
        if isinstance(tape, tuple):   # the C++ chain's
            specs, saved = tape
            compute_dw = [spec.weight.requires_grad for spec in specs]
            grads = dispatch.get("chain_backward_ghost", grad.device)(grad, ghost_grad, saved,
                                                                      specs, compute_dw)
            _count(specs, "backward", 2)
            _assign(specs, grads)
            return grads[-1]
        n = ghost_grad.shape[0]
        for i in range(len(tape) - 1, -1, -1):
            fn, record, args, y = tape[i]
            x, weight, bias, activation, slope, p, seed, offset = args
            ghost_grad = ghost_dx(ghost_grad, x[:n], weight, y[:n], activation, slope, p,
                                  seed, offset, record[2])
            grads = fn.tape_backward(record, grad, i > 0, weight.requires_grad)
            for t, g in zip((weight, bias), grads[1:]):
                _accumulate(t, g)
            grad = grads[0]
        return ghost_grad


def _fits(x: Tensor, layer) -> bool:
    """Whether ``x`` is a well-formed input of the chain's first layer. The C++
    chain checks only what keeps its calls in bounds; an input the op's check
    would refuse goes the per-layer way, whose check raises the op's error."""
    w = layer._modules["0"].weight
    return x.dim() == 2 and x.shape[1] == w.shape[1] and x.dtype == w.dtype and \
        x.device == w.device


def _count(specs, direction: str, per_layer: int = 1) -> None:
    """The cpu backend's op calls a C++ chain call made, in its dispatch counters."""
    bn = sum(spec.bn is not None for spec in specs)
    if bn:
        dispatch.count("cpu", f"linear_bn_act_{direction}", bn * per_layer)
    if len(specs) > bn:
        dispatch.count("cpu", f"linear_act_{direction}", (len(specs) - bn) * per_layer)


def _assign(specs, grads) -> None:
    """``chain_backward``'s parameter gradients (top layer first) into ``.grad``."""
    k = 0
    for spec in reversed(specs):
        targets = (spec.weight, spec.bias) if spec.bn is None else \
            (spec.weight, spec.bias, spec.bn[0], spec.bn[1])
        for t in targets:
            _accumulate(t, grads[k])
            k += 1


def _ones(dtype: torch.dtype) -> Tensor:
    # d(loss)/d(loss): the autograd step's seed gradient (gan_bce's backward multiplies by it)
    return torch.ones((), dtype=dtype)


def _bce(logits_a: Tensor, logits_b: Optional[Tensor], target_a: float, target_b: float):
    """gan_bce's (loss, prob_a, prob_b) and its gradients with respect to the logits."""
    (loss, prob_a, prob_b), record = GanBCEFunction.tape_forward(logits_a, logits_b, target_a,
                                                                 target_b)
    grad_a, grad_b = GanBCEFunction.tape_backward(record, _ones(loss.dtype), True)
    return loss, prob_a, prob_b, grad_a, grad_b


def _bce_rows(logits: Tensor, split: int, target_first: float, target_second: float):
    """gan_bce of ``logits[:split]`` (``target_first``) and ``logits[split:]``
    (``target_second``; none when ``split`` is every row): (loss, prob_first,
    prob_second, the gradient of the loss with respect to ``logits``). One C++
    call on the cpu backend (``fastgan.impl.cpu.gan_bce_rows``), the same numbers
    as the two ``gan_bce`` calls and the cat of their gradients elsewhere."""
    if dispatch.select(logits.device) == "cpu" and logits.dim() == 2:
        out = dispatch.get("gan_bce_rows", logits.device)(logits, split, target_first,
                                                          target_second)
        dispatch.count("cpu", "gan_bce_forward")
        return out
    second = logits[split:] if split < logits.shape[0] else None
    loss, prob_first, prob_second, grad_first, grad_second = _bce(
        logits[:split], second, target_first, target_second)
    grad = grad_first if second is None else torch.cat([grad_first, grad_second])
    return loss, prob_first, prob_second, grad


def alternating(step, G: Chain, D: Chain, real: Tensor):
    """``GANStep._alternating`` without autograd: the same calls, in the same order."""
    B = step.batch_size
    fake, g_tape = G.forward(step._noise())
    fake = fake.to(step.d_dtype)
    step.d_opt.zero_grad(set_to_none=True)
    logits, d_tape = D.forward(torch.cat([real, fake]))
    d_loss, d_real, d_fake, grad = _bce_rows(logits, B, 1.0 - step.smoothing, 0.0)
    D.backward(d_tape, grad, dx=False)
    step.d_opt.step()
    step.g_opt.zero_grad(set_to_none=True)
    # the G step through the updated D: D's input gradient only (D's weights frozen)
    g_logits, dg_tape = D.forward(fake)
    g_loss, _, _, grad_g = _bce_rows(g_logits, B, 1.0, 0.0)
    G.backward(g_tape, D.backward(dg_tape, grad_g, dx=True, dw=False), dx=False)
    step.g_opt.step()
    return d_loss, g_loss, d_real, d_fake


def simultaneous(step, G: Chain, D: Chain, real: Tensor):
    """``GANStep._simultaneous``'s ghost-row sweep without autograd."""
    B = step.batch_size
    fake, g_tape = G.forward(step._noise())
    step.d_opt.zero_grad(set_to_none=True)
    step.g_opt.zero_grad(set_to_none=True)
    fake = fake.to(step.d_dtype)
    logits, d_tape = D.forward(torch.cat([fake, real]))
    # rows [fake; real]: D's loss is gan_bce(real, fake)'s (the sum is the same either way)
    d_loss, d_fake, d_real, grad = _bce_rows(logits, B, 0.0, 1.0 - step.smoothing)
    g_loss, _, _, grad_g = _bce_rows(logits[:B], B, 1.0, 0.0)
    ghost = D.backward_ghost(d_tape, grad, grad_g)
    G.backward(g_tape, ghost, dx=False)
    step.d_opt.step()
    step.g_opt.step()
    return d_loss, g_loss, d_real, d_fake


def chains(step) -> Optional[tuple[Chain, Chain]]:
    """The (G, D) chains ``step`` may tape, or None (module docstring)."""
    if step.device.type != "cpu" or step.g_dtype != step.d_dtype:
        return None
    G, D = Chain.of(step.G), Chain.of(step.D)
    if G is None or D is None:
        return None
    if step.schedule == "simultaneous" and not all(
            isinstance(m, _layers.LinearAct) for m in D.layers):
        return None
    return G, D


def ready(step, G: Chain, D: Chain, real: Tensor) -> bool:
    """Whether this step may run taped (module docstring), checked before every step."""
    return real.__class__ is Tensor and tape_mode_ok() and G.ready() and D.ready()
