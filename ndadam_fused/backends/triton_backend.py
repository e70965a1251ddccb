"""The Triton backend: one kernel launch updates every row of every vector tensor of a group.

The kernel :func:`_ndadam_rows_kernel` reads two cached tables (see :class:`RowTable`):

- ``tensor_table``: int64 ``[n_tensors, 9]``: where param, grad and exp_avg start (element
  offsets from two base pointers passed as arguments), the addresses of exp_avg_sq and step, then rows, row length, the tile class of the tensor and whether its rows are
  16-byte aligned (then loads and stores are 128 bits wide);
- ``tile_table``: int32 ``[n_programs, 2]``: the tensor and first row each program updates,
  which is the prefix sum of the tensors' tile counts laid out flat, so that a program finds
  its ``(tensor, row)`` with two loads instead of a search.

Per row ``w`` (length ``L``) with gradient ``ḡ``, first moment ``m`` (``L`` elements) and
second moment ``v`` (one scalar), step ``t`` and lr ``α`` (DESIGN.md section 4)::

    g  = ḡ - (ḡ·w) w;   m' = β1 m + (1-β1) g;   v' = β2 v + (1-β2) ||g||²
    s  = α / (1-β1^t) / (sqrt(v' / (1-β2^t)) + ε)
    w' = (w - s m') / ||w - s m'||

Rows that fit on chip take the exact single-pass path: the row is loaded once, ``g`` and
``||w - s m'||`` are computed explicitly, and it is stored once (20 bytes per fp32 element).
Short rows are packed several to a program as a 2-D tile ``[ROWS, COLS]`` (tile classes
below). Rows longer than ``single_pass_max`` take the statistics path: pass 1 accumulates
``a = ḡ·w, b = ḡ·ḡ, c = w·w, d = m·w, e = m·m, f = m·ḡ`` over chunks, the closed forms give
``||g||², ||m'||², w·m'`` and ``||w̄||²``, and pass 2 writes ``m'`` and ``w'`` (32 bytes per
element).

lr, β1, β2 and ε are read from a small device tensor and the step from each tensor's own
``state["step"]``: an lr schedule never recompiles the kernel, and nothing here syncs with
the host.
"""

from __future__ import annotations

import collections
import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.optim.optimizer import Optimizer

from .scalars import adam_step

__all__ = ["vector_step", "scalar_step", "RowTable", "row_table", "TILE_CLASSES", "SINGLE_PASS_MAX"]

