"""Fused layers that drop into existing models.

``LinearBNAct`` *is* an ``nn.Sequential(Linear, BatchNorm1d, act, Dropout)``
whose forward runs the fused op with its children's parameters and
hyper-parameters. So its ``state_dict`` keys, printing and indexing are those of
the plain Sequential, weights load both ways, and ``unfuse`` only has to
change the class. ``LinearAct`` is the same without the BatchNorm1d.

The children stay in charge, as in the plain Sequential: each forward reads
the Linear's weight (a parametrization such as ``spectral_norm`` applies), the
activation's slope, the BatchNorm1d's and the Dropout's own ``training`` flags
(``.eval()`` on the Dropout alone turns dropout off) and hyper-parameters.
Structural edits take effect: after ``append``, ``insert``, ``del`` or
``layer[i] = m`` the layer fuses the leading children that still form its
pattern and runs the rest after it as plain modules (all of them, if the
pattern is gone). A child with hooks of its own runs the whole layer as the
plain Sequential, so every hook sees its call. Hyper-parameters that no forward
could accept are rejected at construction, by the ops' own check.

Dropout randomness: each layer holds a non-persistent ``dropout_rng`` buffer
``[seed, counter]`` (int64, on the layer's device, not in the state_dict).
Its seed is drawn from torch's default generator of the layer's device the
first time the layer drops anything (its first training forward with
``p > 0``), so ``torch.manual_seed`` governs fused dropout as it governs
``nn.Dropout``, and building a model draws nothing (its weights equal the
plain model's under one seed). Every training forward then uses ``(seed,
counter)`` and advances the counter on the device, so a CUDA graph replay
draws a fresh mask with no host involvement; the draw itself is a device op
too (a graph captured before any training forward holds it). ``seed_dropout``
sets the streams explicitly; ``dropout_rng_state`` / ``set_dropout_rng_state``
save and restore them (checkpoints).

Fused or plain: where the fused op would be slower than the children run as
plain PyTorch (small layers, batch 1: fixed per-call costs), a fused layer
runs the plain computation of its own children: ``act(bn(linear(x)))``,
each child called as in the ``nn.Sequential``. The decision is the one speed
rule, ``fastgan.nn.fuse.speed`` (measured per backend, dtype, BatchNorm1d
mode, dropout and grad; cached per shape). Dropout on the plain path keeps
the fused layer's semantics: it draws the same ``(seed, offset)`` from the
layer's stream and applies the mask the fused kernels would (the backend's
own Philox mask, made by its ``linear_act`` on a column of ones), so a
layer's masks are the same whichever path a call takes. The arguments are
checked by the op's own check on both paths (same errors). ``fused_path``
(or ``FASTGAN_FUSED_PATH``) forces either path.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import threading
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import checks, dispatch, spec
from ..ops.registry import LinearActFunction, LinearBNActFunction

_instances = itertools.count()


def activation_module(activation: str, negative_slope: float = 0.2) -> nn.Module:
    """The ``nn`` module of an activation of ``fastgan.ops.spec.ACTIVATION_TABLE``."""
    return spec.activation(activation).make_module(negative_slope)


def activation_of(module: nn.Module) -> tuple[str, float]:
    """(name, negative_slope) of an activation module; ValueError if not fusable."""
    row = spec.activation_of_module(module)
    if row is None:
        raise ValueError(f"{type(module).__name__} is not a fusable activation")
    return row.name, row.slope_of(module)


def _new_rng_state(device=None) -> Tensor:
    # The stream a layer starts with until its first draw (a restored copy of
    # this buffer keeps it): distinct per layer, drawn without consuming
    # torch's default generator, so building a fused model leaves the same RNG
    # state (and weights) as the plain one.
    with torch.random.fork_rng(devices=[]):
        seed = int(torch.randint(0, 2**61, (1,)))
    seed = (seed + next(_instances) * 0x9E3779B97F4A7C15) % 2**62
    return torch.tensor([seed, 0], dtype=torch.int64, device=device)


class SeedSource:
    """The seed a layer draws at its first use, shared with its deep copies.

    ``copy.deepcopy`` of a layer gives a clone that behaves exactly as the
    original: copies taken before the first draw share this object, so
    whichever of them drops first draws the seed from torch's generator and
    the others start from the same one (each with its own counter). Copies
    taken after it hold the drawn stream in their buffer anyway. A pickled
    layer gets its own.
    """

    def __init__(self):
        self.seed: Optional[Tensor] = None

    def __deepcopy__(self, memo):
        return self

    def draw(self, device: torch.device) -> Tensor:
        if self.seed is None:
            self.seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
        return self.seed.to(device)


def draw_seed_(state: Tensor, source: Optional[SeedSource] = None) -> None:
    """Start the dropout stream ``state`` (``[seed, counter]``) at a seed drawn from
    torch's default generator of its device (as ``nn.Dropout`` draws its masks),
    or the one ``source`` drew. A device op: nothing is read on the host (a CUDA
    graph may capture it)."""
    seed = (source or SeedSource()).draw(state.device)
    state.copy_(torch.cat([seed, seed.new_zeros(1)]))


_STEPS: dict = {}      # device -> tensor([0, 1]): one advance of a [seed, counter] stream
_ZERO_KEYS: dict = {}  # device -> (seed, offset) handed to ops that drop nothing




def next_key(state: Tensor) -> tuple[Tensor, Tensor]:
    """``(seed, offset)`` of the next mask of stream ``state``, which advances on the device.

    A copy, not a view: autograd saves the key for backward, and a later
    forward's in-place advance of the stream must not invalidate an earlier graph.
    On the CPU in eager code one C++ call does it (``fastgan.impl.cpu.next_key``).
    """
    if state.is_cpu and not torch.compiler.is_compiling():
        cpu_next_key = dispatch.optional("cpu", "next_key")
        if cpu_next_key is not None:
            return cpu_next_key(state)
    key = state.clone()
    step = _STEPS.get(state.device)
    if step is None:
        step = _STEPS[state.device] = torch.tensor([0, 1], dtype=torch.int64, device=state.device)
    state.add_(step)
    return key.unbind()


def zero_key(device: torch.device) -> tuple[Tensor, Tensor]:
    """A ``(seed, offset)`` for ops with ``p == 0``: the kernels read no key then, so one
    shared, never-modified pair per device saves two allocations per call."""
    key = _ZERO_KEYS.get(device)
    if key is None:
        key = _ZERO_KEYS[device] = torch.zeros(2, dtype=torch.int64, device=device).unbind()
    return key


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


# ------------------------------------------------------------ fused or plain
PATHS = ("auto", "fused", "plain")
_ENV_PATH = "FASTGAN_FUSED_PATH"
_environ = getattr(os.environ, "_data", None)   # (as fastgan.ops.dispatch reads its variable)
_ENV_PATH_KEY = os.environ.encodekey(_ENV_PATH) if _environ is not None else None


class _PathState(threading.local):
    path: Optional[str] = None


_path_state = _PathState()


def _check_path(path) -> str:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    return path


@contextlib.contextmanager
def fused_path(path: str):
    """Inside the block (this thread), the fused layers take ``path``: "fused" always
    calls the fused op, "plain" always runs the children's plain computation,
    "auto" (the default) asks the speed rule. For tests and benchmarks."""
    _check_path(path)
    prev = _path_state.path
    _path_state.path = path
    try:
        yield
    finally:
        _path_state.path = prev


def current_path() -> str:
    """The fused layers' path now: ``fused_path``'s, else ``FASTGAN_FUSED_PATH``, else "auto"."""
    path = _path_state.path
    if path is not None:
        return path
    if _environ is None:
        value = os.environ.get(_ENV_PATH)
    else:
        value = _environ.get(_ENV_PATH_KEY)
        value = os.environ.decodevalue(value) if value else None
    return _check_path(value) if value else "auto"


_PLAIN = (Tensor, nn.Parameter)
_speed = None
# How a fused layer's call runs (``_route``).
GENERAL, NO_GRAD, GRAD, PLAIN = 0, 1, 2, 3


def _route(memo: dict, x: Tensor, weight: Tensor, bias: Optional[Tensor],
           bn_training: Optional[bool], p: float, bn_weight: Optional[Tensor] = None,
           bn_bias: Optional[Tensor] = None) -> int:
    """How this call runs: ``PLAIN`` (the children), ``NO_GRAD`` (the fused op's body
    with no autograd node: plain eager tensors, nothing needs a gradient), ``GRAD``
    (its autograd, ``call_grad``: plain eager tensors) or ``GENERAL``
    (the op's ``call``: torch.compile, meta or subclass tensors, arguments the
    op's check refuses: it raises the op's error).

    The fused layers ask on every forward, and where the answer is PLAIN this
    must cost no more than the nn.Sequential's own module calls. So the answer
    is kept in ``memo`` (the layer's ``__dict__``) with everything it depends
    on: the forced path and backend, the speed rule's generation (its table and
    the GEMM policy), x's shape, dtype and device, grad, the BatchNorm1d mode,
    p, and the very weight and bias (a new tensor, or one converted by the
    layer's ``_apply``, which forgets the memo, is checked again)."""
    path = _path_state.path or current_path()
    if x.__class__ not in _PLAIN or weight.__class__ not in _PLAIN \
            or torch.compiler.is_compiling():
        return PLAIN if path == "plain" else GENERAL
    grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        or (bn_weight is not None and (bn_weight.requires_grad or bn_bias.requires_grad)))
    global _speed
    if _speed is None:  # (imported here: fastgan.nn.fuse imports this module)
        from .fuse import speed as _speed
    key = (path, grad, x.shape, x.dtype, x.device, bn_training, p, id(weight), id(bias),
           dispatch.forced(), _speed.generation)
    hit = memo.get("_route")
    if hit is not None and hit[0] == key:
        return hit[1]
    route = _decide(path, grad, x, weight, bias, bn_training, p)
    memo["_route"] = (key, route)
    return route


