"""Build: pure-Python package + Triton kernels, and the C++/CUDA extension when csrc/ has sources.

Install with ``pip install --no-build-isolation -e .``: torch must already be
importable (the extension is built against the installed torch).

Environment:
  FORCE_CUDA=1                    build the CUDA sources even where torch sees no GPU (needs nvcc / CUDA_HOME)
  PYOBJECTIVES_SKIP_CUDA_BUILD=1  build only the C++ (CPU) sources
  PYOBJECTIVES_SKIP_BUILD=1       build no extension at all (pure Python + Triton; `info` says why cpu is unavailable)
  TORCH_CUDA_ARCH_LIST, MAX_JOBS  honoured by torch.utils.cpp_extension
"""

import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extensions():
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if os.environ.get("PYOBJECTIVES_SKIP_BUILD", "0") == "1":
        return [], {}
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if not cpp and not cu:
        return [], {}
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        print(f"pyobjectives: no C++ compiler ({compiler!r} not found): building without the extension; "
              "the cpu / cuda backends will say so in `python -m pyobjectives info`", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    class OptionalBuildExt(BuildExtension):
        """A failed compile leaves a working pure-Python + Triton package (the backends report why)."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # CompileError, LinkError, ninja's RuntimeError, ...
                print(f"pyobjectives: building {ext.name} failed ({type(exc).__name__}: {exc}); installing "
                      "without it (set PYOBJECTIVES_SKIP_BUILD=1 to skip the attempt)", file=sys.stderr)

    skip_cuda = os.environ.get("PYOBJECTIVES_SKIP_CUDA_BUILD", "0") == "1"
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    with_cuda = bool(cu) and not skip_cuda and CUDA_HOME is not None and torch.version.cuda is not None and (
        force_cuda or torch.cuda.is_available())
    # -fopenmp: ATen's parallel_for is an inline OpenMP loop (without it the kernels run on one thread);
    # it also enables the kernels' `#pragma omp simd reduction` row reductions.
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    include_dirs = [os.path.join(HERE, "csrc", "include"), os.path.join(HERE, "csrc")]
    if with_cuda:
        ext = CUDAExtension("pyobjectives._C", cpp + cu, define_macros=[("PYOBJECTIVES_WITH_CUDA", None)], optional=True,
                            include_dirs=include_dirs, extra_link_args=link,
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math",
                                                                      "-lineinfo"]})
    else:
        ext = CppExtension("pyobjectives._C", cpp, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                           extra_link_args=link, optional=True)
    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="pyobjectives",
    version="0.1.0",
    description="Fast, verified kernels for XLNet two-stream relative attention and ELECTRA's objective",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["pyobjectives", "pyobjectives.reference", "pyobjectives.integrations", "pyobjectives.kernels"],
    package_dir={"pyobjectives.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "triton>=3.6; platform_system == 'Linux'"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "transformers>=4.40"],
        "bench": ["matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
