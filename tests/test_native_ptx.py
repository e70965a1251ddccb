"""The checks tools/compile_cuda.py runs on the compiled CUDA kernel (tools/ptx_checks.py).

CI compiles the kernel for sm_90 with nvcc (`make cuda-compile`) and fails on a spill, a stack
frame, flush to zero, an approximate or not-round-to-nearest square root or division, or a
product_without_fma fused into an fma. These tests show that each check fails on PTX or ptxas
output that has the fault, and passes on output that has not; the samples are written in the
format nvcc 13 emits, with the source lines of csrc/ndadam_row_math.h as they are now.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import ptx_checks  # noqa: E402

KERNEL = "_ZN6ndadam11cuda_kernel18vector_step_kernelIffEEvNS0_15LaunchArgumentsE"

PTXAS_REPORT = f"""\
ptxas info    : 28 bytes gmem
ptxas info    : Compiling entry function '{KERNEL}' for 'sm_90'
ptxas info    : Function properties for {KERNEL}
    {{stack}} bytes stack frame, {{stores}} bytes spill stores, {{loads}} bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 100224 bytes smem
ptxas info    : Compile time = 256.190 ms
ptxas info    : Function properties for __internal_accurate_pow
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""


def test_resources_are_read_per_kernel():
    functions = ptx_checks.kernel_resources(PTXAS_REPORT.format(stack=0, stores=0, loads=0))
    kernel = functions[0]
    assert (kernel.name, kernel.registers, kernel.shared_bytes, kernel.is_entry) == (
        "vector_step_kernel<float, float>", 64, 100224, True)
    assert [f.name for f in functions] == ["vector_step_kernel<float, float>", "__internal_accurate_pow"]
    assert ptx_checks.resource_problems(functions) == []


@pytest.mark.parametrize("stack, stores, loads", [(32, 44, 56), (16, 0, 0), (0, 0, 8)])
def test_a_spill_or_stack_frame_fails(stack, stores, loads):
    problems = ptx_checks.resource_problems(ptx_checks.kernel_resources(PTXAS_REPORT.format(stack=stack, stores=stores, loads=loads)))
    assert len(problems) == 1 and "vector_step_kernel<float, float>" in problems[0]


def test_a_report_without_kernels_fails():
    assert ptx_checks.resource_problems(ptx_checks.kernel_resources("ptxas info : 28 bytes gmem")) != []


def _sample_ptx(*, ftz="", sqrt="sqrt.rn.f32", division="div.rn.f32", product="mul.rn.f32", product_line=None):
    """PTX of one kernel with the row math's instructions at their source lines (nvcc -lineinfo)."""
    lines = ptx_checks.row_math_lines(ptx_checks.ROW_MATH.read_text())
    body_line = min(lines.product_body) + 1 if product_line is None else product_line
    out = [f".visible .entry {KERNEL}(", ".param .align 8 .b8 param_0[72]", ")", "{"]
    out.append(f"\tadd{ftz}.f32 \t%f1, %f2, %f3;")
    step_line, norm_line, root_line = min(lines.step_size), min(lines.inverse_norm), min(lines.square_root)
    out += [f"\t.loc\t4 {step_line} 3, function_name $L__info_string1, inlined_at 2 400 3",
            f"\t.loc\t4 {root_line} 95, function_name $L__info_string2, inlined_at 4 {step_line} 3",
            f"\t{sqrt} \t%f4, %f5;",
            f"\t.loc\t4 {max(lines.step_size)} 3, function_name $L__info_string1, inlined_at 2 400 3",
            f"\t{division} \t%f6, %f7, %f4;",
            f"\t.loc\t4 {norm_line} 3, function_name $L__info_string3, inlined_at 2 410 3",
            "\trcp.rn.f32 \t%f8, %f9;"]
    for site in sorted(lines.product_call_sites):
        out += [f"\t.loc\t4 {site} 3, function_name $L__info_string4, inlined_at 2 459 3",
                f"\t.loc\t4 {body_line} 3, function_name $L__info_string5, inlined_at 4 {site} 3",
                f"\t{product} \t%f10, %f11, %f12;",
                f"\t.loc\t4 {site} 3, function_name $L__info_string4, inlined_at 2 459 3",
                "\tadd.f32 \t%f13, %f10, %f14;"]
    out += ["\tret;", "}", '\t.file\t2 "/x/csrc/cuda/ndadam_cuda_kernel.cuh"', '\t.file\t4 "/x/csrc/cuda/../ndadam_row_math.h"']
    return "\n".join(out)


