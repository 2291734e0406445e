"""Builds the extension fastgan._C from csrc/.

* C++ CPU kernels (csrc/ops.cpp, csrc/cpu/*.cpp): always, unless FASTGAN_NO_EXT=1.
* CUDA kernels (csrc/cuda/*.cu): when FASTGAN_BUILD_CUDA=1, or when it is unset and
  torch has CUDA and nvcc is found. FASTGAN_BUILD_CUDA=0 turns them off.
  Architectures come from FASTGAN_CUDA_ARCHS (e.g. "8.0;9.0", the default) and
  are never queried from a GPU.
Build against the installed torch: pip install --no-build-isolation -e .
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_home():
    """A CUDA toolkit with nvcc and headers: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda,
    or the parent of the nvcc on PATH (which may be a wrapper script outside the
    toolkit, hence the header check); None if there is none."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in filter(None, candidates):
        if (os.path.exists(os.path.join(home, "bin", "nvcc"))
                and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))):
            return home
    return None


def _want_cuda(torch_cuda_version):
    """FASTGAN_BUILD_CUDA=1 / 0 forces the CUDA kernels on / off; unset (or empty),
    they are built when torch has CUDA and a CUDA toolkit is found."""
    flag = os.environ.get("FASTGAN_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise ValueError(f"FASTGAN_BUILD_CUDA must be 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return False
    has_toolkit = torch_cuda_version is not None and _cuda_home() is not None
    if flag == "1" and not has_toolkit:
        raise RuntimeError("FASTGAN_BUILD_CUDA=1 needs a CUDA build of torch and a CUDA toolkit "
                           f"(nvcc and headers; set CUDA_HOME): torch.version.cuda="
                           f"{torch_cuda_version}, toolkit={_cuda_home()}")
    return has_toolkit


def _extensions():
    if os.environ.get("FASTGAN_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    # C++20: recent torch headers require it. -fopenmp: at::parallel_for is an inline
    # "#pragma omp parallel", and the library links the libgomp.so.1 torch already loaded.
    # -ffp-contract=off: a * b + c rounds twice, as in the eager reference (no silent FMA
    # contraction in the epilogues). -fno-math-errno: sqrt and friends inline and
    # vectorize instead of calling libm for errno (nothing reads errno; the values
    # are the same IEEE results). -fno-trapping-math: without it GCC will not turn a
    # compare-and-select (leaky_relu, the dropout mask) into vector blends, since the
    # compare may raise an FP exception flag; only the AVX-512 clones, which have
    # masked ops, vectorized, and the AVX2 ones ran a branch per element (leaky_relu
    # over a 64 x 1024 tile: 0.14 ms against ATen's 0.01 on a Zen 3). Nothing reads the
    # flags, and the values are the same IEEE results.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
           "-fno-trapping-math",
           "-Wno-unknown-pragmas", "-DFASTGAN_WITH_OPENMP"]
    kwargs = dict(name="fastgan._C", sources=sources, extra_link_args=["-fopenmp"],
                  include_dirs=[os.path.join(ROOT, "csrc")], py_limited_api=False)
    if _want_cuda(torch.version.cuda):
        # torch guesses the toolkit from the nvcc on PATH; point it at the real one.
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = _cuda_home()
        archs = os.environ.get("FASTGAN_CUDA_ARCHS", "8.0;9.0")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # torch reads it; never a GPU query
        kwargs["sources"] = sources + _rel("csrc/cuda/*.cu")  # one file per op: parallel builds
        kwargs["extra_compile_args"] = {
            "cxx": cxx + ["-DFASTGAN_WITH_CUDA"],
            # No --use_fast_math and no FMA contraction: the epilogues are memory
            # bound, and exact expf/log1pf/tanhf plus twice-rounded a * b + c keep
            # them at round-off distance from the eager reference.
            "nvcc": ["-O3", "-std=c++20", "-fmad=false", "-lineinfo", "-DFASTGAN_WITH_CUDA",
                     "--expt-relaxed-constexpr"],
        }
        ext = cpp_extension.CUDAExtension(**kwargs)
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext = cpp_extension.CppExtension(**kwargs)
    build = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
