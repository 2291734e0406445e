"""Compile every Triton kernel for a GPU target without a GPU (ahead of time).

``python -m fastgan.kernels.aot [--all] [--arch 90 80] [--dtype bf16 fp32 fp16]``
lowers each kernel to PTX and runs ptxas (bundled with Triton) for sm_90 and
sm_80, so a CPU-only machine catches what the interpreter cannot: type errors
of the compiled language, unsupported ops, register/shared-memory blow-ups.
Must run with TRITON_INTERPRET unset (the test suite starts a subprocess).
By default one constexpr variant per kernel; ``--all`` compiles every
activation x dropout x mode variant.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("fastgan.kernels.aot needs TRITON_INTERPRET unset")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from . import gan_bce as GB
from . import linear_act as LA
from . import linear_bn_act as LBA
from . import matmul as MM


def compile_one(kernel, args: dict, constexprs: dict, arch: int, num_warps: int = 4,
                num_stages: int = 3, specialize_ones: bool = False):
    """Compile ``kernel`` (a JITFunction or an Autotuner around one) for sm_<arch>.
    ``args``: pointer args as type strings (``"*bf16"``), scalars as sample values.
    ``specialize_ones``: an int argument equal to 1 becomes a constexpr, as the JIT
    does at launch unless the parameter is listed in ``do_not_specialize`` (how a
    batch of one logit is compiled on a GPU)."""
    fn = kernel if isinstance(kernel, JITFunction) else kernel.fn
    sig, constexprs = {}, dict(constexprs)
    for param in fn.params:
        name = param.name
        v = args.get(name)
        if (specialize_ones and isinstance(v, int) and not isinstance(v, bool) and v == 1
                and not param.do_not_specialize):
            constexprs[name] = 1
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        sig[name] = v if isinstance(v, str) else "i32" if isinstance(v, int) else "fp32"
    return triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def jobs(dt: str = "*bf16"):
    """(kernel, args, constexprs) for every kernel and constexpr variant;
    ``dt`` is the pointer type of x, W, h, y and the gradients."""
    f, i = "*fp32", "*i64"
    rng = dict(seed_ptr=i, offset_ptr=i)
    drop = dict(slope=0.1, p=0.1, scale=1.0)
    gemm = dict(x_ptr=dt, w_ptr=dt, b_ptr=dt, M=1, N=1, K=1, stride_xm=1, stride_xk=1,
                stride_wn=1, stride_wk=1)
    bn = dict(gamma_ptr=f, beta_ptr=f, mean_ptr=f, rstd_ptr=f)
    running = dict(rm_ptr=f, rv_ptr=f, nbt_ptr=i, momentum=0.1, unbias=1.0, eps=1.0)
    bwd = dict(g_ptr=dt, h_ptr=dt, M=1, N=1, stride_gm=1, stride_gn=1, **bn, **rng, **drop)
    out = []
    for act in (0, 1, 2, 3):
        for has_dropout in (False, True):
            c = dict(ACT=act, HAS_DROPOUT=has_dropout)
            out.append((LA._fwd_kernel, dict(gemm, y_ptr=dt, **rng, **drop),
                        dict(c, HAS_BIAS=True, TF32=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)))
            for single in (False, True):
                out.append((LA._bwd_dz_kernel,
                            dict(g_ptr=dt, y_ptr=dt, dz_ptr=dt, part_ptr=f, db_ptr=dt, M=1, N=1,
                                 stride_gm=1, stride_gn=1, stride_ym=1, stride_yn=1, **rng,
                                 **drop),
                            dict(c, SINGLE=single, BLOCK_M=256 if single else 128,
                                 BLOCK_N=64)))
            for cumulative in (False, True):
                out.append((LBA._fwd_single_kernel,
                            dict(gemm, y_ptr=dt, h_ptr=dt, **bn, **running, **rng, **drop),
                            dict(c, HAS_BIAS=True, CUMULATIVE=cumulative, TF32=False, BLOCK_M=256,
                                 BLOCK_N=32, BLOCK_K=64)))
                out.append((LBA._fwd_apply_kernel,
                            dict(h_ptr=dt, psum_ptr=f, pm2_ptr=f, y_ptr=dt, M=1, N=1, R=1,
                                 STATS_M=1, **bn, **running, **rng, **drop),
                            dict(c, CUMULATIVE=cumulative, BLOCK_M=128, BLOCK_N=64)))
            out.append((LBA._fwd_eval_kernel,
                        dict(gemm, rm_ptr=f, rv_ptr=f, eps=1.0, y_ptr=dt, h_ptr=dt, **bn, **rng,
                             **drop),
                        dict(c, HAS_BIAS=False, TF32=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)))
            for training in (False, True):
                for single in (False, True):
                    out.append((LBA._bwd_kernel,
                                dict(bwd, pdbeta_ptr=f, pdgamma_ptr=f, dh_ptr=dt, db_ptr=dt,
                                     pdb_ptr=f, dgamma_ptr=f, dbeta_ptr=f, R=1),
                                dict(c, TRAINING=training, SINGLE=single,
                                     BLOCK_M=256 if single else 128, BLOCK_N=64)))
            out.append((LBA._bwd_reduce_kernel, dict(bwd, pdbeta_ptr=f, pdgamma_ptr=f),
                        dict(c, BLOCK_M=128, BLOCK_N=64)))
    out.append((LBA._fwd_stats_kernel, dict(gemm, h_ptr=dt, psum_ptr=f, pm2_ptr=f),
                dict(HAS_BIAS=True, TF32=False, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64)))
    out.append((MM._matmul_kernel,
                dict(a_ptr=dt, b_ptr=dt, c_ptr=dt, M=1, N=1, K=1, stride_am=1, stride_ak=1,
                     stride_bk=1, stride_bn=1, stride_cm=1, stride_cn=1),
                dict(TF32=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)))
    out.append((MM._col_sum_kernel, dict(part_ptr=f, out_ptr=dt, R=1, N=1), dict(BLOCK_N=128)))
    for has_b in (False, True):
        out.append((GB._gan_bce_kernel,
                    dict(a_ptr=dt, b_ptr=dt, grad_a_ptr=dt, grad_b_ptr=dt, loss_ptr=f,
                         prob_a_ptr=f, prob_b_ptr=f, n_a=1, n_b=1, target_a=1.0, target_b=0.0),
                    dict(HAS_B=has_b, BLOCK=1024)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32", "fp16"])
    ap.add_argument("--all", action="store_true", help="every constexpr variant, not one per kernel")
    a = ap.parse_args(argv)
    for arch in a.arch:
        for dt in a.dtype:
            todo = jobs("*" + dt)
            if not a.all:
                seen = set()
                todo = [j for j in todo if not (j[0] in seen or seen.add(j[0]))]
            t = time.time()
            for k, args, c in todo:
                try:
                    compile_one(k, args, c, arch)
                except Exception as e:
                    print(f"FAILED sm_{arch} {dt} {getattr(k, '__name__', k)} {c}: "
                          f"{type(e).__name__}: {e}", flush=True)
                    return 1
            print(f"sm_{arch} {dt}: {len(todo)} kernels compiled in {time.time() - t:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
