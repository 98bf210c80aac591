"""Build script: packages (with kernels/ installed as fastdiff.kernels) and the optional CUDA extension.

The CUDA extension ``fastdiff._C`` is built only when torch was built with CUDA
and nvcc is found. Set FASTDIFF_SKIP_CUDA_BUILD=1 to skip it; fastdiff then
JIT-builds it on first use on a CUDA machine (see fastdiff/_extension.py), and
works without it everywhere else (reference and Triton paths).
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _packages():
    packages = [p for p in find_packages(include=["fastdiff", "fastdiff.*"])]
    packages.append("fastdiff.kernels")
    return packages


def _cuda_build():
    """(ext_modules, cmdclass) for the CUDA extension, or ([], {}) when it cannot or should not be built."""
    if os.environ.get("FASTDIFF_SKIP_CUDA_BUILD", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or (CUDA_HOME is None and shutil.which("nvcc") is None):
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    archs = os.environ.get("FASTDIFF_CUDA_ARCHS", "80;90").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    ext = CUDAExtension(
        name="fastdiff._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *gencode]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_build()

setup(
    packages=_packages(),
    package_dir={"fastdiff": "fastdiff", "fastdiff.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