def _decide(path: str, grad: bool, x: Tensor, weight: Tensor, bias: Optional[Tensor],
            bn_training: Optional[bool], p: float) -> int:
    """``_route``'s answer for a kind of call it has not seen (plain eager tensors)."""
    if x.dim() != 2 or x.is_meta:
        return PLAIN if path == "plain" else GENERAL
    b, k = x.shape
    if path == "auto":
        device_type = "cpu" if x.is_cpu else x.device.type
        if _speed.fused_wins(_speed.backend(device_type), x.dtype, b, k, weight.shape[0],
                             bn_training, p > 0, grad):
            return GRAD if grad else NO_GRAD
    elif path == "fused":
        return GRAD if grad else NO_GRAD
    # The plain path, for arguments the fused op accepts (else its check raises):
    # the Linear's quick check here, the rest on the way (``_Fused._plain``).
    dtype, device = x.dtype, x.device
    if b * weight.shape[0] >= checks.MAX_OUTPUT_NUMEL:
        return GENERAL
    if (dtype in checks.FLOAT_DTYPES and weight.dtype is dtype and weight.device == device
            and weight.dim() == 2 and weight.shape[1] == k
            and (bias is None or (bias.__class__ in _PLAIN and bias.dtype is dtype
                                  and bias.shape == weight.shape[:1]
                                  and bias.device == device))):
        return PLAIN
    return GENERAL


