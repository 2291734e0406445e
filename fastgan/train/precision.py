"""Training precision: bf16 weights with fp32 master weights.

``to_train_dtype(model, "bf16")`` casts every ``nn.Linear``'s weight and bias
to bf16 (the fused layers' and plain ones alike); BatchNorm1d parameters and
running statistics stay fp32 (the fused kernels and ATen's CPU batch norm
keep statistics in fp32 for a bf16 input). The step then feeds the models
bf16 noise and images, so every GEMM runs in bf16 with no per-step casts.

``MasterWeightAdam`` keeps an fp32 copy (the master) of each bf16 parameter
and steps the masters with torch's Adam (fused on CPU and CUDA): each step
copies the bf16 gradients into preallocated fp32 buffers, steps the masters,
and writes them back into the bf16 parameters' own storage (``copy_``, round
to nearest even). On the CPU with ``fused=True`` (what the engine asks for)
the cpu backend does all three in one pass instead
(``csrc/cpu/master_adam.cpp``): inside a training step the optimizer's memory
is cold, and the two copies were a third of its time. Its arithmetic is
torch's fused Adam's, so the masters are the same bit for bit. Small updates
accumulate in the masters instead of being rounded away in bf16 (8 significant
bits: ``w + lr * g`` equals ``w`` for most steps otherwise). Its state dict
holds the masters, so a resumed run continues bit for bit. Parameters that are
fp32 already are stepped in place by the same Adam, with no master: for an
fp32 model it *is* plain Adam.

Why not autocast: it casts every fp32 weight to bf16 in each forward and each
bf16 gradient back in each backward, into fresh memory; on the CPU those
copies cost more than the bf16 GEMMs save.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .config import DTYPES, ConfigError

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LOW_PRECISION = (torch.bfloat16, torch.float16)
# Adam's group keys that say how it runs, not what it computes.
IMPL_KEYS = ("fused", "foreach", "capturable", "differentiable")

__all__ = ["DTYPES", "LOW_PRECISION", "MasterWeightAdam", "TORCH_DTYPES", "dtype_name",
           "input_dtype", "is_low_precision", "to_train_dtype", "torch_dtype"]


def torch_dtype(dtype) -> torch.dtype:
    """The torch dtype of a training dtype name (``"fp32"``, ``"bf16"``) or of a torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in TORCH_DTYPES.values():
        return dtype
    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return TORCH_DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """``"fp32"`` or ``"bf16"`` for a torch dtype."""
    for name, dt in TORCH_DTYPES.items():
        if dt == dtype:
            return name
    raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")


def is_low_precision(t: Tensor) -> bool:
    return t.dtype in LOW_PRECISION


def to_train_dtype(module: nn.Module, dtype) -> nn.Module:
    """``module`` with every ``nn.Linear``'s parameters in ``dtype`` (in place;
    returned for chaining). Nothing else changes: BatchNorm1d parameters and
    buffers stay fp32, dropout streams and other buffers keep their dtype."""
    dt = torch_dtype(dtype)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.to(dt)   # the Linear alone: a fused layer's BatchNorm1d is its sibling
    return module


