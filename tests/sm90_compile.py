"""Compile the Triton backend's kernels for sm_90 without a GPU and report what ptxas made of them.

    python tests/sm90_compile.py OUT_DIR     (TRITON_INTERPRET must not be set)

For every specialization a default launch can use (``triton_backend.default_specializations``)
and for the probe kernels below, it writes ``OUT_DIR/<name>.ptx`` and prints one JSON object:
``{name: {"compile_s", "registers", "spill_stores", "spill_loads", "stack", "opcodes"}}`` where
``opcodes`` counts each PTX instruction with its modifiers (``fma.rn.f32``: 540). Registers
and spills come from running Triton's own ptxas with ``-v`` on the PTX Triton emitted.

The tests in test_triton_sm90.py run it once in a subprocess (the test process runs Triton in
its interpreter, which cannot compile).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ndadam_fused.backends import triton_backend  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


@triton.jit
def projected_dots_probe(stats, out):
    """The statistics path's closed forms alone: stats = [a, b, c, d, f] -> [||g||², m·g, w·g]."""
    a = tl.load(stats + 0)
    b = tl.load(stats + 1)
    c = tl.load(stats + 2)
    d = tl.load(stats + 3)
    f = tl.load(stats + 4)
    g_sq, m_dot_g, w_dot_g = triton_backend._projected_dots(a, b, c, d, f)
    tl.store(out + 0, g_sq)
    tl.store(out + 1, m_dot_g)
    tl.store(out + 2, w_dot_g)


def probes() -> list[dict]:
    return [
        dict(name=f"projected_dots_{dtype}", kernel=projected_dots_probe,
             signature={"stats": f"*{dtype}", "out": f"*{dtype}"}, constexprs={}, attrs={}, num_warps=1)
        for dtype in ("fp32", "fp64")
    ]


def ptxas_path() -> str:
    import triton.backends.nvidia as nvidia

    bundled = Path(nvidia.__file__).parent / "bin" / "ptxas"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("ptxas")
    if found is None:
        raise RuntimeError("no ptxas: neither Triton's bundled one nor one on PATH")
    return found


def opcode_counts(ptx: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for match in re.finditer(r"^\s*(?:@!?%\w+\s+)?([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*)\s", ptx, re.M):
        opcode = match.group(1)
        counts[opcode] = counts.get(opcode, 0) + 1
    return counts


def ptxas_usage(ptx_path: Path, arch: str) -> dict[str, int]:
    result = subprocess.run([ptxas_path(), f"-arch={arch}", "-v", str(ptx_path), "-o", os.devnull],
                            capture_output=True, text=True, check=True)
    text = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas output:\n{text}")
    return {"registers": int(registers.group(1)), "stack": int(spills.group(1)),
            "spill_stores": int(spills.group(2)), "spill_loads": int(spills.group(3))}


def compile_one(spec: dict, out_dir: Path) -> dict:
    begin = time.perf_counter()
    kernel = triton.compile(ASTSource(spec["kernel"], spec["signature"], spec["constexprs"], spec["attrs"]),
                            target=TARGET, options={"num_warps": spec["num_warps"]})
    seconds = time.perf_counter() - begin
    ptx = kernel.asm["ptx"]
    path = out_dir / f"{spec['name']}.ptx"
    path.write_text(ptx)
    arch = re.search(r"^\.target (sm_\w+)", ptx, re.M).group(1)
    return {"compile_s": round(seconds, 2), "ptx": str(path), **ptxas_usage(path, arch), "opcodes": opcode_counts(ptx)}


def main(out_dir: str) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"triton": triton.__version__}
    for spec in triton_backend.default_specializations() + probes():
        report[spec["name"]] = compile_one(spec, out)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