_ONES: dict = {}   # (n, device) -> ones(n, 1): the K = 1 operands of _dropout_mask


def _ones(n: int, device: torch.device) -> Tensor:
    t = _ONES.get((n, device))
    if t is None:
        if len(_ONES) > 256:
            _ONES.clear()
        t = _ONES[(n, device)] = torch.ones(n, 1, device=device)
    return t


def _dropout_mask(y: Tensor, p: float, seed: Tensor, offset: Tensor) -> Tensor:
    """``y`` with the fused kernels' dropout mask for ``(seed, offset)``: the mask of the
    backend that would run the op (its ``linear_act`` on a column of ones, K = 1:
    the same Philox call and element numbering), applied in fp32 and rounded once."""
    dev = y.device
    name = dispatch.select(dev)
    rows, cols = _ones(y.shape[0], dev), _ones(y.shape[1], dev)
    with torch.no_grad():
        keep = dispatch.module(name).linear_act_forward(rows, cols, None, "identity", 0.0, p,
                                                        seed, offset)
    if y.dtype == torch.float32:
        return y * keep
    return (y.to(keep.dtype) * keep).to(y.dtype)


def autocast_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """``(x, weight, bias)`` in the autocast dtype while autocast is on for ``x``'s
    device, as they are otherwise: the fused ops take one dtype for all three and
    are not autocast-aware themselves."""
    if not torch.compiler.is_compiling() and not _any_autocast():
        return x, weight, bias  # the common case, without asking x for its device
    # Devices without autocast (meta, for shape inference) cannot ask about it.
    if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        return x.to(dt), weight.to(dt), (None if bias is None else bias.to(dt))
    return x, weight, bias


class TapeSpec(NamedTuple):
    """A fused layer's op arguments besides its input and dropout key
    (``_Fused.tape_spec``)."""
    weight: Tensor
    bias: Optional[Tensor]
    bn: Optional[tuple]       # BatchNorm1d's (weight, bias, running_mean, running_var,
    #                           num_batches_tracked), None for LinearAct
    bn_training: bool
    momentum: Optional[float]
    eps: float
    activation: str
    negative_slope: float
    p: float
    stream: Tensor            # the dropout stream (read only when p > 0)


