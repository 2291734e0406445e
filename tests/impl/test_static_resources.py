"""Static GPU checks without a GPU: every kernel's registers, spills, shared
memory and threads per block against the hardware limits of sm_90 and sm_80,
and the CUDA launch limits on the emulator.

* Triton: ``python -m fastgan.kernels.resources`` (every kernel x autotune
  config x dtype, compiled ahead of time; the full table is kept in
  bench/results/issue15-triton-resources.md). Here: the plan covers every
  config of every kernel, the limits are enforced, and a batch of one
  compiles (the JIT turns an int argument equal to 1 into a constexpr).
* CUDA: ptxas's own report (``-Xptxas -v``) for every ``__global__`` kernel of
  csrc/cuda, for sm_90 and sm_80, in a copy of the tree; and the built
  extension's device code when it has some (``cuobjdump --dump-resource-usage``).

``FASTGAN_RESOURCES_OUT=DIR`` writes the CUDA table there.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
MAX_REGS, MAX_THREADS = 255, 1024


def _no_interpreter_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _triton_subprocess(code: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``code`` in a Python without TRITON_INTERPRET (the AOT path needs the compiler)."""
    pytest.importorskip("triton")
    return subprocess.run([sys.executable, "-c", code], env=_no_interpreter_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------ Triton
def test_triton_plan_covers_every_config_and_enforces_the_limits():
    r = _triton_subprocess("""
from fastgan.kernels import aot, resources as R
from fastgan.kernels import configs as C
dtypes = ["fp32", "bf16", "fp16", "tf32"]
todo = R.plan([90, 80], dtypes)
jobs = aot.jobs("*bf16")
kernels = {R._name(k) for k, _, _ in jobs}
seen = {}
for arch, dt, j, ci, ones, height, tf32 in todo:
    assert dt in ("fp32", "bf16", "fp16") and (dt == "fp32" or not tf32)
    seen.setdefault((j, arch, "tf32" if tf32 else dt, ones), set()).add(ci)
    k, _, c = jobs[j]
    if height is not None:  # launcher-chosen tile height: the tallest the pruner admits
        cfg = R._configs(k, arch, dt, tf32)[ci]
        assert C.admits(cfg, f"sm{arch}", R._cls(dt, tf32), height)
        assert height == c["BLOCK_M"] or not C.admits(cfg, f"sm{arch}", R._cls(dt, tf32),
                                                     2 * height)
for j, (k, _, c) in enumerate(jobs):
    if c.get("ACT", R.WORST_ACT) != R.WORST_ACT or c.get("HAS_DROPOUT", True) is not True:
        continue  # the plan compiles the costliest variant
    for arch in (90, 80):
        for dt in dtypes if "TF32" in c else dtypes[:3]:  # tf32: the GEMM kernels only
            real = "fp32" if dt == "tf32" else dt
            cfgs = R._configs(k, arch, real, dt == "tf32")
            want = {None} if cfgs == [None] else {
                i for i, cfg in enumerate(cfgs) if "BLOCK_M" in cfg.kwargs
                or R._height(cfg, arch, real, dt == "tf32", c["BLOCK_M"]) is not None}
            assert seen[(j, arch, dt, False)] == want, (R._name(k), arch, dt)
        assert (j, arch, "fp32", True) in seen
# each arch, and IEEE fp32 apart from the tensor-core dtypes, compiles its own list
mm = [k for k, _, _ in jobs if R._name(k) == "_matmul_kernel"][0]
assert R._configs(mm, 90) != R._configs(mm, 80) != R._configs(mm, 80, "fp32")
tf, bf = R._configs(mm, 90, "fp32", True), R._configs(mm, 90, "bf16")  # TF32: half the depth
assert [c.kwargs["BLOCK_K"] for c in tf] == [max(16, c.kwargs["BLOCK_K"] // 2) for c in bf]
assert R.SPILL_ALLOWANCE == {}  # every compile is spill-free: nothing is excused
ok = dict(kernel="k", arch="sm_80", regs=255, spill_bytes=0, smem=163 * 1024, threads=1024)
assert R.violations(ok) == []
for bad, what in ((dict(regs=256), "registers"), (dict(spill_bytes=8), "spills"),
                  (dict(smem=163 * 1024 + 1), "shared"), (dict(threads=2048), "threads"),
                  (dict(error="CompilationError: x"), "compile")):
    v = R.violations(dict(ok, **bad))
    assert len(v) == 1 and what in v[0], v
spill = dict(ok, spill_bytes=8)
assert R.fatal(spill, True) and not R.fatal(spill, False)  # spills: findings unless asked
assert R.fatal(dict(ok, regs=256), False)                   # hard limits always fail
print("ok", len(todo), len(kernels))
""")
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr


@pytest.mark.slow
def test_triton_batch_of_one_compiles_for_sm90():
    """gan_bce with one logit and the BN kernels at M == 1: the JIT makes an int
    argument equal to 1 a constexpr unless it is in ``do_not_specialize``."""
    r = _triton_subprocess("""
from fastgan.kernels import aot, resources as R
todo = [e for e in R.plan([90], ["bf16"]) if e[4]]
names = []
for e in todo:
    row = R.run_one(e)
    assert "error" not in row, row
    assert R.violations(row) == [], (row, R.violations(row))
    names.append(row["kernel"])
assert "_gan_bce_kernel" in names and "_fwd_single_kernel" in names, names
print("ok", len(todo))
""")
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout[-3000:] + r.stderr[-3000:]


# -------------------------------------------------------------------------- CUDA
_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def parse_ptxas(text: str) -> list[dict]:
    """One row per (kernel, arch) from ``ptxas -v``'s report."""
    rows, cur = [], None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            cur = dict(kernel=m.group(1), arch=m.group(2), stack=0, spills=0, regs=None, smem=0)
            rows.append(cur)
        elif cur is not None and (m := _PROPS.search(line)):
            cur["stack"], cur["spills"] = int(m.group(1)), int(m.group(2)) + int(m.group(3))
        elif cur is not None and (m := _USED.search(line)):
            cur["regs"], cur["smem"] = int(m.group(1)), int(m.group(2) or 0)
    return rows


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return list(names)
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    return out.stdout.splitlines()


def cuda_violations(row: dict) -> list[str]:
    arch = int(row["arch"][3:])
    out = []
    if row["regs"] is None or row["regs"] > MAX_REGS:
        out.append(f"registers {row['regs']}")
    if row["spills"] or row["stack"]:
        out.append(f"spills {row['spills']} B, stack {row['stack']} B")
    if row["smem"] > SMEM_LIMIT[arch]:
        out.append(f"shared memory {row['smem']} B")
    return out


def _global_kernels() -> set[str]:
    names = set()
    for f in (ROOT / "csrc/cuda").glob("*.cu"):
        text = f.read_text()
        for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", text):
            names.add(m.group(1))
    return names


def test_parse_ptxas_report():
    text = """ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'
ptxas info    : Function properties for _Z1kPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z1gPf' for 'sm_80'
ptxas info    : Function properties for _Z1gPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, 380 bytes cmem[0]
"""
    a, b = parse_ptxas(text)
    assert a == dict(kernel="_Z1kPf", arch="sm_90", stack=8, spills=8, regs=40, smem=2048)
    assert b == dict(kernel="_Z1gPf", arch="sm_80", stack=0, spills=0, regs=12, smem=0)
    assert cuda_violations(a) and not cuda_violations(b)
    assert cuda_violations(dict(b, smem=163 * 1024 + 1))


def _nvcc():
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc"
                                    if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None or torch.version.cuda is None:
        pytest.skip("needs nvcc and a CUDA build of torch")
    return nvcc


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_cuda_kernels_within_limits_for_sm90_and_sm80(tmp_path):
    """ptxas -v for every .cu of csrc/cuda (the setup.py flags), sm_90 and sm_80:
    every __global__ kernel, every dtype instantiation, within 255 registers, no
    spills or stack, shared memory within the arch's limit."""
    nvcc = _nvcc()
    from torch.utils import cpp_extension
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    cuda_home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    inc = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{cuda_home}/include",
                                                                f"-I{tmp_path / 'csrc'}"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)

    def build(cu: Path) -> str:
        cmd = [nvcc, "-c", str(cu), "-o", str(tmp_path / (cu.stem + ".o")), *inc, "-std=c++20",
               "-O3", "-fmad=false", "--expt-relaxed-constexpr", "-DFASTGAN_WITH_CUDA",
               f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-Xcompiler", "-fPIC", "-Xptxas", "-v",
               "-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_80,code=sm_80"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]
        return r.stdout + r.stderr

    sources = sorted((tmp_path / "csrc/cuda").glob("*.cu"))
    with ThreadPoolExecutor(int(os.environ.get("MAX_JOBS", "2"))) as pool:
        rows = [r for text in pool.map(build, sources) for r in parse_ptxas(text)]
    names = _demangle([r["kernel"] for r in rows])
    for r, n in zip(rows, names):
        r["name"] = n
    for arch in ("sm_90", "sm_80"):
        got = {k for k in _global_kernels() if any(k in r["name"] and r["arch"] == arch
                                                   for r in rows)}
        assert got == _global_kernels(), (arch, _global_kernels() - got)
    bad = [(r["name"], r["arch"], v) for r in rows for v in cuda_violations(r)]
    out = os.environ.get("FASTGAN_RESOURCES_OUT")
    if out:
        lines = ["| kernel | arch | regs | spill B | stack B | smem B | verdict |",
                 "|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["name"], r["arch"])):
            lines.append(f"| `{r['name']}` | {r['arch']} | {r['regs']} | {r['spills']} | "
                         f"{r['stack']} | {r['smem']} | {'; '.join(cuda_violations(r)) or 'ok'} |")
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "issue15-cuda-resources.md").write_text(
            "# CUDA kernels: ptxas -v per kernel (nvcc " + subprocess.run(
                [nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
            + ", setup.py flags)\n\n" + "\n".join(lines) + "\n")
    assert not bad, bad


def test_cuda_resources_of_the_built_extension():
    """The installed fastgan._C's device code (CI builds it with nvcc for sm_90):
    cuobjdump's per-kernel resource usage within the limits."""
    import fastgan
    so = sorted(Path(fastgan.__file__).parent.glob("_C*.so"))
    triton = pytest.importorskip("triton")
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    if not so or not tool.exists():
        pytest.skip("no built extension or no cuobjdump")
    r = subprocess.run([str(tool), "--dump-resource-usage", str(so[0])], capture_output=True,
                       text=True)
    if "does not contain device code" in r.stdout + r.stderr:
        if os.environ.get("FASTGAN_EXPECT_CUDA_BUILD") == "1":
            pytest.fail("FASTGAN_EXPECT_CUDA_BUILD=1 but fastgan._C has no device code")
        pytest.skip("fastgan._C was built without the CUDA kernels")
    assert r.returncode == 0, r.stderr
    arch, rows = None, []
    for line in r.stdout.splitlines():
        if m := re.search(r"arch = (sm_\d+)", line):
            arch = m.group(1)
        if m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line):
            reg, stack, shared, local = map(int, m.groups())
            rows.append(dict(kernel=line, arch=arch or "sm_90", regs=reg, stack=stack,
                             spills=local, smem=shared))
    assert rows, r.stdout[:2000]
    bad = [(r["arch"], v) for r in rows for v in cuda_violations(r)]
    assert not bad, bad


# ------------------------------------------------------- CUDA launch limits, emulated
@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    """The host-side grid formulas of csrc/cuda/common.cuh and the emulator's
    launch, compiled as C++ (FASTGAN_CUDA_EMULATE)."""
    from torch.utils import cpp_extension
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    build = tmp_path_factory.mktemp("cuda_grids")
    src = build / "grids.cpp"
    src.write_text("""#define FASTGAN_CUDA_EMULATE
#include "cuda/common.cuh"
namespace fastgan { namespace cuda {
__global__ void noop_kernel(int) {}
std::vector<int64_t> column(int64_t n) { dim3 g = column_grid(n), b = column_block();
  return {g.x, g.y, g.z, b.x, b.y, b.z}; }
std::vector<int64_t> elementwise(int64_t numel) { dim3 g = elementwise_grid(numel);
  return {g.x, g.y, g.z, kThreads}; }
std::vector<int64_t> chunks(int64_t b, int64_t n) {  // the GPU build's row chunking
  set_row_chunking(kGpuChunkTargetBlocks, kGpuChunkMinRows);
  const RowChunks c = row_chunks(b, n);
  const dim3 g = column_grid(n, c);
  set_row_chunking(1, int64_t(1) << 40);
  return {c.count, c.rows, g.x, g.y, g.z}; }
void try_launch(int64_t gx, int64_t gy, int64_t gz, int64_t bx, int64_t by, int64_t bz) {
  launch(noop_kernel, dim3(gx, gy, gz), dim3(bx, by, bz), current_stream(), 0); }
}}
TORCH_LIBRARY(fastgan_grids, m) {
  m.def("column", &fastgan::cuda::column);
  m.def("elementwise", &fastgan::cuda::elementwise);
  m.def("chunks", &fastgan::cuda::chunks);
  m.def("try_launch", &fastgan::cuda::try_launch);
}
""")
    cpp_extension.load(name="fastgan_grids", sources=[str(src)],
                       extra_include_paths=[str(ROOT / "csrc")], extra_cflags=["-O1", "-std=c++20"],
                       build_directory=str(build), is_python_module=False)
    return torch.ops.fastgan_grids


@pytest.mark.slow
def test_emulated_launch_refuses_what_the_gpu_refuses(grids):
    grids.try_launch(2, 3, 1, 32, 2, 1)  # fine: 6 blocks of 64 threads
    for bad in [(1, 65536, 1, 1, 1, 1), (1, 1, 65536, 1, 1, 1), (1, 1, 1, 1025, 1, 1),
                (1, 1, 1, 64, 32, 1), (1, 1, 1, 1, 1, 65), (0, 1, 1, 1, 1, 1)]:
        with pytest.raises((RuntimeError, ValueError), match="exceeds the CUDA launch limits"):
            grids.try_launch(*bad)


@pytest.mark.slow
def test_grids_of_the_largest_accepted_shapes(grids):
    """The ops accept batch * features < 2**31 (fastgan/ops/checks.py; the loops
    below go further) with any feature count up to that: the column-tile grid and
    the elementwise grid stay within grid.x < 2**31, grid.y = grid.z = 1, threads
    <= 1024 (the launch helper of the emulator checks the same limits on every
    emulated test)."""
    for n in (1, 31, 32, 33, 2**16, 2**31 - 1, 2**32 - 1):
        gx, gy, gz, bx, by, bz = grids.column(n)
        assert 1 <= gx < 2**31 and gy == gz == 1 and bx * by * bz <= MAX_THREADS, (n, gx)
        assert gx * bx >= n  # every column has a thread
    for numel in (1, 255, 256, 2**31, 2**32 - 1):
        gx, gy, gz, threads = grids.elementwise(numel)
        assert 1 <= gx < 2**31 and gy == gz == 1 and threads <= MAX_THREADS



@pytest.mark.slow
def test_row_chunks_of_the_gpu_build(grids):
    """The column-tile kernels' row chunks (grid.y) as the GPU build computes
    them: within grid.y <= 65535 for every accepted shape, no empty chunk, every
    row in one, at least 256 rows a chunk, and enough blocks to fill 132 SMs
    twice where the batch allows; one chunk (the single-pass kernels) otherwise."""
    for b in (1, 2, 3, 255, 256, 511, 512, 1000, 1024, 16384, 65536, 2**20 + 3, 2**31 - 1):
        for n in (1, 3, 31, 32, 33, 64, 100, 256, 784, 1024, 8448, 2**16):
            if b * n >= 2**31 and n > 1:
                continue
            count, rows, gx, gy, gz = grids.chunks(b, n)
            assert gy == count and gz == 1 and 1 <= count <= 65535, (b, n, count)
            assert (count - 1) * rows < b <= count * rows, (b, n, count, rows)
            assert count == 1 or rows >= 256, (b, n, rows)
            if count > 1:
                assert gx * (count - 1) < 264, (b, n, gx, count)  # no more chunks than needed
            if b >= 256 * 264 and gx < 264:
                assert gx * count >= 264, (b, n, gx, count)  # a big batch fills the GPU
    assert grids.chunks(16384, 64)[0] == 64 and grids.chunks(16384, 1024)[0] == 9
    assert grids.chunks(100, 3)[0] == 1 and grids.chunks(16384, 8448)[0] == 1
