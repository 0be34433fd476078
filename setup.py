"""Build: pure-Python package + Triton kernels, and the C++/CUDA extension when csrc/ has sources.

Install with ``pip install --no-build-isolation -e .``: torch must already be
importable (the extension is built against the installed torch).

Environment:
  FORCE_CUDA=1                    build the CUDA sources even where torch sees no GPU (needs nvcc / CUDA_HOME)
  PYOBJECTIVES_SKIP_CUDA_BUILD=1  build only the C++ (CPU) sources
  PYOBJECTIVES_SKIP_BUILD=1       build no extension at all (pure Python + Triton; `info` says why cpu is unavailable)
  TORCH_CUDA_ARCH_LIST, MAX_JOBS  CUDA architectures (default "8.0;9.0"), parallel compile jobs
  CUTLASS_INCLUDE                 CUTLASS / CuTe headers for the attention kernels (default: the include folder of
                                  the pinned nvidia-cutlass wheel when it is installed, see CUTLASS_WHEEL)
"""

import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
#: The CUTLASS release whose CuTe headers the attention kernels are written against (Makefile pins it too).
CUTLASS_WHEEL = "nvidia-cutlass==4.2.0.0"
#: Kernel sources that include CuTe: compiled only with the CUTLASS headers at hand.
CUTE_SOURCES = "two_stream_attention_"
#: nvcc flags. No --use_fast_math: it turns logf into __logf and x / y into an approximate division,
#: which would change the Gumbel noise (samples must equal the reference's bit for bit); kernels call
#: the fast intrinsics (__expf) explicitly where an approximation is safe.
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]


def cutlass_include():
    """The CUTLASS include folder (CUTLASS_INCLUDE, else the installed wheel's), or None."""
    path = os.environ.get("CUTLASS_INCLUDE")
    if not path:
        import importlib.util
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = os.path.join(list(spec.submodule_search_locations)[0], "source", "include")
    return path if os.path.isfile(os.path.join(path, "cute", "tensor.hpp")) else None


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
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        macros = [("PYOBJECTIVES_WITH_CUDA", None)]
        attention = [f for f in cu if os.path.basename(f).startswith(CUTE_SOURCES)]
        cutlass = cutlass_include()
        if attention and cutlass is None:
            print(f"pyobjectives: no CUTLASS headers (pip install {CUTLASS_WHEEL}, or set CUTLASS_INCLUDE): building "
                  "the CUDA extension without the attention kernels", file=sys.stderr)
            cu = [f for f in cu if f not in attention]
        elif os.path.join("csrc", "cuda", "two_stream_attention_fwd.cu") in attention:
            macros.append(("PYOBJECTIVES_CUDA_ATTENTION", None))
        else:  # kernels without their entry point: not linkable as an op
            cu = [f for f in cu if f not in attention]
        if cutlass is not None:
            include_dirs.append(cutlass)
        ext = CUDAExtension("pyobjectives._C", cpp + cu, define_macros=macros, optional=True,
                            include_dirs=include_dirs, extra_link_args=link,
                            extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS})
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
