"""Build script: the Python package plus the compiled extension ndadam_fused._C (csrc/).

The extension is built with torch.utils.cpp_extension and ninja:

- a CUDAExtension (C++ CPU kernel + CUDA kernel) when torch is a CUDA build and nvcc is found
  (set CUDA_HOME to the toolkit, e.g. CUDA_HOME=/usr/local/cuda-13.0); the architectures are
  TORCH_CUDA_ARCH_LIST, by default "8.0;9.0+PTX" (A100, H100/H200, PTX for newer GPUs);
- a CppExtension (the C++ CPU kernel only) otherwise.

Environment switches:

- NDADAM_NO_EXTENSION=1: pure Python package, no extension (the "native" backend then says
  how to build it; "auto" uses the next best backend);
- NDADAM_NO_CUDA=1: CPU-only extension even where CUDA could be built (a CUDA build takes
  minutes);
- NDADAM_REQUIRE_EXTENSION=1: a failed extension build fails the install. Without it a failed
  build prints why and installs the package without the extension.

Install with `pip install --no-build-isolation -e .` (pip would otherwise build against a fresh
torch in an isolated environment), or build in place with `python setup.py build_ext --inplace`.
A plain `pip install .` builds in an isolated environment without torch, so it installs the
package without the extension; the sources go into the package as ndadam_fused/_csrc/ (see
BuildPy), and the extension is built from them at first use (ndadam_fused/backends/_jit.py).
"""

import glob
import os
import shutil
import sys

import setuptools
from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = [
    "csrc/ndadam_op.cpp", "csrc/cpu/vector_step_cpu.cpp", "csrc/split_rows_op.cpp", "csrc/cpu/split_rows_cpu.cpp",
    "csrc/scalar_step_op.cpp", "csrc/cpu/scalar_step_cpu.cpp",
]
CUDA_SOURCES = ["csrc/cuda/vector_step_cuda.cu"]
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _flag(name):
    return os.environ.get(name, "0") == "1"


def _nvcc_found(cuda_home):
    return cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))


def _extension_build():
    """(ext_modules, cmdclass) for setup(); empty when the extension is switched off."""
    if _flag("NDADAM_NO_EXTENSION"):
        print("ndadam_fused: NDADAM_NO_EXTENSION=1, building without the native extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        if _flag("NDADAM_REQUIRE_EXTENSION"):
            raise
        print(f"ndadam_fused: torch is not importable ({error}); building without the native extension. "
              "Install torch first, then `pip install --no-build-isolation -e .`", file=sys.stderr)
        return [], {}

    use_cuda = (
        not _flag("NDADAM_NO_CUDA") and torch.version.cuda is not None and _nvcc_found(cpp_extension.CUDA_HOME)
    )
    # -fopenmp: at::parallel_for is inline OpenMP code, compiled here. -fno-math-errno: a sqrt
    # that may set errno is never vectorized (the scalar op's elementwise sqrt ran scalar).
    cxx_flags = ["-O3", "-fno-math-errno", "-fopenmp"]
    link_flags = ["-fopenmp"]
    sources = list(CPU_SOURCES)
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        sources += CUDA_SOURCES
        cxx_flags.append("-DNDADAM_WITH_CUDA=1")
        extension_class = cpp_extension.CUDAExtension
        compile_args = {"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]}
        print(f"ndadam_fused: building the CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST="
              f"{os.environ['TORCH_CUDA_ARCH_LIST']} with {cpp_extension.CUDA_HOME}/bin/nvcc", file=sys.stderr)
    else:
        extension_class = cpp_extension.CppExtension
        compile_args = {"cxx": cxx_flags}
        reason = ("NDADAM_NO_CUDA=1" if _flag("NDADAM_NO_CUDA") else
                  "torch is a CPU build" if torch.version.cuda is None else
                  "nvcc was not found (set CUDA_HOME to the CUDA toolkit)")
        print(f"ndadam_fused: building the CPU kernel only ({reason})", file=sys.stderr)

    extension = extension_class(
        "ndadam_fused._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=compile_args,
        extra_link_args=link_flags,
        py_limited_api=True,
    )

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension (ninja), made optional unless NDADAM_REQUIRE_EXTENSION=1."""

        def run(self):
            if shutil.which("ninja") is None:
                print("ndadam_fused: ninja not found, the build falls back to slower distutils", file=sys.stderr)
            try:
                super().run()
            except Exception as error:  # a compiler error surfaces as RuntimeError/CompileError/...
                if _flag("NDADAM_REQUIRE_EXTENSION"):
                    raise
                print(f"ndadam_fused: WARNING: the native extension failed to build ({error}); installing "
                      "without it. The 'native' backend will say how to build it; set "
                      "NDADAM_REQUIRE_EXTENSION=1 to make this an error.", file=sys.stderr)

    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


class BuildPy(build_py):
    """build_py that also puts csrc/ into the package as ndadam_fused/_csrc/.

    An installed package has no repository root beside it: the build at first use
    (ndadam_fused/backends/_jit.py) compiles these copies. An editable install reads csrc/ in
    place, so nothing is copied there.
    """

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for source in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True):
            if not source.endswith((".h", ".cpp", ".cu")):
                continue
            relative = os.path.relpath(source, os.path.join(ROOT, "csrc"))
            target = os.path.join(self.build_lib, "ndadam_fused", "_csrc", relative)
            self.mkpath(os.path.dirname(target))
            self.copy_file(source, target)


def _license_metadata():
    """MIT, as the metadata field each setuptools knows: License-Expression (PEP 639) from 77 on.

    LICENSE ships in both cases (setuptools' default license-files patterns).
    """
    if int(setuptools.__version__.split(".")[0]) >= 77:
        return {"license_expression": "MIT"}
    return {"license": "MIT"}


ext_modules, cmdclass = _extension_build()
cmdclass = {**cmdclass, "build_py": BuildPy}
setup(
    **_license_metadata(),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