#: Exact-path tile classes for short rows, as (COLS, ROWS): a row of length L goes to the
#: first class with L <= COLS, and ROWS of its rows share one program (a tile of COLS*ROWS
#: elements at most 4096, as many as a long row's program holds).
TILE_CLASSES = ((16, 64), (128, 16), (1024, 4))
#: Rows up to this length take the exact path (one row per program beyond the last class);
#: longer rows take the two-pass statistics path. A 4096-element fp32 row is 16 KiB per
#: operand in registers with 8 warps: the longest row that stays there without spilling.
SINGLE_PASS_MAX = 4096
#: Elements per chunk of the statistics path's loops.
STATISTICS_CHUNK = 2048
_SINGLE_ROW_CLASS = len(TILE_CLASSES)
_STATISTICS_CLASS = len(TILE_CLASSES) + 1
_TABLE_FIELDS = 9  # param, grad, exp_avg, exp_avg_sq, step, rows, row_len, tile_class, aligned
#: Rows whose length is a multiple of this start every operand on 16 bytes (8 bf16/fp16,
#: 4 fp32, 2 fp64 elements), given 16-byte aligned base addresses.
_ALIGN_ROW_ELEMENTS = tl.constexpr(8)
_NUM_WARPS = 8

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

    β^t = 2^(t log2 β) in float64 (libdevice, round-to-nearest grade; exact for β = 0 since
    log2 0 = -inf): a few ulp of float32 error in β2^t would grow about 100x in 1 - β2^t at t = 1.
    """
    t = step.to(tl.float64)
    bias_correction1 = 1.0 - tl.exp2(t * tl.log2(tl.load(hyper + 1)))
    bias_correction2 = 1.0 - tl.exp2(t * tl.log2(tl.load(hyper + 2)))
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
def _exact_tile(
    param, grad, exp_avg, exp_avg_sq, first_row, rows, row_len,
    hyper, bias_correction1, bias_correction2,
    ROWS: tl.constexpr, COLS: tl.constexpr, PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
):
    """Exact single-pass step of up to ROWS rows of one tensor, each at most COLS long."""
    beta1, one_minus_beta1 = _first_moment_weights(hyper, STATE_DTYPE)
    row_ids = first_row + tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    row_mask = row_ids < rows
    mask = row_mask[:, None] & (cols[None, :] < row_len)
    offsets = row_ids[:, None].to(tl.int64) * row_len + cols[None, :]

    w = tl.load(param + offsets, mask=mask, other=0.0).to(STATE_DTYPE)
    g_bar = tl.load(grad + offsets, mask=mask, other=0.0).to(STATE_DTYPE)
    m = tl.load(exp_avg + offsets, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq + row_ids, mask=row_mask, other=0.0)

    radial = tl.sum(g_bar * w, axis=1)
    g = g_bar - radial[:, None] * w
    m = beta1 * m + one_minus_beta1 * g
    v = _second_moment(hyper, v, tl.sum(g * g, axis=1))
    step_size = _step_size(hyper, v, bias_correction1, bias_correction2).to(STATE_DTYPE)
    w_bar = w - step_size[:, None] * m
    # Masked rows have ||w̄|| = 0: give them 1 so that no lane divides by 0.
    inverse_norm = _inverse_sqrt(tl.where(row_mask, tl.sum(w_bar * w_bar, axis=1), 1.0)).to(STATE_DTYPE)
    w_new = w_bar * inverse_norm[:, None]

    tl.store(exp_avg + offsets, m, mask=mask)
    tl.store(exp_avg_sq + row_ids, v.to(STATE_DTYPE), mask=row_mask)
    tl.store(param + offsets, w_new.to(PARAM_DTYPE), mask=mask)


@triton.jit
def _statistics_row(
    param, grad, exp_avg, exp_avg_sq, row, row_len,
    hyper, bias_correction1, bias_correction2,
    CHUNK: tl.constexpr, PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
):
    """Two-pass step of one long row: six dot products, the closed forms, one elementwise pass."""
    beta1, one_minus_beta1 = _first_moment_weights(hyper, STATE_DTYPE)
    base = row.to(tl.int64) * row_len
    cols = tl.arange(0, CHUNK)
    sum_gw = tl.zeros([CHUNK], dtype=STATE_DTYPE)  # a = ḡ·w
    sum_gg = tl.zeros([CHUNK], dtype=STATE_DTYPE)  # b = ḡ·ḡ
    sum_ww = tl.zeros([CHUNK], dtype=STATE_DTYPE)  # c = w·w
    sum_mw = tl.zeros([CHUNK], dtype=STATE_DTYPE)  # d = m·w
    sum_mm = tl.zeros([CHUNK], dtype=STATE_DTYPE)  # e = m·m
    sum_mg = tl.zeros([CHUNK], dtype=STATE_DTYPE)  # f = m·ḡ
    for start in range(0, row_len, CHUNK):
        mask = start + cols < row_len
        offsets = base + start + cols
        w = tl.load(param + offsets, mask=mask, other=0.0).to(STATE_DTYPE)
        g_bar = tl.load(grad + offsets, mask=mask, other=0.0).to(STATE_DTYPE)
        m = tl.load(exp_avg + offsets, mask=mask, other=0.0)
        sum_gw += g_bar * w
        sum_gg += g_bar * g_bar
        sum_ww += w * w
        sum_mw += m * w
        sum_mm += m * m
        sum_mg += m * g_bar
    a = tl.sum(sum_gw, axis=0)
    b = tl.sum(sum_gg, axis=0)
    c = tl.sum(sum_ww, axis=0)
    d = tl.sum(sum_mw, axis=0)
    e = tl.sum(sum_mm, axis=0)
    f = tl.sum(sum_mg, axis=0)

    g_sq, m_dot_g, w_dot_g = _projected_dots(a, b, c, d, f)
    v = _second_moment(hyper, tl.load(exp_avg_sq + row), g_sq)
    step_size = _step_size(hyper, v, bias_correction1, bias_correction2)
    inv_norm = _inverse_sqrt(_updated_row_sq_norm(hyper, step_size, c, d, e, g_sq, m_dot_g, w_dot_g)).to(STATE_DTYPE)
    step_size = step_size.to(STATE_DTYPE)
    tl.store(exp_avg_sq + row, v.to(STATE_DTYPE))

    for start in range(0, row_len, CHUNK):
        mask = start + cols < row_len
        offsets = base + start + cols
        w = tl.load(param + offsets, mask=mask, other=0.0).to(STATE_DTYPE)
        g_bar = tl.load(grad + offsets, mask=mask, other=0.0).to(STATE_DTYPE)
        m = tl.load(exp_avg + offsets, mask=mask, other=0.0)
        m = beta1 * m + one_minus_beta1 * (g_bar - a * w)
        tl.store(exp_avg + offsets, m, mask=mask)
        tl.store(param + offsets, ((w - step_size * m) * inv_norm).to(PARAM_DTYPE), mask=mask)


@triton.jit
def _ndadam_rows_kernel(
    param_base, state_base, tensor_table, tile_table, hyper,
    PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, PARAM_VEC: tl.constexpr, STATE_VEC: tl.constexpr,
    COLS0: tl.constexpr, ROWS0: tl.constexpr,
    COLS1: tl.constexpr, ROWS1: tl.constexpr,
    COLS2: tl.constexpr, ROWS2: tl.constexpr,
    SINGLE_ROW_COLS: tl.constexpr, STATISTICS_CHUNK: tl.constexpr,
):
    """One program updates one tile: ROWS rows of one tensor (see the module docstring).

    param_base: *PARAM_DTYPE, state_base: *STATE_DTYPE (the addresses table offsets count from);
    tensor_table: int64 [n_tensors, 9]; tile_table: int32 [n_programs, 2];
    hyper: float64 [4] = (lr, β1, β2, ε). PARAM_VEC, STATE_VEC: elements per 16 bytes.
    """
    tile = tl.program_id(0)
    tensor = tl.load(tile_table + 2 * tile).to(tl.int64)
    first_row = tl.load(tile_table + 2 * tile + 1)
    entry = tensor_table + tensor * 9
    param_offset = tl.load(entry + 0)
    grad_offset = tl.load(entry + 1)
    exp_avg_offset = tl.load(entry + 2)
    exp_avg_sq = tl.load(entry + 3).to(tl.pointer_type(STATE_DTYPE))
    step = tl.load(tl.load(entry + 4).to(tl.pointer_type(tl.float32)))
    rows = tl.load(entry + 5)
    row_len = tl.load(entry + 6)
    tile_class = tl.load(entry + 7)
    aligned = tl.load(entry + 8)

    bias_correction1, bias_correction2 = _bias_corrections(hyper, step)

    if aligned != 0:
        # The host checked that these offsets and row lengths are multiples of 16 bytes. Written
        # as (x // k) * k, the compiler can prove it too (it cannot see through the table), and
        # emits 128-bit loads and stores.
        _dispatch(param_base + (param_offset // PARAM_VEC) * PARAM_VEC,
                  param_base + (grad_offset // PARAM_VEC) * PARAM_VEC,
                  state_base + (exp_avg_offset // STATE_VEC) * STATE_VEC,
                  exp_avg_sq, first_row, rows, (row_len // _ALIGN_ROW_ELEMENTS) * _ALIGN_ROW_ELEMENTS,
                  tile_class, hyper, bias_correction1, bias_correction2,
                  COLS0, ROWS0, COLS1, ROWS1, COLS2, ROWS2, SINGLE_ROW_COLS, STATISTICS_CHUNK, PARAM_DTYPE, STATE_DTYPE)
    else:
        _dispatch(param_base + param_offset, param_base + grad_offset, state_base + exp_avg_offset,
                  exp_avg_sq, first_row, rows, row_len,
                  tile_class, hyper, bias_correction1, bias_correction2,
                  COLS0, ROWS0, COLS1, ROWS1, COLS2, ROWS2, SINGLE_ROW_COLS, STATISTICS_CHUNK, PARAM_DTYPE, STATE_DTYPE)


@triton.jit
def _dispatch(
    param, grad, exp_avg, exp_avg_sq, first_row, rows, row_len, tile_class, hyper,
    bias_correction1, bias_correction2,
    COLS0: tl.constexpr, ROWS0: tl.constexpr, COLS1: tl.constexpr, ROWS1: tl.constexpr,
    COLS2: tl.constexpr, ROWS2: tl.constexpr, SINGLE_ROW_COLS: tl.constexpr, STATISTICS_CHUNK: tl.constexpr,
    PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
):
    """The tile's path: one exact tile shape per class, or the statistics path."""
    if tile_class == 0:
        _exact_tile(param, grad, exp_avg, exp_avg_sq, first_row, rows, row_len, hyper,
                    bias_correction1, bias_correction2, ROWS0, COLS0, PARAM_DTYPE, STATE_DTYPE)
    elif tile_class == 1:
        _exact_tile(param, grad, exp_avg, exp_avg_sq, first_row, rows, row_len, hyper,
                    bias_correction1, bias_correction2, ROWS1, COLS1, PARAM_DTYPE, STATE_DTYPE)
    elif tile_class == 2:
        _exact_tile(param, grad, exp_avg, exp_avg_sq, first_row, rows, row_len, hyper,
                    bias_correction1, bias_correction2, ROWS2, COLS2, PARAM_DTYPE, STATE_DTYPE)
    elif tile_class == 3:
        _exact_tile(param, grad, exp_avg, exp_avg_sq, first_row, rows, row_len, hyper,
                    bias_correction1, bias_correction2, 1, SINGLE_ROW_COLS, PARAM_DTYPE, STATE_DTYPE)
    else:
        _statistics_row(param, grad, exp_avg, exp_avg_sq, first_row, row_len, hyper,
                        bias_correction1, bias_correction2, STATISTICS_CHUNK, PARAM_DTYPE, STATE_DTYPE)


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def tile_class(row_len: int, single_pass_max: int) -> int:
    """Which path and tile shape a tensor with rows of ``row_len`` elements takes."""
    if row_len > single_pass_max:
        return _STATISTICS_CLASS
    for index, (cols, _) in enumerate(TILE_CLASSES):
        if row_len <= cols:
            return index
    return _SINGLE_ROW_CLASS


