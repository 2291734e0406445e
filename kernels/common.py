"""``@triton.jit`` helpers shared by the fused kernels: the GEMM tile loop,
tile loads and stores, rounding to the storage dtype, the activations and their
derivatives, and the Philox dropout mask (bit-exact with ``fastgan.reference``).

Activation codes are those of ``fastgan.ops.spec.ACTIVATION_TABLE`` (read by
``code``): the kernels switch on them as constexprs, one case per table row in
``_activation``. Adding an activation: a row in the table, a case there (and one
in the C++ kernels' switch); a code without a case fails to compile.
"""
import triton
import triton.language as tl

from fastgan.ops.spec import ACTIVATIONS

from .runtime import INTERPRET

# The interpreter's bf16/fp16 arithmetic is wrong (it runs on the raw bits) and
# its fp32 -> bf16 conversion truncates; under it we upcast before tl.dot and
# round to bf16 by hand. On a GPU neither is needed.
_INTERPRET = tl.constexpr(INTERPRET)


@triton.constexpr_function
def code(name):
    """The table's integer code of activation ``name``, at compile time."""
    return ACTIVATIONS[name]


@triton.jit
def tile_offsets(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(row tile index, row offsets, column offsets) of this program's tile of a
    grid of (row tiles, column blocks)."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, offs_m, offs_n


@triton.jit
def matmul_tile(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                offs_m, offs_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, TF32: tl.constexpr):
    """fp32 tile ``A[offs_m, :] @ B[:, offs_n]`` of A (M, K) and B (K, N), any strides.

    Out-of-range rows/columns/depth are masked to zero, so the tile never reads
    past a tensor. fp32 inputs use IEEE fp32 products (the fp32 contract; on
    Hopper that runs on FMA units, not tensor cores) unless ``TF32``, the
    labelled opt-in (``runtime.tf32``): TF32 tensor-core products, as cuBLAS
    with TF32 allowed. The interpreter emulates TF32 by rounding the inputs."""
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
            bt = tl.load(b_ptrs_t, mask=n_ok_t & k_ok[None, :], other=0.0).to(tl.float32)
            af = a.to(tl.float32)
            if TF32:
                af = _round_tf32(af)
                bt = _round_tf32(bt)
            acc += tl.sum(af[:, None, :] * bt[None, :, :], axis=2)
            b_ptrs_t += BLOCK_K * stride_bk
        else:
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok, other=0.0)
            if TF32:
                acc = tl.dot(a, b, acc, input_precision="tf32")
            else:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            b_ptrs += BLOCK_K * stride_bk
        a_ptrs += BLOCK_K * stride_ak
    return acc


@triton.jit
def linear_tile(x_ptr, w_ptr, b_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                offs_m, offs_n, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TF32: tl.constexpr):
    """fp32 tile of ``x @ W.T + b`` for x (M, K), W (N, K), b (N,)."""
    # W.T as the (K, N) operand: swap W's strides.
    acc = matmul_tile(x_ptr, w_ptr, M, N, K, stride_xm, stride_xk, stride_wk, stride_wn,
                      offs_m, offs_n, BLOCK_M, BLOCK_N, BLOCK_K, TF32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _round_tf32(x):
    """fp32 -> fp32 holding the TF32 value (10 mantissa bits), rounded to
    nearest with ties away from zero as the GPU's cvt.rna.tf32 (interpreter only)."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


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


# What ``_activation`` returns for its argument ``v``.
_VALUE = tl.constexpr(0)             # act(z), from v = z
_GRAD = tl.constexpr(1)              # act'(z), from v = z
_GRAD_FROM_OUTPUT = tl.constexpr(2)  # act'(z), from v = act(z) (slope >= 0)


@triton.jit
def _activation(v, ACT: tl.constexpr, slope, PART: tl.constexpr):
    """One case per row of ``ACTIVATION_TABLE``; fp32 in, fp32 out."""
    if ACT == code("identity"):
        if PART == _VALUE:
            return v
        else:
            return tl.full(v.shape, 1.0, tl.float32)
    elif ACT == code("relu"):
        if PART == _VALUE:
            return tl.where(v > 0, v, 0.0)
        else:  # z > 0 exactly where relu(z) > 0
            return tl.where(v > 0, 1.0, 0.0)
    elif ACT == code("leaky_relu"):
        if PART == _VALUE:
            return tl.where(v > 0, v, v * slope)
        else:  # the sign survives a slope >= 0
            return tl.where(v > 0, 1.0, slope)
    elif ACT == code("tanh"):
        if PART == _VALUE:
            return tanh_f32(v)
        elif PART == _GRAD:
            t = tanh_f32(v)
            return 1.0 - t * t
        else:
            return 1.0 - v * v
    else:
        tl.static_assert(False, "activation code without a case in kernels/common.py")


@triton.jit
def act(z, ACT: tl.constexpr, slope):
    return _activation(z, ACT, slope, _VALUE)


@triton.jit
def act_grad(z, ACT: tl.constexpr, slope):
    """d act / dz from the pre-activation ``z``."""
    return _activation(z, ACT, slope, _GRAD)


@triton.jit
def act_grad_from_output(a, ACT: tl.constexpr, slope):
    """d act / dz from the activation's output ``a`` (slope >= 0)."""
    return _activation(a, ACT, slope, _GRAD_FROM_OUTPUT)


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
def drop(v, seed_ptr, offset_ptr, offs_m, offs_n, N, p, scale):
    """Inverted dropout of the (offs_m, offs_n) tile ``v`` of an (M, N) tensor:
    kept values times ``scale``, dropped ones 0; (seed, offset) are read from
    the device, so a CUDA graph replay sees their current values."""
    seed = tl.load(seed_ptr)
    offset = tl.load(offset_ptr)
    keep = dropout_keep(seed, offset, element_index(offs_m, offs_n, N), p)
    return tl.where(keep, v * scale, 0.0)


@triton.jit
def load_tile(ptr, offs_m, offs_n, stride_m, stride_n, mask):
    """The (offs_m, offs_n) tile of a strided 2-D tensor as fp32; 0 outside ``mask``."""
    return tl.load(ptr + offs_m[:, None] * stride_m + offs_n[None, :] * stride_n, mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def store_tile(ptr, x, offs_m, offs_n, N, mask):
    """Round fp32 ``x`` to the dtype of ``ptr`` and store it as the (offs_m,
    offs_n) tile of a contiguous (M, N) tensor; returns the rounded tile."""
    v = round_to(x, ptr.dtype.element_ty)
    tl.store(ptr + offs_m[:, None] * N + offs_n[None, :], v, mask=mask)
    return v


@triton.jit
def sum_partials(ptr, R, N, offs_n, n_ok, BLOCK_N: tl.constexpr):
    """fp32 ``sum_r ptr[r, offs_n]`` of a contiguous (R, N) fp32 buffer of
    per-row-tile partial sums, added in row-tile order."""
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r in range(0, R):
        acc += tl.load(ptr + r * N + offs_n, mask=n_ok, other=0.0)
    return acc


@triton.jit
def div_ieee(x, y):
    """x / y rounded to nearest (IEEE), as torch divides: a GPU's fp32 "/" is an
    approximation. Scalars and blocks broadcast to each other."""
    zero = tl.zeros_like(x + y)
    return tl.div_rn(x + zero, y + zero)
