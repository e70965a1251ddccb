"""What the Triton kernel becomes on a Hopper GPU, proven without one: PTX and ptxas output.

tests/sm90_compile.py compiles every specialization a default launch can use for sm_90, plus
probe kernels made of the kernel's own helpers, and reports ptxas's register and spill counts
and the PTX instructions. It runs once per session in a subprocess (this process runs Triton
in its interpreter). The same checks hold for Triton 3.6 (the GPU machine's) and 3.8.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import param_sets

ROOT = Path(__file__).resolve().parents[1]
# Kernels with every code path of the step: per param dtype, per launch option (GradScaler,
# master weights, stochastic rounding), and the rows-split step's apply phase, which has the
# same closed forms and per-row scalars.
ROW_SPECIALIZATIONS = (
    "rows_float32", "rows_bfloat16", "rows_float16", "rows_float64",
    "rows_float16_grad_scale", "rows_bfloat16_master", "rows_bfloat16_stochastic", "rows_bfloat16_master_grad_scale",
    "split_apply_float32", "split_apply_float64", "split_apply_bfloat16_stochastic",
)
# The rows-split step's statistics phase: sums only.
STATISTICS_PHASE = ("split_statistics_float32", "split_statistics_bfloat16_master")
# Every unaligned tile shape of the launches with the most live values per element.
UNALIGNED = ("unaligned_bfloat16_master", "unaligned_bfloat16_stochastic", "unaligned_split_apply_bfloat16_stochastic")


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "sm90_compile.py"), str(out)],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for name, entry in report.items():
        if name != "triton":
            print(f"{name}: {entry['registers']} registers, {entry['spill_stores']} B spilled, compiled in {entry['compile_s']} s")
    return report


def _opcodes(entry, predicate):
    return {op: n for op, n in entry["opcodes"].items() if predicate(op)}


@pytest.mark.parametrize("probe", ["projected_dots_fp32", "projected_dots_fp64"])
def test_statistics_formula_is_not_contracted(sm90, probe):
    """||g||² = b - 2a² + a²c, m·g = f - a·d, w·g = a - a·c (the kernel's own helper, compiled
    alone): no FMA, and the four products are mul.rn, so that each product is rounded as b was
    and a row parallel to its gradient gets ||g||² = 0 exactly."""
    entry = sm90[probe]
    assert _opcodes(entry, lambda op: op.startswith("fma")) == {}, "the closed forms were contracted into FMAs"
    dtype = {"fp32": "f32", "fp64": "f64"}[probe.rsplit("_", 1)[1]]
    assert entry["opcodes"].get(f"mul.rn.{dtype}") == 4
    assert _opcodes(entry, lambda op: op.startswith("mul.") and op != f"mul.rn.{dtype}") == {}


@pytest.mark.parametrize("name", ROW_SPECIALIZATIONS)
def test_kernel_inlines_the_uncontracted_products(sm90, name):
    dtype = "f64" if name.endswith("float64") else "f32"
    assert sm90[name]["opcodes"].get(f"mul.rn.{dtype}", 0) >= 4


# Approximate instructions Triton emits for tl.exp2, tl.log2, tl.sqrt and "/" in float32.
APPROXIMATE = ("ex2.approx", "lg2.approx", "sqrt.approx", "rsqrt.approx", "div.full", "div.approx", "rcp.approx.f32", "rcp.approx.ftz.f32")


@pytest.mark.parametrize("name", ROW_SPECIALIZATIONS + STATISTICS_PHASE)
def test_per_row_scalars_round_to_nearest_without_flush(sm90, name):
    """Bias corrections in float64 (libdevice exp2/log2), sqrt.rn and div.rn for the per-row
    scalars, and no flush-to-zero on any float32 operation: a subnormal v̂ with eps = 0 must
    give the reference's step, not a flushed 0.

    Allowed: libdevice's own float64 log2 seeds a Newton step with rcp.approx.ftz.f64 (its
    input is a mantissa near 1, never subnormal), and its exp2 range check takes
    abs.ftz.f32 of a float64's high word, a comparison, not a value."""
    opcodes = sm90[name]["opcodes"]
    assert _opcodes(sm90[name], lambda op: op.startswith(APPROXIMATE)) == {}
    assert _opcodes(sm90[name], lambda op: ".ftz" in op and op not in ("abs.ftz.f32", "rcp.approx.ftz.f64")) == {}
    if name not in STATISTICS_PHASE:
        assert opcodes.get("sqrt.rn.f64", 0) > 0 and opcodes.get("div.rn.f64", 0) > 0


