"""The Triton backend: one kernel launch updates every row of every vector tensor of a group.

Per row ``w`` (length ``L``) with gradient ``ḡ``, first moment ``m`` (``L`` elements) and
second moment ``v`` (one scalar), step ``t`` and lr ``α`` (DESIGN.md section 4)::

    g  = ḡ - (ḡ·w) w;   m' = β1 m + (1-β1) g;   v' = β2 v + (1-β2) ||g||²
    s  = α / (1-β1^t) / (sqrt(v' / (1-β2^t)) + ε)
    w' = (w - s m') / ||w - s m'||     (w' = w where α = 0 or m' = 0: a zero update keeps the bits)

Rows of up to :data:`SINGLE_PASS_MAX` (8192) elements (at most the :data:`TILE_LANES` of
their state dtype and alignment: 8192 for 16-byte aligned float32 rows, 4096 for float64 or
unaligned float32, 2048 for unaligned float64) take the exact single-pass path: the row is
loaded once into registers, ``g`` and ``||w - s m'||`` are computed explicitly, and it is
stored once (20 bytes per fp32 element). Longer rows take the statistics path: pass 1
accumulates ``a = ḡ·w, b = ḡ·ḡ, c = w·w, d = m·w, e = m·m, f = m·ḡ`` over chunks, the closed
forms give ``||g||², ||m'||², w·m'`` and ``||w̄||²``, and pass 2 writes ``m'`` and ``w'``
(32 bytes per element).

Options of the same launch (PHASE2-INTERFACE: the semantics of backends/reference.py):

- ``hyper``, the optimizer's float64 ``[lr, β1, β2, ε]`` on the device, is read by the kernel
  itself (β^t = 2^(t log2 β) in float64): an lr schedule never recompiles the kernel, and a CUDA
  graph that captured a step sees lr changes made to that tensor between replays;
- ``grad_scale`` (GradScaler): ḡ = grad / grad_scale per element (div.rn), in the state dtype;
- ``found_inf``: read by every program; when nonzero the program returns before touching any
  tensor, step counts included (no host read);
- ``master_params`` (fp32 copies of bf16/fp16 params): w is read from the master, the master
  gets w' and the param w' rounded to nearest;
- ``rounding_seeds`` (bf16 params): the param gets w' rounded stochastically with the hash of
  :mod:`ndadam_fused.rounding` (uint32 arithmetic, the same integer steps).

Tiles. A program updates one tile: ``ROWS`` row slots of one width class (see
:data:`WIDTH_CLASSES`) and alignment, each slot any row of any tensor of the group whose
length fits the class. A class's width is the sum of two powers of two, ``WIDE + NARROW``
(2^k, 1.25·2^k, 1.5·2^k), so that a row of more than one element fills more than three
quarters of its lanes, and ``ROWS * width`` is at most :data:`TILE_LANES`, so that tiles hold
about as many elements per thread whatever their rows. The kernel is compiled for the tile
shapes a group's plan uses (:func:`plan_tiles`), each a function of its own (``noinline``:
compile time grows with the number of shapes, not with its square). A tensor with 0 rows gets
one empty slot, so that its step is counted as every other tensor's.

Tables (:class:`GroupTable`), built once per set of tensors and cached on what stays put
(params, state, master copies, seeds, shapes; never gradients):

- ``tensor_table`` int64 ``[n_tensors, 9]``: param, exp_avg and master offsets (elements from
  the two base pointers passed to the kernel, which Triton knows are 16-byte aligned; masters
  count from the exp_avg base, which has their dtype), the addresses of exp_avg_sq, step and
  rounding seed, the row length, how many tiles hold rows of the tensor, and its first row in a
  rows-split statistics buffer;
- ``slot_table`` int32 ``[n_slots, 2]``: (tensor, row) of each row slot, class by class, each
  class padded to whole tiles with tensor -1 (row -1: the empty slot of a tensor with 0 rows);
- ``tile_table`` int32 ``[n_tiles, 2]``: (tile shape, first slot);
- ``arrivals`` int32 ``[n_tensors]``: the step counter's arrival count (below).

The gradients' offsets (int64 ``[n_tensors]``) are copied at every step from pinned memory,
asynchronously on the current stream (only when they moved). The step is read from each tensor's
own ``state["step"]``, and nothing here syncs with the host. The kernel increments the steps
itself: every tile reads the step, then counts its arrival at each of its tensors with an atomic
add; the last tile to arrive at a tensor writes step + 1 and resets the count, so that one
launch is the whole step.

Rows split across ranks (tensor parallelism, :mod:`.row_statistics`): :func:`row_statistics`
and :func:`apply_row_statistics` run the same tiles in two launches, one writing each row's six
sums into the statistics buffer, the other finishing the step from the all-reduced sums.

Under ``torch.compile`` each of the three steps is one opaque custom op
(``ndadam_fused_triton::vector_step_``, ``row_statistics_``, ``apply_row_statistics_``) with
a fake implementation; eager calls run the same host code directly (a dispatcher round trip
would cost milliseconds for thousands of tensors).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from .scalars import adam_step

__all__ = [
    "vector_step", "scalar_step", "row_statistics", "apply_row_statistics", "GroupTable", "group_table",
    "plan_tiles", "TilePlan", "width_class", "WIDTH_CLASSES", "SINGLE_PASS_MAX", "TILE_LANES", "STATISTICS_CHUNK",
    "kernel_specialization",
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


# tensor_table columns (the kernel reads them as the constexprs below)
_PARAM_OFFSET, _EXP_AVG_OFFSET, _MASTER_OFFSET, _EXP_AVG_SQ, _STEP, _SEED, _ROW_LEN, _TILES, _FIRST_ROW = range(9)
_FIELDS = tl.constexpr(9)
_COLUMN_PARAM = tl.constexpr(_PARAM_OFFSET)
_COLUMN_EXP_AVG = tl.constexpr(_EXP_AVG_OFFSET)
_COLUMN_MASTER = tl.constexpr(_MASTER_OFFSET)
_COLUMN_EXP_AVG_SQ = tl.constexpr(_EXP_AVG_SQ)
_COLUMN_STEP = tl.constexpr(_STEP)
_COLUMN_SEED = tl.constexpr(_SEED)
_COLUMN_ROW_LEN = tl.constexpr(_ROW_LEN)
_COLUMN_TILES = tl.constexpr(_TILES)
_COLUMN_FIRST_ROW = tl.constexpr(_FIRST_ROW)

# What a launch does (the kernel's MODE): the whole step, or one phase of the rows-split step.
_STEP_ROWS = 0
_SPLIT_STATISTICS = 1
_SPLIT_APPLY = 2
_MODE_STEP_ROWS = tl.constexpr(_STEP_ROWS)
_MODE_SPLIT_STATISTICS = tl.constexpr(_SPLIT_STATISTICS)

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
    """(1 - β1^t, 1 - β2^t) in float64 for the float32 step ``t``; hyper: float64 [lr, β1, β2, ε].

    β^t = 2^(t log2 β) in float64 (libdevice log2 and exp2), 0 for β = 0 (t >= 1): a few ulp
    of float32 error in β2^t would grow about 100x in 1 - β2^t at t = 1.
    """
    t = step.to(tl.float64)
    return 1.0 - _power(tl.load(hyper + 1), t), 1.0 - _power(tl.load(hyper + 2), t)


@triton.jit
def _power(beta, t):
    """β^t for 0 <= β < 1 and t >= 1, float64."""
    positive = beta > 0
    return tl.where(positive, tl.exp2(t * tl.log2(tl.where(positive, beta, 1.0))), 0.0)


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
def _row_scale(hyper, valid, w_bar_sq_norm, m_new_magnitude):
    """1 / ||w̄|| per row in float64, or exactly 1 where the update is zero (csrc row_scale):
    α = 0, or m' = 0 on the row (``m_new_magnitude``: Σ|m'| on the exact path, ||m'||² from the
    statistics), so that such a row (DCP's state-initializing step) keeps its bits."""
    # A where, not an &: the interpreter cannot & a scalar comparison with a block of them.
    divide = tl.where(tl.load(hyper + 0) != 0, valid & (m_new_magnitude > 0), False)
    return tl.where(divide, _inverse_sqrt(tl.where(divide, w_bar_sq_norm, 1.0)), 1.0)


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
    """(||w - s m'||², ||m'||²) from the row statistics, in float64 (step_size float64):
    ||m'||² = β1² e + 2β1(1-β1)(m·g) + (1-β1)² ||g||² (clamped at 0), w·m' = β1 d + (1-β1)(w·g),
    ||w̄||² = c - 2s (w·m') + s² ||m'||²."""
    beta1 = tl.load(hyper + 1)
    one_minus_beta1 = 1.0 - beta1
    m_new_sq = beta1 * beta1 * e.to(tl.float64) + 2.0 * beta1 * one_minus_beta1 * m_dot_g.to(tl.float64) \
        + one_minus_beta1 * one_minus_beta1 * g_sq.to(tl.float64)
    m_new_sq = tl.maximum(m_new_sq, 0.0)
    w_dot_m_new = beta1 * d.to(tl.float64) + one_minus_beta1 * w_dot_g.to(tl.float64)
    return c.to(tl.float64) - 2.0 * step_size * w_dot_m_new + step_size * step_size * m_new_sq, m_new_sq


@triton.jit
def _update_from_statistics(hyper, a, b, c, d, e, f, v, step):
    """Per row, from the six sums (state dtype) and v: (v', s, ||w̄||², ||m'||²), float64."""
    g_sq, m_dot_g, w_dot_g = _projected_dots(a, b, c, d, f)
    v_new = _second_moment(hyper, v, g_sq)
    bias_correction1, bias_correction2 = _bias_corrections(hyper, step)
    step_size = _step_size(hyper, v_new, bias_correction1, bias_correction2)
    w_bar_sq_norm, m_new_sq = _updated_row_sq_norm(hyper, step_size, c, d, e, g_sq, m_dot_g, w_dot_g)
    return v_new, step_size, w_bar_sq_norm, m_new_sq


@triton.jit
def _round_to_nearest(x, DTYPE: tl.constexpr):
    """``x`` rounded to nearest (ties to even) in DTYPE, as the reference's ``.to(dtype)``.

    Compiled, that is the cast (cvt.rn). The interpreter truncates float32 to bfloat16, so there
    the rounding is done on the bits: add 0x7FFF plus the lowest kept bit, drop the low 16 bits
    (a carry moves into the exponent, up to inf, as it should); NaN stays a quiet NaN.
    """
    if _INTERPRETER and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        rounded = tl.where(x != x, (bits | 0x00400000) & 0xFFFF0000, rounded)
        return rounded.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(DTYPE)


# ---- stochastic rounding: ndadam_fused/rounding.py's hash, in uint32 ---------------------------


@triton.jit
def _fmix32(x):
    """MurmurHash3's finalizer on uint32 (products wrap mod 2³², shifts are logical)."""
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _rounding_key(entry, valid, step):
    """fmix32(seed32 ^ (t · 0x85EBCA77)) per slot: t is the step after its increment."""
    seed_pointer = tl.load(entry + _COLUMN_SEED, mask=valid, other=0).to(tl.pointer_type(tl.int64))
    seed = tl.load(seed_pointer, mask=valid, other=0).to(tl.uint32)
    return _fmix32(seed ^ (step.to(tl.uint32) * 0x85EBCA77))


@triton.jit
def _stochastic_bfloat16(values, index, key):
    """float32 ``values`` rounded stochastically to bf16: the upper 16 bits of (bits + r), with
    r = fmix32((i · 0x9E3779B1) ^ key) & 0xFFFF for the row-major element index i (mod 2³²)."""
    random = _fmix32((index.to(tl.uint32) * 0x9E3779B1) ^ key) & 0xFFFF
    bits = (values.to(tl.uint32, bitcast=True) + random) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


# ---- where a tile's rows are, and what every path loads and stores ----------------------------


@triton.jit
def _tile_rows(tensor_table, slot_table, grad_offsets, first_slot, ROWS: tl.constexpr, ALIGNED: tl.constexpr,
               GRADS_ALIGNED: tl.constexpr, PARAM_VEC: tl.constexpr, GRAD_VEC: tl.constexpr,
               STATE_VEC: tl.constexpr, ROW_VEC: tl.constexpr, MASTER: tl.constexpr):
    """Where the ROWS row slots of a tile live.

    Returns, per slot: valid (a row: neither padding nor the empty slot of a 0-row tensor),
    listed (a tensor's slot, empty or not), first_of_tensor (the first of the tile's slots of
    its tensor), the tensor (0 for padding) and its table entry, the row, the row length, the start of the row in
    param / grad / exp_avg / master (elements from the base pointers) and in the row-major
    tensor (row * row length).
    """
    lane = tl.arange(0, ROWS)
    slot = first_slot + lane
    tensor = tl.load(slot_table + 2 * slot)
    row = tl.load(slot_table + 2 * slot + 1).to(tl.int64)
    previous = tl.load(slot_table + 2 * slot - 2, mask=lane > 0, other=-1)
    listed = tensor >= 0
    valid = listed & (row >= 0)
    first_of_tensor = listed & (tensor != previous)
    tensor = tl.where(listed, tensor, 0).to(tl.int64)
    entry = tensor_table + tensor * _FIELDS
    row = tl.where(valid, row, 0)
    row_len = tl.load(entry + _COLUMN_ROW_LEN, mask=valid, other=0)
    row_start = row * row_len
    param_start = tl.load(entry + _COLUMN_PARAM, mask=valid, other=0) + row_start
    exp_avg_start = tl.load(entry + _COLUMN_EXP_AVG, mask=valid, other=0) + row_start
    grad_start = tl.load(grad_offsets + tensor, mask=valid, other=0) + row_start
    if MASTER:
        master_start = tl.load(entry + _COLUMN_MASTER, mask=valid, other=0) + row_start
    else:
        master_start = exp_avg_start
    if ALIGNED:
        # The host checked that these start on 16 bytes. The compiler cannot see through the
        # tables; written as (x // k) * k it can prove it too (tl.multiple_of on a computed value
        # does not survive canonicalization), and loads and stores 128 bits at a time.
        param_start = (param_start // PARAM_VEC) * PARAM_VEC
        exp_avg_start = (exp_avg_start // STATE_VEC) * STATE_VEC
        master_start = (master_start // STATE_VEC) * STATE_VEC
        row_len = (row_len // ROW_VEC) * ROW_VEC
        if GRADS_ALIGNED:
            grad_start = (grad_start // GRAD_VEC) * GRAD_VEC
    return valid, listed, first_of_tensor, tensor, entry, row, row_len, row_start, param_start, grad_start, exp_avg_start, master_start


@triton.jit
def _count_step(tensor, entry, listed, first_of_tensor, arrivals):
    """t, the step this launch takes (state["step"] + 1), per slot; counts the tile's arrival.

    Each tile reads the steps of its tensors, then counts its arrival at each of them (one
    atomic per tensor and tile, release after those reads); the tile that arrives last, when
    every other tile has read the step, writes t and resets the count for the next launch.
    """
    step_pointer = tl.load(entry + _COLUMN_STEP, mask=listed, other=0).to(tl.pointer_type(tl.float32))
    step = tl.load(step_pointer, mask=listed, other=0.0) + 1.0
    tiles_of_tensor = tl.load(entry + _COLUMN_TILES, mask=first_of_tensor, other=0)
    arrived = tl.atomic_add(arrivals + tensor, 1, mask=first_of_tensor)
    last = first_of_tensor & (arrived.to(tl.int64) == tiles_of_tensor - 1)
    tl.store(step_pointer, step, mask=last)
    tl.store(arrivals + tensor, 0, mask=last)
    return step


@triton.jit
def _load_w(param_base, state_base, param_start, master_start, cols, mask, MASTER: tl.constexpr, STATE_DTYPE: tl.constexpr):
    """The rows' w in the state dtype: from the master copy where there is one."""
    if MASTER:
        return tl.load(state_base + (master_start[:, None] + cols), mask=mask, other=0.0)
    else:
        return tl.load(param_base + (param_start[:, None] + cols), mask=mask, other=0.0).to(STATE_DTYPE)


@triton.jit
def _load_grad(param_base, grad_start, cols, mask, grad_scale, HAS_GRAD_SCALE: tl.constexpr,
               GRAD_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr):
    """ḡ in the state dtype, divided by GradScaler's scale (div.rn) when there is one. Gradient
    offsets count GRAD_DTYPE elements from param_base's address."""
    grad_base = param_base.to(tl.pointer_type(GRAD_DTYPE))
    g_bar = tl.load(grad_base + (grad_start[:, None] + cols), mask=mask, other=0.0).to(STATE_DTYPE)
    if HAS_GRAD_SCALE:
        if STATE_DTYPE == tl.float64:
            g_bar = g_bar / tl.load(grad_scale).to(tl.float64)  # div.rn.f64: float64 has no approximate division
        else:
            g_bar = tl.math.div_rn(g_bar, tl.load(grad_scale).to(tl.float32))
    return g_bar


@triton.jit
def _store_w(param_base, state_base, param_start, master_start, row_start, cols, mask, w_new, key,
             MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, PARAM_DTYPE: tl.constexpr):
    """Write w' (state dtype): into the master copy, and into the param rounded to nearest or,
    with STOCHASTIC (bf16 params), stochastically."""
    if MASTER:
        tl.store(state_base + (master_start[:, None] + cols), w_new, mask=mask)
    if STOCHASTIC:
        param_value = _stochastic_bfloat16(w_new, row_start[:, None] + cols, key[:, None])
    else:
        param_value = _round_to_nearest(w_new, PARAM_DTYPE)
    tl.store(param_base + (param_start[:, None] + cols), param_value, mask=mask)


@triton.jit
def _block_products(param_base, state_base, param_start, grad_start, exp_avg_start, master_start, cols, mask,
                    grad_scale, HAS_GRAD_SCALE: tl.constexpr, MASTER: tl.constexpr, PARAM_DTYPE: tl.constexpr,
                    GRAD_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr):
    """The six elementwise products ḡw, ḡḡ, ww, mw, mm, mḡ of a block of the rows."""
    w = _load_w(param_base, state_base, param_start, master_start, cols, mask, MASTER, STATE_DTYPE)
    g_bar = _load_grad(param_base, grad_start, cols, mask, grad_scale, HAS_GRAD_SCALE, GRAD_DTYPE, STATE_DTYPE)
    m = tl.load(state_base + (exp_avg_start[:, None] + cols), mask=mask, other=0.0)
    return g_bar * w, g_bar * g_bar, w * w, m * w, m * m, m * g_bar


@triton.jit
def _chunked_sums(param_base, state_base, valid, row_len, param_start, grad_start, exp_avg_start, master_start,
                  grad_scale, CHUNK: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, MASTER: tl.constexpr,
                  PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr):
    """a..f = (ḡ·w, ḡ·ḡ, w·w, m·w, m·m, m·ḡ) of one row (a tile of one slot), over chunks of
    CHUNK elements: elementwise accumulators, reduced once at the end."""
    length = tl.sum(tl.where(valid, row_len, 0), axis=0)
    cols = tl.arange(0, CHUNK)[None, :]
    sum_gw = tl.zeros([1, CHUNK], dtype=STATE_DTYPE)
    sum_gg = tl.zeros([1, CHUNK], dtype=STATE_DTYPE)
    sum_ww = tl.zeros([1, CHUNK], dtype=STATE_DTYPE)
    sum_mw = tl.zeros([1, CHUNK], dtype=STATE_DTYPE)
    sum_mm = tl.zeros([1, CHUNK], dtype=STATE_DTYPE)
    sum_mg = tl.zeros([1, CHUNK], dtype=STATE_DTYPE)
    for start in range(0, length, CHUNK):
        mask = valid[:, None] & (start + cols < row_len[:, None])
        gw, gg, ww, mw, mm, mg = _block_products(
            param_base, state_base, param_start, grad_start, exp_avg_start, master_start, start + cols, mask,
            grad_scale, HAS_GRAD_SCALE, MASTER, PARAM_DTYPE, GRAD_DTYPE, STATE_DTYPE)
        sum_gw += gw
        sum_gg += gg
        sum_ww += ww
        sum_mw += mw
        sum_mm += mm
        sum_mg += mg
    return (tl.sum(sum_gw, axis=1), tl.sum(sum_gg, axis=1), tl.sum(sum_ww, axis=1),
            tl.sum(sum_mw, axis=1), tl.sum(sum_mm, axis=1), tl.sum(sum_mg, axis=1))


@triton.jit
def _apply_block(param_base, state_base, param_start, grad_start, exp_avg_start, master_start, row_start, cols, mask,
                 a, step_size, scale, beta1, one_minus_beta1, key, grad_scale, HAS_GRAD_SCALE: tl.constexpr,
                 MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr,
                 STATE_DTYPE: tl.constexpr):
    """The elementwise pass of the closed forms on a block: m' = β1 m + (1-β1)(ḡ - a w),
    w' = (w - s m') · scale; a, s, scale: per row, in the state dtype."""
    w = _load_w(param_base, state_base, param_start, master_start, cols, mask, MASTER, STATE_DTYPE)
    g_bar = _load_grad(param_base, grad_start, cols, mask, grad_scale, HAS_GRAD_SCALE, GRAD_DTYPE, STATE_DTYPE)
    exp_avg = state_base + (exp_avg_start[:, None] + cols)
    m = tl.load(exp_avg, mask=mask, other=0.0)
    m = beta1 * m + one_minus_beta1 * (g_bar - a[:, None] * w)
    tl.store(exp_avg, m, mask=mask)
    _store_w(param_base, state_base, param_start, master_start, row_start, cols, mask,
             (w - step_size[:, None] * m) * scale[:, None], key, MASTER, STOCHASTIC, PARAM_DTYPE)


# ---- the tile paths --------------------------------------------------------------------------


# noinline: each tile shape is a function of its own. Inlined, the dispatch compiled in time
# quadratic in the number of shapes (24 shapes: 219 s against 13 s as functions, Triton 3.8).
@triton.jit(noinline=True)
def _exact_tile(
    param_base, state_base, tensor_table, slot_table, grad_offsets, hyper, arrivals, grad_scale, first_slot,
    ROWS: tl.constexpr, WIDE: tl.constexpr, NARROW: tl.constexpr, ALIGNED: tl.constexpr,
    GRADS_ALIGNED: tl.constexpr, PARAM_VEC: tl.constexpr, GRAD_VEC: tl.constexpr, STATE_VEC: tl.constexpr,
    ROW_VEC: tl.constexpr, PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
):
    """Exact single-pass step of ROWS row slots, each at most WIDE + NARROW long.

    A row is held as two register blocks, columns [0, WIDE) and [WIDE, WIDE + NARROW), both
    powers of two; row sums add the two blocks' sums.
    """
    valid, listed, first_of_tensor, tensor, entry, row, row_len, row_start, param_start, grad_start, exp_avg_start, master_start = \
        _tile_rows(tensor_table, slot_table, grad_offsets, first_slot, ROWS, ALIGNED, GRADS_ALIGNED,
                   PARAM_VEC, GRAD_VEC, STATE_VEC, ROW_VEC, MASTER)
    step = _count_step(tensor, entry, listed, first_of_tensor, arrivals)
    beta1, one_minus_beta1 = _first_moment_weights(hyper, STATE_DTYPE)
    cols_wide = tl.arange(0, WIDE)[None, :]
    cols_narrow = WIDE + tl.arange(0, NARROW)[None, :]
    in_wide = valid[:, None] & (cols_wide < row_len[:, None])
    in_narrow = valid[:, None] & (cols_narrow < row_len[:, None])
    exp_avg_wide = state_base + (exp_avg_start[:, None] + cols_wide)
    exp_avg_narrow = state_base + (exp_avg_start[:, None] + cols_narrow)
    exp_avg_sq = tl.load(entry + _COLUMN_EXP_AVG_SQ, mask=valid, other=0).to(tl.pointer_type(STATE_DTYPE)) + row

    w_wide = _load_w(param_base, state_base, param_start, master_start, cols_wide, in_wide, MASTER, STATE_DTYPE)
    w_narrow = _load_w(param_base, state_base, param_start, master_start, cols_narrow, in_narrow, MASTER, STATE_DTYPE)
    g_wide = _load_grad(param_base, grad_start, cols_wide, in_wide, grad_scale, HAS_GRAD_SCALE, GRAD_DTYPE, STATE_DTYPE)
    g_narrow = _load_grad(param_base, grad_start, cols_narrow, in_narrow, grad_scale, HAS_GRAD_SCALE, GRAD_DTYPE, STATE_DTYPE)
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
    m_new_magnitude = tl.sum(tl.abs(m_wide), axis=1) + tl.sum(tl.abs(m_narrow), axis=1)
    scale = _row_scale(hyper, valid, sq_norm, m_new_magnitude).to(STATE_DTYPE)

    tl.store(exp_avg_wide, m_wide, mask=in_wide)
    tl.store(exp_avg_narrow, m_narrow, mask=in_narrow)
    tl.store(exp_avg_sq, v.to(STATE_DTYPE), mask=valid)
    if STOCHASTIC:
        key = _rounding_key(entry, valid, step)
    else:
        key = step
    _store_w(param_base, state_base, param_start, master_start, row_start, cols_wide, in_wide,
             w_wide * scale[:, None], key, MASTER, STOCHASTIC, PARAM_DTYPE)
    _store_w(param_base, state_base, param_start, master_start, row_start, cols_narrow, in_narrow,
             w_narrow * scale[:, None], key, MASTER, STOCHASTIC, PARAM_DTYPE)


@triton.jit(noinline=True)
def _statistics_row(
    param_base, state_base, tensor_table, slot_table, grad_offsets, hyper, arrivals, grad_scale, first_slot,
    CHUNK: tl.constexpr, ALIGNED: tl.constexpr, GRADS_ALIGNED: tl.constexpr, PARAM_VEC: tl.constexpr,
    GRAD_VEC: tl.constexpr, STATE_VEC: tl.constexpr, ROW_VEC: tl.constexpr, PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, MASTER: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    """Two-pass step of one long row (a tile of one slot): six dot products over chunks of
    CHUNK elements, the closed forms, one elementwise pass."""
    valid, listed, first_of_tensor, tensor, entry, row, row_len, row_start, param_start, grad_start, exp_avg_start, master_start = \
        _tile_rows(tensor_table, slot_table, grad_offsets, first_slot, 1, ALIGNED, GRADS_ALIGNED,
                   PARAM_VEC, GRAD_VEC, STATE_VEC, ROW_VEC, MASTER)
    step = _count_step(tensor, entry, listed, first_of_tensor, arrivals)
    beta1, one_minus_beta1 = _first_moment_weights(hyper, STATE_DTYPE)
    a, b, c, d, e, f = _chunked_sums(param_base, state_base, valid, row_len, param_start, grad_start, exp_avg_start,
                                     master_start, grad_scale, CHUNK, HAS_GRAD_SCALE, MASTER, PARAM_DTYPE, GRAD_DTYPE,
                                     STATE_DTYPE)
    exp_avg_sq = tl.load(entry + _COLUMN_EXP_AVG_SQ, mask=valid, other=0).to(tl.pointer_type(STATE_DTYPE)) + row
    v, step_size, w_bar_sq_norm, m_new_sq = _update_from_statistics(
        hyper, a, b, c, d, e, f, tl.load(exp_avg_sq, mask=valid, other=0.0), step)
    scale = _row_scale(hyper, valid, w_bar_sq_norm, m_new_sq).to(STATE_DTYPE)
    tl.store(exp_avg_sq, v.to(STATE_DTYPE), mask=valid)
    if STOCHASTIC:
        key = _rounding_key(entry, valid, step)
    else:
        key = step
    length = tl.sum(tl.where(valid, row_len, 0), axis=0)
    cols = tl.arange(0, CHUNK)[None, :]
    for start in range(0, length, CHUNK):
        _apply_block(param_base, state_base, param_start, grad_start, exp_avg_start, master_start, row_start,
                     start + cols, valid[:, None] & (start + cols < row_len[:, None]), a, step_size.to(STATE_DTYPE),
                     scale, beta1, one_minus_beta1, key, grad_scale, HAS_GRAD_SCALE, MASTER, STOCHASTIC, PARAM_DTYPE,
                     GRAD_DTYPE, STATE_DTYPE)


@triton.jit(noinline=True)
def _split_tile(
    param_base, state_base, tensor_table, slot_table, grad_offsets, hyper, arrivals, grad_scale, statistics, first_slot,
    MODE: tl.constexpr, ROWS: tl.constexpr, WIDE: tl.constexpr, NARROW: tl.constexpr, CHUNK: tl.constexpr,
    ALIGNED: tl.constexpr, GRADS_ALIGNED: tl.constexpr, PARAM_VEC: tl.constexpr, GRAD_VEC: tl.constexpr,
    STATE_VEC: tl.constexpr, ROW_VEC: tl.constexpr, PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
):
    """One phase of the rows-split step on ROWS row slots (WIDE = 0: one row, in chunks of CHUNK).

    MODE _SPLIT_STATISTICS: statistics[first_row + row] = [ḡ·w, ḡ·ḡ, w·w, m·w, m·m, m·ḡ] over the
    local elements. _SPLIT_APPLY: from the all-reduced statistics, v', s and 1/||w̄|| by the
    closed forms, then m' and w' elementwise, and the step counted.
    """
    valid, listed, first_of_tensor, tensor, entry, row, row_len, row_start, param_start, grad_start, exp_avg_start, master_start = \
        _tile_rows(tensor_table, slot_table, grad_offsets, first_slot, ROWS, ALIGNED, GRADS_ALIGNED,
                   PARAM_VEC, GRAD_VEC, STATE_VEC, ROW_VEC, MASTER)
    sums = statistics + (tl.load(entry + _COLUMN_FIRST_ROW, mask=valid, other=0) + row) * 6
    if MODE == _MODE_SPLIT_STATISTICS:
        if WIDE == 0:
            a, b, c, d, e, f = _chunked_sums(param_base, state_base, valid, row_len, param_start, grad_start,
                                             exp_avg_start, master_start, grad_scale, CHUNK, HAS_GRAD_SCALE, MASTER,
                                             PARAM_DTYPE, GRAD_DTYPE, STATE_DTYPE)
        else:
            cols_wide = tl.arange(0, WIDE)[None, :]
            cols_narrow = WIDE + tl.arange(0, NARROW)[None, :]
            gw, gg, ww, mw, mm, mg = _block_products(
                param_base, state_base, param_start, grad_start, exp_avg_start, master_start, cols_wide,
                valid[:, None] & (cols_wide < row_len[:, None]), grad_scale, HAS_GRAD_SCALE, MASTER, PARAM_DTYPE,
                GRAD_DTYPE, STATE_DTYPE)
            a, b, c = tl.sum(gw, axis=1), tl.sum(gg, axis=1), tl.sum(ww, axis=1)
            d, e, f = tl.sum(mw, axis=1), tl.sum(mm, axis=1), tl.sum(mg, axis=1)
            gw, gg, ww, mw, mm, mg = _block_products(
                param_base, state_base, param_start, grad_start, exp_avg_start, master_start, cols_narrow,
                valid[:, None] & (cols_narrow < row_len[:, None]), grad_scale, HAS_GRAD_SCALE, MASTER, PARAM_DTYPE,
                GRAD_DTYPE, STATE_DTYPE)
            a, b, c = a + tl.sum(gw, axis=1), b + tl.sum(gg, axis=1), c + tl.sum(ww, axis=1)
            d, e, f = d + tl.sum(mw, axis=1), e + tl.sum(mm, axis=1), f + tl.sum(mg, axis=1)
        tl.store(sums + 0, a, mask=valid)
        tl.store(sums + 1, b, mask=valid)
        tl.store(sums + 2, c, mask=valid)
        tl.store(sums + 3, d, mask=valid)
        tl.store(sums + 4, e, mask=valid)
        tl.store(sums + 5, f, mask=valid)
    else:
        step = _count_step(tensor, entry, listed, first_of_tensor, arrivals)
        beta1, one_minus_beta1 = _first_moment_weights(hyper, STATE_DTYPE)
        a = tl.load(sums + 0, mask=valid, other=0.0)
        exp_avg_sq = tl.load(entry + _COLUMN_EXP_AVG_SQ, mask=valid, other=0).to(tl.pointer_type(STATE_DTYPE)) + row
        v, step_size, w_bar_sq_norm, m_new_sq = _update_from_statistics(
            hyper, a, tl.load(sums + 1, mask=valid, other=0.0), tl.load(sums + 2, mask=valid, other=0.0),
            tl.load(sums + 3, mask=valid, other=0.0), tl.load(sums + 4, mask=valid, other=0.0),
            tl.load(sums + 5, mask=valid, other=0.0), tl.load(exp_avg_sq, mask=valid, other=0.0), step)
        scale = _row_scale(hyper, valid, w_bar_sq_norm, m_new_sq).to(STATE_DTYPE)
        step_size = step_size.to(STATE_DTYPE)
        tl.store(exp_avg_sq, v.to(STATE_DTYPE), mask=valid)
        if STOCHASTIC:
            key = _rounding_key(entry, valid, step)
        else:
            key = step
        if WIDE == 0:
            length = tl.sum(tl.where(valid, row_len, 0), axis=0)
            cols = tl.arange(0, CHUNK)[None, :]
            for start in range(0, length, CHUNK):
                _apply_block(param_base, state_base, param_start, grad_start, exp_avg_start, master_start, row_start,
                             start + cols, valid[:, None] & (start + cols < row_len[:, None]), a, step_size, scale,
                             beta1, one_minus_beta1, key, grad_scale, HAS_GRAD_SCALE, MASTER, STOCHASTIC, PARAM_DTYPE,
                             GRAD_DTYPE, STATE_DTYPE)
        else:
            # NARROW columns at a time (WIDE is a multiple of NARROW): with both blocks at once,
            # their loads hoisted above the float64 closed forms, unaligned tiles spilled.
            cols = tl.arange(0, NARROW)[None, :]
            for start in range(0, WIDE + NARROW, NARROW):
                _apply_block(param_base, state_base, param_start, grad_start, exp_avg_start, master_start, row_start,
                             start + cols, valid[:, None] & (start + cols < row_len[:, None]), a, step_size, scale,
                             beta1, one_minus_beta1, key, grad_scale, HAS_GRAD_SCALE, MASTER, STOCHASTIC, PARAM_DTYPE,
                             GRAD_DTYPE, STATE_DTYPE)


@triton.jit
def _ndadam_rows_kernel(
    param_base, state_base, tensor_table, slot_table, tile_table, grad_offsets, hyper, arrivals,
    grad_scale, found_inf, statistics,
    MODE: tl.constexpr, PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
    PARAM_VEC: tl.constexpr, GRAD_VEC: tl.constexpr, STATE_VEC: tl.constexpr, ROW_VEC: tl.constexpr,
    CLASSES: tl.constexpr, STATISTICS_CHUNK: tl.constexpr, GRADS_ALIGNED: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
):
    """One program updates one tile (see the module docstring).

    param_base: *PARAM_DTYPE, state_base: *STATE_DTYPE: what the tables' offsets count from
    (16-byte aligned); tensor_table: int64 [n_tensors, 9]; slot_table: int32 [n_slots, 2];
    tile_table: int32 [n_programs, 2] = (index into CLASSES, first slot); grad_offsets: int64
    [n_tensors] (GRAD_DTYPE elements from param_base); hyper: float64 [4] = (lr, β1, β2, ε);
    arrivals: int32 [n_tensors]; grad_scale, found_inf: 0-dim (or None: HAS_GRAD_SCALE /
    HAS_FOUND_INF false); statistics: STATE_DTYPE [Σ rows, 6] of the rows-split step (or None).
    MODE: _STEP_ROWS (the whole step), _SPLIT_STATISTICS or _SPLIT_APPLY.
    PARAM_VEC, GRAD_VEC, STATE_VEC: elements per 16 bytes; ROW_VEC: the larger of PARAM_VEC and
    STATE_VEC. CLASSES: the tile shapes this group uses, (WIDE, NARROW, ROWS, ALIGNED) each,
    WIDE = 0 for the statistics path: only they are compiled. GRADS_ALIGNED: every gradient
    starts on 16 bytes this step.
    """
    tile = tl.program_id(0)
    tile_class = tl.load(tile_table + 2 * tile)
    first_slot = tl.load(tile_table + 2 * tile + 1)
    proceed = True
    if HAS_FOUND_INF:
        # GradScaler found an inf or NaN: nothing changes, step counts included.
        proceed = tl.load(found_inf) == 0
    if proceed:
        for index in tl.static_range(len(CLASSES)):
            if tile_class == index:
                if MODE != _MODE_STEP_ROWS:
                    _split_tile(param_base, state_base, tensor_table, slot_table, grad_offsets, hyper, arrivals,
                                grad_scale, statistics, first_slot, MODE, CLASSES[index][2], CLASSES[index][0],
                                CLASSES[index][1], STATISTICS_CHUNK, CLASSES[index][3], GRADS_ALIGNED and CLASSES[index][3],
                                PARAM_VEC, GRAD_VEC, STATE_VEC, ROW_VEC, PARAM_DTYPE, GRAD_DTYPE, STATE_DTYPE,
                                HAS_GRAD_SCALE, MASTER, STOCHASTIC)
                elif CLASSES[index][0] == 0:
                    _statistics_row(param_base, state_base, tensor_table, slot_table, grad_offsets, hyper, arrivals,
                                    grad_scale, first_slot, STATISTICS_CHUNK, CLASSES[index][3],
                                    GRADS_ALIGNED and CLASSES[index][3], PARAM_VEC, GRAD_VEC, STATE_VEC, ROW_VEC,
                                    PARAM_DTYPE, GRAD_DTYPE, STATE_DTYPE, HAS_GRAD_SCALE, MASTER, STOCHASTIC)
                else:
                    _exact_tile(param_base, state_base, tensor_table, slot_table, grad_offsets, hyper, arrivals,
                                grad_scale, first_slot, CLASSES[index][2], CLASSES[index][0], CLASSES[index][1],
                                CLASSES[index][3], GRADS_ALIGNED and CLASSES[index][3], PARAM_VEC, GRAD_VEC, STATE_VEC,
                                ROW_VEC, PARAM_DTYPE, GRAD_DTYPE, STATE_DTYPE, HAS_GRAD_SCALE, MASTER, STOCHASTIC)



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
    slot_table: np.ndarray  # int32 [n_slots, 2]: (tensor, row), tensor -1 for padding, row -1 for a 0-row tensor
    tile_table: np.ndarray  # int32 [n_tiles, 2]: (index into classes, first slot)
    tiles_per_tensor: np.ndarray  # int64 [n_tensors]: tiles holding slots of each tensor
    lanes: int  # register lanes of all tiles (a statistics row: its chunks' lanes)
    elements: int  # elements of all rows

    @property
    def idle_fraction(self) -> float:
        """The fraction of lanes that hold no element of any row."""
        return 1.0 - self.elements / self.lanes if self.lanes else 0.0


def plan_tiles(rows, row_lens, aligned, single_pass_max: int = SINGLE_PASS_MAX, state_dtype: torch.dtype = torch.float32,
               fewer_unaligned_rows: bool = False) -> TilePlan:
    """Pack every row of every tensor into tiles: rows of one width class and alignment share
    tiles, whatever tensor they come from, in tensor order. A tensor with 0 rows gets one empty
    slot (row -1), so that the launch counts its step.

    rows, row_lens, aligned: per tensor, its row count, row length and whether its rows start
    on 16 bytes (then its tiles use 128-bit accesses). ``fewer_unaligned_rows``: unaligned
    tiles hold half their rows (at least one), for launches with more live values per row or
    element: a master copy (one more address per element), stochastic rounding (the hash), the
    rows-split apply phase (float64 closed forms of six sums per row). With an address of its
    own per element and stream, such tiles spilled on sm_90 (tests/test_triton_sm90.py).
    """
    rows = np.asarray(rows, dtype=np.int64)
    row_lens = np.asarray(row_lens, dtype=np.int64)
    aligned = np.asarray(aligned, dtype=bool)
    slot_rows = np.maximum(rows, 1)
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
        member_rows = slot_rows[members]
        statistics = tile_class == statistics_class
        wide, narrow, slots_per_tile = (0, 0, 1) if statistics else WIDTH_CLASSES[state_dtype, is_aligned][tile_class]
        if fewer_unaligned_rows and not is_aligned:
            slots_per_tile = max(1, slots_per_tile // 2)
        starts = np.concatenate(([0], np.cumsum(member_rows)[:-1]))
        count = int(member_rows.sum())
        tensor_of_slot = np.repeat(members, member_rows)
        row_of_slot = np.arange(count) - np.repeat(starts, member_rows)
        row_of_slot[np.repeat(rows[members] == 0, member_rows)] = -1
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
    param_base: Tensor  # what param and grad offsets count from
    state_base: Tensor  # what exp_avg and master offsets count from
    tensor_table: Tensor
    slot_table: Tensor
    tile_table: Tensor
    arrivals: Tensor
    grad_offsets: Tensor
    n_programs: int
    plan: TilePlan
    rows: int  # rows of all its tensors
    empty: np.ndarray  # bool [n_tensors]: tensors without elements (their gradients have no address to count)
    master: bool  # the tensors have master copies (read w there, write w' there too)
    stochastic: bool  # the params are rounded stochastically
    last_grad_offsets: np.ndarray | None = None  # what `grad_offsets` holds, when known
    captured: bool = False  # a CUDA graph writes these buffers too: never trust the one above
    keep: list = field(default_factory=list)  # host buffers a captured graph copies from
    # This launch's per-step arguments, set just before _launch and cleared after it.
    launch_arguments: dict | None = None


@dataclass
class GroupTable:
    """The cached launch description of one group's tensors: one part per (device, dtype)."""

    parts: list[_Part]


# Tables are a pure function of their key (the addresses of params, state, master copies and
# seeds, shapes, dtype, device, path limit), so a cached one can never be stale: when the
# caching allocator hands an address to a different tensor of the same shape, the table for it
# is the same table. An LRU bounds the memory kept. A table that a CUDA graph captured is moved
# out of the LRU and kept for good: the graph reads its buffers at every replay.
_TABLE_CACHE: collections.OrderedDict[tuple, GroupTable] = collections.OrderedDict()
_TABLE_CACHE_SIZE = 64
_CAPTURED_TABLES: dict[tuple, GroupTable] = {}
table_builds = 0  # how many tables were built (tests read it to prove the cache works)


def _addresses(tensors) -> tuple | None:
    return None if tensors is None else tuple(map(Tensor.data_ptr, tensors))


def _table_key(params, exp_avgs, exp_avg_sqs, state_steps, single_pass_max, master_params, rounding_seeds,
               fewer_unaligned_rows) -> tuple:
    return (
        params[0].device, params[0].dtype, single_pass_max, fewer_unaligned_rows,
        tuple(map(Tensor.data_ptr, params)), tuple([p.shape for p in params]), tuple(map(Tensor.data_ptr, exp_avgs)),
        _addresses(exp_avg_sqs), _addresses(state_steps), _addresses(master_params), _addresses(rounding_seeds),
    )


def group_table(params, exp_avgs, exp_avg_sqs, state_steps, single_pass_max: int = SINGLE_PASS_MAX,
                master_params=None, rounding_seeds=None, fewer_unaligned_rows: bool = False) -> GroupTable:
    """The cached :class:`GroupTable` for these tensors; built only when a param, state tensor,
    master copy or seed moved or a param changed shape. Gradients are not part of it.
    ``exp_avg_sqs`` and ``state_steps`` may be None (the rows-split statistics phase).
    ``fewer_unaligned_rows``: see :func:`plan_tiles` (the rows-split apply phase asks for it;
    master copies and rounding seeds imply it)."""
    global table_builds
    key = _table_key(params, exp_avgs, exp_avg_sqs, state_steps, single_pass_max, master_params, rounding_seeds,
                     fewer_unaligned_rows)
    table = _CAPTURED_TABLES.get(key)
    if table is not None:
        return table
    table = _TABLE_CACHE.get(key)
    if table is not None:
        _TABLE_CACHE.move_to_end(key)
        return table
    table_builds += 1
    first_rows = np.concatenate(([0], np.cumsum([p.shape[0] for p in params])[:-1])).astype(np.int64)
    # One part per (device, dtype) of the params, in order of first appearance.
    grouped: dict[tuple, list[int]] = {}
    for index, p in enumerate(params):
        grouped.setdefault((p.device, p.dtype), []).append(index)
    parts = []
    for indices in grouped.values():
        lists = [None if tensors is None else [tensors[i] for i in indices]
                 for tensors in (params, exp_avgs, exp_avg_sqs, state_steps, master_params, rounding_seeds)]
        parts.append(_build_part(None if len(grouped) == 1 else indices, *lists, first_rows[indices], single_pass_max,
                                 fewer_unaligned_rows))
    table = GroupTable(parts)
    _TABLE_CACHE[key] = table
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return table


def _is_capturing(tensor: Tensor) -> bool:
    """Whether this step is being captured into a CUDA graph (never for CPU tensors)."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def _keep_for_capture(key: tuple, table: GroupTable) -> None:
    _TABLE_CACHE.pop(key, None)
    _CAPTURED_TABLES[key] = table
    for part in table.parts:
        part.captured = True


def _vector_widths(param_dtype: torch.dtype, state_dtype: torch.dtype) -> tuple[int, int, int]:
    """Elements per 16 bytes of a param, of a state element, and the larger of the two."""
    param_vec, state_vec = 16 // param_dtype.itemsize, 16 // state_dtype.itemsize
    return param_vec, state_vec, max(param_vec, state_vec)


def _check_part(positions, params, exp_avgs, exp_avg_sqs, state_steps, master_params, rounding_seeds, state_dtype) -> None:
    """Raise, naming the tensor, for anything the kernel cannot step as it is laid out."""
    device = params[0].device
    for k, p in enumerate(params):
        m = exp_avgs[k]
        where = f"NDAdam triton backend: params[{positions[k]}] (shape {list(p.shape)}, {p.dtype})"
        if not p.is_contiguous():
            raise RuntimeError(
                f"{where} is not contiguous (strides {list(p.stride())}); the kernel steps contiguous row-major "
                "tensors (NDAdam passes them so through ndadam_fused.rows.RowMajorViews)"
            )
        if not m.is_contiguous() or m.dtype != state_dtype or m.shape != p.shape or m.device != device:
            raise RuntimeError(f"{where} has an exp_avg of shape {list(m.shape)} ({m.dtype} on {m.device}, contiguous: {m.is_contiguous()}): it needs a contiguous {state_dtype} tensor of the param's shape on {device}")
        if exp_avg_sqs is not None:
            v = exp_avg_sqs[k]
            if not v.is_contiguous() or v.dtype != state_dtype or v.shape != p.shape[:1] or v.device != device:
                raise RuntimeError(f"{where} has an exp_avg_sq of shape {list(v.shape)} ({v.dtype} on {v.device}): it needs a contiguous {state_dtype} tensor of shape [{p.shape[0]}] on {device}")
        if state_steps is not None:
            s = state_steps[k]
            if s.device != device or s.dtype != torch.float32 or s.numel() != 1:
                raise RuntimeError(f"{where} has a step on {s.device} ({s.dtype}, {s.numel()} elements): it needs one float32 on {device}")
        if master_params is not None:
            master = master_params[k]
            if not master.is_contiguous() or master.dtype != state_dtype or master.shape != p.shape or master.device != device:
                raise RuntimeError(f"{where} has a master copy of shape {list(master.shape)} ({master.dtype} on {master.device}, contiguous: {master.is_contiguous()}): it needs a contiguous {state_dtype} tensor of the param's shape on {device}")
        if rounding_seeds is not None:
            seed = rounding_seeds[k]
            if p.dtype != torch.bfloat16:
                raise RuntimeError(f"{where} has a rounding seed: stochastic rounding rounds to bfloat16 params only")
            if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != device:
                raise RuntimeError(f"{where} has a rounding seed of {seed.numel()} {seed.dtype} elements on {seed.device}: it needs one int64 on {device}")


def _build_part(indices, params, exp_avgs, exp_avg_sqs, state_steps, master_params, rounding_seeds, first_rows,
                single_pass_max, fewer_unaligned_rows) -> _Part:
    device, param_dtype = params[0].device, params[0].dtype
    state_dtype = _state_dtype_of(param_dtype)
    positions = indices if indices is not None else range(len(params))
    _check_part(list(positions), params, exp_avgs, exp_avg_sqs, state_steps, master_params, rounding_seeds, state_dtype)
    param_size, state_size = param_dtype.itemsize, state_dtype.itemsize
    param_vec, state_vec, row_vec = _vector_widths(param_dtype, state_dtype)
    empty = np.array([p.numel() == 0 for p in params], dtype=bool)
    # Tensors without elements have no address worth counting (possibly 0): offsets 0, never read.
    param_addresses = np.where(empty, 0, np.array([p.data_ptr() for p in params], dtype=np.int64))
    exp_avg_addresses = np.where(empty, 0, np.array([m.data_ptr() for m in exp_avgs], dtype=np.int64))
    master_addresses = exp_avg_addresses if master_params is None else \
        np.where(empty, 0, np.array([m.data_ptr() for m in master_params], dtype=np.int64))
    # Offsets count from one param and one exp_avg, passed to the kernel as pointer arguments:
    # Triton knows those are 16-byte aligned, which an address read from a table cannot tell
    # it. A tensor with elements whose param, exp_avg (and master) start on 16 bytes is the
    # base, when there is one.
    on_16 = ~empty & (param_addresses % 16 == 0) & (exp_avg_addresses % 16 == 0) & (master_addresses % 16 == 0)
    base = int(np.argmax(on_16)) if on_16.any() else int(np.argmin(empty))
    param_delta = np.where(empty, 0, param_addresses - param_addresses[base])
    exp_avg_delta = np.where(empty, 0, exp_avg_addresses - exp_avg_addresses[base])
    master_delta = np.where(empty, 0, master_addresses - exp_avg_addresses[base])
    if (param_delta % param_size).any() or (exp_avg_delta % state_size).any() or (master_delta % state_size).any():
        raise RuntimeError("NDAdam triton backend: a parameter, its exp_avg or its master copy is not aligned to its element size")
    rows = np.array([p.shape[0] for p in params], dtype=np.int64)
    row_lens = np.array([math.prod(p.shape[1:]) for p in params], dtype=np.int64)
    aligned = bool(on_16[base]) & (param_delta % 16 == 0) & (exp_avg_delta % 16 == 0) & (master_delta % 16 == 0) \
        & (row_lens % row_vec == 0)
    plan = plan_tiles(rows, row_lens, aligned, single_pass_max, state_dtype,
                      fewer_unaligned_rows=fewer_unaligned_rows or master_params is not None or rounding_seeds is not None)

    def addresses(tensors):
        return np.zeros(len(params), dtype=np.int64) if tensors is None else np.array([t.data_ptr() for t in tensors], dtype=np.int64)

    tensor_table = np.stack([
        param_delta // param_size, exp_avg_delta // state_size, master_delta // state_size,
        addresses(exp_avg_sqs), addresses(state_steps), addresses(rounding_seeds),
        row_lens, plan.tiles_per_tensor, np.asarray(first_rows, dtype=np.int64),
    ], axis=1)
    assert tensor_table.shape[1] == _FIELDS.value
    return _Part(
        indices=indices, param_dtype=param_dtype, state_dtype=state_dtype, device=device,
        param_base=params[base], state_base=exp_avgs[base],
        tensor_table=_upload(tensor_table, device), slot_table=_upload(plan.slot_table, device),
        tile_table=_upload(plan.tile_table, device),
        arrivals=torch.zeros(len(params), dtype=torch.int32, device=device),
        grad_offsets=torch.zeros(len(params), dtype=torch.int64, device=device),
        n_programs=len(plan.tile_table), plan=plan, rows=int(rows.sum()), empty=empty,
        master=master_params is not None, stochastic=rounding_seeds is not None,
    )


def _write_grad_offsets(part: _Part, grads: list[Tensor], capturing: bool) -> tuple[list[Tensor], torch.dtype, bool]:
    """Put this step's gradient offsets on the device (gradient elements from part.param_base).

    Returns the gradients as the kernel reads them (contiguous; the caller keeps them alive
    until the launch), their dtype and whether every one starts on 16 bytes. The copy is
    asynchronous, from pinned memory, on the current stream, and skipped when the offsets are
    those of the last step (gradients updated in place) unless a CUDA graph may have written
    the buffer since.
    """
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    grad_dtype = grads[0].dtype
    if any(g.dtype != grad_dtype for g in grads):
        raise RuntimeError(
            f"NDAdam triton backend: the gradients of one launch must share a dtype, got {sorted({str(g.dtype) for g in grads})}"
        )
    delta = np.fromiter(map(Tensor.data_ptr, grads), dtype=np.int64, count=len(grads)) - part.param_base.data_ptr()
    if part.empty.any():
        delta[part.empty] = 0
    size = grad_dtype.itemsize
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
    return grads, grad_dtype, grads_aligned


def _launch_constexprs(param_dtype: torch.dtype, classes: tuple, grads_aligned: bool, *, mode: int = _STEP_ROWS,
                       grad_dtype: torch.dtype | None = None, grad_scale: bool = False, found_inf: bool = False,
                       master: bool = False, stochastic: bool = False) -> dict:
    """The kernel's compile-time arguments for a part of ``param_dtype`` params whose plan uses
    ``classes``, with gradients of ``grad_dtype`` (the param dtype by default)."""
    state_dtype = _state_dtype_of(param_dtype)
    grad_dtype = param_dtype if grad_dtype is None else grad_dtype
    param_vec, state_vec, row_vec = _vector_widths(param_dtype, state_dtype)
    return dict(
        MODE=mode, PARAM_DTYPE=_TL_DTYPES[param_dtype], GRAD_DTYPE=_TL_DTYPES[grad_dtype], STATE_DTYPE=_TL_DTYPES[state_dtype],
        PARAM_VEC=param_vec, GRAD_VEC=16 // grad_dtype.itemsize, STATE_VEC=state_vec, ROW_VEC=row_vec,
        CLASSES=classes, STATISTICS_CHUNK=STATISTICS_CHUNK, GRADS_ALIGNED=grads_aligned,
        HAS_GRAD_SCALE=grad_scale, HAS_FOUND_INF=found_inf, MASTER=master, STOCHASTIC=stochastic,
    )


#: What kernel_specialization's flags select: the launch options a GradScaler, master weights or
#: stochastic rounding add, and the rows-split phases.
_SPECIALIZATION_FLAGS = ("grad_scale", "found_inf", "master", "stochastic")


def kernel_specialization(param_dtype: torch.dtype, classes: tuple, name: str = "", *, mode: int = _STEP_ROWS,
                          **flags: bool) -> dict:
    """What a launch for ``classes`` (a TilePlan's) compiles, with 16-byte aligned bases and
    gradients, for ahead-of-time checks: name, kernel, signature, constexprs, attrs, num_warps.
    ``flags``: grad_scale, found_inf, master, stochastic (all False by default); ``mode``: the
    whole step, or a phase of the rows-split step."""
    unknown = set(flags) - set(_SPECIALIZATION_FLAGS)
    if unknown:
        raise ValueError(f"kernel_specialization: unknown flags {sorted(unknown)}; choose from {_SPECIALIZATION_FLAGS}")
    state_dtype = _state_dtype_of(param_dtype)
    constexprs = _launch_constexprs(param_dtype, classes, True, mode=mode, **flags)
    signature = {
        "param_base": _POINTER_TYPES[param_dtype], "state_base": _POINTER_TYPES[state_dtype],
        "tensor_table": "*i64", "slot_table": "*i32", "tile_table": "*i32", "grad_offsets": "*i64",
        "hyper": "*fp64" if mode != _SPLIT_STATISTICS else "constexpr", "arrivals": "*i32",
        "grad_scale": "*fp32" if flags.get("grad_scale") else "constexpr",
        "found_inf": "*fp32" if flags.get("found_inf") else "constexpr",
        "statistics": _POINTER_TYPES[state_dtype] if mode != _STEP_ROWS else "constexpr",
        **{key: "constexpr" for key in constexprs},
    }
    for argument in ("hyper", "grad_scale", "found_inf", "statistics"):
        if signature[argument] == "constexpr":
            constexprs[argument] = None
    pointers = [i for i, kind in enumerate(signature.values()) if kind.startswith("*")]
    return dict(
        name=name, kernel=_ndadam_rows_kernel, signature=signature, constexprs=constexprs,
        # What the JIT tells the compiler about 16-byte aligned tensor arguments.
        attrs={(i,): [["tt.divisibility", 16]] for i in pointers},
        num_warps=_NUM_WARPS,
    )


def _launch(part: _Part, grads_aligned: bool) -> None:
    """Launch the kernel for ``part`` with the per-step arguments in ``part.launch_arguments``."""
    arguments = part.launch_arguments
    _ndadam_rows_kernel[(part.n_programs,)](
        part.param_base, part.state_base, part.tensor_table, part.slot_table, part.tile_table,
        part.grad_offsets, arguments["hyper"], part.arrivals, arguments["grad_scale"], arguments["found_inf"],
        arguments["statistics"],
        **_launch_constexprs(part.param_dtype, part.plan.classes, grads_aligned, mode=arguments["mode"],
                             grad_dtype=arguments["grad_dtype"], grad_scale=arguments["grad_scale"] is not None,
                             found_inf=arguments["found_inf"] is not None, master=part.master,
                             stochastic=part.stochastic),
        num_warps=_NUM_WARPS,
    )


def _scalar_on(tensor: Tensor | None, device: torch.device, name: str) -> Tensor | None:
    """GradScaler's 0-dim tensor on the params' device (moved without blocking, as torch's fused
    Adam does, when it lives elsewhere)."""
    if tensor is None:
        return None
    if not isinstance(tensor, Tensor) or tensor.numel() != 1 or not tensor.is_floating_point():
        raise ValueError(f"NDAdam triton backend: {name} must be a floating-point tensor of one element, got {tensor!r}")
    return tensor if tensor.device == device else tensor.to(device, non_blocking=True)


def _check_hyper(hyper: Tensor, device: torch.device) -> None:
    if not isinstance(hyper, Tensor) or hyper.dtype != torch.float64 or hyper.shape != (4,) or hyper.device != device:
        described = f"{hyper.dtype} {list(hyper.shape)} on {hyper.device}" if isinstance(hyper, Tensor) else repr(hyper)
        raise ValueError(f"NDAdam triton backend: hyper must be the float64 [4] tensor (lr, β1, β2, ε) on {device}, got {described}")


def _check_lists(where: str, params: list[Tensor], **lists) -> None:
    for name, tensors in lists.items():
        if tensors is not None and len(tensors) != len(params):
            raise ValueError(f"NDAdam triton backend: {where} got {len(params)} params but {len(tensors)} {name}")


def _run(mode: int, params, grads, exp_avgs, exp_avg_sqs, state_steps, *, hyper, grad_scale, found_inf, master_params,
         rounding_seeds, statistics, single_pass_max) -> None:
    """Build or find the table, write the gradients' offsets, launch once per part."""
    device = params[0].device
    table_args = (params, exp_avgs, exp_avg_sqs, state_steps, single_pass_max, master_params, rounding_seeds,
                  mode == _SPLIT_APPLY)
    table = group_table(*table_args)
    capturing = _is_capturing(params[0])
    if capturing and not all(part.captured for part in table.parts):
        _keep_for_capture(_table_key(*table_args), table)
    grad_scale = _scalar_on(grad_scale, device, "grad_scale")
    found_inf = _scalar_on(found_inf, device, "found_inf")
    for part in table.parts:
        part_grads = grads if part.indices is None else [grads[i] for i in part.indices]
        if statistics is not None and part.state_dtype != statistics.dtype:
            raise ValueError(
                f"NDAdam triton backend: the statistics buffer is {statistics.dtype}, but {part.param_dtype} params "
                f"keep {part.state_dtype} state; one buffer serves params of one state dtype"
            )
        with torch.cuda.device(part.device) if part.device.type == "cuda" else contextlib.nullcontext():
            kernel_grads, grad_dtype, grads_aligned = _write_grad_offsets(part, part_grads, capturing)
            part.launch_arguments = dict(mode=mode, hyper=hyper, grad_scale=grad_scale, found_inf=found_inf,
                                         statistics=statistics, grad_dtype=grad_dtype)
            try:
                _launch(part, grads_aligned)
            finally:
                part.launch_arguments = None
        del kernel_grads


def _limit(single_pass_max: int | None) -> int:
    limit = SINGLE_PASS_MAX if single_pass_max is None else single_pass_max
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ValueError(f"NDAdam triton backend: single_pass_max must be an int >= 0, got {limit!r}")
    return limit


def _vector_step(params, grads, exp_avgs, exp_avg_sqs, state_steps, hyper, grad_scale, found_inf, master_params,
                 rounding_seeds, single_pass_max) -> None:
    if not params:
        return
    _check_lists("vector_step", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, state_steps=state_steps,
                 master_params=master_params, rounding_seeds=rounding_seeds)
    _check_hyper(hyper, params[0].device)
    _run(_STEP_ROWS, params, grads, exp_avgs, exp_avg_sqs, state_steps, hyper=hyper, grad_scale=grad_scale,
         found_inf=found_inf, master_params=master_params, rounding_seeds=rounding_seeds, statistics=None,
         single_pass_max=single_pass_max)


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
    """ND-Adam step of every row of ``params`` (and of their steps): one kernel launch per dtype.

    ``params[i]``, ``grads[i]``, ``exp_avgs[i]`` (and ``master_params[i]``): contiguous
    ``[rows_i, *]`` on ``hyper``'s device; ``exp_avg_sqs[i]``: ``[rows_i]``; ``state_steps[i]``:
    float32 0-dim; ``hyper``: float64 ``[lr, β1, β2, ε]``, read by the kernel (``beta1``,
    ``beta2``, ``eps`` are the same values as floats, unused here). ``grad_scale``, ``found_inf``,
    ``master_params``, ``rounding_seeds``: see the module docstring.
    ``single_pass_max`` overrides :data:`SINGLE_PASS_MAX` (tests force each path with it); rows
    longer than the state dtype's TILE_LANES take the statistics path whatever it says.
    """
    limit = _limit(single_pass_max)
    if torch.compiler.is_compiling():
        torch.ops.ndadam_fused_triton.vector_step_(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, hyper, grad_scale, found_inf,
            [] if master_params is None else master_params, [] if rounding_seeds is None else rounding_seeds, limit,
        )
        return
    _vector_step(params, grads, exp_avgs, exp_avg_sqs, state_steps, hyper, grad_scale, found_inf, master_params,
                 rounding_seeds, limit)


#: θ^s of Algorithm 1: torch's fused Adam (CUDA and CPU) with L2 weight decay; it takes a tensor lr.
scalar_step = functools.partial(adam_step, implementation="fused")


# ---- the rows-split step (rows split across ranks; see ndadam_fused.backends.row_statistics) ----


def _check_statistics(params: list[Tensor], statistics: Tensor) -> None:
    rows = sum(p.shape[0] for p in params)
    if not isinstance(statistics, Tensor) or statistics.shape != (rows, 6) or not statistics.is_contiguous() \
            or statistics.device != params[0].device:
        described = f"shape {list(statistics.shape)} on {statistics.device}" if isinstance(statistics, Tensor) else repr(statistics)
        raise ValueError(
            f"row statistics: the buffer has {described}, but the {len(params)} tensors have {rows} rows in all; "
            f"expected a contiguous [{rows}, 6] tensor on {params[0].device}"
        )


def _row_statistics(params, grads, exp_avgs, statistics, grad_scale, master_params) -> None:
    if not params:
        return
    _check_lists("row_statistics", params, grads=grads, exp_avgs=exp_avgs, master_params=master_params)
    _check_statistics(params, statistics)
    _run(_SPLIT_STATISTICS, params, grads, exp_avgs, None, None, hyper=None, grad_scale=grad_scale, found_inf=None,
         master_params=master_params, rounding_seeds=None, statistics=statistics, single_pass_max=SINGLE_PASS_MAX)


def row_statistics(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    statistics: Tensor,
    grad_scale: Tensor | None = None,
    master_params: list[Tensor] | None = None,
) -> None:
    """Phase 1 of the rows-split step: ``statistics[row] = [ḡ·w, ḡ·ḡ, w·w, m·w, m·m, m·ḡ]`` over
    each row's local elements, ``ḡ = grad / grad_scale``, ``w`` from ``master_params`` where
    given (a param of another dtype than its gradient, such as a master copy passed as the param,
    is read as it is). ``statistics``: ``[Σ rows_i, 6]`` in the state dtype, tensor ``i``'s rows
    after those of tensors ``0 .. i-1``. One launch per param dtype."""
    if torch.compiler.is_compiling():
        torch.ops.ndadam_fused_triton.row_statistics_(
            params, grads, exp_avgs, statistics, grad_scale, [] if master_params is None else master_params)
        return
    _row_statistics(params, grads, exp_avgs, statistics, grad_scale, master_params)


def _apply_row_statistics(params, grads, exp_avgs, exp_avg_sqs, state_steps, statistics, hyper, grad_scale, found_inf,
                          master_params, rounding_seeds) -> None:
    if not params:
        return
    _check_lists("apply_row_statistics", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                 state_steps=state_steps, master_params=master_params, rounding_seeds=rounding_seeds)
    _check_statistics(params, statistics)
    _check_hyper(hyper, params[0].device)
    _run(_SPLIT_APPLY, params, grads, exp_avgs, exp_avg_sqs, state_steps, hyper=hyper, grad_scale=grad_scale,
         found_inf=found_inf, master_params=master_params, rounding_seeds=rounding_seeds, statistics=statistics,
         single_pass_max=SINGLE_PASS_MAX)


def apply_row_statistics(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    statistics: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    hyper: Tensor | None = None,
    lr: float | Tensor | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: list[Tensor] | None = None,
    rounding_seeds: list[Tensor] | None = None,
) -> None:
    """Phase 2 of the rows-split step: each tensor's step is incremented and its rows updated from
    the all-reduced ``statistics`` by the closed forms of :mod:`.row_statistics` (a zero update
    keeps the row's bits), with the options of :func:`vector_step`. ``hyper`` (float64
    ``[lr, β1, β2, ε]`` on the device, read by the kernel) or ``lr`` (then the tensor is made
    from ``lr``, ``beta1``, ``beta2``, ``eps``): one of the two."""
    if (hyper is None) == (lr is None):
        raise ValueError("apply_row_statistics: pass exactly one of hyper= (the float64 [lr, β1, β2, ε] tensor) and lr=")
    if hyper is None and params:
        from ..optimizer import hyperparameter_tensor

        hyper = hyperparameter_tensor(lr, beta1, beta2, eps, params[0].device)
    if torch.compiler.is_compiling():
        torch.ops.ndadam_fused_triton.apply_row_statistics_(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, statistics, hyper, grad_scale, found_inf,
            [] if master_params is None else master_params, [] if rounding_seeds is None else rounding_seeds)
        return
    _apply_row_statistics(params, grads, exp_avgs, exp_avg_sqs, state_steps, statistics, hyper, grad_scale, found_inf,
                          master_params, rounding_seeds)


# ---- torch.compile: each step one opaque custom op --------------------------------------------
# Lists cannot be Optional in a custom op's schema: an empty list stands for None.


@torch.library.custom_op(
    "ndadam_fused_triton::vector_step_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "state_steps", "master_params"),
)
def _vector_step_op(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor], hyper: Tensor, grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
    master_params: list[Tensor], rounding_seeds: list[Tensor], single_pass_max: int,
) -> None:
    _vector_step(params, grads, exp_avgs, exp_avg_sqs, state_steps, hyper, grad_scale, found_inf,
                 master_params or None, rounding_seeds or None, single_pass_max)


@_vector_step_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, state_steps, hyper, grad_scale, found_inf, master_params, rounding_seeds,
      single_pass_max) -> None:
    # The op only mutates its inputs in place: no outputs to describe.
    return None


@torch.library.custom_op("ndadam_fused_triton::row_statistics_", mutates_args=("statistics",))
def _row_statistics_op(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], statistics: Tensor,
    grad_scale: Optional[Tensor], master_params: list[Tensor],
) -> None:
    _row_statistics(params, grads, exp_avgs, statistics, grad_scale, master_params or None)


@_row_statistics_op.register_fake
def _(params, grads, exp_avgs, statistics, grad_scale, master_params) -> None:
    return None


@torch.library.custom_op(
    "ndadam_fused_triton::apply_row_statistics_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "state_steps", "master_params"),
)
def _apply_row_statistics_op(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor], statistics: Tensor, hyper: Tensor, grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor], master_params: list[Tensor], rounding_seeds: list[Tensor],
) -> None:
    _apply_row_statistics(params, grads, exp_avgs, exp_avg_sqs, state_steps, statistics, hyper, grad_scale, found_inf,
                          master_params or None, rounding_seeds or None)


@_apply_row_statistics_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, state_steps, statistics, hyper, grad_scale, found_inf, master_params,
      rounding_seeds) -> None:
    return None
