"""The ``cpu`` backend: C++ kernels of the extension ``fastgan._C`` (csrc/cpu).

The extension registers its kernels as ``torch.ops.fastgan_C.<function>``
(schemas in csrc/ops.cpp, CPU kernels in csrc/cpu/<op>.cpp, CUDA kernels in
csrc/cuda/<op>.cu). This module adapts the backend contract of
``fastgan.impl.reference`` to them: activation names become the integer codes
of ``fastgan.ops.spec.ACTIVATIONS`` (csrc/activation.h) and inputs are made
contiguous. Arguments arrive checked (``fastgan.ops.checks``); the C++ entries
check again only what protects memory (csrc/checks.h).

GEMMs (csrc/cpu/gemm.h) take one of three paths, chosen per call at run time:
torch's bundled oneDNN (``mkldnn::_linear_pointwise``) where this CPU has the
ISA for the dtype (AVX-512 for fp32, AVX512_BF16/AMX for bf16, AVX512_FP16
for fp16), ATen's GEMM is not as fast already (fp32 on an Intel CPU: MKL runs
AVX-512 there, not on AMD) and the product is large enough to repay oneDNN's
fixed cost;
"widened" for a bf16 / fp16 product without that ISA (computed in fp32 and
rounded once: ATen's bf16 GEMM is 6-10x slower than its fp32 one there);
ATen otherwise. fp32 stays IEEE on all. ``gemm_info()`` reports the policy and
a call counter per path; ``gemm_path`` the path a product takes;
``set_gemm`` / ``gemm_policy`` force a path (also the environment:
``FASTGAN_CPU_GEMM=auto|aten|onednn|widen`` at import).
"""
from __future__ import annotations

import contextlib
import os
import platform

import torch

from .. import _C  # (ImportError = extension not built; ops.dispatch reports it)
from ..ops.spec import ACTIVATIONS

name = "cpu"
_DEVICE_KEY = "CPU"
_FUNCTIONS = ("linear_bn_act_forward", "linear_bn_act_backward", "linear_act_forward",
              "linear_act_backward", "gan_bce_forward")


def registered(dispatch_key: str) -> dict[str, bool]:
    """For each C++ function, whether a kernel is registered for ``dispatch_key``."""
    return {f: torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgan_C::{f}", dispatch_key)
            for f in _FUNCTIONS}


def available() -> tuple[bool, str]:
    missing = [f for f, ok in registered(_DEVICE_KEY).items() if not ok]
    if missing:
        return False, f"fastgan._C has no {_DEVICE_KEY} kernel for {missing}"
    return True, f"C++ kernels (fastgan._C, {_DEVICE_KEY})"


def supports(device: torch.device) -> bool:
    return device.type == "cpu"


GEMM_POLICIES = ("auto", "aten", "onednn", "widen")   # csrc/cpu/gemm.h's Policy
GEMM_PATHS = ("aten", "onednn", "widened")            # and its Path


def gemm_info() -> dict:
    """The GEMM policy, ``min_work`` (oneDNN from M*K*N on, under "auto"), calls per path
    since load, whether oneDNN is usable here per dtype, whether ATen's fp32 GEMM
    already runs AVX-512 (MKL on an Intel CPU: then "auto" leaves fp32 to ATen), and
    the CPU kind (``hardware``)."""
    (policy, min_work, *calls, fp32, bf16, fp16, aten_avx512,
     vendor) = torch.ops.fastgan_C.cpu_gemm_info()
    return dict(policy=GEMM_POLICIES[policy], min_work=min_work,
                calls=dict(zip(GEMM_PATHS, calls)),
                onednn={"float32": bool(fp32), "bfloat16": bool(bf16), "float16": bool(fp16)},
                aten_fp32_avx512=bool(aten_avx512), hardware=_hardware(vendor))


_VENDORS = ("", "intel", "amd")   # csrc/cpu/gemm.cpp's cpu_vendor()
_HARDWARE = None


def _hardware(vendor: int) -> str:
    # vendor + the ISA ATen's kernels run ("avx512", "avx2", "default", ...)
    isa = torch.backends.cpu.get_cpu_capability().lower()
    return f"{_VENDORS[vendor] or platform.machine().lower()}-{isa}"


