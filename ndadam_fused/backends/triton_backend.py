"""The Triton backend: one kernel launch updates every row of every vector tensor of a group.

Per row ``w`` (length ``L``) with gradient ``ḡ``, first moment ``m`` (``L`` elements) and
second moment ``v`` (one scalar), step ``t`` and lr ``α`` (DESIGN.md section 4)::

    g  = ḡ - (ḡ·w) w;   m' = β1 m + (1-β1) g;   v' = β2 v + (1-β2) ||g||²
    s  = α / (1-β1^t) / (sqrt(v' / (1-β2^t)) + ε)
    w' = (w - s m') / ||w - s m'||

Rows of up to :data:`SINGLE_PASS_MAX` (8192) elements (at most the :data:`TILE_LANES` of
their state dtype and alignment: 8192 for 16-byte aligned float32 rows, 4096 for float64 or
unaligned float32, 2048 for unaligned float64) take the exact single-pass path: the row is
loaded once into registers, ``g`` and ``||w - s m'||`` are computed explicitly, and it is
stored once (20 bytes per fp32 element). Longer rows take the statistics path: pass 1
accumulates ``a = ḡ·w, b = ḡ·ḡ, c = w·w, d = m·w, e = m·m, f = m·ḡ`` over chunks, the closed
forms give ``||g||², ||m'||², w·m'`` and ``||w̄||²``, and pass 2 writes ``m'`` and ``w'``
(32 bytes per element).

Tiles. A program updates one tile: ``ROWS`` row slots of one width class (see
:data:`WIDTH_CLASSES`) and alignment, each slot any row of any tensor of the group whose
length fits the class. A class's width is the sum of two powers of two, ``WIDE + NARROW``
(2^k, 1.25·2^k, 1.5·2^k), so that a row of more than one element fills more than three
quarters of its lanes, and ``ROWS * width`` is at most :data:`TILE_LANES`, so that tiles hold
about as many elements per thread whatever their rows. The kernel is compiled for the tile
shapes a group's plan uses (:func:`plan_tiles`), each a function of its own (``noinline``:
compile time grows with the number of shapes, not with its square).

Tables (:class:`GroupTable`), built once per set of tensors and cached on what stays put
(params, state, shapes; never gradients):

- ``tensor_table`` int64 ``[n_tensors, 6]``: param and exp_avg offsets (elements from the two
  base pointers passed to the kernel, which Triton knows are 16-byte aligned), the addresses of
  exp_avg_sq and step, the row length, and how many tiles hold rows of the tensor;
- ``slot_table`` int32 ``[n_slots, 2]``: (tensor, row) of each row slot, class by class, each
  class padded to whole tiles with tensor -1;
- ``tile_table`` int32 ``[n_tiles, 2]``: (tile shape, first slot);
- ``arrivals`` int32 ``[n_tensors]``: the step counter's arrival count (below).

The gradients' offsets (int64 ``[n_tensors]``) are copied at every step from pinned memory,
asynchronously on the current stream. lr, β1, β2 and ε are read from a float64 device tensor
and the step from each tensor's own ``state["step"]``: an lr schedule never recompiles the
kernel, and nothing here syncs with the host. The kernel increments the steps itself: every
tile reads the step, then counts its arrival at each of its tensors with an atomic add; the
last tile to arrive at a tensor writes step + 1 and resets the count, so that one launch is the
whole step.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.optim.optimizer import Optimizer

from .scalars import adam_step

__all__ = [
    "vector_step", "scalar_step", "GroupTable", "group_table", "plan_tiles", "TilePlan", "width_class",
    "WIDTH_CLASSES", "SINGLE_PASS_MAX", "TILE_LANES", "STATISTICS_CHUNK", "kernel_specialization",
]

_NUM_WARPS = 16
#: Elements per tile, by (state dtype, rows 16-byte aligned): rows of one width class fill a
#: tile up to this many lanes, held in registers by _NUM_WARPS warps: 16 float32 or 8 float64
#: elements of each operand per thread, within 128 registers and without spilling
#: (tests/test_triton_sm90.py). Unaligned rows get half: every element has its own 64-bit
#: address where an aligned row has one per 16 bytes.
TILE_LANES = {
    (torch.float32, True): 8192, (torch.float32, False): 4096,
    (torch.float64, True): 4096, (torch.float64, False): 2048,
}
#: Rows up to this length take the exact path (at most the TILE_LANES of their state dtype
#: and alignment: 8192 for aligned float32 rows); longer rows take the statistics path.
SINGLE_PASS_MAX = 8192


def _width_classes(max_width: int, lanes: int) -> tuple[tuple[int, int, int], ...]:
    """(WIDE, NARROW, ROWS) per class, by width WIDE + NARROW: 2^k as 2^(k-1) + 2^(k-1), 1.25·2^k
    as 2^k + 2^(k-2) and 1.5·2^k as 2^k + 2^(k-1), from 2 up to ``max_width``. ROWS is the
    largest power of two with ROWS * width <= ``lanes`` and at most one row per thread (the
    per-row scalars are float64: one set per thread keeps the code small).

    Between two classes the width grows by at most a third, so a row uses more than 3/4 of
    its lanes (a row of length L fills L/width of them): no tile is more than 25% idle.
    """
    pieces = set()
    power = 2
    while power <= max_width:
        pieces.add((power // 2, power // 2))
        for narrow in (power // 4, power // 2):
            if narrow >= 1 and power + narrow <= max_width:
                pieces.add((power, narrow))
        power *= 2
    classes = []
    for wide, narrow in sorted(pieces, key=sum):
        rows = 1
        while 2 * rows * (wide + narrow) <= lanes and 2 * rows <= 32 * _NUM_WARPS:
            rows *= 2
        classes.append((wide, narrow, rows))
    return tuple(classes)


#: The exact path's tile shapes by (state dtype, aligned), narrowest first: (WIDE, NARROW, ROWS).
WIDTH_CLASSES = {key: _width_classes(lanes, lanes) for key, lanes in TILE_LANES.items()}
#: Elements per chunk of the statistics path's loops: 4 per thread, one 128-bit access of fp32.
STATISTICS_CHUNK = 4 * 32 * _NUM_WARPS

# tensor_table columns
_PARAM_OFFSET, _EXP_AVG_OFFSET, _EXP_AVG_SQ, _STEP, _ROW_LEN, _TILES = range(6)
_FIELDS = tl.constexpr(6)

# Under the interpreter the kernel runs as NumPy, which never contracts a product into an FMA;
# compiled, the products that must round on their own are written as PTX.
_INTERPRETER = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _product_rn(x, y):
    """x*y rounded to nearest on its own: never contracted with a neighbouring add into an FMA.

    ||g||² = b - 2a² + a²c subtracts nearly equal terms (a² = b on a row of length 1); with
    both products rounded as b was, the difference is exactly 0 and a length-1 row stays ±1.
    Contracted, fma(-2a, a, b) keeps the exact a² and leaves twice b's rounding error.
    """
    if _INTERPRETER:
        return x * y
    elif x.dtype == tl.float64:
        return tl.inline_asm_elementwise("mul.rn.f64 $0, $1, $2;", "=d,d,d", [x, y], dtype=tl.float64, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [x, y], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _bias_corrections(hyper, step):
    """(1 - β1^t, 1 - β2^t) in float64 for the float32 step ``t``;
    hyper: float64 [lr, β1, β2, ε, log2 β1, log2 β2].

    β^t = 2^(t log2 β) in float64 (libdevice exp2; log2 β from the host; exact for β = 0 since
    log2 0 = -inf): a few ulp of float32 error in β2^t would grow about 100x in 1 - β2^t at t = 1.
    """
    t = step.to(tl.float64)
    bias_correction1 = 1.0 - tl.exp2(t * tl.load(hyper + 4))
    bias_correction2 = 1.0 - tl.exp2(t * tl.load(hyper + 5))
    return bias_correction1, bias_correction2


@triton.jit
def _first_moment_weights(hyper, STATE_DTYPE: tl.constexpr):
    """(β1, 1 - β1) rounded once from float64 to the state dtype, as the reference's scalars are."""
    beta1 = tl.load(hyper + 1)
    return beta1.to(STATE_DTYPE), (1.0 - beta1).to(STATE_DTYPE)


