"""A non-editable install as `pip install .` makes it, and what its first step does.

pip's isolated build has no torch, so the package is installed without ``ndadam_fused._C``
(here: NDADAM_NO_EXTENSION=1, the same setup.py path without needing the network). Then:

- the install holds py.typed, the LICENSE and the C++ sources the first-use build compiles;
- where a compiler and ninja are present, the first step builds the extension into
  TORCH_EXTENSIONS_DIR, prints one line, and the native backend matches the reference; a second
  process loads the cached build without a word;
- where it cannot be built (no compiler, no ninja, or NDADAM_NO_JIT_BUILD=1), the first step
  warns once (naming the reference backend and the fix) and the steps run on the reference.

Every run imports the installed copy in a subprocess with the repository off sys.path, so the
in-place build of the checkout cannot be picked up. This module compiles the extension once
(about 30-90 s on 2 cores).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
BUILD_LINE = "ndadam_fused: the native extension is not built; building"
# What torch's cpp_extension logs by itself on a CUDA build of torch without a GPU.
TORCH_LOG_MARK = "torch/utils/cpp_extension.py"


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> Path:
    """A clean copy of what a clone holds for the build: no compiled extension, no leftovers."""
    source = tmp_path_factory.mktemp("source") / "ndadam_fused-source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "CMakeLists.txt"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info")
    for name in ("ndadam_fused", "csrc"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    return source


@pytest.fixture(scope="module")
def installed(source_tree, tmp_path_factory) -> Path:
    """`pip install --target` of the source tree, without the extension."""
    base = tmp_path_factory.mktemp("install")
    source = source_tree
    target = base / "site-packages"
    env = {**os.environ, "NDADAM_NO_EXTENSION": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        env=env, cwd=base, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (base / "pip-output.txt").write_text(result.stdout + result.stderr)
    return target


# The test environment may hold an editable install of a checkout (`make install` makes one):
# its import finder would hand that checkout's in-place ndadam_fused._C to any ndadam_fused.
# An environment with only the install under test has no such finder.
WITHOUT_EDITABLE_FINDERS = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
"""


def _run(installed: Path, script: str, tmp_path: Path, **env_changes: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), str(TESTS)])}
    for key in ("NDADAM_NO_JIT_BUILD", "NDADAM_NO_EXTENSION", "CXX"):
        env.pop(key, None)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    # cwd outside the repository: sys.path[0] is the cwd for `python -c`.
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_EDITABLE_FINDERS + script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900
    )


def _own_stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip() and TORCH_LOG_MARK not in line]


def test_install_ships_types_license_and_sources(installed):
    package = installed / "ndadam_fused"
    assert (package / "py.typed").is_file()
    licenses = list(installed.glob("ndadam_fused-*.dist-info/licenses/LICENSE"))
    assert len(licenses) == 1 and "MIT License" in licenses[0].read_text()
    for source in ("ndadam_op.cpp", "ndadam_op.h", "ndadam_row_math.h", "cpu/vector_step_cpu.cpp",
                   "cpu/ndadam_cpu_rows.h", "cuda/vector_step_cuda.cu", "scalar_step_op.cpp", "scalar_step_op.h",
                   "cpu/scalar_step_cpu.cpp"):
        assert (package / "_csrc" / source).read_bytes() == (ROOT / "csrc" / source).read_bytes(), source
    assert not list(package.glob("_C*.so")), "this install was meant to have no compiled extension"
    # setuptools >= 77 deprecates the `license = {text = ...}` table (PEP 639: an SPDX string).
    build_output = (installed.parent / "pip-output.txt").read_text()
    assert "project.license" not in build_output, build_output
    metadata = next(installed.glob("ndadam_fused-*.dist-info/METADATA")).read_text().splitlines()
    import setuptools

    field = "License-Expression: MIT" if int(setuptools.__version__.split(".")[0]) >= 77 else "License: MIT"
    assert field in metadata and "License-File: LICENSE" in metadata, metadata[:30]