def _set_kernels(sm90):
    return {name: entry for name, entry in sm90.items() if name.startswith("set_")}


def test_every_set_kernel_fits_128_registers_without_spilling(sm90):
    """Issue 13 item 1: the kernel each parameter set of benchmarks/param_sets.py compiles to
    (float32 and float64, with the tile shapes its plan uses) stays within 128 registers per
    thread (16 warps: one block of 512 threads fills an SM's 64K registers) and spills
    nothing, in the kernel or in any tile path it calls."""
    kernels = _set_kernels(sm90)
    assert len(kernels) == 2 * len(param_sets.SETS)
    report = {name: (entry["registers"], entry["spill_stores"], entry["spill_loads"], entry["stack"]) for name, entry in kernels.items()}
    for name, (registers, spill_stores, spill_loads, stack) in report.items():
        assert registers <= 128 and spill_stores == 0 and spill_loads == 0 and stack == 0, (name, report)


@pytest.mark.parametrize("name", ROW_SPECIALIZATIONS + STATISTICS_PHASE + UNALIGNED)
def test_every_path_fits_128_registers_without_spilling(sm90, name):
    entry = sm90[name]
    assert entry["registers"] <= 128 and entry["spill_stores"] == 0 and entry["stack"] == 0, entry


def test_aligned_rows_move_128_bits_per_access(sm90):
    for name, entry in _set_kernels(sm90).items():
        wide = ("ld.global.v4.b32", "st.global.v4.b32") if name.endswith("float32") else ("ld.global.v2.b64", "st.global.v2.b64")
        assert all(entry["opcodes"].get(op, 0) > 0 for op in wide), (name, {k: v for k, v in entry["opcodes"].items() if "global" in k})


@pytest.mark.parametrize("name", ["rows_float16_grad_scale", "rows_bfloat16_master_grad_scale", "split_apply_bfloat16_stochastic",
                                  "split_statistics_bfloat16_master"])
def test_gradients_are_unscaled_by_a_rounded_division(sm90, name):
    """ḡ = grad / grad_scale as the reference divides: div.rn.f32 per element (Triton's "/"
    would be div.full.f32, 2 ulp; the test above refuses that anywhere)."""
    assert sm90[name]["opcodes"].get("div.rn.f32", 0) > 0


@pytest.mark.parametrize("name", ["rows_bfloat16", "rows_bfloat16_master", "rows_float16", "split_apply_bfloat16_stochastic"])
def test_params_are_rounded_to_nearest_as_the_reference_rounds_them(sm90, name):
    """Compiled, float32 -> bf16/fp16 is cvt.rn (the interpreter's own cast truncates to bf16:
    _round_to_nearest rounds on the bits there); no other rounding mode on the way to the param."""
    target = "bf16" if "bfloat16" in name else "f16"
    to_low_precision = _opcodes(sm90[name], lambda op: re.fullmatch(rf"cvt(\.\w+)*\.{target}(x2)?\.f32", op) is not None)
    assert to_low_precision and all(op.startswith("cvt.rn.") for op in to_low_precision), to_low_precision


def test_stochastic_rounding_hashes_with_32_bit_products(sm90):
    """rounding.py's hash is mod 2³²: fmix32's and the index and step multipliers appear as
    32-bit products (mul.lo.s32 by the constants as signed 32-bit numbers)."""
    ptx = Path(sm90["rows_bfloat16_stochastic"]["ptx"]).read_text()
    for constant in (0x85EBCA6B, 0xC2B2AE35, 0x85EBCA77):
        signed = constant - 2**32 if constant >= 2**31 else constant
        assert f", {signed};" in ptx and re.search(rf"mul\.lo\.s32\s+%r\d+, %r\d+, {signed};", ptx), hex(constant)
