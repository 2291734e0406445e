"""``FusedAdam``: ``torch.optim.Adam(fused=True)`` with a lean step on the CPU.

torch's Adam spends 60-400 us of Python per ``step()`` (the hook and
profiler wrapper, ``_init_group``, grouping the tensors by device and dtype)
around one ``torch._fused_adam_`` kernel call. In a CPU GAN step at batch 64
that is ~2% of the step (two optimizers). Where nothing needs that machinery,
``FusedAdam.step`` makes what torch's fused path makes of it: the step
counters plus one, then ``_fused_adam_`` with the same arguments, so
parameters, moments and steps are bit-identical to
``torch.optim.Adam(fused=True)``'s. With the cpu backend built, both are one
call (``fastgan.impl.cpu.fused_adam_``: torch's ``_foreach_add_`` over 0-dim
step tensors is one dispatched ``add_`` each, ~45 us a network); without it,
torch's two. Everything else goes through torch's own step, unchanged:

* a closure, step hooks (the optimizer's or global ones), a running profiler
  (it expects the ``Optimizer.step#`` range), a GradScaler's ``grad_scale``;
* a group that is not fused, or capturable (CUDA graphs), amsgrad, maximize,
  differentiable, decoupled weight decay, or a tensor lr or betas;
* a parameter without a gradient, with a sparse one, not yet stepped (torch
  creates the state), or not on the CPU; a group of mixed dtypes.

It is a ``torch.optim.Adam``: the same ``state_dict``, ``param_groups`` (lr
schedulers edit them as usual), ``load_state_dict`` and ``isinstance``.
"""
from __future__ import annotations

import torch
from torch.optim import optimizer as _optimizer

from ..ops import dispatch

# Adam.step without the hook wrapper torch puts on an optimizer class's step
# (``Optimizer.profile_hook_step``); wrapped once more here for FusedAdam's own
# class name. (Whether torch has wrapped Adam.step yet depends on whether a
# plain Adam was built first.)
_adam_step = torch.optim.Adam.step
if getattr(_adam_step, "hooked", False):
    _adam_step = _adam_step.__wrapped__


def _hooked() -> bool:
    return bool(_optimizer._global_optimizer_pre_hooks or _optimizer._global_optimizer_post_hooks)


def _lean_group(group: dict) -> bool:
    return (group["fused"] and not group["capturable"] and not group["amsgrad"]
            and not group["maximize"] and not group["differentiable"]
            and not group.get("decoupled_weight_decay", False)
            and type(group["lr"]) is float and all(type(b) is float for b in group["betas"]))


class FusedAdam(torch.optim.Adam):
    """``torch.optim.Adam`` with ``fused=True`` by default and a lean step on the
    CPU (module docstring); the same arguments, state and results."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, fused: bool = True, **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         fused=fused, **kwargs)

    def _step_lists(self):
        """Per group, the lists ``_fused_adam_`` takes, or None where torch's step must run."""
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or _hooked()
                or torch.autograd._profiler_enabled()
                or getattr(self, "grad_scale", None) is not None
                or getattr(self, "found_inf", None) is not None):
            return None
        out = []
        state = self.state
        for group in self.param_groups:
            if not _lean_group(group):
                return None
            params, grads, avgs, sqs, steps = [], [], [], [], []
            for p in group["params"]:
                g = p.grad
                st = state.get(p)
                if g is None or st is None or g.is_sparse or p.device.type != "cpu" \
                        or "step" not in st:
                    return None
                params.append(p)
                grads.append(g)
                avgs.append(st["exp_avg"])
                sqs.append(st["exp_avg_sq"])
                steps.append(st["step"])
            if params:
                dtype = params[0].dtype
                if any(p.dtype is not dtype for p in params):
                    return None
                out.append((group, params, grads, avgs, sqs, steps))
        return out

    def step(self, closure=None):
        lists = self._step_lists() if closure is None else None
        if lists is None:
            return self._torch_step(closure)
        native = dispatch.optional("cpu", "fused_adam_")
        with torch.no_grad():   # (torch's step runs under no_grad too: leaves are updated in place)
            for group, params, grads, avgs, sqs, steps in lists:
                beta1, beta2 = group["betas"]
                if native is not None and all(s.dtype is torch.float32 for s in steps):
                    native(params, grads, avgs, sqs, steps, group["lr"], beta1, beta2,
                           group["weight_decay"], group["eps"], False)
                    continue
                torch._foreach_add_(steps, 1)
                torch._fused_adam_(params, grads, avgs, sqs, [], steps, amsgrad=False,
                                   lr=group["lr"], beta1=beta1, beta2=beta2,
                                   weight_decay=group["weight_decay"], eps=group["eps"],
                                   maximize=False, grad_scale=None, found_inf=None)
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; with ``set_to_none`` and no profiler running, the
        same loop without its profiler range (~0.1 ms of a batch-64 CPU step)."""
        if not set_to_none or torch.autograd._profiler_enabled() or \
                torch.compiler.is_compiling():
            return super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = None
        return None

    # torch's own step, hooks and profiler range included, for every other case
    _torch_step = _optimizer.Optimizer.profile_hook_step(_adam_step)
    # FusedAdam.step runs the hooks through _torch_step whenever there are any:
    # torch must not wrap it once more (Optimizer._patch_step_function).
    step.hooked = True
