"""Build the native extension at first use, where the install did not build it.

``pip install .`` builds the package in an isolated environment that has no torch, so setup.py
installs it without ``ndadam_fused._C``. This module compiles the same sources with
``torch.utils.cpp_extension.load`` (ninja) the first time the native backend is needed, into
torch's extension cache: ``$TORCH_EXTENSIONS_DIR/<name>/`` when that variable is set, else
``~/.cache/torch_extensions/<name>/``. ``<name>`` holds the Python, torch and CUDA versions and
which kernels were built, so a torch upgrade builds afresh instead of loading a stale library;
later processes only load the cached library (ninja finds nothing to do).

The sources are ``ndadam_fused/_csrc/`` in an installed package (setup.py copies ``csrc/``
there) or ``csrc/`` beside the package in a source checkout.

What gets built: the C++ CPU kernel; the CUDA kernel too when torch is a CUDA build, a GPU is
visible, nvcc is found (``CUDA_HOME``) and ``NDADAM_NO_CUDA`` is not 1, for the visible GPUs'
architectures (or ``TORCH_CUDA_ARCH_LIST``). ``NDADAM_NO_JIT_BUILD=1`` turns the build off.

``csrc/ndadam_op.cpp`` names its module init ``PyInit__C``, so the library is built as a plain
shared library (``is_python_module=False``: torch dlopens it, which registers the ops) and then
imported under the name ``ndadam_fused._C``, whose last component is what Python's extension
loader looks up: the result is the same module, with ``BUILT_WITH_CUDA`` and
``SINGLE_PASS_MAX_ROW_LENGTH``, as the in-place build.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["OPT_OUT_VARIABLE", "JitBuildError", "build_directory", "load_extension", "sources_directory"]

#: Set to 1 to never compile at first use.
OPT_OUT_VARIABLE = "NDADAM_NO_JIT_BUILD"

_CPU_SOURCES = ("ndadam_op.cpp", "cpu/vector_step_cpu.cpp", "scalar_step_op.cpp", "cpu/scalar_step_cpu.cpp")
_CUDA_SOURCES = ("cuda/vector_step_cuda.cu",)
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


class JitBuildError(RuntimeError):
    """The extension could not be built at first use; the message says why and what fixes it."""


def sources_directory() -> Path | None:
    """The C++/CUDA sources: ``ndadam_fused/_csrc`` when installed, ``csrc/`` in a checkout."""
    for candidate in (_PACKAGE_DIR / "_csrc", _PACKAGE_DIR.parent / "csrc"):
        if all((candidate / source).is_file() for source in _CPU_SOURCES + _CUDA_SOURCES):
            return candidate
    return None


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


def _cuda_build_reason() -> str | None:
    """None when the CUDA kernel can be built here, else why not."""
    if _flag("NDADAM_NO_CUDA"):
        return "NDADAM_NO_CUDA=1"
    if torch.version.cuda is None:
        return "torch is a CPU build"
    if not torch.cuda.is_available():
        return "no GPU is visible"
    from torch.utils import cpp_extension

    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None or not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        return "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    return None


def _extension_name(with_cuda: bool) -> str:
    accelerator = f"cu{torch.version.cuda}" if torch.version.cuda else "cpu"
    kernels = "cpu_cuda" if with_cuda else "cpu"
    torch_version = torch.__version__.split("+")[0]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch_version}_{accelerator}_{kernels}"
    return "ndadam_fused_C_" + re.sub(r"[^0-9A-Za-z]+", "_", tag)


def build_directory(with_cuda: bool = False) -> Path:
    """Where the library for this Python, torch and kernel set is built and cached."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / _extension_name(with_cuda)


