"""Compile the CUDA sources of csrc/ to object files with nvcc, without a GPU, and check the result.

CI runs this (`make cuda-compile`) so that a CUDA compile error fails CI on machines that have
nvcc but no GPU. It compiles with the same headers and flags that setup.py's CUDAExtension
uses, for one architecture (sm_90 by default), keeps the PTX, and fails when

- ptxas reports a spill or a stack frame in any kernel or device function (tools/ptx_checks.py
  prints registers, spills and shared memory per kernel), or
- the PTX breaks the numerics the kernel promises: flush to zero or an approximate instruction
  in a kernel, a square root or division of the per-row scalars that is not rounded to nearest,
  a product_without_fma that is not a mul.rn of its own (tools/ptx_checks.py), or
- a kernel never moves its rows 16 bytes at a time (bf16/fp16: 8 elements per access).

    python tools/compile_cuda.py [--arch sm_90] [--out build/cuda-compile] [--nvcc-flag=-ftz=true ...]

Needs nvcc (CUDA_HOME, default /usr/local/cuda-13.0 when that exists, else /usr/local/cuda)
and a torch install whose headers match the one the extension is built against.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import ptx_checks  # noqa: E402


def _cuda_home() -> Path:
    for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda-13.0", "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return Path(candidate)
    sys.exit("compile_cuda.py: nvcc not found; set CUDA_HOME to the CUDA toolkit")


def nvcc_command(source: Path, output: Path, arch: str, cuda_home: Path, keep_dir: Path | None = None) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    # torch 2.14's headers need C++20 (2.13 and older: C++17).
    std = "c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 14) else "c++17"
    includes = [str(ROOT / "csrc")] + cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    keep = ["--keep", "--keep-dir", str(keep_dir)] if keep_dir is not None else []
    return [
        str(cuda_home / "bin" / "nvcc"), "-c", str(source), "-o", str(output),
        # -lineinfo as setup.py builds it; the PTX checks map instructions to source lines with it.
        f"-std={std}", f"-arch={arch}", "-O3", "-lineinfo", "-Xptxas", "-v", *keep,
        *[f"-I{path}" for path in includes],
        *cpp_extension.COMMON_NVCC_FLAGS,
        "-Xcompiler", "-fPIC",
        "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sm_90", help="nvcc -arch value (default sm_90)")
    parser.add_argument("--out", default=str(ROOT / "build" / "cuda-compile"), help="folder for the object files")
    parser.add_argument("--nvcc-flag", action="append", default=[],
                        help="an extra nvcc flag (to show that the checks fail, e.g. --nvcc-flag=--use_fast_math)")
    args = parser.parse_args()

    cuda_home = _cuda_home()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    for source in CUDA_SOURCES:
        keep_dir = out / f"{source.stem}.keep"
        keep_dir.mkdir(exist_ok=True)
        command = nvcc_command(source, out / (source.stem + ".o"), args.arch, cuda_home, keep_dir) + args.nvcc_flag
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        report = result.stdout + result.stderr
        if result.returncode != 0:
            print(" ".join(command), file=sys.stderr)
            print(report, file=sys.stderr)
            sys.exit(f"compile_cuda.py: nvcc failed on {source.relative_to(ROOT)} for {args.arch}")
        for line in report.splitlines():
            if "warning" in line.lower():
                print(line.strip())
        print(f"compiled {source.relative_to(ROOT)} for {args.arch} in {time.perf_counter() - started:.0f} s")

        functions = ptx_checks.kernel_resources(report)
        print(f"  {'function':48s} {'registers':>9s} {'stack':>6s} {'spill st':>8s} {'spill ld':>8s} {'smem':>6s}")
        for f in functions:
            print(f"  {f.name:48s} {f.registers or '':>9} {f.stack_bytes:>6d} {f.spill_store_bytes:>8d} "
                  f"{f.spill_load_bytes:>8d} {f.shared_bytes if f.is_entry else '':>6}")
        problems += [f"{source.name}: {p}" for p in ptx_checks.resource_problems(functions)]

        ptx_files = sorted(keep_dir.glob(f"{source.stem}*.ptx"))
        if not ptx_files:
            problems.append(f"{source.name}: nvcc kept no PTX in {keep_dir}")
        for ptx in ptx_files:
            text = ptx.read_text()
            found = ptx_checks.numerics_problems(text) + ptx_checks.access_width_problems(text)
            print(f"  PTX checks of {ptx.name}: {len(found)} problem(s)")
            problems += [f"{ptx.name}: {p}" for p in found]

    if problems:
        for problem in problems[:40]:
            print(f"FAILED: {problem}", file=sys.stderr)
        sys.exit(f"compile_cuda.py: {len(problems)} problem(s) in the compiled CUDA kernel")
    print("compile_cuda.py: no spill, no stack frame; IEEE round-to-nearest per-row scalars, no flush to zero; "
          "16-byte row accesses")


if __name__ == "__main__":
    main()