def _rows_per_program(tile_class_index: int) -> int:
    return TILE_CLASSES[tile_class_index][1] if tile_class_index < len(TILE_CLASSES) else 1


@dataclass
class RowTable:
    """The launch's metadata, on the tensors' device, and the group's hyperparameter tensor."""

    tensor_table: Tensor  # int64 [n_tensors, 9]
    tile_table: Tensor  # int32 [n_programs, 2]
    n_programs: int
    base_index: int  # the tensor whose param and exp_avg addresses the offsets count from
    single_row_cols: int
    hyper: Tensor  # float64 [4]: lr, β1, β2, ε
    hyper_values: list  # what `hyper` holds, as Python numbers (None: unknown)


# Tables are a pure function of their key (addresses, shapes, dtype, device, path limit), so a
# cached one can never be stale: when the caching allocator hands an address to a different
# tensor of the same shape, the table for it is the same table. An LRU bounds the memory kept.
_TABLE_CACHE: collections.OrderedDict[tuple, RowTable] = collections.OrderedDict()
_TABLE_CACHE_SIZE = 64
table_builds = 0  # how many tables were built (tests read it to prove the cache works)


def row_table(params, grads, exp_avgs, exp_avg_sqs, state_steps, single_pass_max: int = SINGLE_PASS_MAX) -> RowTable:
    """The cached :class:`RowTable` for these tensors; built only when an address or shape changed."""
    global table_builds
    data_ptr, numel = Tensor.data_ptr, Tensor.numel
    key = (
        params[0].device, params[0].dtype, single_pass_max,
        tuple(map(data_ptr, params)), tuple(map(data_ptr, grads)), tuple(map(data_ptr, exp_avgs)),
        tuple(map(data_ptr, exp_avg_sqs)), tuple(map(data_ptr, state_steps)), tuple(map(len, params)), tuple(map(numel, params)),
    )
    table = _TABLE_CACHE.get(key)
    if table is not None:
        _TABLE_CACHE.move_to_end(key)
        return table

    table_builds += 1
    device = params[0].device
    param_size, state_size = params[0].element_size(), exp_avgs[0].element_size()
    aligned = [
        p.numel() // p.shape[0] % _ALIGN_ROW_ELEMENTS.value == 0 and all(t.data_ptr() % 16 == 0 for t in (p, g, m))
        for p, g, m in zip(params, grads, exp_avgs)
    ]
    # Addresses are stored as element offsets from one param and one exp_avg, passed to the
    # kernel as pointer arguments: Triton knows those are 16-byte aligned, which an address
    # read from a table cannot tell it. An aligned tensor is the base, when there is one.
    base = aligned.index(True) if True in aligned else 0
    param_base, state_base = params[base].data_ptr(), exp_avgs[base].data_ptr()
    entries, tiles = [], []
    for index, (p, g, m, v, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, state_steps)):
        rows = p.shape[0]
        row_len = p.numel() // rows
        cls = tile_class(row_len, single_pass_max)
        offsets = [(p.data_ptr() - param_base, param_size), (g.data_ptr() - param_base, param_size), (m.data_ptr() - state_base, state_size)]
        if any(delta % size for delta, size in offsets):
            raise RuntimeError(f"NDAdam triton backend: a tensor of shape {list(p.shape)} is not aligned to its element size")
        entries.append([delta // size for delta, size in offsets] + [v.data_ptr(), s.data_ptr(), rows, row_len, cls, int(aligned[index])])
        tiles.extend((index, first) for first in range(0, rows, _rows_per_program(cls)))
    tensor_table = torch.tensor(entries, dtype=torch.int64).to(device)
    tile_table = torch.tensor(tiles, dtype=torch.int32).reshape(-1, 2).to(device)
    state_dtype = exp_avgs[0].dtype
    table = RowTable(
        tensor_table=tensor_table,
        tile_table=tile_table,
        n_programs=len(tiles),
        base_index=base,
        single_row_cols=max(triton.next_power_of_2(max(single_pass_max, 1)), TILE_CLASSES[-1][0]),
        hyper=torch.zeros(4, dtype=torch.float64, device=device),
        hyper_values=[None] * 4,
    )
    _TABLE_CACHE[key] = table
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return table


def _set_hyper(table: RowTable, lr: float | Tensor, beta1: float, beta2: float, eps: float) -> None:
    """Write (lr, β1, β2, ε) into the group's device tensor, touching only what changed."""
    for index, value in enumerate((lr, beta1, beta2, eps)):
        if isinstance(value, Tensor):
            table.hyper[index].copy_(value.reshape(()))  # stays on device: capturable
            table.hyper_values[index] = None
        elif table.hyper_values[index] != value:
            table.hyper[index].fill_(value)  # a fill kernel with the value as argument: no sync
            table.hyper_values[index] = value


def _launch_constexprs(param_dtype: torch.dtype, state_dtype: torch.dtype, single_row_cols: int) -> dict:
    """The kernel's compile-time arguments for a group of ``param_dtype`` params."""
    (cols0, rows0), (cols1, rows1), (cols2, rows2) = TILE_CLASSES
    return dict(
        PARAM_DTYPE=_TL_DTYPES[param_dtype], STATE_DTYPE=_TL_DTYPES[state_dtype],
        PARAM_VEC=16 // param_dtype.itemsize, STATE_VEC=16 // state_dtype.itemsize,
        COLS0=cols0, ROWS0=rows0, COLS1=cols1, ROWS1=rows1, COLS2=cols2, ROWS2=rows2,
        SINGLE_ROW_COLS=single_row_cols, STATISTICS_CHUNK=STATISTICS_CHUNK,
    )


_POINTER_TYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


def default_specializations() -> list[dict]:
    """Every compiled form of the kernel that a default launch can use, for ahead-of-time checks
    (tests compile each for sm_90): name, kernel, signature, constexprs, attrs, num_warps."""
    specializations = []
    for param_dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        state_dtype = torch.float64 if param_dtype == torch.float64 else torch.float32
        constexprs = _launch_constexprs(param_dtype, state_dtype, max(triton.next_power_of_2(SINGLE_PASS_MAX), TILE_CLASSES[-1][0]))
        signature = {
            "param_base": _POINTER_TYPES[param_dtype], "state_base": _POINTER_TYPES[state_dtype],
            "tensor_table": "*i64", "tile_table": "*i32", "hyper": "*fp64",
            **{name: "constexpr" for name in constexprs},
        }
        specializations.append(dict(
            name=f"rows_{str(param_dtype).removeprefix('torch.')}", kernel=_ndadam_rows_kernel, signature=signature,
            constexprs=constexprs,
            # What the JIT tells the compiler about 16-byte aligned tensor arguments.
            attrs={(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]},
            num_warps=_NUM_WARPS,
        ))
    return specializations


def _launch(table: RowTable, param_base: Tensor, state_base: Tensor) -> None:
    _ndadam_rows_kernel[(table.n_programs,)](
        param_base, state_base, table.tensor_table, table.tile_table, table.hyper,
        **_launch_constexprs(param_base.dtype, state_base.dtype, table.single_row_cols),
        num_warps=_NUM_WARPS,
    )


def vector_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    single_pass_max: int | None = None,
) -> None:
    """ND-Adam step of every row of ``params``: one kernel launch per (device, dtype).

    ``single_pass_max`` overrides :data:`SINGLE_PASS_MAX` (tests force each path with it).
    """
    limit = SINGLE_PASS_MAX if single_pass_max is None else single_pass_max
    for p, m, s in zip(params, exp_avgs, state_steps):
        if s.device != p.device:
            raise RuntimeError(f"NDAdam triton backend: the step of a parameter of shape {list(p.shape)} is on {s.device}, the parameter on {p.device}")
        if not m.is_contiguous():
            raise RuntimeError(f"NDAdam triton backend: exp_avg of a parameter of shape {list(p.shape)} is not contiguous")

    # torch's own grouping (C++, as its fused optimizers use): by the params' (device, dtype).
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, state_steps])
    for (device, _), ((group_params, group_grads, group_exp_avgs, group_exp_avg_sqs, group_steps), _) in grouped.items():
        # The kernel addresses rows as base + row * row_len: non-contiguous params are updated
        # through a contiguous copy, and written back.
        work = [p if p.is_contiguous() else p.contiguous() for p in group_params]
        group_grads = [g.contiguous() for g in group_grads]
        torch._foreach_add_(group_steps, 1.0)
        table = row_table(work, group_grads, group_exp_avgs, group_exp_avg_sqs, group_steps, limit)
        _set_hyper(table, lr, beta1, beta2, eps)
        if table.n_programs:
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                _launch(table, work[table.base_index], group_exp_avgs[table.base_index])
        for original, updated in zip(group_params, work):
            if updated is not original:
                original.copy_(updated)


def scalar_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Adam with L2 weight decay for the scalars: torch's fused Adam on CUDA, foreach elsewhere."""
    adam_step(
        params, grads, exp_avgs, exp_avg_sqs, state_steps,
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        implementation="fused" if params[0].device.type == "cuda" else "foreach",
    )
