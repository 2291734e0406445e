"""Shared test setup.

Without a GPU, Triton kernels run in the interpreter on CPU tensors; that must
be decided before any Triton kernel is defined, so it happens here, first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

# The fused layers take the fused op in every test (the speed rule would run small
# test layers plainly); tests of the rule and its fallback choose the path themselves.
os.environ.setdefault("FASTGAN_FUSED_PATH", "fused")

torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must mean fp32 (docs/design.md, Numerics)
torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by bench/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