class FusedInputs(NamedTuple):
    """What a fused layer's training or eval forward hands its op, besides the
    BatchNorm1d's tensors (``_Fused.op_inputs``)."""
    x: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    activation: str
    negative_slope: float
    p: float          # dropout probability of this forward (0 in eval)
    seed: Tensor
    offset: Tensor


def linear_bn_act_sequential(in_features, out_features, bias=True, eps=1e-5, momentum=0.1,
                             activation="leaky_relu", negative_slope=0.2, dropout=0.0,
                             device=None, dtype=None) -> nn.Sequential:
    """The plain-PyTorch block ``LinearBNAct`` fuses (the reference)."""
    checks.hyper(activation, negative_slope, dropout)
    checks.batch_norm(eps, momentum)
    kw = dict(device=device, dtype=dtype)
    # BatchNorm1d in fp32 (its statistics), in fp64 for an fp64 Linear
    bn_dtype = torch.float64 if dtype == torch.float64 else None
    return nn.Sequential(nn.Linear(in_features, out_features, bias=bias, **kw),
                         nn.BatchNorm1d(out_features, eps=eps, momentum=momentum, device=device,
                                        dtype=bn_dtype),
                         activation_module(activation, negative_slope), nn.Dropout(dropout))


def linear_act_sequential(in_features, out_features, bias=True, activation="leaky_relu",
                          negative_slope=0.2, dropout=0.0, device=None,
                          dtype=None) -> nn.Sequential:
    """The plain-PyTorch block ``LinearAct`` fuses (the reference)."""
    checks.hyper(activation, negative_slope, dropout)
    layers = [nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype),
              activation_module(activation, negative_slope)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class _Plan(NamedTuple):
    """How a fused layer runs its children (made again whenever they change)."""
    kids: tuple                  # the children it was made for, by identity
    n: int                       # leading children the fused op runs; 0: none (plain Sequential)
    linear: Optional[nn.Module]
    bn: Optional[nn.Module]
    act: Optional[nn.Module]
    row: Optional[spec.Activation]
    dropout: Optional[nn.Module]
    tail: tuple                  # children after the fused ones, run as plain modules


def _hooked(modules) -> bool:
    """Whether a child has a forward or backward hook, which a fused op (one call
    for several modules) would skip. Global module hooks (FlopCounterMode's
    module tracker, profilers) are not asked about: they see the fused layer's
    own call, as they see any module's that does not call its children."""
    for m in modules:
        if m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks or \
                m._backward_hooks:
            return True
    return False


def _tensor_hooked(t: Optional[Tensor]) -> bool:
    """Whether a parameter has a gradient hook (autograd would call it)."""
    return t is not None and bool(t._backward_hooks or t._post_accumulate_grad_hooks)


