"""Static resource check of every Triton kernel for sm_90 and sm_80, no GPU.

``python -m fastgan.kernels.resources [--arch 90 80] [--dtype fp32 bf16 fp16 tf32]
[--out TABLE.md] [--jobs N] [--fail-on-spills]`` compiles, through the AOT path of
``fastgan.kernels.aot``, every kernel x every autotune config of that
architecture x dtype ("tf32": fp32 with the TF32 opt-in, whose GEMMs use the
tensor-core config rows), reads each compiled kernel back (shared memory from
Triton's metadata plus the cubin's static shared memory; registers, stack and
local memory from the bundled ``cuobjdump --dump-resource-usage``: spilled
registers live in the stack frame / local memory) and checks them against the
hardware:

- shared memory per block within the opt-in limit (227 KB sm_90, 163 KB sm_80),
- at most 255 registers per thread,
- no spills, unless ``SPILL_ALLOWANCE`` names the kernel and says why (a
  finding; fatal with ``--fail-on-spills``),
- ``num_warps * 32 <= 1024`` threads per block.

Activation and dropout are fixed at the costliest variant (tanh + dropout:
the most live values); ``python -m fastgan.kernels.aot --all`` compiles the
others. Where the launcher chooses the tile height (single-tile kernels: the
batch, up to 256 rows; multi-tile passes: 128), each config is compiled at the
tallest height the pruner of ``configs.py`` lets it run at: registers only
grow with the height. A second pass compiles every kernel as the JIT does for a batch of one
(int arguments equal to 1 turn into constexprs unless ``do_not_specialize``).
Compiles are cached by Triton (``TRITON_CACHE_DIR``), so a rerun only reads.
Must run with TRITON_INTERPRET unset. Exit status 1 on a hard violation (or
any, with ``--fail-on-spills``).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("fastgan.kernels.resources needs TRITON_INTERPRET unset")

import triton
from triton.runtime.jit import JITFunction

from . import aot
from . import configs as C

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # opt-in max dynamic shared memory per block
MAX_REGS = 255
MAX_THREADS = 1024
# kernel name -> why its spills are acceptable (none is: every config of every
# kernel compiles without spills for sm_90 and sm_80 in fp32, bf16, fp16, tf32;
# see kernels/configs.py for how the tiles were sized). ``--fail-on-spills``
# (CI) fails on any spill not listed here.
SPILL_ALLOWANCE: dict[str, str] = {}
# num_warps of the launches that are not autotuned (the launchers' defaults)
LAUNCH_WARPS = {"_gan_bce_kernel": C.BCE_WARPS, "_col_sum_kernel": 4}
WORST_ACT, WORST_DROPOUT = 3, True  # tanh + dropout: the most live values per element

_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _name(kernel) -> str:
    return (kernel if isinstance(kernel, JITFunction) else kernel.fn).__name__


def _cls(dt: str, tf32: bool = False) -> str:
    if dt != "fp32":
        return "mma"
    return "tf32" if tf32 else "fp32"


def _configs(kernel, arch: int, dt: str = "bf16", tf32: bool = False):
    """The autotune configs of ``kernel`` that run on sm_<arch> for dtype ``dt``
    at some tile height (None: not autotuned)."""
    cfgs = getattr(kernel, "configs", None)
    if cfgs is None:
        return [None]
    return [c for c in cfgs if C._TAG_OF_CONFIG[id(c)][:2] == (f"sm{arch}", _cls(dt, tf32))]


def _height(cfg, arch: int, dt: str, tf32: bool, block_m: int) -> int | None:
    """The tallest launcher tile height (``block_m`` halved down to 16) at which
    the pruner admits ``cfg`` (None: at none): registers grow with the height, so
    that one is the compile to check. ``block_m``: the launcher's tallest height."""
    h = block_m
    while h >= 16:
        if C.admits(cfg, f"sm{arch}", _cls(dt, tf32), h):
            return h
        h //= 2
    return None


def plan(archs, dtypes):
    """One entry per compile: (arch, dtype, job index, config index or None, ones,
    tile height or None, tf32). Dtype "tf32": fp32 with the TF32 opt-in."""
    out = []
    for label in dtypes:
        tf = label == "tf32"
        dt = "fp32" if tf else label
        todo = aot.jobs("*" + dt)
        for j, (k, _, c) in enumerate(todo):
            if c.get("ACT", WORST_ACT) != WORST_ACT or c.get("HAS_DROPOUT", WORST_DROPOUT) != WORST_DROPOUT:
                continue
            if tf and "TF32" not in c:  # no GEMM: the opt-in changes nothing (the fp32 rows)
                continue
            for arch in archs:
                cfgs = _configs(k, arch, dt, tf)
                for ci, cfg in enumerate(cfgs):
                    h = None
                    if cfg is not None and "BLOCK_M" not in cfg.kwargs:
                        h = _height(cfg, arch, dt, tf, c["BLOCK_M"])
                        if h is None:  # never runs for this kernel's heights
                            continue
                    out.append((arch, dt, j, None if cfg is None else ci, False, h, tf))
                if label == dtypes[0]:  # batch of one: the first config of each kernel suffices
                    out.append((arch, dt, j, None if cfgs == [None] else 0, True, None, tf))
    return out


def _usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage: {text!r}")
    reg, stack, shared, local = map(int, m.groups())
    return dict(regs=reg, stack=stack, static_smem=shared, local=local)


