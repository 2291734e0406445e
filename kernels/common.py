"""``@triton.jit`` helpers shared by the fused kernels: the GEMM tile loop,
rounding to the storage dtype, activations and their derivatives, and the
Philox dropout mask (bit-exact with ``fastgan.reference``).

Activation codes are those of ``fastgan.spec.ACTIVATIONS``.
"""
import triton
import triton.language as tl

from .runtime import INTERPRET

# The interpreter's bf16/fp16 arithmetic is wrong (it runs on the raw bits) and
# its fp32 -> bf16 conversion truncates; under it we upcast before tl.dot and
# round to bf16 by hand. On a GPU neither is needed.
_INTERPRET = tl.constexpr(INTERPRET)

ACT_IDENTITY = tl.constexpr(0)
ACT_RELU = tl.constexpr(1)
ACT_LEAKY_RELU = tl.constexpr(2)
ACT_TANH = tl.constexpr(3)


@triton.jit
def matmul_tile(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                offs_m, offs_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """fp32 tile ``A[offs_m, :] @ B[:, offs_n]`` of A (M, K) and B (K, N), any strides.

    Out-of-range rows/columns/depth are masked to zero, so the tile never reads
    past a tensor. fp32 inputs use IEEE fp32 products (no TF32)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if _INTERPRET:
        b_ptrs_t = b_ptr + offs_n[:, None] * stride_bn + offs_k[None, :] * stride_bk
        n_ok_t = offs_n[:, None] < N
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=m_ok & k_ok[None, :], other=0.0)
        if _INTERPRET:
            # The interpreter's tl.dot is numpy's unblocked matmul loop (np.matmul
            # with dtype=...). A broadcast product summed over its last axis is
            # several times faster, and numpy sums a contiguous last axis
            # pairwise, as accurately as a blocked BLAS: so gather B already
            # transposed, (BLOCK_N, BLOCK_K), rather than tl.trans a view. The sum
            # stays fp32 like the GPU's tl.dot, so the tests see fp32 round-off.
            bt = tl.load(b_ptrs_t, mask=n_ok_t & k_ok[None, :], other=0.0)
            acc += tl.sum(a.to(tl.float32)[:, None, :] * bt.to(tl.float32)[None, :, :], axis=2)
            b_ptrs_t += BLOCK_K * stride_bk
        else:
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok, other=0.0)
            acc = tl.dot(a, b, acc, input_precision="ieee")
            b_ptrs += BLOCK_K * stride_bk
        a_ptrs += BLOCK_K * stride_ak
    return acc


@triton.jit
def _round_bf16_rne(x):
    """fp32 -> fp32 holding the nearest-even bf16 value (interpreter only)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """Round fp32 ``x`` to storage dtype ``dtype`` (round to nearest even)."""
    if _INTERPRET and dtype == tl.bfloat16:
        return _round_bf16_rne(x).to(dtype)
    return x.to(dtype)


@triton.jit
def tanh_f32(z):
    # exp(-2|z|) never overflows; the sign is restored afterwards.
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def act(z, ACT: tl.constexpr, slope):
    if ACT == ACT_RELU:
        return tl.where(z > 0, z, 0.0)
    elif ACT == ACT_LEAKY_RELU:
        return tl.where(z > 0, z, z * slope)
    elif ACT == ACT_TANH:
        return tanh_f32(z)
    else:
        return z


@triton.jit
def act_grad(z, ACT: tl.constexpr, slope):
    """d act / dz from the pre-activation ``z``."""
    if ACT == ACT_RELU:
        return tl.where(z > 0, 1.0, 0.0)
    elif ACT == ACT_LEAKY_RELU:
        return tl.where(z > 0, 1.0, slope)
    elif ACT == ACT_TANH:
        t = tanh_f32(z)
        return 1.0 - t * t
    else:
        return tl.full(z.shape, 1.0, tl.float32)


@triton.jit
def act_grad_from_output(a, ACT: tl.constexpr, slope):
    """d act / dz from the activation's output ``a`` (slope >= 0)."""
    if ACT == ACT_RELU:
        return tl.where(a > 0, 1.0, 0.0)
    elif ACT == ACT_LEAKY_RELU:
        return tl.where(a > 0, 1.0, slope)
    elif ACT == ACT_TANH:
        return 1.0 - a * a
    else:
        return tl.full(a.shape, 1.0, tl.float32)


@triton.jit
def dropout_keep(seed, offset, idx, p):
    """Keep-mask of dropout for int64 element indices ``idx`` (``i * N + j``).

    Key = (seed lo, seed hi); counter = (idx, offset lo, offset hi, 0); the first
    Philox 4x32-10 word becomes a float exactly as tl.rand does; keep iff u >= p.
    ``seed`` and ``offset`` are int64 scalars loaded from device tensors."""
    c0 = idx.to(tl.uint32)
    zero = c0 * 0
    c1 = zero + (offset & 0xFFFFFFFF).to(tl.uint32)
    c2 = zero + ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    r, _, _, _ = tl.philox(seed, c0, c1, c2, zero)
    u = tl.random.uint_to_uniform_float(r)
    return u >= p


@triton.jit
def element_index(offs_m, offs_n, N):
    """Row-major element index ``i * N + j`` in int64 (below 2**32 by validation)."""
    return offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]


@triton.jit
def div_ieee(x, y):
    """x / y rounded to nearest (IEEE), as torch divides: a GPU's fp32 "/" is an
    approximation. Scalars and blocks broadcast to each other."""
    zero = tl.zeros_like(x + y)
    return tl.div_rn(x + zero, y + zero)