def input_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``module`` wants its input in: its first Linear's weight's
    (fp32 for a module without a floating-point weight)."""
    first = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return m.weight.dtype
        if first is None:
            first = next((p for p in m.parameters(recurse=False) if p.is_floating_point()), None)
    return first.dtype if first is not None else torch.float32


def _native_step(group: dict):
    """The cpu backend's one-pass step (``csrc/cpu/master_adam.cpp``: gradient, master,
    moments and parameter in one read and one write, bit for bit torch's fused Adam
    on the masters) for a group that asked for ``fused=True`` and that it computes
    (no amsgrad, a float lr, not capturable); None where it cannot run."""
    if not (group.get("fused") is True and not group.get("amsgrad")
            and not group.get("capturable") and not group.get("differentiable")
            and isinstance(group["lr"], float)):
        return None
    from ..ops import dispatch
    return dispatch.optional("cpu", "master_adam_")


class MasterWeightAdam(torch.optim.Optimizer):
    """Adam over fp32 master copies of the low-precision (bf16/fp16) parameters.

    Takes torch.optim.Adam's arguments. ``param_groups`` hold the model's own
    parameters and the hyper-parameters (an lr schedule edits them as usual);
    the inner ``torch.optim.Adam`` over the masters (``self.adam``) gets them
    at each step. ``state[p]`` is Adam's state of ``p`` plus ``"master"`` (the
    fp32 value) for a low-precision ``p``; ``state_dict`` stores it, and
    ``load_state_dict`` restores masters and moments in fp32 (torch's own
    load would cast them to the parameter's bf16) and writes the parameters
    from the masters.

    A step allocates nothing: the gradients are copied into fp32 buffers
    made once, the masters stepped in place, the parameters overwritten with
    ``copy_``; nothing syncs the host, so on CUDA (``capturable=True``) it
    can be captured in a CUDA graph.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, amsgrad: bool = False,
                 fused: Optional[bool] = None, capturable: bool = False,
                 foreach: Optional[bool] = None, maximize: bool = False):
        self.adam: Optional[torch.optim.Adam] = None
        self._pairs: list[tuple[Tensor, Tensor]] = []   # (param, master); fp32: master is param
        self._low: list[tuple[Tensor, Tensor, Tensor]] = []   # (param, master, grad buffer)
        self._low_of: dict[int, tuple[Tensor, Tensor]] = {}   # id(master) -> (param, grad buffer)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, foreach=foreach, maximize=maximize,
                        capturable=capturable, differentiable=False, fused=fused)
        super().__init__(params, defaults)   # calls add_param_group for each group

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        masters = []
        for p in group["params"]:
            if is_low_precision(p):
                m = p.detach().to(torch.float32, copy=True)
                # The master's gradient buffer, made once: each step copies into it.
                self._low.append((p, m, torch.zeros_like(m)))
                self._low_of[id(m)] = self._low[-1][0], self._low[-1][2]
                masters.append(m)
            else:
                masters.append(p)   # fp32 already: Adam steps it in place
            self._pairs.append((p, masters[-1]))
        inner = {**{k: v for k, v in group.items() if k != "params"}, "params": masters}
        if self.adam is None:
            self.adam = torch.optim.Adam([inner])
        else:
            self.adam.add_param_group(inner)
        # Keys the inner Adam has and we did not set (newer torch): the same in both.
        for k, v in self.adam.param_groups[-1].items():
            group.setdefault(k, v)
        for p, m, _ in self._low:
            self.state.setdefault(p, {"master": m})
        self._pending = True

    def _views(self) -> None:
        """``state[p]`` from the inner Adam's state of ``p``'s master (the same tensors)."""
        pending = False
        for p, m in self._pairs:
            st = self.adam.state.get(m)
            if not st:
                pending = True
                continue
            self.state[p] = st if m is p else {"master": m, **st}
        self._pending = pending

    def _sync_hyper(self) -> None:
        for outer, inner in zip(self.param_groups, self.adam.param_groups):
            for k, v in outer.items():
                if k != "params":
                    inner[k] = v

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_hyper()
        grads, bufs, params, masters = [], [], [], []
        for group in self.adam.param_groups:
            native = _native_step(group)
            lists: tuple[list, ...] = ([], [], [], [], [], [])
            for m in group["params"]:
                low = self._low_of.get(id(m))
                if low is None:
                    continue   # fp32 already: the inner Adam steps it
                p, buf = low
                g = p.grad
                if g is None:
                    m.grad = None   # no gradient this step: Adam skips the master, as it would p
                    continue
                if native is not None and p.device.type == "cpu" and g.dtype == p.dtype \
                        and g.is_contiguous() and p.is_contiguous():
                    m.grad = None   # stepped here, not by the inner Adam
                    st = self._adam_state(m)
                    for out, t in zip(lists, (p, g, m, st["exp_avg"], st["exp_avg_sq"],
                                              st["step"])):
                        out.append(t)
                    continue
                m.grad = buf
                grads.append(g)
                bufs.append(buf)
                params.append(p)
                masters.append(m)
            if lists[0]:
                beta1, beta2 = group["betas"]
                native(*lists, group["lr"], beta1, beta2, group["weight_decay"], group["eps"],
                       group["maximize"])
        if bufs:
            torch._foreach_copy_(bufs, grads)
        self.adam.step()
        if params:
            torch._foreach_copy_(params, masters)   # round to nearest even, in place
        if self._pending:
            self._views()
        return loss

    def _adam_state(self, m: Tensor) -> dict:
        """The inner Adam's state of master ``m``, made as torch's fused Adam makes it
        at its first step (the one-pass step fills the same tensors)."""
        st = self.adam.state[m]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=m.device)
            st["exp_avg"] = torch.zeros_like(m, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(m, memory_format=torch.preserve_format)
            self._pending = True
        return st

    def state_dict(self) -> dict:
        self._views()
        return super().state_dict()

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved_groups) or any(
                len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            raise ValueError("loaded state dict's parameter groups do not match this "
                             "optimizer's (their number or sizes differ)")
        master_of = {id(p): m for p, m in self._pairs}
        index = {i: (p, master_of[id(p)]) for s, g in zip(saved_groups, groups)
                 for i, p in zip(s["params"], g["params"])}
        inner_state, masters = {}, {}
        for i, st in state_dict["state"].items():
            st = dict(st)
            if "master" in st:
                masters[i] = st.pop("master")
            inner_state[i] = st
        for i, (p, m) in index.items():
            if m is p:
                continue
            src = masters.get(i, p)   # a state saved without masters: start from the params
            if not torch.is_tensor(src) or src.shape != m.shape:
                raise ValueError(f"loaded state dict's master of parameter {i} has shape "
                                 f"{tuple(getattr(src, 'shape', ()))}, expected {tuple(m.shape)}")
            m.copy_(src)
        # Hyper-parameters from the file; how Adam runs (fused, capturable) stays
        # this optimizer's, which fits this device.
        loaded = []
        for g, s in zip(groups, saved_groups):
            g.update({k: v for k, v in s.items() if k != "params" and k not in IMPL_KEYS})
            loaded.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": list(s["params"])})
        self.adam.load_state_dict({"state": inner_state, "param_groups": loaded})
        for p, m, _ in self._low:
            p.copy_(m)
            self.state[p] = {"master": m}
        for p, m in self._pairs:
            if m is p:
                self.state.pop(p, None)
        self._views()