@triton.jit
def _second_moment(hyper, v, g_sq):
    """v' = β2 v + (1-β2) ||g||² in float64 (a per-row scalar: no flush of a subnormal v')."""
    beta2 = tl.load(hyper + 2)
    return beta2 * v.to(tl.float64) + (1.0 - beta2) * g_sq.to(tl.float64)


@triton.jit
def _step_size(hyper, v_new, bias_correction1, bias_correction2):
    """s = α / (1-β1^t) / (sqrt(v' / (1-β2^t)) + ε), float64 in and out (sqrt.rn, div.rn).

    A denominator of 0 (ε = 0 and every projected gradient so far 0, so m' = 0) divides by 1,
    as the reference does: the step is 0, not 0/0.
    """
    denom = tl.sqrt(v_new / bias_correction2) + tl.load(hyper + 3)
    denom = tl.where(denom > 0, denom, 1.0)
    return tl.load(hyper + 0) / bias_correction1 / denom


@triton.jit
def _inverse_sqrt(sq_norm):
    """1 / sqrt(x) for a per-row x, in float64 (sqrt.rn, div.rn: no approximation, no flush)."""
    return 1.0 / tl.sqrt(sq_norm.to(tl.float64))


@triton.jit
def _projected_dots(a, b, c, d, f):
    """(||g||², m·g, w·g) from a = ḡ·w, b = ḡ·ḡ, c = w·w, d = m·w, f = m·ḡ, in the state dtype:
    ||g||² = b - 2a² + a²c (clamped at 0), m·g = f - a·d, w·g = a - a·c, every product
    rounded on its own (see _product_rn)."""
    a_sq = _product_rn(a, a)
    g_sq = tl.maximum((b - (a_sq + a_sq)) + _product_rn(a_sq, c), 0.0)
    return g_sq, f - _product_rn(a, d), a - _product_rn(a, c)


@triton.jit
def _updated_row_sq_norm(hyper, step_size, c, d, e, g_sq, m_dot_g, w_dot_g):
    """||w - s m'||² from the row statistics, in float64 (step_size float64):
    ||m'||² = β1² e + 2β1(1-β1)(m·g) + (1-β1)² ||g||² (clamped at 0), w·m' = β1 d + (1-β1)(w·g),
    ||w̄||² = c - 2s (w·m') + s² ||m'||²."""
    beta1 = tl.load(hyper + 1)
    one_minus_beta1 = 1.0 - beta1
    m_new_sq = beta1 * beta1 * e.to(tl.float64) + 2.0 * beta1 * one_minus_beta1 * m_dot_g.to(tl.float64) \
        + one_minus_beta1 * one_minus_beta1 * g_sq.to(tl.float64)
    m_new_sq = tl.maximum(m_new_sq, 0.0)
    w_dot_m_new = beta1 * d.to(tl.float64) + one_minus_beta1 * w_dot_g.to(tl.float64)
    return c.to(tl.float64) - 2.0 * step_size * w_dot_m_new + step_size * step_size * m_new_sq