def hardware() -> str:
    """This CPU's kind, e.g. "amd-avx512" (Zen 4, Zen 5), "intel-avx512" (Xeon),
    "amd-avx2" (Zen 3): the vendor and the ISA level of ATen's kernels. The speed
    rule keeps rows per kind (``fastgan.nn.fuse.speed``): MKL runs AVX-512 on Intel
    only, so the same ISA gives the plain layers a 2x different GEMM."""
    global _HARDWARE
    if _HARDWARE is None:
        _HARDWARE = gemm_info()["hardware"]
    return _HARDWARE


_BIG = 1 << 12   # gemm_path's default size: every path's size threshold is below 4096^3


def gemm_path(dtype: torch.dtype, m: int = _BIG, k: int = _BIG, n: int = _BIG) -> str:
    """The path ("aten", "onednn", "widened") an (m, k) @ (k, n) product of ``dtype``
    takes under the current policy (by default a large one: this machine's path for
    the dtype)."""
    return GEMM_PATHS[torch.ops.fastgan_C.cpu_gemm_path(dtype, m, k, n)]


def set_gemm(policy: str | None = None, min_work: int | None = None) -> tuple[str, int]:
    """Sets the GEMM policy ("auto", "aten", "onednn", "widen") and/or ``min_work``; returns
    the previous pair. "onednn" still uses ATen for a dtype oneDNN cannot run here (fp64);
    "widen" computes every bf16 / fp16 product in fp32 ("auto" does where oneDNN cannot
    run the dtype natively)."""
    info = gemm_info()
    if policy is None:
        policy = info["policy"]
    if policy not in GEMM_POLICIES:
        raise ValueError(f"policy must be one of {GEMM_POLICIES}, got {policy!r}")
    if min_work is None:
        min_work = info["min_work"]
    if not isinstance(min_work, int) or isinstance(min_work, bool) or min_work < 0:
        raise ValueError(f"min_work must be an int >= 0, got {min_work!r}")
    old_policy, old_work = torch.ops.fastgan_C.cpu_gemm_set(GEMM_POLICIES.index(policy), min_work)
    for changed in on_gemm_change:
        changed()
    return GEMM_POLICIES[old_policy], old_work


# Called after every set_gemm: the speed rule (fastgan.nn.fuse.speed) caches answers
# that depend on the GEMM paths and adds its reset here.
on_gemm_change: list = []


@contextlib.contextmanager
def gemm_policy(policy: str, min_work: int | None = None):
    """Context: the cpu backend's GEMMs under ``policy`` (restored on exit)."""
    old = set_gemm(policy, min_work)
    try:
        yield
    finally:
        set_gemm(*old)


if os.environ.get("FASTGAN_CPU_GEMM"):
    set_gemm(os.environ["FASTGAN_CPU_GEMM"])


