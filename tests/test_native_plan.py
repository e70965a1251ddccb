"""The CUDA kernel's launch plan, computed by its own C++ code on the CPU.

``ndadam_fused._C.cuda_plan_lanes`` runs the plan of csrc/cuda/ndadam_cuda_plan.h (the code the
CUDA launch uses, built into every build of the extension, with or without CUDA) on a list of
(rows, row_length) shapes. A thread slot is one element a launched thread could hold (threads x
elements per thread, idle teams and idle warps included); idle = 1 - elements / slots.
"""

from __future__ import annotations

import math
import os

import pytest

from benchmarks.param_sets import SETS
from ndadam_fused.backends import native

if native._C is None:
    if os.environ.get("NDADAM_NO_EXTENSION") == "1":
        pytest.skip("NDADAM_NO_EXTENSION=1: the native extension is not built", allow_module_level=True)
    raise RuntimeError(f"the plan tests need the extension: {native.unavailable_reason('cpu')}")

#: The most idle thread slots a launch plan may leave on a parameter set (issue 13 item 2).
IDLE_LIMIT = 0.25
PARAM_BYTES = {"bf16-fp16": 2, "fp32": 4, "fp64": 8}


def vector_shapes(name: str) -> list[tuple[int, int]]:
    """(rows, row_length) of every vector tensor of a set: one launch per group and dtype."""
    return [(shape[0], math.prod(shape[1:])) for shape in SETS[name]() if len(shape) >= 2]


@pytest.mark.parametrize("dtype", sorted(PARAM_BYTES))
@pytest.mark.parametrize("name", sorted(SETS))
def test_no_plan_leaves_more_than_a_quarter_of_lanes_idle(name, dtype):
    lanes = native._C.cuda_plan_lanes(vector_shapes(name), PARAM_BYTES[dtype])
    idle = 1 - lanes["elements"] / lanes["slots"]
    assert idle <= IDLE_LIMIT, f"{name} ({dtype}): {idle:.1%} of the thread slots are idle"
    # Every row of every set up to 8192 long is on the exact path, 20 B per fp32 element; only
    # longer rows (llama-7b-mlp's 11,008) take the statistics path.
    longer = sum(rows * length for rows, length in vector_shapes(name) if length > 8192)
    assert lanes["statistics_elements"] == longer


def test_rows_up_to_8192_take_the_exact_path():
    assert native._C.cuda_plan_lanes([(3, 8192)], 4)["statistics_elements"] == 0
    assert native._C.cuda_plan_lanes([(3, 8193), (2, 8192)], 4)["statistics_elements"] == 3 * 8193
    assert native._C.cuda_plan_lanes([(3, 8192)], 4, 0)["statistics_elements"] == 3 * 8192


def test_many_small_tensors_share_blocks():
    """2,000 tensors of a few short rows: warps are packed across tensors, not a block each."""
    lanes = native._C.cuda_plan_lanes([(3, 20)] * 2000, 4)
    assert lanes["blocks"] <= math.ceil(2000 / 32)
    assert lanes["elements"] == 2000 * 60


@pytest.mark.parametrize("args, message", [
    (([(3, 8)], 3), "param_element_size"),
    (([(3,)], 4), r"shapes\[0\]"),
    (([(3, -1)], 4), r"shapes\[0\]"),
    (([(3, 8)], 4, -2), "max_single_pass_row_length"),
    (([(3, 8)], 4, 8193), "on-chip capacity 8192"),
])
def test_bad_arguments_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        native._C.cuda_plan_lanes(*args)