@triton.jit
def _tile_rows(tensor_table, slot_table, grad_offsets, arrivals, first_slot,
               ROWS: tl.constexpr, STATE_DTYPE: tl.constexpr):
    """Where the ROWS row slots of a tile live, and the step they take.

    Returns, per slot: valid (not padding), row length, start of the row in param / grad /
    exp_avg (elements from the base pointers), a pointer to its exp_avg_sq, and t, the step
    this launch takes (state["step"] + 1).

    Each tile reads the steps of its tensors, then counts its arrival at each of them (one
    atomic per tensor and tile, release after those reads); the tile that arrives last, when
    every other tile has read the step, writes t and resets the count for the next launch.
    """
    lane = tl.arange(0, ROWS)
    slot = first_slot + lane
    tensor = tl.load(slot_table + 2 * slot)
    row = tl.load(slot_table + 2 * slot + 1).to(tl.int64)
    previous = tl.load(slot_table + 2 * slot - 2, mask=lane > 0, other=-1)
    valid = tensor >= 0
    first_of_tensor = valid & (tensor != previous)
    tensor = tl.where(valid, tensor, 0).to(tl.int64)
    entry = tensor_table + tensor * _FIELDS
    row_len = tl.load(entry + 4, mask=valid, other=0)
    row_start = row * row_len
    param_start = tl.load(entry + 0, mask=valid, other=0) + row_start
    exp_avg_start = tl.load(entry + 1, mask=valid, other=0) + row_start
    grad_start = tl.load(grad_offsets + tensor, mask=valid, other=0) + row_start
    exp_avg_sq = tl.load(entry + 2, mask=valid, other=0).to(tl.pointer_type(STATE_DTYPE)) + row
    step_pointer = tl.load(entry + 3, mask=valid, other=0).to(tl.pointer_type(tl.float32))
    step = tl.load(step_pointer, mask=valid, other=0.0) + 1.0

    tiles_of_tensor = tl.load(entry + 5, mask=first_of_tensor, other=0)
    arrived = tl.atomic_add(arrivals + tensor, 1, mask=first_of_tensor)
    last = first_of_tensor & (arrived.to(tl.int64) == tiles_of_tensor - 1)
    tl.store(step_pointer, step, mask=last)
    tl.store(arrivals + tensor, 0, mask=last)
    return valid, row_len, param_start, grad_start, exp_avg_start, exp_avg_sq, step