_MALLOC_KEPT = None


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Keep memory that tensors free in the process's heap for the next step instead of
    returning it to the OS (glibc malloc's M_MMAP_THRESHOLD / M_TRIM_THRESHOLD; see
    csrc/cpu/memory.cpp for why). Process-wide and sticky, so it is opt-in: the
    training engine and ``fastgan bench`` call it (every contender of a benchmark runs
    under it alike); ``FASTGAN_CPU_MALLOC=0`` turns it off. Returns whether it applied
    (False on a C library other than glibc, or when turned off)."""
    global _MALLOC_KEPT
    if os.environ.get("FASTGAN_CPU_MALLOC", "1") == "0":
        return False
    if _MALLOC_KEPT is None:
        _MALLOC_KEPT = bool(torch.ops.fastgan_C.cpu_malloc_keep(mmap_threshold, trim_threshold))
    return _MALLOC_KEPT


def freed_memory_kept() -> bool:
    """Whether ``keep_freed_memory`` applied in this process."""
    return bool(_MALLOC_KEPT)


def vector_tanh() -> bool:
    """Whether the fused epilogues' fp32 tanh is torch.tanh's own vector tanh (MKL's,
    bit-equal to torch.tanh) rather than scalar tanhf (csrc/cpu/vec_math.cpp)."""
    return bool(torch.ops.fastgan_C.cpu_vector_tanh())


def dropout_mask(state, rows: int, cols: int, p: float, dtype=torch.float32) -> torch.Tensor:
    """The ``(rows, cols)`` keep mask (0 or ``1 / (1 - p)``) of the key
    ``(state[0], state[1])``, numbered as the fused ops number their outputs;
    advances ``state[1]`` by one (a CPU int64 ``state``). In ``dtype`` where that
    dtype holds the scale exactly, else float32: ``y * mask`` then rounds
    ``float(y) * scale`` once either way."""
    return torch.ops.fastgan_C.cpu_dropout_mask(state, rows, cols, p, dtype)


def next_key(state) -> tuple[torch.Tensor, torch.Tensor]:
    """``(seed, offset)`` of CPU dropout stream ``state`` (``[seed, counter]``, int64)
    as two new 0-dim tensors, then ``state[1] += 1``: ``fastgan.nn.layers.next_key``
    in one C++ call instead of three ATen ones."""
    return _C.cpu_next_key(state)


# ------------------------------------------------------------------ the ops in one call
# The fused ops with their autograd in C++ (csrc/cpu/autograd.cpp): the forward
# kernel and, where an input needs a gradient, a C++ autograd node running the
# backward kernel, in one call from Python (the op's registry Function, without
# its Python). fastgan.ops.registry calls them for plain eager CPU tensors, with
# the op's arguments after its check, and registers each op's differentiable
# backward for create_graph (``set_double_backward``).
# The ops this backend runs in one call, in csrc/cpu/autograd.h's AutogradOp order.
AUTOGRAD_OPS = ("linear_act", "linear_bn_act")


def linear_act(x, weight, bias, activation, negative_slope, p, seed, offset):
    """y of ``fastgan::linear_act``, differentiable (a C++ autograd node)."""
    return _C.cpu_linear_act(x, weight, bias, ACTIVATIONS[activation], negative_slope, p, seed,
                             offset)


def linear_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                  num_batches_tracked, training, momentum, eps, activation, negative_slope, p,
                  seed, offset):
    """y of ``fastgan::linear_bn_act``, differentiable (a C++ autograd node); updates
    the running statistics in place as the op does."""
    return _C.cpu_linear_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                num_batches_tracked, training, momentum, eps,
                                ACTIVATIONS[activation], negative_slope, p, seed, offset)


def set_double_backward(op: str, fn) -> None:
    """The callable the C++ nodes of ``op`` call for a differentiable backward
    (``create_graph=True``): the op's ``double`` arguments without ``backend``, the
    activation as its integer code (``fastgan.ops.spec.ACTIVATIONS``)."""
    _C.cpu_set_double_backward(AUTOGRAD_OPS.index(op), fn)


def uncounted_calls() -> dict:
    """Backward kernel runs of the C++ autograd nodes (no Python sees them), for
    ``fastgan.ops.dispatch.calls``."""
    n_act, n_bn = _C.cpu_autograd_backward_calls()
    return {(name, "linear_act_backward"): n_act, (name, "linear_bn_act_backward"): n_bn}


def master_adam_(params, grads, masters, exp_avgs, exp_avg_sqs, steps, lr: float, beta1: float,
                 beta2: float, weight_decay: float, eps: float, maximize: bool) -> None:
    """One Adam step of bf16/fp16 ``params`` over their fp32 ``masters`` in one pass
    (csrc/cpu/master_adam.cpp): counts ``steps``, updates masters and moments as
    torch's fused Adam does (bit for bit) and writes each parameter as its master
    rounded. Contiguous CPU tensors, one entry of each list per parameter."""
    torch.ops.fastgan_C.cpu_master_adam_(params, grads, masters, exp_avgs, exp_avg_sqs, steps,
                                         lr, beta1, beta2, weight_decay, eps, maximize)


def fused_adam_(params, grads, exp_avgs, exp_avg_sqs, steps, lr: float, beta1: float,
                beta2: float, weight_decay: float, eps: float, maximize: bool) -> None:
    """torch's fused CPU Adam step (``torch._fused_adam_``) with the step counts
    (float32 CPU scalars) added in the same call, as one add of 1 each
    (csrc/cpu/master_adam.cpp): the same results as torch's two calls."""
    torch.ops.fastgan_C.cpu_fused_adam_(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1,
                                        beta2, weight_decay, eps, maximize)


def _c(t):
    return None if t is None else t.contiguous()


# ------------------------------------------------------------------ whole chains
# One C++ call runs a chain of fused layers (csrc/cpu/chain.cpp): the op calls
# linear_act_* / linear_bn_act_* below would make, in the same order, without
# the Python around each. For the engine's step without autograd
# (fastgan.train.tape); ``specs`` are the layers' ``tape_spec()``.
_NAN = float("nan")