def _missing_tools() -> str | None:
    """Why a build cannot even start (no compiler, no ninja, no Python headers), else None."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if not compiler.strip() or shutil.which(shlex.split(compiler)[0]) is None:
        return (
            f"no C++ compiler: {compiler!r} was not found"
            + (" (CXX is set to it)" if "CXX" in os.environ else "")
            + "; install one (e.g. `apt install g++`) or point CXX to it"
        )
    if not cpp_extension.is_ninja_available():
        # torch runs `ninja` from the PATH; `pip install ninja` puts it beside this Python, which
        # is on the PATH only in an activated environment.
        beside_python = Path(sys.executable).parent / "ninja"
        if beside_python.is_file():
            return f"ninja was not found on the PATH; it is in {beside_python.parent}: activate that environment or add it to the PATH"
        return "ninja was not found on the PATH; `pip install ninja` (then activate the environment, so that it is on the PATH)"
    include = sysconfig.get_paths()["include"]
    if not os.path.isfile(os.path.join(include, "Python.h")):
        return f"the Python headers are missing ({include}/Python.h); install them (e.g. `apt install python3-dev`)"
    return None


def _summary(error: BaseException, limit: int = 600) -> str:
    """The end of a build error (the compiler's last words), on one line."""
    text = " ".join(str(error).split()).rstrip(".")
    return text if len(text) <= limit else "... " + text[-limit:]


def _built_library(directory: Path, name: str, sources: list[Path]) -> bool:
    library = directory / f"{name}.so"
    if not library.is_file():
        return False
    built = library.stat().st_mtime
    return all(source.stat().st_mtime <= built for source in sources)


def _lock_notice(directory: Path, cpp_extension: object) -> str | None:
    """The line to print before waiting on another process's build, where that wait can hang.

    torch before 2.14 serializes builds with a lock FILE whose mere existence makes a second
    process wait, without a word and without end when the builder was killed (SIGKILL, out of
    memory). torch 2.14 holds an OS lock that dies with its holder, so there is nothing to say.
    """
    lock = directory / "lock"
    if hasattr(cpp_extension, "FileLock") or not lock.exists():
        return None
    return (
        f"ndadam_fused: waiting for another process to finish building the native extension ({lock} "
        "exists); if no process is building it (a build was killed), delete that file"
    )


def _import_as_package_module(path: str) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader("ndadam_fused._C", path)
    spec = importlib.util.spec_from_file_location("ndadam_fused._C", path, loader=loader)
    if spec is None:
        raise JitBuildError(f"cannot import the built library {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules["ndadam_fused._C"] = module
    return module


def load_extension() -> ModuleType:
    """Build (or load from the cache) ``ndadam_fused._C`` and return it; JitBuildError if not.

    Prints one line to stderr when it compiles. When another process is building the same
    library, torch's lock makes this wait for that build and then load its result (with
    torch < 2.14, one more line says what to do if that wait is on a killed build).
    """
    if _flag(OPT_OUT_VARIABLE):
        raise JitBuildError(f"{OPT_OUT_VARIABLE}=1 is set")
    csrc = sources_directory()
    if csrc is None:
        raise JitBuildError(
            f"its C++ sources are not in the installed package ({_PACKAGE_DIR / '_csrc'} is missing or incomplete)"
        )
    missing = _missing_tools()
    if missing is not None:
        raise JitBuildError(missing)
    from torch.utils import cpp_extension

    cuda_reason = _cuda_build_reason()
    with_cuda = cuda_reason is None
    sources = [csrc / s for s in _CPU_SOURCES + (_CUDA_SOURCES if with_cuda else ())]
    name = _extension_name(with_cuda)
    directory = build_directory(with_cuda)
    if not _built_library(directory, name, sources):
        what = (
            "its C++ CPU and CUDA kernels (several minutes)" if with_cuda
            else f"its C++ CPU kernel (about 30 s; no CUDA kernel: {cuda_reason})"
        )
        print(
            f"ndadam_fused: the native extension is not built; building {what} once, into {directory} "
            f"(set {OPT_OUT_VARIABLE}=1 to skip)",
            file=sys.stderr, flush=True,
        )
    directory.mkdir(parents=True, exist_ok=True)
    notice = _lock_notice(directory, cpp_extension)
    if notice is not None:
        print(notice, file=sys.stderr, flush=True)
    # -fopenmp: at::parallel_for is inline OpenMP code, compiled here; -fno-math-errno lets
    # sqrt vectorize (both as in setup.py).
    cflags = ["-O3", "-fno-math-errno", "-fopenmp"] + (["-DNDADAM_WITH_CUDA=1"] if with_cuda else [])
    try:
        path = cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=cflags,
            extra_cuda_cflags=["-O3", "-lineinfo"],
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(csrc)],
            build_directory=str(directory),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=False,
        )
        return _import_as_package_module(str(path))
    except JitBuildError:
        raise
    except Exception as error:  # compiler errors surface as RuntimeError, a bad library as ImportError/OSError
        log = directory / "build-error.log"
        log.write_text(f"{type(error).__name__}: {error}\n")
        raise JitBuildError(f"building it in {directory} failed (the whole output: {log}): {_summary(error)}") from error