def test_sdist_ships_types_license_and_sources(source_tree, tmp_path):
    script = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=source_tree, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NDADAM_NO_EXTENSION": "1"},
    )
    assert result.returncode == 0, result.stderr
    with tarfile.open(tmp_path / result.stdout.strip().splitlines()[-1]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    expected = {"LICENSE", "ndadam_fused/py.typed", "CMakeLists.txt"} | {
        str(path.relative_to(ROOT)) for path in (ROOT / "csrc").rglob("*") if path.suffix in (".h", ".cpp", ".cu")
    }
    assert expected <= names, sorted(expected - names)


def test_lock_notice_only_where_a_lock_file_can_outlive_its_builder(tmp_path):
    from ndadam_fused.backends import _jit

    class TorchBefore214:  # cpp_extension with FileBaton: the lock is a file
        pass

    class Torch214:  # cpp_extension with FileLock: an OS lock that dies with its holder
        FileLock = object

    assert _jit._lock_notice(tmp_path, TorchBefore214) is None  # no build under way
    (tmp_path / "lock").touch()
    notice = _jit._lock_notice(tmp_path, TorchBefore214)
    assert notice is not None and str(tmp_path / "lock") in notice and "delete that file" in notice
    assert _jit._lock_notice(tmp_path, Torch214) is None


FIRST_USE_SCRIPT = """
import sys, torch
import ndadam_fused
from ndadam_fused import NDAdam, backends
from ndadam_fused.backends import native
assert ndadam_fused.__file__.startswith({installed!r}), ndadam_fused.__file__
assert native._C is None, "the installed copy should have no compiled extension"
p = torch.nn.Parameter(torch.randn(4, 6))
opt = NDAdam([p], lr=0.1)
p.grad = torch.randn(4, 6)
opt.step()
assert backends.resolve("auto", "cpu") is native
import ndadam_fused._C as C
assert C is native._C and C.__file__.startswith({extensions!r}), C.__file__
assert C.BUILT_WITH_CUDA == 0 and C.SINGLE_PASS_MAX_ROW_LENGTH == 8192
# The build at first use has the CPU scalar op too (its sources are in _jit's list).
assert hasattr(torch.ops.ndadam_fused, "scalar_step_")
import backend_cases
for dtype in (torch.float64, torch.float32):
    backend_cases.compare_with_reference("native", backend_cases.SECTION_7_SHAPES + backend_cases.SCALAR_SHAPES, dtype, 25)
print("ok")
"""


def test_first_step_builds_the_extension_once(installed, tmp_path):
    extensions = tmp_path / "torch_extensions"
    script = FIRST_USE_SCRIPT.format(installed=str(installed), extensions=str(extensions))
    first = _run(installed, script, tmp_path, TORCH_EXTENSIONS_DIR=str(extensions), MAX_JOBS="2")
    assert first.returncode == 0 and first.stdout.strip() == "ok", first.stderr
    lines = _own_stderr_lines(first)
    assert len(lines) == 1 and lines[0].startswith(BUILD_LINE), lines
    assert str(extensions) in lines[0] and "NDADAM_NO_JIT_BUILD=1" in lines[0]

    # A second process finds the build in the cache: no line, no warning, same module.
    second = _run(installed, script, tmp_path, TORCH_EXTENSIONS_DIR=str(extensions))
    assert second.returncode == 0 and second.stdout.strip() == "ok", second.stderr
    assert _own_stderr_lines(second) == []


CANNOT_BUILD_SCRIPT = """
import warnings, torch
from ndadam_fused import NDAdam, backends
from ndadam_fused.backends import native, reference
torch.manual_seed(0)
p = torch.nn.Parameter(torch.randn(4, 6, dtype=torch.float64))
q = torch.nn.Parameter(p.detach().clone())
opt = NDAdam([p], lr=0.1)
ref = NDAdam([q], lr=0.1, backend="reference")
caught = []
for step in range(2):
    grad = torch.randn(4, 6, dtype=torch.float64)
    p.grad, q.grad = grad.clone(), grad.clone()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt.step()
    caught.append([w for w in record if issubclass(w.category, backends.SlowBackendWarning)])
    ref.step()
assert backends.resolve("auto", "cpu") is reference
assert torch.equal(p, q), "the fallback steps must be the reference's, bit for bit"
assert len(caught[0]) == 1 and caught[1] == [], [[str(w.message) for w in c] for c in caught]
assert native._C is None
try:
    NDAdam([torch.nn.Parameter(torch.randn(3, 4))], backend="native")
except RuntimeError as error:
    print("NATIVE:", error)
else:
    raise AssertionError("backend='native' that cannot be built did not raise")
print("WARNING:", caught[0][0].message)
"""


def _no_ninja_path(tmp_path: Path) -> str:
    """A PATH with the C++ compiler and without ninja."""
    folder = tmp_path / "bin"
    folder.mkdir()
    compiler = shutil.which("c++")
    assert compiler is not None, "the test needs a C++ compiler to hide ninja from"
    (folder / "c++").symlink_to(compiler)
    return str(folder)


@pytest.mark.parametrize(
    "case, reason",
    [
        ("missing compiler", "no C++ compiler: '/nonexistent/c++' was not found (CXX is set to it)"),
        (
            "no ninja",
            # `pip install ninja` puts it beside the interpreter, where the message points.
            f"ninja was not found on the PATH; it is in {Path(sys.executable).parent}: activate that environment"
            if (Path(sys.executable).parent / "ninja").is_file()
            else "ninja was not found on the PATH; `pip install ninja`",
        ),
        ("opted out", "NDADAM_NO_JIT_BUILD=1 is set"),
        ("compile error", "failed (the whole output: "),
    ],
    ids=["missing-compiler", "no-ninja", "opted-out", "compile-error"],
)
def test_cannot_build_warns_once_and_steps_on_the_reference(installed, tmp_path, case, reason):
    extensions = tmp_path / "torch_extensions"
    env = {"TORCH_EXTENSIONS_DIR": str(extensions)}
    if case == "missing compiler":
        env["CXX"] = "/nonexistent/c++"
    elif case == "no ninja":
        env["PATH"] = _no_ninja_path(tmp_path)
    elif case == "opted out":
        env["NDADAM_NO_JIT_BUILD"] = "1"
    else:
        # A compiler that answers torch's version checks and fails on every source file, as a
        # compile error does: the build starts, and the compiler's words are reported.
        compiler = shutil.which("c++")
        assert compiler is not None, "the test needs a C++ compiler to wrap"
        failing = tmp_path / "failing-c++"
        failing.write_text(
            "#!/bin/sh\n"
            'case " $* " in *" -c "*) echo "failing-c++: error: this compiler always fails" >&2; exit 1;; esac\n'
            f'exec {compiler} "$@"\n'
        )
        failing.chmod(0o755)
        env["CXX"] = str(failing)
    result = _run(installed, CANNOT_BUILD_SCRIPT, tmp_path, **env)
    assert result.returncode == 0, result.stderr
    native_error = next(line for line in result.stdout.splitlines() if line.startswith("NATIVE:"))
    warning = next(line for line in result.stdout.splitlines() if line.startswith("WARNING:"))
    for message in (native_error, warning):
        assert reason in message, message
        assert "pip install --no-build-isolation ." in message, message
    assert "with the 'reference' backend" in warning and "10-20x slower" in warning
    build_lines = [line for line in result.stderr.splitlines() if line.startswith(BUILD_LINE)]
    if case == "compile error":
        # It said it was building; the compiler's own words are in the reason and in the log.
        assert len(build_lines) == 1, result.stderr
        assert "this compiler always fails" in warning, warning
        (log,) = extensions.glob("*/build-error.log")
        assert str(log) in warning and "this compiler always fails" in log.read_text()
    else:
        assert build_lines == [], result.stderr
        assert not extensions.exists(), "nothing may be built when the tools are missing"


def _nvcc_found() -> bool:
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME is not None and (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").is_file()


FIRST_CUDA_USE_SCRIPT = """
import torch
from ndadam_fused import NDAdam, backends
from ndadam_fused.backends import native
assert native._C is None, "the installed copy should have no compiled extension"
p = torch.nn.Parameter(torch.randn(4, 6, device="cuda"))
opt = NDAdam([p], lr=0.1)
p.grad = torch.randn(4, 6, device="cuda")
opt.step()
assert backends.resolve("auto", "cuda") is native
assert native._C.BUILT_WITH_CUDA == 1
import backend_cases
for dtype in (torch.float64, torch.float32):
    backend_cases.compare_with_reference("native", backend_cases.SECTION_7_SHAPES, dtype, 25, device="cuda")
print("ok")
"""


@pytest.mark.skipif(
    not (torch.cuda.is_available() and _nvcc_found()), reason="needs a GPU, a CUDA build of torch and nvcc (CUDA_HOME)"
)
def test_first_step_on_a_gpu_builds_the_cuda_kernel(installed, tmp_path):
    """On a GPU machine the build at first use holds the CUDA kernel too (a few minutes)."""
    extensions = tmp_path / "torch_extensions"
    result = _run(installed, FIRST_CUDA_USE_SCRIPT, tmp_path, TORCH_EXTENSIONS_DIR=str(extensions), NDADAM_NO_CUDA=None)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    lines = _own_stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith(BUILD_LINE) and "CPU and CUDA kernels" in lines[0], lines
