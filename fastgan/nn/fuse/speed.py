"""When a fused run gains over the same children run as plain PyTorch.

``fuse`` must never make a model slower, so every call of a fused run asks
``no_gain`` first and runs plain PyTorch when it returns a reason (the report
quotes the reason). The rule is conservative: a run fuses only where a
measurement showed the fused op ahead.

* CPU (the ``cpu`` backend): training forward+backward, one thread, batch 64,
  measured side by side (``bench/results/issue13-fuse-speed-rule.md``, loaded
  2-vCPU AMD EPYC VM): with dropout active the fused op gained 1.04-1.12x at
  256x512, 512x512, 512x1024 and 1024x784 (LinearAct 1024x784: 0.93-1.15x
  across runs, within noise); without dropout it lost at every size
  (0.55-0.88x: the GEMM dominates and eager's epilogue is cheap); 100x128
  lost even with dropout (0.75x: fixed per-call costs). bf16 lost in both
  cases (the CPU-speed issue's measurements). So on the CPU a run fuses
  only with dropout active, in fp32 without autocast, batch >= 64 and
  in_features * out_features >= 256 * 512.
* CUDA (``triton`` / ``cuda``): a run fuses when it has BatchNorm1d in
  training or dropout active, where fusion removes whole passes over the
  activations and the dropout mask tensor; a Linear -> activation run
  without either stays cuBLAS + one elementwise kernel. No GPU has measured
  this yet (``bench/gpu_check.sh`` will).
* The ``reference`` backend (plain-PyTorch math of the spec) is slower than
  eager everywhere; any other device has no fused backend.

``fuse(model, only_if_faster=False)`` skips the rule (to test or benchmark
the kernels).
"""
from __future__ import annotations

from typing import Optional

import torch

from ...ops import dispatch

CPU_MIN_BATCH = 64
CPU_MIN_WEIGHT = 256 * 512     # in_features * out_features

REFERENCE = "the reference backend runs the spec's plain-PyTorch math, slower than eager"
NO_BACKEND = "no fused backend runs on this device"
CPU_NO_DROPOUT = ("on the CPU a run without active dropout is faster unfused (eager's epilogue "
                  "is cheap next to the GEMM)")
CPU_DTYPE = "on the CPU only fp32 runs fuse (bf16/fp16/fp64 measured or expected slower)"
CPU_SMALL = (f"on the CPU a layer below {CPU_MIN_WEIGHT} weights (256 x 512) is faster unfused "
             "(fixed per-call costs)")
CPU_BATCH = f"on the CPU a batch below {CPU_MIN_BATCH} rows is faster unfused (fixed per-call costs)"
GPU_PLAIN = ("on CUDA a Linear -> activation run without BatchNorm1d in training or active "
             "dropout is left to cuBLAS and one elementwise kernel")

_chosen: dict = {}   # device type -> the backend the dispatcher would pick (None: none)


def backend(device_type: str) -> Optional[str]:
    """The backend that would run a fused op on ``device_type`` (None: none would)."""
    forced = dispatch.forced()
    if forced is not None:
        return forced
    if device_type not in _chosen:
        # Only this device's backends are loaded (the triton import is slow).
        _chosen[device_type] = next((n for n in dispatch._PREFERENCE.get(device_type, ())
                                     if dispatch._load(n)[0] is not None), None)
    return _chosen[device_type]


def no_gain(device_type: str, dtype: torch.dtype, batch: Optional[int], in_features: int,
            out_features: int, bn_training: Optional[bool], p: float) -> Optional[str]:
    """None if the fused op gains for this call, else why it would not.

    ``dtype``: the inputs' dtype after autocast; ``bn_training``: None without
    BatchNorm1d, else its mode; ``batch`` None: not known (the report asks at
    fuse time), assumed large enough.
    """
    name = backend(device_type)
    if name is None:
        return NO_BACKEND
    if name == "reference":
        return REFERENCE
    if name == "cpu":
        if p <= 0:
            return CPU_NO_DROPOUT
        if dtype != torch.float32:
            return CPU_DTYPE
        if in_features * out_features < CPU_MIN_WEIGHT:
            return CPU_SMALL
        if batch is not None and batch < CPU_MIN_BATCH:
            return CPU_BATCH
        return None
    if p <= 0 and not bn_training:
        return GPU_PLAIN
    return None
