"""gan_bce: the GAN's BCE-with-logits losses, loss and gradient in one kernel.

A single program walks both logit vectors (a GAN has one logit per sample, so
thousands at most): per element the stable softplus form of the loss, the
sigmoid, and the gradient (sigmoid - target) / n, stored at once; the loss
and the mean D(x), D(G(z)) are reduced in registers and divided by n on the
device. One launch, deterministic, no atomics, no host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs, guards, runtime
from .common import div_ieee, round_to


@triton.jit
def _log1p(e):
    # log(1 + e) accurate for tiny e (Goldberg): u - 1 is exact, the ratio fixes
    # the rounding of u; for u == 1 the answer is e itself.
    u = 1.0 + e
    d = u - 1.0
    return tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _bce_pass(z_ptr, grad_ptr, n, target, BLOCK: tl.constexpr):
    """(mean loss, mean sigmoid) of logits z against ``target``; stores the gradient."""
    nf = n.to(tl.float32)  # IEEE divisions (a GPU's "/" is approximate), as the reference
    loss = tl.zeros((BLOCK,), dtype=tl.float32)
    prob = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < n
        z = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        e = tl.exp(-tl.abs(z))  # in (0, 1]: never overflows
        # An infinite logit would give inf - inf = nan below; its limit is (1 - t) * inf
        # for +inf and t * inf for -inf: inf, or 0 where the target matches it.
        big = tl.abs(z) == float("inf")
        zf = tl.where(big, 0.0, z)
        term = tl.maximum(zf, 0.0) - zf * target + _log1p(e)
        limit = tl.where(z > 0, tl.where(target < 1.0, float("inf"), 0.0),
                         tl.where(target > 0.0, float("inf"), 0.0))
        term = tl.where(big, limit, term)
        sig = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        loss += tl.where(ok, term, 0.0)
        prob += tl.where(ok, sig, 0.0)
        grad = div_ieee(sig - target, nf)
        tl.store(grad_ptr + offs, round_to(grad, grad_ptr.dtype.element_ty), mask=ok)
    return div_ieee(tl.sum(loss, axis=0), nf), div_ieee(tl.sum(prob, axis=0), nf)


# n_a, n_b: a batch of one logit would make them constexprs (Triton specializes ints
# equal to 1), and n.to() in _bce_pass fails on a constexpr.
@triton.jit(do_not_specialize=["n_a", "n_b"])
def _gan_bce_kernel(a_ptr, b_ptr, grad_a_ptr, grad_b_ptr, loss_ptr, prob_a_ptr, prob_b_ptr,
                    n_a, n_b, target_a, target_b, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    loss, prob_a = _bce_pass(a_ptr, grad_a_ptr, n_a, target_a, BLOCK)
    prob_b = 0.0
    if HAS_B:
        loss_b, prob_b = _bce_pass(b_ptr, grad_b_ptr, n_b, target_b, BLOCK)
        loss += loss_b
    tl.store(loss_ptr, loss)
    tl.store(prob_a_ptr, prob_a)
    tl.store(prob_b_ptr, prob_b)


def forward(logits_a, logits_b, target_a, target_b):
    # gan_bce_g passes the fake logits alone, as logits_a
    guards.operands(**(dict(fake_logits=logits_a) if logits_b is None
                       else dict(real_logits=logits_a, fake_logits=logits_b)))
    # the kernel walks the logits as flat vectors
    a = logits_a.contiguous()
    b = a if logits_b is None else logits_b.contiguous()
    dev = a.device
    loss, prob_a, prob_b = (torch.empty((), dtype=torch.float32, device=dev) for _ in range(3))
    grad_a = torch.empty_like(a)
    grad_b = a.new_empty(0) if logits_b is None else torch.empty_like(b)
    runtime.launch("gan_bce", _gan_bce_kernel, (1,), a, b, grad_a,
                   grad_a if logits_b is None else grad_b, loss, prob_a, prob_b,
                   a.numel(), b.numel(), float(target_a), float(target_b),
                   HAS_B=logits_b is not None, BLOCK=configs.BCE_BLOCK, num_warps=configs.BCE_WARPS)
    return loss, prob_a, prob_b, grad_a, grad_b