def _linear_tensors(lin: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
    """``(lin.weight, lin.bias)`` as the Linear's own forward reads them. A plain
    nn.Linear's come from its parameter dict (two dict reads instead of two
    ``Module.__getattr__`` calls: this runs on every forward); anything else
    (a parametrized weight, a plain tensor attribute) through getattr."""
    if lin.__class__ is nn.Linear:
        params = lin._parameters
        weight, bias = params.get("weight"), params.get("bias", lin)
        if weight is not None and bias is not lin:
            return weight, bias
    return lin.weight, lin.bias


def _bn_tensors(bn: nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(weight, bias, running_mean, running_var, num_batches_tracked)`` of a BatchNorm1d."""
    if bn.__class__ is nn.BatchNorm1d:
        params, buffers = bn._parameters, bn._buffers
        w, b = params.get("weight"), params.get("bias")
        mean, var = buffers.get("running_mean"), buffers.get("running_var")
        count = buffers.get("num_batches_tracked")
        if (w is not None and b is not None and mean is not None and var is not None
                and count is not None):
            return w, b, mean, var, count
    return bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked


class _Fused(nn.Sequential):
    act_index = 1   # position of the activation child (after the Linear [and BatchNorm1d])
    has_bn = False
    _plan: Optional[_Plan] = None
    _dropout_seeded = False   # drawn from torch's generator yet (or set explicitly)?

    def __init__(self, *layers: nn.Module):
        super().__init__(*layers)
        self.register_buffer("dropout_rng", _new_rng_state(layers[0].weight.device),
                             persistent=False)
        self._seed_source = SeedSource()

    @classmethod
    def from_sequential(cls, seq: nn.Sequential) -> "_Fused":
        """Wrap the children of an equivalent plain Sequential (shares its tensors)."""
        fused = cls.__new__(cls)
        _Fused.__init__(fused, *seq)
        fused._validate()
        return fused

    def to_sequential(self) -> nn.Sequential:
        """The plain-PyTorch equivalent, sharing this layer's parameters."""
        return nn.Sequential(*self)

    def __getstate__(self):
        # The plan is a cache (it holds the activation table's row, whose
        # functions do not pickle); the next forward makes it again.
        state = super().__getstate__()
        state.pop("_plan", None)
        for memo in self._MEMOS:   # object ids: meaningless in another process
            state.pop(memo, None)
        return state

    _MEMOS = ("_bn_checked", "_route")   # answers for these very tensors (by id)

    def _apply(self, fn, recurse=True):
        # A conversion changes the tensors' dtype or device under the same ids.
        for memo in self._MEMOS:
            self.__dict__.pop(memo, None)
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------ structure
    def _make_plan(self) -> _Plan:
        kids = tuple(self._modules.values())
        lin = bn = act = row = drop = None
        n = 0
        if kids and isinstance(kids[0], nn.Linear):
            i = 1
            if self.has_bn:
                cand = kids[1] if len(kids) > 1 else None
                if type(cand) is nn.BatchNorm1d and cand.affine and cand.track_running_stats:
                    bn, i = cand, 2
            if bn is not None or not self.has_bn:
                row = spec.activation_of_module(kids[i]) if len(kids) > i else None
            if row is not None:
                lin, act, n = kids[0], kids[i], i + 1
                if len(kids) > n and type(kids[n]) is nn.Dropout:
                    drop, n = kids[n], n + 1
        if n == 0:
            bn = row = None
        plan = _Plan(kids, n, lin, bn, act, row, drop, kids[n:] if n else ())
        self._plan = plan
        return plan

    def plan(self) -> _Plan:
        """The plan for the children as they are now."""
        plan = self._plan
        if plan is None or plan.kids != tuple(self._modules.values()):
            plan = self._make_plan()
        return plan

    def _validate(self):
        """The children are exactly this layer's pattern, with hyper-parameters the op accepts."""
        plan = self._make_plan()
        if plan.n != len(self) or (self.has_bn and plan.dropout is None):
            if len(self) > self.act_index:
                self.activation()  # ValueError naming an activation that is not fusable
            raise ValueError(f"{type(self).__name__} needs children {self.pattern}, got "
                             f"{tuple(type(k).__name__ for k in plan.kids)}")
        slope = plan.row.slope_of(plan.act)
        checks.hyper(plan.row.name, slope, float(plan.dropout.p) if plan.dropout else 0.0)
        if plan.bn is not None:
            checks.batch_norm(plan.bn.eps, plan.bn.momentum)

    def _sync_active(self) -> bool:
        return False   # (LinearBNAct: cross-process batch statistics)

    def activation(self) -> tuple[str, float]:
        """(name, negative_slope) of the activation child."""
        return activation_of(self[self.act_index])

    # ------------------------------------------------------------ dropout
    def dropout_p(self) -> float:
        """The dropout probability of a forward now: the Dropout child's while it is
        in training mode (its own flag, as for nn.Dropout), else 0."""
        drop = self.plan().dropout
        return float(drop.p) if drop is not None and drop.training else 0.0

    def dropout_key(self, p: float) -> tuple[Tensor, Tensor]:
        """(seed, offset) of the next dropout mask; advances the stream when ``p > 0``
        (its first use draws the seed from torch's default generator)."""
        if p > 0:
            return next_key(self._dropout_stream())
        return zero_key(self._buffers["dropout_rng"].device)

    def _dropout_stream(self) -> Tensor:
        """The ``[seed, counter]`` buffer of this layer's masks, seeded at its first use."""
        state = self._buffers["dropout_rng"]
        if not self._dropout_seeded:
            draw_seed_(state, self.__dict__.get("_seed_source"))
            self._dropout_seeded = True
        return state

    def seed_dropout(self, seed: int) -> None:
        """Restart this layer's dropout stream at ``seed`` (instead of a draw from
        torch's generator at its first use)."""
        self.dropout_rng.copy_(torch.tensor([seed % 2**62, 0], dtype=torch.int64))
        self._dropout_seeded = True

    # ------------------------------------------------------------ forward
    def op_inputs(self, x: Tensor) -> FusedInputs:
        """The arguments of this forward's op call (draws the dropout key, so call
        it once per forward)."""
        plan = self.plan()
        if plan.n == 0:
            raise ValueError(f"{type(self).__name__}'s children {tuple(type(k).__name__ for k in plan.kids)} "
                             f"no longer start with {self.pattern}: nothing to fuse")
        return FusedInputs(*self._inputs(plan, x))

    def _inputs(self, plan: _Plan, x: Tensor) -> tuple:
        """The fields of ``FusedInputs``, as a plain tuple (cheaper, once per forward)."""
        weight, bias = _linear_tensors(plan.linear)
        x, weight, bias = autocast_inputs(x, weight, bias)
        drop = plan.dropout
        p = float(drop.p) if drop is not None and drop.training else 0.0
        seed, offset = self.dropout_key(p)
        return x, weight, bias, plan.row.name, plan.row.slope_of(plan.act), p, seed, offset

    # ------------------------------------------------------------ the engine's tape
    # fastgan.train.tape runs a chain of fused layers forward and backward without
    # autograd: it asks ``tape_ready`` before each step, then takes each forward's
    # op arguments from ``tape_spec`` (a whole chain in one C++ call) or
    # ``tape_args`` (one op call per layer) and differentiates them itself.
    def tape_ready(self) -> bool:
        """Whether this layer's forward may run as its fused op outside autograd:
        False for a hook on the layer or a child, children it does not fuse (or
        after the fused ones), cross-process BatchNorm statistics, a Linear or
        BatchNorm1d subclass, a hooked parameter, or ``fused_path("plain")``.
        (The speed rule is not asked: it weighs the fused op's autograd
        Function against the children's autograd, and without autograd the
        fused op is the cheaper of the two at every size.)"""
        plan = self.plan()
        lin, bn = plan.linear, plan.bn
        if plan.n == 0 or plan.tail or lin.__class__ is not nn.Linear or \
                (bn is not None and bn.__class__ is not nn.BatchNorm1d) or \
                _hooked((self, *plan.kids)) or self._sync_active() or \
                (_path_state.path or current_path()) == "plain":
            return False
        weight, bias = _linear_tensors(lin)
        return not (_tensor_hooked(weight) or _tensor_hooked(bias) or (bn is not None and (
            _tensor_hooked(bn._parameters.get("weight"))
            or _tensor_hooked(bn._parameters.get("bias")))))

    def tape_spec(self) -> "TapeSpec":
        """This forward's op arguments other than the input and the dropout key
        (``tape_args`` with x and the key left out; for one call that runs a whole
        chain, ``fastgan.train.tape``), checked as the op checks them. Draws
        nothing; seeds the dropout stream at its first use, as a forward does."""
        plan = self.plan()
        weight, bias = _linear_tensors(plan.linear)
        drop, bn = plan.dropout, plan.bn
        p = float(drop.p) if drop is not None and drop.training else 0.0
        name, slope = plan.row.name, plan.row.slope_of(plan.act)
        checks.hyper(name, slope, p)
        stream = self._dropout_stream() if p > 0 else self._buffers["dropout_rng"]
        if bn is None:
            return TapeSpec(weight, bias, None, False, None, 0.0, name, slope, p, stream)
        checks.batch_norm(bn.eps, bn.momentum)
        return TapeSpec(weight, bias, _bn_tensors(bn), bn.training, bn.momentum, bn.eps, name,
                        slope, p, stream)

    def tape_args(self, x: Tensor) -> tuple:
        """The arguments of ``self.function``'s op for this forward: ``tape_spec``'s,
        with ``x`` and the dropout key (drawn here); only where ``tape_ready``."""
        s = self.tape_spec()
        seed, offset = self.dropout_key(s.p)
        bn = () if s.bn is None else (*s.bn, s.bn_training, s.momentum, s.eps)
        return (x, s.weight, s.bias, *bn, s.activation, s.negative_slope, s.p, seed, offset)

    def forward(self, x: Tensor) -> Tensor:
        plan = self._plan
        if plan is None or plan.kids != tuple(self._modules.values()):
            plan = self._make_plan()
        if plan.n == 0 or _hooked(plan.kids):
            return super().forward(x)  # every child runs as itself
        y = self._fused(plan, x)
        for m in plan.tail:
            y = m(y)
        return y

    def _plain(self, plan: _Plan, x: Tensor, p: float) -> Tensor:
        """The plain computation of the fused children, with this call's dropout
        mask from the layer's stream (the key a fused call would draw) in place of
        nn.Dropout's. The op's checks of the hyper-parameters (and of BatchNorm1d's
        tensors) run first: the same errors as on the fused path.

        This is the path the speed rule takes where the fused op would lose, so it
        must cost no more than the nn.Sequential: a plain nn.Linear and a table
        activation run as their functional calls (what their forwards do, without
        two module calls), and BatchNorm1d's check runs once per kind of call."""
        row, act, lin, bn = plan.row, plan.act, plan.linear, plan.bn
        slope = row.slope_of(act)
        checks.hyper(row.name, slope, p)
        if bn is not None:
            self._check_bn(plan, x, p, slope)
        h = F.linear(x, *_linear_tensors(lin)) if lin.__class__ is nn.Linear else lin(x)
        if bn is not None:
            h = bn(h)
        y = row.fn(h, slope) if act.__class__ is row.module else act(h)
        if p > 0:
            return self._plain_dropout(y, p)
        return y

    def _check_bn(self, plan: _Plan, x: Tensor, p: float, slope: float) -> None:
        """``checks.linear_bn_act`` for the plain path, skipped when the same kind of
        call (shapes, dtypes, flags and the very tensors) passed it last time."""
        bn = plan.bn
        weight, bias = _linear_tensors(plan.linear)
        bn_tensors = _bn_tensors(bn)
        key = (x.shape, x.dtype, x.device, bn.training, bn.momentum, bn.eps, p, slope,
               id(weight), id(bias), *map(id, bn_tensors))
        if key != self.__dict__.get("_bn_checked"):
            seed, offset = zero_key(x.device)
            checks.linear_bn_act(x, weight, bias, *bn_tensors, bn.training, bn.momentum,
                                 bn.eps, plan.row.name, slope, p, seed, offset)
            self.__dict__["_bn_checked"] = key

    def _plain_dropout(self, y: Tensor, p: float) -> Tensor:
        """``y`` with the mask a fused call would draw next, applied in fp32 and
        rounded once (``y`` is the fresh output of the children)."""
        mask = dispatch.optional("cpu", "dropout_mask") if y.device.type == "cpu" else None
        if mask is None:   # any device: the backend's own kernel draws it
            seed, offset = self.dropout_key(p)
            return _dropout_mask(y, p, seed, offset)
        # The cpu backend draws it (and advances the stream) in one call.
        keep = mask(self._dropout_stream(), y.shape[0], y.shape[1], p, y.dtype)
        if not y.requires_grad:
            return y.mul_(keep)   # y fresh; an fp32 keep: multiplied in fp32, rounded once
        out = y * keep   # an fp32 keep promotes a half y: float(y) * scale
        return out if out.dtype == y.dtype else out.to(y.dtype)


class LinearBNAct(_Fused):
    """Fused Linear -> BatchNorm1d -> activation -> Dropout.

    Children ``0`` Linear, ``1`` BatchNorm1d (kept in fp32; fp64 for an fp64
    Linear), ``2`` activation, ``3`` Dropout, exactly as
    ``linear_bn_act_sequential`` builds them. The BatchNorm1d's ``training``
    flag chooses batch or running statistics, the Dropout's whether to drop.
    """

    act_index = 2
    has_bn = True
    pattern = "(Linear, BatchNorm1d(affine=True, track_running_stats=True), activation, Dropout)"

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 eps: float = 1e-5, momentum: float | None = 0.1,
                 activation: str = "leaky_relu", negative_slope: float = 0.2,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__(*linear_bn_act_sequential(in_features, out_features, bias, eps,
                                                   momentum, activation, negative_slope,
                                                   dropout, device, dtype))
        self._validate()

    def _apply(self, fn, recurse=True):
        # BN parameters and running statistics stay fp32 when the Linear is cast
        # to a half dtype (the kernels keep statistics in fp32), and follow it
        # to fp64 (the fp64 contract, for gradcheck).
        super()._apply(fn, recurse)
        lin, bn = self._modules.get("0"), self._modules.get("1")
        if isinstance(lin, nn.Linear) and isinstance(bn, nn.BatchNorm1d) and bn.weight is not None:
            want = torch.float64 if lin.weight.dtype == torch.float64 else torch.float32
            if bn.weight.dtype != want:
                bn.to(want)
        return self

    # Cross-process batch statistics: fastgan.distributed.convert_sync_batchnorm
    # sets a callable (layer, x) -> y that runs training forwards while active().
    sync_stats = None

    def forward(self, x: Tensor) -> Tensor:
        if self._sync_active():
            return self.sync_stats(self, x)
        return super().forward(x)

    function = LinearBNActFunction

    def _sync_active(self) -> bool:
        return self.training and self.sync_stats is not None and self.sync_stats.active()

    def _op_args(self, plan: _Plan, x: Tensor):
        xc, weight, bias = autocast_inputs(x, *_linear_tensors(plan.linear))
        drop, bn = plan.dropout, plan.bn
        p = float(drop.p) if drop is not None and drop.training else 0.0
        bn_tensors = _bn_tensors(bn)
        route = _route(self.__dict__, xc, weight, bias, bn.training, p, bn_tensors[0],
                       bn_tensors[1])
        if route == PLAIN:
            return route, p
        seed, offset = self.dropout_key(p)
        return route, (xc, weight, bias, *bn_tensors, bn.training, bn.momentum, bn.eps,
                       plan.row.name, plan.row.slope_of(plan.act), p, seed, offset)

    def _fused(self, plan: _Plan, x: Tensor) -> Tensor:
        route, args = self._op_args(plan, x)
        if route == PLAIN:
            return self._plain(plan, x, args)
        return _RUN_BN[route](*args)


class LinearAct(_Fused):
    """Fused Linear -> activation (-> Dropout): children ``0`` Linear, ``1``
    activation and, when ``dropout > 0``, ``2`` Dropout."""

    pattern = "(Linear, activation[, Dropout])"

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str = "leaky_relu", negative_slope: float = 0.2,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__(*linear_act_sequential(in_features, out_features, bias, activation,
                                                negative_slope, dropout, device, dtype))
        self._validate()

    function = LinearActFunction

    def _op_args(self, plan: _Plan, x: Tensor):
        xc, weight, bias = autocast_inputs(x, *_linear_tensors(plan.linear))
        drop = plan.dropout
        p = float(drop.p) if drop is not None and drop.training else 0.0
        route = _route(self.__dict__, xc, weight, bias, None, p)
        if route == PLAIN:
            return route, p
        seed, offset = self.dropout_key(p)
        return route, (xc, weight, bias, plan.row.name, plan.row.slope_of(plan.act), p, seed,
                       offset)

    def _fused(self, plan: _Plan, x: Tensor) -> Tensor:
        route, args = self._op_args(plan, x)
        if route == PLAIN:
            return self._plain(plan, x, args)
        return _RUN[route](*args)


# route -> how the fused op is called
_RUN = {GENERAL: LinearActFunction.call, NO_GRAD: LinearActFunction.call_no_grad,
        GRAD: LinearActFunction.call_grad}
_RUN_BN = {GENERAL: LinearBNActFunction.call, NO_GRAD: LinearBNActFunction.call_no_grad,
           GRAD: LinearBNActFunction.call_grad}


def _fused_layers(model: nn.Module) -> list:
    """The fused layers of ``model`` and, in their place, the dropout streams of the
    runs ``fastgan.fuse`` planned (they have a layer's seed_dropout, dropout_rng and
    _dropout_seeded)."""
    out = []
    for m in model.modules():
        if isinstance(m, _Fused):
            out.append(m)
        elif hasattr(type(m), "_fastgan_dropout_streams"):
            out.extend(m._fastgan_dropout_streams())
    return out


def seed_dropout(model: nn.Module, seed: int) -> None:
    """Give every fused layer of ``model`` its own dropout stream derived from
    ``seed``, for explicit control (otherwise each layer draws its seed from
    torch's default generator when it first drops)."""
    for i, m in enumerate(_fused_layers(model)):
        m.seed_dropout(seed * 1_000_003 + i)


def dropout_rng_state(model: nn.Module) -> list[Tensor]:
    """The dropout RNG buffers of ``model``'s fused layers (for checkpoints)."""
    return [m.dropout_rng.detach().cpu().clone() for m in _fused_layers(model)]


def set_dropout_rng_state(model: nn.Module, states: list[Tensor]) -> None:
    """Restore what ``dropout_rng_state`` returned; the layers keep these streams."""
    layers = _fused_layers(model)
    if len(layers) != len(states):
        raise ValueError(f"dropout RNG state has {len(states)} entries, model has {len(layers)} fused layers")
    for m, s in zip(layers, states):
        m.dropout_rng.copy_(s)
        m._dropout_seeded = True
