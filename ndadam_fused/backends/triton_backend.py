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
import functools
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


@triton.jit
def _exact_tile(
    param, grad, exp_avg, exp_avg_sq, first_row, rows, row_len,
    lr, beta1, beta2, eps, bias_correction1, bias_correction2,
    ROWS: tl.constexpr, COLS: tl.constexpr, PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
):
    """Exact single-pass step of up to ROWS rows of one tensor, each at most COLS long."""
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
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * tl.sum(g * g, axis=1)
    denom = tl.sqrt(v / bias_correction2) + eps
    # v' = 0 means every projected gradient so far was 0 (so m' = 0): a zero step, not 0/0.
    denom = tl.where(denom > 0, denom, 1.0)
    step_size = lr / bias_correction1 / denom
    w_bar = w - step_size[:, None] * m
    norm = tl.sqrt(tl.sum(w_bar * w_bar, axis=1))
    norm = tl.where(row_mask, norm, 1.0)
    w_new = w_bar / norm[:, None]

    tl.store(exp_avg + offsets, m, mask=mask)
    tl.store(exp_avg_sq + row_ids, v, mask=row_mask)
    tl.store(param + offsets, w_new.to(PARAM_DTYPE), mask=mask)


@triton.jit
def _statistics_row(
    param, grad, exp_avg, exp_avg_sq, row, row_len,
    lr, beta1, beta2, eps, bias_correction1, bias_correction2,
    CHUNK: tl.constexpr, PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
):
    """Two-pass step of one long row: six dot products, the closed forms, one elementwise pass."""
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

    g_sq = tl.maximum(b - 2 * a * a + a * a * c, 0.0)  # ||g||², clamped: it cancels when ḡ ∥ w
    m_dot_g = f - a * d
    w_dot_g = a - a * c
    v = beta2 * tl.load(exp_avg_sq + row) + (1 - beta2) * g_sq
    m_new_sq = beta1 * beta1 * e + 2 * beta1 * (1 - beta1) * m_dot_g + (1 - beta1) * (1 - beta1) * g_sq
    w_dot_m_new = beta1 * d + (1 - beta1) * w_dot_g
    denom = tl.sqrt(v / bias_correction2) + eps
    denom = tl.where(denom > 0, denom, 1.0)
    step_size = lr / bias_correction1 / denom
    w_bar_sq = c - 2 * step_size * w_dot_m_new + step_size * step_size * m_new_sq
    inv_norm = 1.0 / tl.sqrt(w_bar_sq)
    tl.store(exp_avg_sq + row, v)

    for start in range(0, row_len, CHUNK):
        mask = start + cols < row_len
        offsets = base + start + cols
        w = tl.load(param + offsets, mask=mask, other=0.0).to(STATE_DTYPE)
        g_bar = tl.load(grad + offsets, mask=mask, other=0.0).to(STATE_DTYPE)
        m = tl.load(exp_avg + offsets, mask=mask, other=0.0)
        m = beta1 * m + (1 - beta1) * (g_bar - a * w)
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
    hyper: STATE_DTYPE [4] = (lr, β1, β2, ε). PARAM_VEC, STATE_VEC: elements per 16 bytes.
    """
    tile = tl.program_id(0)
    tensor = tl.load(tile_table + 2 * tile).to(tl.int64)
    first_row = tl.load(tile_table + 2 * tile + 1)
    entry = tensor_table + tensor * 9
    param_offset = tl.load(entry + 0)
    grad_offset = tl.load(entry + 1)
    exp_avg_offset = tl.load(entry + 2)
    exp_avg_sq = tl.load(entry + 3).to(tl.pointer_type(STATE_DTYPE))
    step = tl.load(tl.load(entry + 4).to(tl.pointer_type(tl.float32))).to(STATE_DTYPE)
    rows = tl.load(entry + 5)
    row_len = tl.load(entry + 6)
    tile_class = tl.load(entry + 7)
    aligned = tl.load(entry + 8)

    lr = tl.load(hyper + 0)
    beta1 = tl.load(hyper + 1)
    beta2 = tl.load(hyper + 2)
    eps = tl.load(hyper + 3)
    # β^t as 2^(t log2 β): exact for β = 0 (log2 0 = -inf), and no recompile as t grows.
    bias_correction1 = 1 - tl.exp2(step * tl.log2(beta1))
    bias_correction2 = 1 - tl.exp2(step * tl.log2(beta2))

    if aligned != 0:
        # The host checked that these offsets and row lengths are multiples of 16 bytes. Written
        # as (x // k) * k, the compiler can prove it too (it cannot see through the table), and
        # emits 128-bit loads and stores.
        _dispatch(param_base + (param_offset // PARAM_VEC) * PARAM_VEC,
                  param_base + (grad_offset // PARAM_VEC) * PARAM_VEC,
                  state_base + (exp_avg_offset // STATE_VEC) * STATE_VEC,
                  exp_avg_sq, first_row, rows, (row_len // _ALIGN_ROW_ELEMENTS) * _ALIGN_ROW_ELEMENTS,
                  tile_class, lr, beta1, beta2, eps, bias_correction1, bias_correction2,
                  COLS0, ROWS0, COLS1, ROWS1, COLS2, ROWS2, SINGLE_ROW_COLS, STATISTICS_CHUNK, PARAM_DTYPE, STATE_DTYPE)
    else:
        _dispatch(param_base + param_offset, param_base + grad_offset, state_base + exp_avg_offset,
                  exp_avg_sq, first_row, rows, row_len,
                  tile_class, lr, beta1, beta2, eps, bias_correction1, bias_correction2,
                  COLS0, ROWS0, COLS1, ROWS1, COLS2, ROWS2, SINGLE_ROW_COLS, STATISTICS_CHUNK, PARAM_DTYPE, STATE_DTYPE)


@triton.jit
def _dispatch(
    param, grad, exp_avg, exp_avg_sq, first_row, rows, row_len, tile_class, lr, beta1, beta2, eps,
    bias_correction1, bias_correction2,
    COLS0: tl.constexpr, ROWS0: tl.constexpr, COLS1: tl.constexpr, ROWS1: tl.constexpr,
    COLS2: tl.constexpr, ROWS2: tl.constexpr, SINGLE_ROW_COLS: tl.constexpr, STATISTICS_CHUNK: tl.constexpr,
    PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
):
    """The tile's path: one exact tile shape per class, or the statistics path."""
    if tile_class == 0:
        _exact_tile(param, grad, exp_avg, exp_avg_sq, first_row, rows, row_len, lr, beta1, beta2, eps,
                    bias_correction1, bias_correction2, ROWS0, COLS0, PARAM_DTYPE, STATE_DTYPE)
    elif tile_class == 1:
        _exact_tile(param, grad, exp_avg, exp_avg_sq, first_row, rows, row_len, lr, beta1, beta2, eps,
                    bias_correction1, bias_correction2, ROWS1, COLS1, PARAM_DTYPE, STATE_DTYPE)
    elif tile_class == 2:
        _exact_tile(param, grad, exp_avg, exp_avg_sq, first_row, rows, row_len, lr, beta1, beta2, eps,
                    bias_correction1, bias_correction2, ROWS2, COLS2, PARAM_DTYPE, STATE_DTYPE)
    elif tile_class == 3:
        _exact_tile(param, grad, exp_avg, exp_avg_sq, first_row, rows, row_len, lr, beta1, beta2, eps,
                    bias_correction1, bias_correction2, 1, SINGLE_ROW_COLS, PARAM_DTYPE, STATE_DTYPE)
    else:
        _statistics_row(param, grad, exp_avg, exp_avg_sq, first_row, row_len, lr, beta1, beta2, eps,
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
    hyper: Tensor  # STATE_DTYPE [4]: lr, β1, β2, ε
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
        hyper=torch.zeros(4, dtype=state_dtype, device=device),
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


def _launch(table: RowTable, param_base: Tensor, state_base: Tensor) -> None:
    (cols0, rows0), (cols1, rows1), (cols2, rows2) = TILE_CLASSES
    _ndadam_rows_kernel[(table.n_programs,)](
        param_base, state_base, table.tensor_table, table.tile_table, table.hyper,
        PARAM_DTYPE=_TL_DTYPES[param_base.dtype], STATE_DTYPE=_TL_DTYPES[state_base.dtype],
        PARAM_VEC=16 // param_base.element_size(), STATE_VEC=16 // state_base.element_size(),
        COLS0=cols0, ROWS0=rows0, COLS1=cols1, ROWS1=rows1, COLS2=cols2, ROWS2=rows2,
        SINGLE_ROW_COLS=table.single_row_cols, STATISTICS_CHUNK=STATISTICS_CHUNK,
        num_warps=_NUM_WARPS,
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
    """ND-Adam step of every row of ``params``: one kernel launch per (device, dtype).

    ``single_pass_max`` overrides :data:`SINGLE_PASS_MAX` (tests force each path with it).
    """
    from .native import _refuse_unbuilt_features

    _refuse_unbuilt_features(grad_scale, found_inf, master_params, rounding_seeds)
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
        _set_hyper(table, hyper[0], beta1, beta2, eps)
        if table.n_programs:
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                _launch(table, work[table.base_index], group_exp_avgs[table.base_index])
        for original, updated in zip(group_params, work):
            if updated is not original:
                original.copy_(updated)


#: θ^s of Algorithm 1: torch's fused Adam (CUDA and CPU) with L2 weight decay; it takes a tensor lr.
scalar_step = functools.partial(adam_step, implementation="fused")
