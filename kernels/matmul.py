"""The two GEMMs of every backward pass and the column-sum finisher.

``dx = dh @ W`` and ``dW = dh.T @ x`` are one strided kernel (a transpose is
just swapped strides); they read the ``dh`` (or ``dz``) that the op's
elementwise backward kernel wrote once in the input dtype, which is exactly
what the reference multiplies (``dh.to(x.dtype)`` before the GEMMs).
"""
import torch
import triton
import triton.language as tl

from . import configs, runtime
from .common import matmul_tile, round_to, sum_partials, tile_offsets


@triton.autotune(configs=configs.gemm_configs(epilogue=False), key=["M", "N", "K", "TF32"],
                 prune_configs_by=configs.PRUNE)
@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                   stride_cm, stride_cn, TF32: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _, offs_m, offs_n = tile_offsets(BLOCK_M, BLOCK_N)
    acc = matmul_tile(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                      offs_m, offs_n, BLOCK_M, BLOCK_N, BLOCK_K, TF32)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, round_to(acc, c_ptr.dtype.element_ty), mask=mask)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in ``a.dtype`` with fp32 accumulation; strided inputs welcome.

    Internal: the op launchers have guarded devices, dtypes and 32-bit spans."""
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    runtime.launch("matmul", _matmul_kernel, grid, a, b, c, m, n, k, a.stride(0), a.stride(1),
                   b.stride(0), b.stride(1), c.stride(0), c.stride(1), TF32=runtime.tf32(a.dtype))
    return c


@triton.jit
def _col_sum_kernel(part_ptr, out_ptr, R, N, BLOCK_N: tl.constexpr):
    """out[j] = sum_r part[r, j] (fp32 partials, rounded once to out's dtype)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = sum_partials(part_ptr, R, N, offs_n, n_ok, BLOCK_N)
    tl.store(out_ptr + offs_n, round_to(acc, out_ptr.dtype.element_ty), mask=n_ok)


def col_sum(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum a contiguous (R, N) fp32 buffer of per-row-tile partial sums over R."""
    r, n = partials.shape
    out = torch.empty(n, dtype=dtype, device=partials.device)
    block = configs.COL_SUM_BLOCK
    runtime.launch("col_sum", _col_sum_kernel, (triton.cdiv(n, block),), partials, out, r, n,
                   BLOCK_N=block)
    return out
