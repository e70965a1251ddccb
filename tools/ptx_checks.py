"""Checks of what nvcc made of the CUDA kernel, read from its ptxas report and its PTX.

tools/compile_cuda.py runs them on every compile (CI: ``make cuda-compile``); tests/test_native_ptx.py
tests them on small samples. Both are plain text checks, no GPU needed:

- :func:`kernel_resources` / :func:`resource_problems`: registers, stack frame and spills per
  kernel (and per device function it calls) from ``ptxas -v``; a spill or a stack frame fails.
- :func:`numerics_problems`: the per-row scalars are IEEE round-to-nearest and nothing is flushed
  to zero. Every kernel entry is free of ``.ftz`` and of approximate instructions
  (``sqrt.approx``, ``div.approx``, ``div.full``, ``rcp.approx``, ``rsqrt.approx``, ``ex2.approx``,
  ``lg2.approx``); every ``sqrt`` and floating ``div`` is ``.rn``; the row math's square root,
  step size and inverse norm lines do compile to ``sqrt.rn`` / ``div.rn`` (``rcp.rn`` for
  ``1 / x``); and every call of
  ``product_without_fma`` in ``update_from_statistics`` is a ``mul.rn`` of its own, never part of
  an ``fma``. Source lines come from ``-lineinfo`` (``.loc file line col, ..., inlined_at file
  line col``), matched against csrc/ndadam_row_math.h.
- :func:`access_width_problems`: every kernel moves rows 16 bytes at a time where the plan allows
  it: 16-byte asynchronous copies into shared memory (exact path) and 16-byte loads and stores
  of its param type (statistics path): 8 elements of bf16/fp16, 4 of fp32, 2 of fp64.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROW_MATH = Path(__file__).resolve().parent.parent / "csrc" / "ndadam_row_math.h"

_APPROXIMATE = re.compile(r"\b(sqrt\.approx|div\.approx|div\.full|rcp\.approx|rsqrt\.approx|ex2\.approx|lg2\.approx)")
_FTZ = re.compile(r"\.ftz\b")


@dataclass
class KernelResources:
    name: str
    registers: int = 0
    stack_bytes: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    shared_bytes: int = 0
    is_entry: bool = False


#: The kernels' RowWrite template argument (csrc/ndadam_row_math.h), by its value.
ROW_WRITES = {"0": "RowWrite::kParam", "1": "RowWrite::kMasterAndParam", "2": "RowWrite::kStochasticParam"}


def readable_kernel_name(mangled: str) -> str:
    """``<kernel><param, acc[, RowWrite]>`` from a mangled name (the kernels and dtypes this project
    instantiates), e.g. vector_step_kernel<c10::BFloat16, float, RowWrite::kMasterAndParam>."""
    types = {"f": "float", "d": "double", "N3c108BFloat16E": "c10::BFloat16", "N3c104HalfE": "c10::Half"}
    match = re.search(
        r"(vector_step_kernel|row_statistics_kernel|apply_row_statistics_kernel)"
        r"I(N3c108BFloat16E|N3c104HalfE|f|d)(f|d)(?:LNS_8RowWriteE(\d)E|Lb([01])E)?E", mangled
    )
    if match:
        arguments = [types[match.group(2)], types[match.group(3)]]
        if match.group(4) is not None:
            arguments.append(ROW_WRITES.get(match.group(4), f"RowWrite({match.group(4)})"))
        if match.group(5) is not None:
            arguments.append("true" if match.group(5) == "1" else "false")
        return f"{match.group(1)}<{', '.join(arguments)}>"
    return mangled


def kernel_resources(ptxas_report: str) -> list[KernelResources]:
    """Per function of a ``ptxas -v`` report: registers, stack, spills, shared memory."""
    functions: list[KernelResources] = []
    current: KernelResources | None = None
    for line in ptxas_report.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)'", line)
        properties = re.search(r"Function properties for (\S+)", line)
        if entry:
            current = KernelResources(readable_kernel_name(entry.group(1)), is_entry=True)
            functions.append(current)
        elif properties:
            name = readable_kernel_name(properties.group(1))
            if current is None or current.name != name:
                current = KernelResources(name)
                functions.append(current)
        if current is None:
            continue
        spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills:
            current.stack_bytes, current.spill_store_bytes, current.spill_load_bytes = map(int, spills.groups())
        used = re.search(r"Used (\d+) registers", line)
        if used:
            current.registers = int(used.group(1))
            shared = re.search(r"(\d+) bytes smem", line)
            current.shared_bytes = int(shared.group(1)) if shared else 0
    return functions


def resource_problems(functions: list[KernelResources]) -> list[str]:
    problems = []
    if not any(f.is_entry for f in functions):
        problems.append("the ptxas report names no kernel: was it compiled with -Xptxas -v?")
    for f in functions:
        if f.spill_store_bytes or f.spill_load_bytes or f.stack_bytes:
            problems.append(
                f"{f.name}: {f.spill_store_bytes} bytes spill stores, {f.spill_load_bytes} bytes spill loads, "
                f"{f.stack_bytes} bytes stack frame"
            )
    return problems


@dataclass
class Instruction:
    text: str
    function: str
    # (file name, line) of every .loc of the block before it, innermost last, with their
    # inlined_at sites: all the source lines it comes from.
    locations: list[tuple[str, int, tuple[str, int] | None]] = field(default_factory=list)


def parse_ptx(ptx: str) -> list[Instruction]:
    files: dict[str, str] = {}
    for match in re.finditer(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, flags=re.M):
        files[match.group(1)] = Path(match.group(2)).name
    instructions = []
    function = ""
    block: list[tuple[str, int, tuple[str, int] | None]] = []
    current: list[tuple[str, int, tuple[str, int] | None]] = []
    for raw in ptx.splitlines():
        line = raw.strip()
        header = re.match(r"^(?:\.visible\s+|\.weak\s+)?\.(?:entry|func)\s+(?:\([^)]*\)\s*)?([\w$]+)", line)
        if header:
            function = header.group(1)
            block, current = [], []
            continue
        loc = re.match(r"^\.loc\s+(\d+)\s+(\d+)\s+\d+(?:.*inlined_at\s+(\d+)\s+(\d+)\s+\d+)?", line)
        if loc:
            inlined = (files.get(loc.group(3), "?"), int(loc.group(4))) if loc.group(3) else None
            block.append((files.get(loc.group(1), "?"), int(loc.group(2)), inlined))
            continue
        if not line or line.startswith(("//", ".", "{", "}", "$")) or line.endswith(":"):
            continue
        if block:
            current, block = block, []
        text = line.rstrip(";")
        if text.startswith("@"):  # a predicate: the instruction follows it
            text = text.split(None, 1)[1] if " " in text else text
        instructions.append(Instruction(text, function, list(current)))
    return instructions


def _function_lines(source: str, signature: str) -> range:
    """Lines (1-based) of the function whose definition contains `signature`, to its closing brace."""
    lines = source.splitlines()
    start = next(i for i, text in enumerate(lines) if signature in text)
    depth, seen_brace = 0, False
    for i in range(start, len(lines)):
        depth += lines[i].count("{") - lines[i].count("}")
        seen_brace = seen_brace or "{" in lines[i]
        if seen_brace and depth == 0:
            return range(start + 1, i + 2)
    raise ValueError(f"no end of {signature!r}")


@dataclass
class RowMathLines:
    square_root: set[int]
    step_size: set[int]
    inverse_norm: set[int]
    product_body: set[int]           # the lines of product_without_fma (its multiply)
    product_call_sites: set[int]     # lines of update_from_statistics that call it


def row_math_lines(source: str) -> RowMathLines:
    text = source.splitlines()

    def lines_with(function: range, needle: str) -> set[int]:
        return {n for n in function if needle in text[n - 1]}

    square_roots = set()
    for signature in ("float square_root(float x)", "double square_root(double x)"):
        square_roots |= set(_function_lines(source, signature))
    products = set()
    for signature in ("float product_without_fma(float x, float y)", "double product_without_fma(double x, double y)"):
        products |= set(_function_lines(source, signature))
    step = _function_lines(source, "acc_t step_size(acc_t v_new")
    norm = _function_lines(source, "acc_t inverse_norm(acc_t sq_norm")
    closed_forms = _function_lines(source, "RowUpdate<acc_t> update_from_statistics(")
    return RowMathLines(
        square_root=square_roots,
        step_size=lines_with(step, " / "),
        inverse_norm=lines_with(norm, " / "),
        product_body=products,
        product_call_sites=lines_with(closed_forms, "product_without_fma("),
    )


def numerics_problems(ptx: str, row_math_source: str | None = None) -> list[str]:
    """What breaks IEEE round-to-nearest per-row scalars or product_without_fma in this PTX."""
    source = row_math_source if row_math_source is not None else ROW_MATH.read_text()
    lines = row_math_lines(source)
    row_math = ROW_MATH.name
    instructions = parse_ptx(ptx)
    kernels = sorted({i.function for i in instructions if _is_kernel(i.function)})
    problems = []
    if not kernels:
        return ["the PTX holds no kernel of this project (vector_step_kernel, row_statistics_kernel, "
                "apply_row_statistics_kernel)"]

    def from_lines(instruction: Instruction, wanted: set[int]) -> bool:
        return any(file == row_math and line in wanted for file, line, _ in instruction.locations)

    for kernel in kernels:
        name = readable_kernel_name(kernel)
        body = [i for i in instructions if i.function == kernel]
        for i in body:
            if _FTZ.search(i.text):
                problems.append(f"{name}: flush to zero: {i.text}")
            if _APPROXIMATE.search(i.text):
                problems.append(f"{name}: approximate instruction: {i.text}")
            opcode = i.text.split()[0]
            if opcode.startswith("sqrt.") and not opcode.startswith("sqrt.rn."):
                problems.append(f"{name}: square root not rounded to nearest: {i.text}")
            if re.match(r"div\.[a-z.]*f(32|64)", opcode) and not opcode.startswith("div.rn."):
                problems.append(f"{name}: division not rounded to nearest: {i.text}")
        if "row_statistics_kernel" in kernel and "apply_row_statistics_kernel" not in kernel:
            continue  # phase 1 of the rows-split step takes sums only: no per-row scalars
        # 1 / x compiles to rcp.rn, the same correctly rounded quotient as div.rn.
        checks = [
            ("the row math's square root", lines.square_root, ("sqrt.rn.",)),
            ("step_size's division", lines.step_size, ("div.rn.",)),
            ("inverse_norm's division", lines.inverse_norm, ("div.rn.", "rcp.rn.")),
        ]
        for what, wanted, opcodes in checks:
            if not any(i.text.startswith(opcodes) and from_lines(i, wanted) for i in body):
                found = " or ".join(o[:-1] for o in opcodes)
                problems.append(f"{name}: no {found} from {what} (lines {sorted(wanted)} of {row_math})")
        for i in body:
            if i.text.startswith("fma.") and from_lines(i, lines.product_body):
                problems.append(f"{name}: product_without_fma fused into an fma: {i.text}")
        for site in sorted(lines.product_call_sites):
            products = [
                i for i in body
                if any(f == row_math and l in lines.product_body and at == (row_math, site) for f, l, at in i.locations)
            ]
            if not products:
                problems.append(f"{name}: no instruction of product_without_fma called at {row_math}:{site}")
            for i in products:
                if not re.match(r"mul\.rn\.f(32|64)\b", i.text):
                    problems.append(f"{name}: product_without_fma at {row_math}:{site} is not a mul.rn: {i.text}")
    return problems


# 16-byte global accesses of each kernel's param type (generic or .global addressing).
_WIDE_PARAM_ACCESS = {
    "float": r"v4\.f32",
    "double": r"v2\.f64",
    "c10::BFloat16": r"v4\.(?:u32|b32)",
    "c10::Half": r"v4\.(?:u32|b32)",
}


def _is_kernel(function: str) -> bool:
    return any(name in function for name in ("vector_step_kernel", "row_statistics_kernel"))


# A 16-byte global access of any element type.
_WIDE_ACCESS = r"(?:ld|st)(?:\.global)?(?:\.nc)?\.v(?:4\.(?:f32|b32|u32)|2\.(?:f64|b64|u64))\b"


def access_width_problems(ptx: str) -> list[str]:
    """Kernels that never move their rows 16 bytes at a time.

    The vector step: 16-byte asynchronous copies (exact path) and 16-byte loads and stores of
    params (statistics path; with master copies or stochastic rounding, of some row array: their
    16-bit params move 8 bytes at a time there, their fp32 arrays 16). The rows-split kernels,
    which stage nothing: 16-byte loads (phase 1) and loads and stores (phase 2) of some row array
    (likewise).
    """
    instructions = parse_ptx(ptx)
    kernels = sorted({i.function for i in instructions if _is_kernel(i.function)})
    if not kernels:
        return ["the PTX holds no kernel of this project (vector_step_kernel, row_statistics_kernel, "
                "apply_row_statistics_kernel)"]
    problems = []
    for kernel in kernels:
        name = readable_kernel_name(kernel)
        if "row_statistics_kernel" in kernel:
            body = [i.text for i in instructions if i.function == kernel]
            wanted = (("ld", "load"), ("st", "store")) if "apply_row_statistics_kernel" in kernel else (("ld", "load"),)
            for op, what in wanted:
                if not any(re.match(_WIDE_ACCESS, t) and t.startswith(op) for t in body):
                    problems.append(f"{name}: no 16-byte {what} of a row array")
            continue
        if "RowWrite::kParam>" not in name and "RowWrite::" in name:
            # Master copies and stochastic rounding: the statistics path moves 4 elements at a time
            # (the fp32 arrays 16 bytes); the exact path stages 16 bytes at a time like the rest.
            body = [i.text for i in instructions if i.function == kernel]
            if not any(re.match(r"cp\.async\.cg\.shared\.global\s+\[[^]]+\],\s*\[[^]]+\],\s*16\b", t) for t in body):
                problems.append(f"{name}: no 16-byte asynchronous copy into shared memory (the exact path's widest access)")
            for op, what in (("ld", "load"), ("st", "store")):
                if not any(re.match(_WIDE_ACCESS, t) and t.startswith(op) for t in body):
                    problems.append(f"{name}: no 16-byte {what} of a row array (the statistics path's widest access)")
            continue
        name = readable_kernel_name(kernel)
        param = re.search(r"<([^,]*),", name)
        wide = _WIDE_PARAM_ACCESS.get(param.group(1) if param else "", None)
        body = [i.text for i in instructions if i.function == kernel]
        if not any(re.match(r"cp\.async\.cg\.shared\.global\s+\[[^]]+\],\s*\[[^]]+\],\s*16\b", t) for t in body):
            problems.append(f"{name}: no 16-byte asynchronous copy into shared memory (the exact path's widest access)")
        if wide is None:
            problems.append(f"{name}: unknown param type")
            continue
        for op, what in (("ld", "load"), ("st", "store")):
            if not any(re.match(rf"{op}(?:\.global)?(?:\.nc)?\.{wide}\b", t) for t in body):
                problems.append(f"{name}: no 16-byte {what} of params (the statistics path's widest access)")
    return problems