def chain_forward(x, specs):
    """The chain's output and its saved tensors (for ``chain_backward``)."""
    weights, biases, bn_w, bn_b, means, variances, counts, streams = ([] for _ in range(8))
    acts, slopes, ps, training, momentums, epss = ([] for _ in range(6))
    for s in specs:
        weights.append(s.weight)
        biases.append(s.bias)
        bn = s.bn or (None, None, None, None, None)
        bn_w.append(bn[0])
        bn_b.append(bn[1])
        means.append(bn[2])
        variances.append(bn[3])
        counts.append(bn[4])
        streams.append(s.stream)
        acts.append(ACTIVATIONS[s.activation])
        slopes.append(s.negative_slope)
        ps.append(s.p)
        training.append(s.bn_training)
        momentums.append(_NAN if s.momentum is None else s.momentum)
        epss.append(s.eps)
    return torch.ops.fastgan_C.cpu_chain_forward(x, weights, biases, bn_w, bn_b, means, variances,
                                                 counts, streams, acts, slopes, ps, training,
                                                 momentums, epss)


def chain_backward(grad, saved, specs, compute_dw, compute_dx):
    """From the top layer down, each layer's parameter gradients (dW, db [, dgamma,
    dbeta]); then the chain input's gradient (empty unless ``compute_dx``)."""
    return torch.ops.fastgan_C.cpu_chain_backward(
        grad, saved, [s.weight for s in specs], [s.bn and s.bn[0] for s in specs],
        [s.bn and s.bn[1] for s in specs], [ACTIVATIONS[s.activation] for s in specs],
        [s.negative_slope for s in specs], [s.p for s in specs],
        [s.bn_training for s in specs], compute_dw, compute_dx)


def chain_backward_ghost(grad, ghost_grad, saved, specs, compute_dw):
    """``chain_backward`` of a chain of linear_act layers for ``grad`` (every row),
    then the input gradient of the ghost rows (the first ``len(ghost_grad)``) for
    ``ghost_grad``, which reaches no weight (fastgan.nn.models.GhostRows)."""
    return torch.ops.fastgan_C.cpu_chain_backward_ghost(
        grad, ghost_grad, saved, [s.weight for s in specs],
        [ACTIVATIONS[s.activation] for s in specs], [s.negative_slope for s in specs],
        [s.p for s in specs], compute_dw)


def gan_bce_rows(logits, split: int, target_first: float, target_second: float):
    """``gan_bce_forward(logits[:split], logits[split:] or None, target_first,
    target_second)``'s (loss, prob_first, prob_second) and both gradients in one
    tensor shaped as ``logits`` (csrc/cpu/gan_bce.cpp): the taped step's losses."""
    return torch.ops.fastgan_C.cpu_gan_bce_rows(logits, split, target_first, target_second)


def linear_bn_act_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                          num_batches_tracked, training, momentum, eps, activation,
                          negative_slope, p, seed, offset):
    return torch.ops.fastgan_C.linear_bn_act_forward(
        _c(x), _c(weight), _c(bias), _c(bn_weight), _c(bn_bias), running_mean, running_var,
        num_batches_tracked, training, momentum, eps, ACTIVATIONS[activation], negative_slope,
        p, seed, offset)


def linear_bn_act_backward(grad_y, x, weight, bn_weight, bn_bias, h, mean, rstd, training,
                           activation, negative_slope, p, seed, offset, compute_dx,
                           compute_dw=True):
    return torch.ops.fastgan_C.linear_bn_act_backward(
        _c(grad_y), _c(x), _c(weight), _c(bn_weight), _c(bn_bias), _c(h), _c(mean), _c(rstd),
        training, ACTIVATIONS[activation], negative_slope, p, seed, offset, compute_dx,
        compute_dw)


def linear_act_forward(x, weight, bias, activation, negative_slope, p, seed, offset):
    return torch.ops.fastgan_C.linear_act_forward(
        _c(x), _c(weight), _c(bias), ACTIVATIONS[activation], negative_slope, p, seed, offset)


def linear_act_backward(grad_y, x, weight, y, activation, negative_slope, p, seed, offset,
                        compute_dx, compute_dw=True):
    return torch.ops.fastgan_C.linear_act_backward(
        _c(grad_y), _c(x), _c(weight), _c(y), ACTIVATIONS[activation], negative_slope, p, seed,
        offset, compute_dx, compute_dw)


def gan_bce_forward(logits_a, logits_b, target_a, target_b):
    return torch.ops.fastgan_C.gan_bce_forward(_c(logits_a), _c(logits_b), target_a, target_b)
