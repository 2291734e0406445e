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


def _want_cuda(torch_cuda_version):
    flag = os.environ.get("FASTGAN_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    return torch_cuda_version is not None and shutil.which("nvcc") is not None or (
        torch_cuda_version is not None and os.path.exists("/usr/local/cuda/bin/nvcc"))


def _extensions():
    if os.environ.get("FASTGAN_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-DFASTGAN_WITH_OPENMP"]
    kwargs = dict(name="fastgan._C", sources=sources, extra_link_args=["-fopenmp"],
                  include_dirs=[os.path.join(ROOT, "csrc")], py_limited_api=False)
    if _want_cuda(torch.version.cuda):
        archs = os.environ.get("FASTGAN_CUDA_ARCHS", "8.0;9.0")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # torch reads it; never a GPU query
        kwargs["sources"] = sources + _rel("csrc/cuda/*.cu")
        kwargs["extra_compile_args"] = {
            "cxx": cxx + ["-DFASTGAN_WITH_CUDA"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-DFASTGAN_WITH_CUDA",
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