# noinline: each tile shape is a function of its own. Inlined, the dispatch compiled in time
# quadratic in the number of shapes (24 shapes: 219 s against 13 s as functions, Triton 3.8).
@triton.jit(noinline=True)
def _exact_tile(
    param_base, state_base, tensor_table, slot_table, grad_offsets, hyper, arrivals, first_slot,
    ROWS: tl.constexpr, WIDE: tl.constexpr, NARROW: tl.constexpr, ALIGNED: tl.constexpr,
    GRADS_ALIGNED: tl.constexpr, PARAM_VEC: tl.constexpr, STATE_VEC: tl.constexpr, ROW_VEC: tl.constexpr,
    PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
):
    """Exact single-pass step of ROWS row slots, each at most WIDE + NARROW long.

    A row is held as two register blocks, columns [0, WIDE) and [WIDE, WIDE + NARROW), both
    powers of two; row sums add the two blocks' sums.
    """
    valid, row_len, param_start, grad_start, exp_avg_start, exp_avg_sq, step = _tile_rows(
        tensor_table, slot_table, grad_offsets, arrivals, first_slot, ROWS, STATE_DTYPE)
    if ALIGNED:
        # The host checked that these start on 16 bytes. The compiler cannot see through the
        # tables; written as (x // k) * k it can prove it too (tl.multiple_of on a computed value
        # does not survive canonicalization), and loads and stores 128 bits at a time.
        param_start = (param_start // PARAM_VEC) * PARAM_VEC
        exp_avg_start = (exp_avg_start // STATE_VEC) * STATE_VEC
        row_len = (row_len // ROW_VEC) * ROW_VEC
        if GRADS_ALIGNED:
            grad_start = (grad_start // PARAM_VEC) * PARAM_VEC
    beta1, one_minus_beta1 = _first_moment_weights(hyper, STATE_DTYPE)
    cols_wide = tl.arange(0, WIDE)[None, :]
    cols_narrow = WIDE + tl.arange(0, NARROW)[None, :]
    in_wide = valid[:, None] & (cols_wide < row_len[:, None])
    in_narrow = valid[:, None] & (cols_narrow < row_len[:, None])
    param_wide = param_base + (param_start[:, None] + cols_wide)
    param_narrow = param_base + (param_start[:, None] + cols_narrow)
    exp_avg_wide = state_base + (exp_avg_start[:, None] + cols_wide)
    exp_avg_narrow = state_base + (exp_avg_start[:, None] + cols_narrow)

    w_wide = tl.load(param_wide, mask=in_wide, other=0.0).to(STATE_DTYPE)
    w_narrow = tl.load(param_narrow, mask=in_narrow, other=0.0).to(STATE_DTYPE)
    g_wide = tl.load(param_base + (grad_start[:, None] + cols_wide), mask=in_wide, other=0.0).to(STATE_DTYPE)
    g_narrow = tl.load(param_base + (grad_start[:, None] + cols_narrow), mask=in_narrow, other=0.0).to(STATE_DTYPE)
    m_wide = tl.load(exp_avg_wide, mask=in_wide, other=0.0)
    m_narrow = tl.load(exp_avg_narrow, mask=in_narrow, other=0.0)
    v = tl.load(exp_avg_sq, mask=valid, other=0.0)

    radial = tl.sum(g_wide * w_wide, axis=1) + tl.sum(g_narrow * w_narrow, axis=1)
    g_wide = g_wide - radial[:, None] * w_wide
    g_narrow = g_narrow - radial[:, None] * w_narrow
    m_wide = beta1 * m_wide + one_minus_beta1 * g_wide
    m_narrow = beta1 * m_narrow + one_minus_beta1 * g_narrow
    v = _second_moment(hyper, v, tl.sum(g_wide * g_wide, axis=1) + tl.sum(g_narrow * g_narrow, axis=1))
    bias_correction1, bias_correction2 = _bias_corrections(hyper, step)
    step_size = _step_size(hyper, v, bias_correction1, bias_correction2).to(STATE_DTYPE)
    w_wide = w_wide - step_size[:, None] * m_wide
    w_narrow = w_narrow - step_size[:, None] * m_narrow
    sq_norm = tl.sum(w_wide * w_wide, axis=1) + tl.sum(w_narrow * w_narrow, axis=1)
    # Padding slots have ||w̄|| = 0: give them 1 so that no lane divides by 0.
    inverse_norm = _inverse_sqrt(tl.where(valid, sq_norm, 1.0)).to(STATE_DTYPE)

    tl.store(exp_avg_wide, m_wide, mask=in_wide)
    tl.store(exp_avg_narrow, m_narrow, mask=in_narrow)
    tl.store(exp_avg_sq, v.to(STATE_DTYPE), mask=valid)
    tl.store(param_wide, (w_wide * inverse_norm[:, None]).to(PARAM_DTYPE), mask=in_wide)
    tl.store(param_narrow, (w_narrow * inverse_norm[:, None]).to(PARAM_DTYPE), mask=in_narrow)


@triton.jit(noinline=True)
def _statistics_row(
    param_base, state_base, tensor_table, slot_table, grad_offsets, hyper, arrivals, first_slot,
    CHUNK: tl.constexpr, ALIGNED: tl.constexpr, GRADS_ALIGNED: tl.constexpr, PARAM_VEC: tl.constexpr,
    STATE_VEC: tl.constexpr, ROW_VEC: tl.constexpr, PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
):
    """Two-pass step of one long row (a tile of one slot): six dot products over chunks of
    CHUNK elements, the closed forms, one elementwise pass."""
    valid, row_len, param_start, grad_start, exp_avg_start, exp_avg_sq, step = _tile_rows(
        tensor_table, slot_table, grad_offsets, arrivals, first_slot, 1, STATE_DTYPE)
    if ALIGNED:
        param_start = (param_start // PARAM_VEC) * PARAM_VEC
        exp_avg_start = (exp_avg_start // STATE_VEC) * STATE_VEC
        row_len = (row_len // ROW_VEC) * ROW_VEC
        if GRADS_ALIGNED:
            grad_start = (grad_start // PARAM_VEC) * PARAM_VEC
    beta1, one_minus_beta1 = _first_moment_weights(hyper, STATE_DTYPE)
    length = tl.sum(row_len, axis=0)
    cols = tl.arange(0, CHUNK)[None, :]
    sum_gw = tl.zeros([1, CHUNK], dtype=STATE_DTYPE)  # a = ḡ·w
    sum_gg = tl.zeros([1, CHUNK], dtype=STATE_DTYPE)  # b = ḡ·ḡ
    sum_ww = tl.zeros([1, CHUNK], dtype=STATE_DTYPE)  # c = w·w
    sum_mw = tl.zeros([1, CHUNK], dtype=STATE_DTYPE)  # d = m·w
    sum_mm = tl.zeros([1, CHUNK], dtype=STATE_DTYPE)  # e = m·m
    sum_mg = tl.zeros([1, CHUNK], dtype=STATE_DTYPE)  # f = m·ḡ
    for start in range(0, length, CHUNK):
        mask = valid[:, None] & (start + cols < row_len[:, None])
        w = tl.load(param_base + (param_start[:, None] + start + cols), mask=mask, other=0.0).to(STATE_DTYPE)
        g_bar = tl.load(param_base + (grad_start[:, None] + start + cols), mask=mask, other=0.0).to(STATE_DTYPE)
        m = tl.load(state_base + (exp_avg_start[:, None] + start + cols), mask=mask, other=0.0)
        sum_gw += g_bar * w
        sum_gg += g_bar * g_bar
        sum_ww += w * w
        sum_mw += m * w
        sum_mm += m * m
        sum_mg += m * g_bar
    a = tl.sum(sum_gw, axis=1)
    c = tl.sum(sum_ww, axis=1)
    d = tl.sum(sum_mw, axis=1)
    g_sq, m_dot_g, w_dot_g = _projected_dots(a, tl.sum(sum_gg, axis=1), c, d, tl.sum(sum_mg, axis=1))
    v = _second_moment(hyper, tl.load(exp_avg_sq, mask=valid, other=0.0), g_sq)
    bias_correction1, bias_correction2 = _bias_corrections(hyper, step)
    step_size = _step_size(hyper, v, bias_correction1, bias_correction2)
    sq_norm = _updated_row_sq_norm(hyper, step_size, c, d, tl.sum(sum_mm, axis=1), g_sq, m_dot_g, w_dot_g)
    inverse_norm = _inverse_sqrt(tl.where(valid, sq_norm, 1.0)).to(STATE_DTYPE)[:, None]
    step_size = step_size.to(STATE_DTYPE)[:, None]
    tl.store(exp_avg_sq, v.to(STATE_DTYPE), mask=valid)

    for start in range(0, length, CHUNK):
        mask = valid[:, None] & (start + cols < row_len[:, None])
        param = param_base + (param_start[:, None] + start + cols)
        exp_avg = state_base + (exp_avg_start[:, None] + start + cols)
        w = tl.load(param, mask=mask, other=0.0).to(STATE_DTYPE)
        g_bar = tl.load(param_base + (grad_start[:, None] + start + cols), mask=mask, other=0.0).to(STATE_DTYPE)
        m = tl.load(exp_avg, mask=mask, other=0.0)
        m = beta1 * m + one_minus_beta1 * (g_bar - a[:, None] * w)
        tl.store(exp_avg, m, mask=mask)
        tl.store(param, ((w - step_size * m) * inverse_norm).to(PARAM_DTYPE), mask=mask)


@triton.jit
def _ndadam_rows_kernel(
    param_base, state_base, tensor_table, slot_table, tile_table, grad_offsets, hyper, arrivals,
    PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, PARAM_VEC: tl.constexpr, STATE_VEC: tl.constexpr,
    ROW_VEC: tl.constexpr, CLASSES: tl.constexpr, STATISTICS_CHUNK: tl.constexpr, GRADS_ALIGNED: tl.constexpr,
):
    """One program updates one tile (see the module docstring).

    param_base: *PARAM_DTYPE, state_base: *STATE_DTYPE: what the tables' offsets count from
    (16-byte aligned); tensor_table: int64 [n_tensors, 6]; slot_table: int32 [n_slots, 2];
    tile_table: int32 [n_programs, 2] = (index into CLASSES, first slot); grad_offsets: int64
    [n_tensors] (param elements from param_base); hyper: float64 [6] = (lr, β1, β2, ε, log2 β1,
    log2 β2); arrivals: int32 [n_tensors].
    PARAM_VEC, STATE_VEC: elements per 16 bytes; ROW_VEC: the larger of the two. CLASSES: the
    tile shapes this group uses, (WIDE, NARROW, ROWS, ALIGNED) each, WIDE = 0 for the statistics
    path: only they are compiled. GRADS_ALIGNED: every gradient starts on 16 bytes this step.
    """
    tile = tl.program_id(0)
    tile_class = tl.load(tile_table + 2 * tile)
    first_slot = tl.load(tile_table + 2 * tile + 1)
    for index in tl.static_range(len(CLASSES)):
        if tile_class == index:
            if CLASSES[index][0] == 0:
                _statistics_row(param_base, state_base, tensor_table, slot_table, grad_offsets, hyper, arrivals, first_slot,
                                STATISTICS_CHUNK, CLASSES[index][3], GRADS_ALIGNED and CLASSES[index][3],
                                PARAM_VEC, STATE_VEC, ROW_VEC, PARAM_DTYPE, STATE_DTYPE)
            else:
                _exact_tile(param_base, state_base, tensor_table, slot_table, grad_offsets, hyper, arrivals, first_slot,
                            CLASSES[index][2], CLASSES[index][0], CLASSES[index][1], CLASSES[index][3],
                            GRADS_ALIGNED and CLASSES[index][3], PARAM_VEC, STATE_VEC, ROW_VEC, PARAM_DTYPE, STATE_DTYPE)


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_POINTER_TYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


def _state_dtype_of(param_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def width_class(row_len: int, single_pass_max: int = SINGLE_PASS_MAX, state_dtype: torch.dtype = torch.float32,
                aligned: bool = True) -> int | None:
    """The exact-path tile shape of rows of ``row_len`` elements: an index into
    WIDTH_CLASSES[state_dtype, aligned] (the narrowest that holds the row), or None: the
    statistics path."""
    classes = WIDTH_CLASSES[state_dtype, aligned]
    if row_len > min(single_pass_max, TILE_LANES[state_dtype, aligned]):
        return None
    for index, (wide, narrow, _) in enumerate(classes):
        if row_len <= wide + narrow:
            return index
    return None


@dataclass
class TilePlan:
    """Which rows each program updates (see the module docstring for the tables' layout)."""

    classes: tuple  # the tile shapes used, (WIDE, NARROW, ROWS, ALIGNED); WIDE = 0: statistics
    slot_table: np.ndarray  # int32 [n_slots, 2]: (tensor, row), tensor -1 for padding
    tile_table: np.ndarray  # int32 [n_tiles, 2]: (index into classes, first slot)
    tiles_per_tensor: np.ndarray  # int64 [n_tensors]: tiles holding rows of each tensor
    lanes: int  # register lanes of all tiles (a statistics row: its chunks' lanes)
    elements: int  # elements of all rows

    @property
    def idle_fraction(self) -> float:
        """The fraction of lanes that hold no element of any row."""
        return 1.0 - self.elements / self.lanes if self.lanes else 0.0


def plan_tiles(rows, row_lens, aligned, single_pass_max: int = SINGLE_PASS_MAX, state_dtype: torch.dtype = torch.float32) -> TilePlan:
    """Pack every row of every tensor into tiles: rows of one width class and alignment share
    tiles, whatever tensor they come from, in tensor order.

    rows, row_lens, aligned: per tensor, its row count, row length and whether its rows start
    on 16 bytes (then its tiles use 128-bit accesses).
    """
    rows = np.asarray(rows, dtype=np.int64)
    row_lens = np.asarray(row_lens, dtype=np.int64)
    aligned = np.asarray(aligned, dtype=bool)
    # The statistics path sorts after every width class.
    statistics_class = max(len(WIDTH_CLASSES[state_dtype, a]) for a in (False, True))
    classes = np.array([statistics_class if c is None else c for c in
                        (width_class(int(length), single_pass_max, state_dtype, bool(a)) for length, a in zip(row_lens, aligned))],
                       dtype=np.int64)
    used, slots, tiles = [], [], []
    tiles_per_tensor = np.zeros(len(rows), dtype=np.int64)
    lanes = 0
    first_slot = 0
    for tile_class, is_aligned in sorted({(int(c), bool(a)) for c, a in zip(classes, aligned)}):
        members = np.flatnonzero((classes == tile_class) & (aligned == is_aligned))
        member_rows = rows[members]
        statistics = tile_class == statistics_class
        wide, narrow, slots_per_tile = (0, 0, 1) if statistics else WIDTH_CLASSES[state_dtype, is_aligned][tile_class]
        starts = np.concatenate(([0], np.cumsum(member_rows)[:-1]))
        count = int(member_rows.sum())
        tensor_of_slot = np.repeat(members, member_rows)
        row_of_slot = np.arange(count) - np.repeat(starts, member_rows)
        n_tiles = -(-count // slots_per_tile)
        padding = n_tiles * slots_per_tile - count
        slots.append(np.stack([np.concatenate([tensor_of_slot, np.full(padding, -1)]),
                               np.concatenate([row_of_slot, np.zeros(padding, dtype=np.int64)])], axis=1))
        tiles.append(np.stack([np.full(n_tiles, len(used)), first_slot + slots_per_tile * np.arange(n_tiles)], axis=1))
        used.append((wide, narrow, slots_per_tile, is_aligned))
        tiles_per_tensor[members] = (starts + member_rows - 1) // slots_per_tile - starts // slots_per_tile + 1
        first_slot += n_tiles * slots_per_tile
        if statistics:
            lanes += int((member_rows * (-(-row_lens[members] // STATISTICS_CHUNK)) * STATISTICS_CHUNK).sum())
        else:
            lanes += n_tiles * slots_per_tile * (wide + narrow)
    if first_slot >= 2**31:
        raise RuntimeError(f"NDAdam triton backend: {first_slot} rows in one group; at most 2^31 - 1 are supported")
    return TilePlan(
        classes=tuple(used),
        slot_table=np.concatenate(slots).astype(np.int32) if slots else np.zeros((0, 2), np.int32),
        tile_table=np.concatenate(tiles).astype(np.int32) if tiles else np.zeros((0, 2), np.int32),
        tiles_per_tensor=tiles_per_tensor, lanes=lanes, elements=int((rows * row_lens).sum()),
    )


def plan_for_shapes(shapes, param_dtype: torch.dtype = torch.float32, single_pass_max: int = SINGLE_PASS_MAX) -> TilePlan:
    """The plan a group of fresh tensors of these shapes gets (every allocation starts on 16
    bytes, as torch's allocators' do): what benchmarks and checks use without allocating."""
    state_dtype = _state_dtype_of(param_dtype)
    rows = [shape[0] for shape in shapes]
    row_lens = [math.prod(shape[1:]) for shape in shapes]
    _, _, row_vec = _vector_widths(param_dtype, state_dtype)
    return plan_tiles(rows, row_lens, [length % row_vec == 0 for length in row_lens], single_pass_max, state_dtype)


def _upload(array: np.ndarray, device: torch.device) -> Tensor:
    """``array`` on ``device`` without blocking: through pinned memory and an asynchronous copy on
    the current stream (torch's pinned-memory cache keeps the host block until the copy is done,
    and never reuses one that a CUDA graph captured)."""
    host = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.clone()


@dataclass
class _Part:
    """The launch of one (device, dtype) part of a group: its tables and per-step buffers."""

    indices: list[int] | None  # positions in the group's lists (None: all of them, in order)
    param_dtype: torch.dtype
    state_dtype: torch.dtype
    device: torch.device
    work: list[tuple[int, Tensor]]  # (position, contiguous buffer) of each non-contiguous param
    param_base: Tensor  # what param and grad offsets count from (a param or a work buffer)
    state_base: Tensor  # what exp_avg offsets count from
    tensor_table: Tensor
    slot_table: Tensor
    tile_table: Tensor
    arrivals: Tensor
    grad_offsets: Tensor
    hyper: Tensor  # float64 [6]: lr, β1, β2, ε, log2 β1, log2 β2
    n_programs: int
    plan: TilePlan
    hyper_values: tuple | None = None  # what `hyper` holds, when known
    last_grad_offsets: np.ndarray | None = None  # what `grad_offsets` holds, when known
    captured: bool = False  # a CUDA graph writes these buffers too: never trust the two above
    keep: list = field(default_factory=list)  # host buffers a captured graph copies from


@dataclass
class GroupTable:
    """The cached launch description of one group's tensors: one part per (device, dtype)."""

    parts: list[_Part]


# Tables are a pure function of their key (the addresses of params and state, shapes, dtype,
# device, path limit), so a cached one can never be stale: when the caching allocator hands an
# address to a different tensor of the same shape, the table for it is the same table. An LRU
# bounds the memory kept. A table that a CUDA graph captured is moved out of the LRU and kept
# for good: the graph reads its buffers at every replay.
_TABLE_CACHE: collections.OrderedDict[tuple, GroupTable] = collections.OrderedDict()
_TABLE_CACHE_SIZE = 64
_CAPTURED_TABLES: dict[tuple, GroupTable] = {}
table_builds = 0  # how many tables were built (tests read it to prove the cache works)


def _table_key(params, exp_avgs, exp_avg_sqs, state_steps, single_pass_max) -> tuple:
    data_ptr = Tensor.data_ptr
    return (
        params[0].device, params[0].dtype, single_pass_max,
        tuple([p.data_ptr() for p in params]), tuple([p.shape for p in params]),
        tuple(map(data_ptr, exp_avgs)), tuple(map(data_ptr, exp_avg_sqs)), tuple(map(data_ptr, state_steps)),
    )


def group_table(params, exp_avgs, exp_avg_sqs, state_steps, single_pass_max: int = SINGLE_PASS_MAX) -> GroupTable:
    """The cached :class:`GroupTable` for these tensors; built only when a param or state
    tensor moved or changed shape. Gradients are not part of it."""
    global table_builds
    key = _table_key(params, exp_avgs, exp_avg_sqs, state_steps, single_pass_max)
    table = _CAPTURED_TABLES.get(key)
    if table is not None:
        return table
    table = _TABLE_CACHE.get(key)
    if table is not None:
        _TABLE_CACHE.move_to_end(key)
        return table
    table_builds += 1
    # torch's own grouping (C++, as its fused optimizers use): by the params' (device, dtype).
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, exp_avgs, exp_avg_sqs, state_steps], with_indices=True)
    parts = []
    for (group_params, group_exp_avgs, group_exp_avg_sqs, group_steps), indices in grouped.values():
        whole = len(grouped) == 1
        parts.append(_build_part(None if whole else list(indices), group_params, group_exp_avgs, group_exp_avg_sqs, group_steps, single_pass_max))
    table = GroupTable(parts)
    _TABLE_CACHE[key] = table
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return table


def _is_capturing(tensor: Tensor) -> bool:
    """Whether this step is being captured into a CUDA graph (never for CPU tensors)."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def _keep_for_capture(key_params, exp_avgs, exp_avg_sqs, state_steps, single_pass_max, table: GroupTable) -> None:
    key = _table_key(key_params, exp_avgs, exp_avg_sqs, state_steps, single_pass_max)
    _TABLE_CACHE.pop(key, None)
    _CAPTURED_TABLES[key] = table
    for part in table.parts:
        part.captured = True


def _vector_widths(param_dtype: torch.dtype, state_dtype: torch.dtype) -> tuple[int, int, int]:
    """Elements per 16 bytes of a param, of a state element, and the larger of the two."""
    param_vec, state_vec = 16 // param_dtype.itemsize, 16 // state_dtype.itemsize
    return param_vec, state_vec, max(param_vec, state_vec)


def _build_part(indices, params, exp_avgs, exp_avg_sqs, state_steps, single_pass_max) -> _Part:
    device, param_dtype, state_dtype = params[0].device, params[0].dtype, exp_avgs[0].dtype
    for p, m, v, s in zip(params, exp_avgs, exp_avg_sqs, state_steps):
        where = f"NDAdam triton backend: a parameter of shape {list(p.shape)}"
        if s.device != p.device or s.dtype != torch.float32 or s.numel() != 1:
            raise RuntimeError(f"{where} has a step on {s.device} ({s.dtype}, {s.numel()} elements): it needs one float32 on {p.device}")
        if not m.is_contiguous() or m.dtype != state_dtype or m.shape != p.shape:
            raise RuntimeError(f"{where} has an exp_avg of shape {list(m.shape)} ({m.dtype}, contiguous: {m.is_contiguous()}): it needs a contiguous {state_dtype} tensor of the param's shape")
        if not v.is_contiguous() or v.dtype != state_dtype or v.shape != p.shape[:1]:
            raise RuntimeError(f"{where} has an exp_avg_sq of shape {list(v.shape)} ({v.dtype}): it needs a contiguous {state_dtype} tensor of shape [{p.shape[0]}]")
    # The kernel addresses rows as start + row * row_len: a non-contiguous param (a
    # channels_last conv weight) is stepped through a contiguous buffer of its own, kept with
    # the table, so that its address, like the table, stays put from step to step.
    work = [(i, torch.empty(p.shape, dtype=p.dtype, device=device)) for i, p in enumerate(params) if not p.is_contiguous()]
    tensors = list(params)
    for i, buffer in work:
        tensors[i] = buffer
    param_size, state_size = param_dtype.itemsize, state_dtype.itemsize
    param_vec, state_vec, row_vec = _vector_widths(param_dtype, state_dtype)
    param_addresses = np.array([t.data_ptr() for t in tensors], dtype=np.int64)
    exp_avg_addresses = np.array([m.data_ptr() for m in exp_avgs], dtype=np.int64)
    # Offsets count from one param and one exp_avg, passed to the kernel as pointer arguments:
    # Triton knows those are 16-byte aligned, which an address read from a table cannot tell
    # it. A tensor whose param and exp_avg both start on 16 bytes is the base, when there is one.
    on_16 = (param_addresses % 16 == 0) & (exp_avg_addresses % 16 == 0)
    base = int(np.argmax(on_16)) if on_16.any() else 0
    param_delta = param_addresses - param_addresses[base]
    exp_avg_delta = exp_avg_addresses - exp_avg_addresses[base]
    if (param_delta % param_size).any() or (exp_avg_delta % state_size).any():
        raise RuntimeError("NDAdam triton backend: a parameter or its exp_avg is not aligned to its element size")
    rows = np.array([p.shape[0] for p in params], dtype=np.int64)
    row_lens = np.array([p.numel() // p.shape[0] for p in params], dtype=np.int64)
    aligned = bool(on_16[base]) & (param_delta % 16 == 0) & (exp_avg_delta % 16 == 0) & (row_lens % row_vec == 0)
    plan = plan_tiles(rows, row_lens, aligned, single_pass_max, state_dtype)
    tensor_table = np.stack([
        param_delta // param_size, exp_avg_delta // state_size,
        np.array([v.data_ptr() for v in exp_avg_sqs], dtype=np.int64), np.array([s.data_ptr() for s in state_steps], dtype=np.int64),
        row_lens, plan.tiles_per_tensor,
    ], axis=1)
    return _Part(
        indices=indices, param_dtype=param_dtype, state_dtype=state_dtype, device=device, work=work,
        param_base=tensors[base], state_base=exp_avgs[base],
        tensor_table=_upload(tensor_table, device), slot_table=_upload(plan.slot_table, device),
        tile_table=_upload(plan.tile_table, device),
        arrivals=torch.zeros(len(params), dtype=torch.int32, device=device),
        grad_offsets=torch.zeros(len(params), dtype=torch.int64, device=device),
        hyper=torch.zeros(6, dtype=torch.float64, device=device),
        n_programs=len(plan.tile_table), plan=plan,
    )


def _write_grad_offsets(part: _Part, grads: list[Tensor], capturing: bool) -> tuple[list[Tensor], bool]:
    """Put this step's gradient offsets on the device (elements from part.param_base).

    Returns the gradients as the kernel reads them (contiguous; the caller keeps them alive
    until the launch) and whether every one starts on 16 bytes. The copy is asynchronous, from
    pinned memory, on the current stream, and skipped when the offsets are those of the last
    step (gradients updated in place) unless a CUDA graph may have written the buffer since.
    """
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    delta = np.fromiter(map(Tensor.data_ptr, grads), dtype=np.int64, count=len(grads)) - part.param_base.data_ptr()
    size = part.param_dtype.itemsize
    if (delta % size).any():
        raise RuntimeError("NDAdam triton backend: a gradient is not aligned to its element size")
    offsets = delta // size
    grads_aligned = not (delta % 16).any()
    if part.captured or capturing or part.last_grad_offsets is None or not np.array_equal(offsets, part.last_grad_offsets):
        host = torch.from_numpy(offsets)
        if part.device.type == "cuda":
            host = host.pin_memory()
            if capturing:
                part.keep.append(host)
        part.grad_offsets.copy_(host, non_blocking=True)
        part.last_grad_offsets = None if (part.captured or capturing) else offsets
    return grads, grads_aligned


def _write_hyper(part: _Part, lr: float | Tensor, beta1: float, beta2: float, eps: float, capturing: bool) -> None:
    """Put (lr, β1, β2, ε, log2 β1, log2 β2) into the part's float64 device tensor: one
    asynchronous copy when a value changed (or a graph may have written it), none otherwise; a
    tensor lr is copied on the device at every step."""
    values = (None if isinstance(lr, Tensor) else float(lr), float(beta1), float(beta2), float(eps))
    if part.captured or capturing or values != part.hyper_values:
        log2_betas = [math.log2(b) if b > 0 else -math.inf for b in values[1:3]]
        host = torch.tensor([0.0 if values[0] is None else values[0], *values[1:], *log2_betas], dtype=torch.float64)
        if part.device.type == "cuda":
            host = host.pin_memory()
            if capturing:
                part.keep.append(host)
        part.hyper.copy_(host, non_blocking=True)
        part.hyper_values = None if (part.captured or capturing) else values
    if isinstance(lr, Tensor):
        part.hyper[0].copy_(lr.reshape(()))


def _launch_constexprs(param_dtype: torch.dtype, classes: tuple, grads_aligned: bool) -> dict:
    """The kernel's compile-time arguments for a part of ``param_dtype`` params whose plan uses
    ``classes``."""
    state_dtype = _state_dtype_of(param_dtype)
    param_vec, state_vec, row_vec = _vector_widths(param_dtype, state_dtype)
    return dict(
        PARAM_DTYPE=_TL_DTYPES[param_dtype], STATE_DTYPE=_TL_DTYPES[state_dtype],
        PARAM_VEC=param_vec, STATE_VEC=state_vec, ROW_VEC=row_vec,
        CLASSES=classes, STATISTICS_CHUNK=STATISTICS_CHUNK, GRADS_ALIGNED=grads_aligned,
    )


def kernel_specialization(param_dtype: torch.dtype, classes: tuple, name: str = "") -> dict:
    """What a launch for ``classes`` (a TilePlan's) compiles, with 16-byte aligned bases and
    gradients, for ahead-of-time checks: name, kernel, signature, constexprs, attrs, num_warps."""
    state_dtype = _state_dtype_of(param_dtype)
    constexprs = _launch_constexprs(param_dtype, classes, True)
    signature = {
        "param_base": _POINTER_TYPES[param_dtype], "state_base": _POINTER_TYPES[state_dtype],
        "tensor_table": "*i64", "slot_table": "*i32", "tile_table": "*i32", "grad_offsets": "*i64",
        "hyper": "*fp64", "arrivals": "*i32", **{key: "constexpr" for key in constexprs},
    }
    return dict(
        name=name, kernel=_ndadam_rows_kernel, signature=signature, constexprs=constexprs,
        # What the JIT tells the compiler about 16-byte aligned tensor arguments.
        attrs={(i,): [["tt.divisibility", 16]] for i in range(8)},
        num_warps=_NUM_WARPS,
    )


def _launch(part: _Part, grads_aligned: bool) -> None:
    _ndadam_rows_kernel[(part.n_programs,)](
        part.param_base, part.state_base, part.tensor_table, part.slot_table, part.tile_table,
        part.grad_offsets, part.hyper, part.arrivals,
        **_launch_constexprs(part.param_dtype, part.plan.classes, grads_aligned), num_warps=_NUM_WARPS,
    )


def vector_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    hyper: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: list[Tensor] | None = None,
    rounding_seeds: list[Tensor] | None = None,
    single_pass_max: int | None = None,
) -> None:
    """ND-Adam step of every row of ``params`` (and of their steps): one kernel launch per
    (device, dtype).

    ``single_pass_max`` overrides :data:`SINGLE_PASS_MAX` (tests force each path with it); rows
    longer than the state dtype's TILE_LANES take the statistics path whatever it says.
    """
    from .native import _refuse_unbuilt_features

    _refuse_unbuilt_features(grad_scale, found_inf, master_params, rounding_seeds)
    limit = SINGLE_PASS_MAX if single_pass_max is None else single_pass_max
    if not isinstance(limit, int) or limit < 0:
        raise ValueError(f"NDAdam triton backend: single_pass_max must be an int >= 0, got {limit!r}")
    if not params:
        return
    table = group_table(params, exp_avgs, exp_avg_sqs, state_steps, limit)
    capturing = _is_capturing(params[0])
    if capturing and not all(part.captured for part in table.parts):
        _keep_for_capture(params, exp_avgs, exp_avg_sqs, state_steps, limit, table)
    for part in table.parts:
        part_grads = grads if part.indices is None else [grads[i] for i in part.indices]
        part_params = params if part.indices is None else [params[i] for i in part.indices]
        with torch.cuda.device(part.device) if part.device.type == "cuda" else contextlib.nullcontext():
            kernel_grads, grads_aligned = _write_grad_offsets(part, part_grads, capturing)
            _write_hyper(part, hyper[0], beta1, beta2, eps, capturing)
            for i, buffer in part.work:
                buffer.copy_(part_params[i])
            _launch(part, grads_aligned)
            for i, buffer in part.work:
                part_params[i].copy_(buffer)
        del kernel_grads


#: θ^s of Algorithm 1: torch's fused Adam (CUDA and CPU) with L2 weight decay; it takes a tensor lr.
scalar_step = functools.partial(adam_step, implementation="fused")