def run_one(entry) -> dict:
    arch, dt, j, ci, ones, height, tf32 = entry
    kernel, args, consts = aot.jobs("*" + dt)[j]
    name = _name(kernel)
    warps, stages = LAUNCH_WARPS.get(name, 4), 3
    consts = dict(consts)
    if ci is not None:
        cfg = _configs(kernel, arch, dt, tf32)[ci]
        consts.update(cfg.kwargs)
        if height is not None:
            consts["BLOCK_M"] = height
        warps, stages = cfg.num_warps, cfg.num_stages
    variant = {k: v for k, v in consts.items()
               if not k.startswith("BLOCK") and k not in ("ACT", "HAS_DROPOUT", "TF32")}
    if "TF32" in consts:
        consts["TF32"] = tf32
    row = dict(kernel=name, arch=f"sm_{arch}", dtype="tf32" if tf32 else dt, batch_of_one=ones,
               variant=",".join(f"{k}={int(v)}" for k, v in variant.items()),
               config=",".join(f"{k[6:] or k}{v}" for k, v in consts.items() if k.startswith("BLOCK")),
               num_warps=warps, num_stages=stages, threads=warps * 32)
    t = time.time()
    try:
        ck = aot.compile_one(kernel, args, consts, arch, warps, stages, specialize_ones=ones)
    except Exception as e:  # a compile failure is a finding, reported in the table
        row.update(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
        return row
    use = _usage(ck.asm["cubin"])
    row.update(regs=use["regs"], spill_bytes=use["stack"] + use["local"],
               smem=ck.metadata.shared + use["static_smem"], seconds=round(time.time() - t, 2))
    return row


def violations(row: dict) -> list[str]:
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    out = []
    arch = int(row["arch"][3:])
    if row["smem"] > SMEM_LIMIT[arch]:
        out.append(f"shared memory {row['smem']} B > {SMEM_LIMIT[arch]} B")
    if row["regs"] > MAX_REGS:
        out.append(f"{row['regs']} registers > {MAX_REGS}")
    if row["spill_bytes"] and row["kernel"] not in SPILL_ALLOWANCE:
        out.append(f"spills {row['spill_bytes']} B (no allowance)")
    if row["threads"] > MAX_THREADS:
        out.append(f"{row['threads']} threads > {MAX_THREADS}")
    return out


def _note(row: dict) -> str:
    """Verdict of a row within the limits: ok, or the listed reason for its spills."""
    return SPILL_ALLOWANCE.get(row["kernel"], "ok") if row.get("spill_bytes") else "ok"


def fatal(row: dict, fail_on_spills: bool) -> list[str]:
    """The violations that fail the run: all with ``fail_on_spills``, else the
    hard limits only."""
    return [v for v in violations(row) if fail_on_spills or not v.startswith("spills")]


def table(rows: list[dict]) -> str:
    head = ("| kernel | variant | arch | dtype | b=1 | config | warps | stages | regs | spill B "
            "| smem B | verdict |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        bad = violations(r)
        lines.append("| " + " | ".join(str(x) for x in (
            r["kernel"], r["variant"] or "-", r["arch"], r["dtype"], "yes" if r["batch_of_one"] else "",
            r["config"] or "-", r["num_warps"], r["num_stages"], r.get("regs", "-"),
            r.get("spill_bytes", "-"), r.get("smem", "-"), "; ".join(bad) or _note(r))) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SMEM_LIMIT))
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16", "fp16", "tf32"],
                    choices=["fp32", "bf16", "fp16", "tf32"],
                    help="tf32: fp32 with the TF32 opt-in (tensor-core tl.dot)")
    ap.add_argument("--out", help="write the table (markdown) here, and the rows as JSON beside it")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--fail-on-spills", action="store_true",
                    help="exit 1 on any spill outside SPILL_ALLOWANCE (default: hard limits only)")
    a = ap.parse_args(argv)
    t0 = time.time()
    todo = plan(a.arch, a.dtype)
    # fork: the workers inherit the imported kernels (nothing here touches CUDA)
    ctx = multiprocessing.get_context("fork")
    rows = []
    with cf.ProcessPoolExecutor(a.jobs, mp_context=ctx) as pool:
        for row in pool.map(run_one, todo):
            rows.append(row)  # one line per compile as it lands: a cut-off run still tells
            print(f"[{len(rows)}/{len(todo)}] {row['kernel']} {row['variant']} {row['arch']} "
                  f"{row['dtype']} {row['config']} regs={row.get('regs')} "
                  f"smem={row.get('smem')} {'; '.join(violations(row)) or 'ok'}", flush=True)
    rows.sort(key=lambda r: (r["kernel"], r["variant"], r["arch"], r["dtype"], r["batch_of_one"],
                             r["config"]))
    text = table(rows)
    bad = [(r, v) for r in rows for v in violations(r)]
    wall = time.time() - t0
    summary = (f"{len(rows)} compiles ({len({r['kernel'] for r in rows})} kernels, archs "
               f"{a.arch}, dtypes {a.dtype}) in {wall:.0f} s with {a.jobs} workers; "
               f"{len(bad)} violations; "
               f"{sum(1 for r in rows if r.get('spill_bytes'))} compiles spill; "
               f"max regs {max(r.get('regs', 0) for r in rows)}, "
               f"max smem {max(r.get('smem', 0) for r in rows)} B")
    print(text)
    print(summary)
    for r, v in bad:
        print(f"VIOLATION {r['kernel']} {r['variant']} {r['arch']} {r['dtype']} {r['config']}: {v}")
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"# Triton kernels: static resources per compile\n\n"
                    f"`python -m fastgan.kernels.resources --out {a.out}` (Triton {triton.__version__}, "
                    f"no GPU: PTX + bundled ptxas, read back with cuobjdump).\n\n"
                    f"{summary}\n\n{text}\n")
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump(dict(summary=summary, rows=rows), f, indent=1)
    return 1 if any(fatal(r, a.fail_on_spills) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
