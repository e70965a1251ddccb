"""Compile the CUDA sources of csrc/ to object files with nvcc, without a GPU.

CI runs this (`make cuda-compile`) so that a CUDA compile error fails CI on machines that have
nvcc but no GPU. It compiles with the same headers and flags that setup.py's CUDAExtension
uses, for one architecture (sm_90 by default), and prints ptxas' register and spill report.

    python tools/compile_cuda.py [--arch sm_90] [--out build/cuda-compile]

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


def _cuda_home() -> Path:
    for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda-13.0", "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return Path(candidate)
    sys.exit("compile_cuda.py: nvcc not found; set CUDA_HOME to the CUDA toolkit")


def nvcc_command(source: Path, output: Path, arch: str, cuda_home: Path) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    # torch 2.14's headers need C++20 (2.13 and older: C++17).
    std = "c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 14) else "c++17"
    includes = [str(ROOT / "csrc")] + cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    return [
        str(cuda_home / "bin" / "nvcc"), "-c", str(source), "-o", str(output),
        f"-std={std}", f"-arch={arch}", "-O3", "-Xptxas", "-v",
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
    args = parser.parse_args()

    cuda_home = _cuda_home()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for source in CUDA_SOURCES:
        command = nvcc_command(source, out / (source.stem + ".o"), args.arch, cuda_home)
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        report = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        if result.returncode != 0:
            print(" ".join(command), file=sys.stderr)
            print("\n".join(report), file=sys.stderr)
            sys.exit(f"compile_cuda.py: nvcc failed on {source.relative_to(ROOT)} for {args.arch}")
        for line in report:
            if "registers" in line or "spill" in line or "warning" in line.lower():
                print(line.strip())
        print(f"compiled {source.relative_to(ROOT)} for {args.arch} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
