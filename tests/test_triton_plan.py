"""The Triton backend's tile plans: every row in exactly one slot, few idle lanes.

Issue 13 item 2: rows up to 8192 elements take the exact 20 B/element path, and no plan of a
parameter set of benchmarks/param_sets.py leaves more than a quarter of its lanes idle.
"""

import math

import numpy as np
import pytest
import torch

from benchmarks import param_sets
from ndadam_fused.backends import triton_backend
from ndadam_fused.backends.triton_backend import plan_for_shapes, plan_tiles

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("set_name", list(param_sets.SETS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_set_leaves_more_than_a_quarter_of_lanes_idle(set_name, dtype):
    """Idle lanes over all lanes of all tiles (that is, weighted by elements), from the plan
    the backend itself makes for the set's vector tensors in one group."""
    shapes = [s for s in param_sets.shapes(set_name) if len(s) >= 2]
    plan = plan_for_shapes(shapes, dtype)
    print(f"{set_name} {dtype}: {plan.idle_fraction:.3f} of {plan.lanes} lanes idle, {len(plan.tile_table)} tiles, {len(plan.classes)} tile shapes")
    assert plan.idle_fraction <= 0.25


@pytest.mark.parametrize("set_name", list(param_sets.SETS))
def test_float32_sets_take_the_exact_path_only(set_name):
    """Every row of every set up to 8192 long (the 1.3B set's MLP rows, WRN-28-10's 5760) is
    updated in one pass (20 bytes per element), none by the 32-byte statistics path; only rows
    past the cut-over (llama-7b-mlp's 11,008) are left to it."""
    shapes = [s for s in param_sets.shapes(set_name) if len(s) >= 2 and math.prod(s[1:]) <= triton_backend.SINGLE_PASS_MAX]
    assert shapes
    for dtype in (torch.float32, torch.bfloat16):
        assert all(wide > 0 for wide, _, _, _ in plan_for_shapes(shapes, dtype).classes)


def test_rows_up_to_8192_are_exact_in_float32():
    assert triton_backend.width_class(8192) is not None
    assert triton_backend.width_class(8193) is None
    assert triton_backend.SINGLE_PASS_MAX == 8192


def test_each_width_class_fills_three_quarters_of_its_lanes():
    for key, classes in triton_backend.WIDTH_CLASSES.items():
        widths = [wide + narrow for wide, narrow, _ in classes]
        assert widths == sorted(widths) and widths[-1] == triton_backend.TILE_LANES[key]
        for narrower, wider in zip(widths, widths[1:]):
            assert (narrower + 1) / wider > 0.75, (key, narrower, wider)
        for wide, narrow, rows in classes:
            assert wide & (wide - 1) == 0 and narrow & (narrow - 1) == 0 and rows & (rows - 1) == 0
            assert rows * (wide + narrow) <= triton_backend.TILE_LANES[key]


@pytest.mark.parametrize("seed", range(3))
def test_plan_covers_every_row_once(seed):
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, 700, 40)
    row_lens = rng.choice([1, 3, 27, 64, 96, 1000, 1440, 4096, 5000, 8192, 9000], 40)
    aligned = rng.random(40) < 0.5
    plan = plan_tiles(rows, row_lens, aligned)
    slots = plan.slot_table
    real = slots[slots[:, 0] >= 0]
    assert len(real) == rows.sum()
    assert len({(int(t), int(r)) for t, r in real}) == rows.sum()
    for tensor in range(40):
        mine = real[real[:, 0] == tensor]
        assert sorted(mine[:, 1]) == list(range(rows[tensor]))
    # Each tile holds ROWS consecutive slots of one class; tiles_per_tensor counts the tiles
    # a tensor's rows are in (the kernel's arrival count for its step).
    for index, (wide, narrow, per_tile, is_aligned) in enumerate(plan.classes):
        firsts = plan.tile_table[plan.tile_table[:, 0] == index, 1]
        for first in firsts:
            tensors = slots[first : first + per_tile, 0]
            for tensor in set(tensors[tensors >= 0].tolist()):
                assert aligned[tensor] == is_aligned
                length = row_lens[tensor]
                assert (wide == 0) == (length > (8192 if is_aligned else 4096))
                if wide:
                    assert length <= wide + narrow
    counted = np.zeros(40, dtype=np.int64)
    for index, first in plan.tile_table:
        per_tile = plan.classes[index][2]
        tensors = slots[first : first + per_tile, 0]
        for tensor in set(tensors[tensors >= 0].tolist()):
            counted[tensor] += 1
    assert (counted == plan.tiles_per_tensor).all()
    assert plan.elements == int((rows * row_lens).sum())
    assert 0 <= plan.idle_fraction < 1
