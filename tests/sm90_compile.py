"""Compile the Triton backend's kernels for sm_90 without a GPU and report what ptxas made of them.

    python tests/sm90_compile.py OUT_DIR     (TRITON_INTERPRET must not be set)

For the kernel as each parameter set of benchmarks/param_sets.py gets it (float32 and
float64), for one kernel per param dtype holding every code path, and for the probe kernels
below, it writes ``OUT_DIR/<name>.ptx`` and prints one JSON object:
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

import torch
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
    """Registers of the kernel (its call tree included), and the stack frames and spills of
    the kernel and of every function it calls (the tile paths are separate functions)."""
    result = subprocess.run([ptxas_path(), f"-arch={arch}", "-v", str(ptx_path), "-o", os.devnull],
                            capture_output=True, text=True, check=True)
    text = result.stdout + result.stderr
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", text)]
    frames = [tuple(map(int, m)) for m in re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)]
    if not registers or not frames:
        raise RuntimeError(f"unexpected ptxas output:\n{text}")
    return {"registers": max(registers), "functions": len(frames), "stack": max(f[0] for f in frames),
            "spill_stores": sum(f[1] for f in frames), "spill_loads": sum(f[2] for f in frames)}


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


def set_specializations(dtypes=(torch.float32, torch.float64)) -> list[dict]:
    """The kernel as a default launch compiles it for each parameter set of
    benchmarks/param_sets.py (its vector tensors in one group), in each of ``dtypes``."""
    from benchmarks import param_sets

    specs = []
    for dtype in dtypes:
        for name in param_sets.SETS:
            shapes = [s for s in param_sets.shapes(name) if len(s) >= 2]
            plan = triton_backend.plan_for_shapes(shapes, dtype)
            specs.append(triton_backend.kernel_specialization(dtype, plan.classes, f"set_{name}_{str(dtype).removeprefix('torch.')}"))
    return specs


def _every_path(dtype: torch.dtype) -> tuple:
    """An exact tile and a statistics row, aligned and not."""
    state = torch.float64 if dtype == torch.float64 else torch.float32
    exact = [(*triton_backend.WIDTH_CLASSES[state, aligned][triton_backend.width_class(96, state_dtype=state, aligned=aligned)], aligned)
             for aligned in (True, False)]
    return (*exact, (0, 0, 1, True), (0, 0, 1, False))


#: The launch options compiled as kernels of their own (name suffix: param dtype, flags), as
#: GradScaler, master weights and stochastic rounding launch them.
FEATURE_VARIANTS = {
    "float16_grad_scale": (torch.float16, dict(grad_scale=True, found_inf=True)),
    "bfloat16_master": (torch.bfloat16, dict(master=True)),
    "bfloat16_stochastic": (torch.bfloat16, dict(stochastic=True)),
    "bfloat16_master_grad_scale": (torch.bfloat16, dict(master=True, grad_scale=True, found_inf=True)),
}


def path_specializations() -> list[dict]:
    """Per param dtype, and per launch option of FEATURE_VARIANTS, a kernel with every code path
    (rows_*), for the checks of what the per-row arithmetic compiles to; and the two phases of
    the rows-split step (split_statistics_*, split_apply_*)."""
    specs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        specs.append(triton_backend.kernel_specialization(dtype, _every_path(dtype), f"rows_{str(dtype).removeprefix('torch.')}"))
    for suffix, (dtype, flags) in FEATURE_VARIANTS.items():
        specs.append(triton_backend.kernel_specialization(dtype, _every_path(dtype), f"rows_{suffix}", **flags))
    specs.append(triton_backend.kernel_specialization(torch.float32, _every_path(torch.float32), "split_statistics_float32",
                                                      mode=triton_backend._SPLIT_STATISTICS))
    for dtype in (torch.float32, torch.float64):
        specs.append(triton_backend.kernel_specialization(dtype, _every_path(dtype), f"split_apply_{str(dtype).removeprefix('torch.')}",
                                                          mode=triton_backend._SPLIT_APPLY))
    specs.append(triton_backend.kernel_specialization(
        torch.bfloat16, _every_path(torch.bfloat16), "split_statistics_bfloat16_master", mode=triton_backend._SPLIT_STATISTICS,
        master=True, grad_scale=True))
    specs.append(triton_backend.kernel_specialization(
        torch.bfloat16, _every_path(torch.bfloat16), "split_apply_bfloat16_stochastic", mode=triton_backend._SPLIT_APPLY,
        stochastic=True, grad_scale=True, found_inf=True))
    return specs


def _unaligned_plan_classes(dtype: torch.dtype) -> tuple:
    """Every unaligned tile shape, as the backend plans them for launches that ask for fewer
    unaligned rows (master copies, stochastic rounding, the rows-split apply phase)."""
    state = torch.float64 if dtype == torch.float64 else torch.float32
    widths = [wide + narrow for wide, narrow, _ in triton_backend.WIDTH_CLASSES[state, False]]
    lengths = [width - 1 if width > 2 else width for width in widths] + [triton_backend.TILE_LANES[state, False] + 1]
    plan = triton_backend.plan_tiles([3] * len(lengths), lengths, [False] * len(lengths), state_dtype=state,
                                     fewer_unaligned_rows=True)
    return plan.classes


def unaligned_specializations() -> list[dict]:
    """The launches with the most live values per element, over every unaligned tile shape (an
    address per element and stream): where a tile of the plan spills first."""
    classes = _unaligned_plan_classes(torch.bfloat16)
    return [
        triton_backend.kernel_specialization(torch.bfloat16, classes, "unaligned_bfloat16_master", master=True,
                                             grad_scale=True, found_inf=True),
        triton_backend.kernel_specialization(torch.bfloat16, classes, "unaligned_bfloat16_stochastic", stochastic=True),
        triton_backend.kernel_specialization(torch.bfloat16, classes, "unaligned_split_apply_bfloat16_stochastic",
                                             mode=triton_backend._SPLIT_APPLY, stochastic=True, grad_scale=True,
                                             found_inf=True),
    ]


def main(out_dir: str) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"triton": triton.__version__}
    for spec in path_specializations() + unaligned_specializations() + set_specializations() + probes():
        report[spec["name"]] = compile_one(spec, out)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