def test_clean_ptx_passes():
    assert ptx_checks.numerics_problems(_sample_ptx()) == []


@pytest.mark.parametrize("change, message", [
    ({"ftz": ".ftz"}, "flush to zero"),
    ({"sqrt": "sqrt.approx.f32"}, "approximate instruction"),
    ({"sqrt": "sqrt.approx.ftz.f32"}, "flush to zero"),
    ({"division": "div.full.f32"}, "division not rounded to nearest"),
    ({"division": "div.approx.f32"}, "approximate instruction"),
    ({"division": "mul.f32"}, "no div.rn from step_size's division"),
    ({"sqrt": "mov.f32"}, "no sqrt.rn from the row math's square root"),
    ({"product": "mul.f32"}, "is not a mul.rn"),
    ({"product": "fma.rn.f32"}, "fused into an fma"),
])
def test_each_numerics_fault_fails(change, message):
    problems = ptx_checks.numerics_problems(_sample_ptx(**change))
    assert any(message in p for p in problems), problems


def test_a_product_missing_at_a_call_site_fails():
    # The product of one call site folded into its line (an fma there, nothing from the helper).
    ptx = _sample_ptx()
    lines = ptx_checks.row_math_lines(ptx_checks.ROW_MATH.read_text())
    site = min(lines.product_call_sites)
    body = min(lines.product_body) + 1
    ptx = ptx.replace(f"\t.loc\t4 {body} 3, function_name $L__info_string5, inlined_at 4 {site} 3\n\tmul.rn.f32 \t%f10, %f11, %f12;",
                      "\tfma.rn.f32 \t%f10, %f11, %f12, %f15;", 1)
    assert any(f"no instruction of product_without_fma called at ndadam_row_math.h:{site}" in p
               for p in ptx_checks.numerics_problems(ptx))


def test_row_math_lines_are_found():
    lines = ptx_checks.row_math_lines(ptx_checks.ROW_MATH.read_text())
    source = ptx_checks.ROW_MATH.read_text().splitlines()
    assert len(lines.product_call_sites) == 4
    assert all("product_without_fma(" in source[n - 1] for n in lines.product_call_sites)
    assert any("__fmul_rn" in source[n - 1] for n in lines.product_body)
    assert any("__dmul_rn" in source[n - 1] for n in lines.product_body)
    assert all(" / " in source[n - 1] for n in lines.step_size | lines.inverse_norm)


def _kernel_ptx(name, lines):
    return "\n".join([f".visible .entry {name}(", ")", "{", *[f"\t{line};" for line in lines], "\tret;", "}"])


BF16_KERNEL = "_ZN6ndadam11cuda_kernel18vector_step_kernelIN3c108BFloat16EfEEvNS0_15LaunchArgumentsE"
WIDE_BF16 = ["cp.async.cg.shared.global [%r1], [%rd1], 16", "ld.v4.u32 {%r2, %r3, %r4, %r5}, [%rd2]",
             "st.v4.u32 [%rd3], {%r2, %r3, %r4, %r5}"]


def test_16_byte_accesses_pass():
    assert ptx_checks.access_width_problems(_kernel_ptx(BF16_KERNEL, WIDE_BF16)) == []
    fp32 = ["cp.async.cg.shared.global [%r1], [%rd1], 16", "ld.global.v4.f32 {%f1, %f2, %f3, %f4}, [%rd2]",
            "st.v4.f32 [%rd3], {%f1, %f2, %f3, %f4}"]
    assert ptx_checks.access_width_problems(_kernel_ptx(KERNEL, fp32)) == []


@pytest.mark.parametrize("narrower, message", [
    (("cp.async.cg.shared.global [%r1], [%rd1], 16", "cp.async.ca.shared.global [%r1], [%rd1], 8"), "asynchronous copy"),
    (("ld.v4.u32 {%r2, %r3, %r4, %r5}, [%rd2]", "ld.v2.u32 {%r2, %r3}, [%rd2]"), "16-byte load"),
    (("st.v4.u32 [%rd3], {%r2, %r3, %r4, %r5}", "st.v2.u32 [%rd3], {%r2, %r3}"), "16-byte store"),
])
def test_narrower_bf16_accesses_fail(narrower, message):
    lines = [narrower[1] if line == narrower[0] else line for line in WIDE_BF16]
    problems = ptx_checks.access_width_problems(_kernel_ptx(BF16_KERNEL, lines))
    assert len(problems) == 1 and message in problems[0], problems
