"""The two-phase step for rows split across ranks, in plain PyTorch (the reference backend's).

Tensor parallelism (``Shard(d)`` with ``d`` not the unit dim: RowwiseParallel, a conv split on
its input channels) leaves each rank a piece of every row. A step then runs in two phases
(DESIGN.md sections 4 and 6; :mod:`ndadam_fused.distributed` runs the all-reduce in between):

1. :func:`row_statistics`: per local row, the six sums over its local elements
   ``[a, b, c, d, e, f] = [ḡ·w, ḡ·ḡ, w·w, m·w, m·m, m·ḡ]``, written into one buffer;
2. (one SUM all-reduce of the buffer over the ranks that share the rows);
3. :func:`apply_row_statistics`: from the full rows' statistics, the closed forms::

       ||g||² = max(b - 2a² + a²c, 0)       m·g = f - a·d        w·g = a - a·c
       v'     = β2 v + (1-β2) ||g||²
       s      = α / (1-β1^t) / (sqrt(v' / (1-β2^t)) + ε)       (denominator 0: divide by 1)
       ||m'||² = max(β1² e + 2β1(1-β1)(m·g) + (1-β1)² ||g||², 0)
       w·m'   = β1 d + (1-β1)(w·g)
       ||w̄||² = c - 2s (w·m') + s² ||m'||²

   then, elementwise on the local piece, ``m' = β1 m + (1-β1)(ḡ - a w)`` and
   ``w' = (w - s m') · r`` with ``r = 1/||w̄||``, or ``r = 1`` where the update is exactly zero
   (lr = 0 or ``||m'||² = 0``: DCP's state-initializing step), so such a row keeps its bits.

These are the formulas of ``update_from_statistics`` in ``csrc/ndadam_row_math.h``, in the same
order of operations. Every backend module that implements the rows-split step exposes these two
functions with these signatures (see :data:`ndadam_fused.backends.ROW_SPLIT_FUNCTIONS`).

Options, with the meaning they have in ``vector_step`` (:mod:`.reference`):

- ``hyper``: float64 [4] (lr, β1, β2, ε) on the params' device (the floats are the same values);
- ``grad_scale`` (fp32, one element): ``ḡ = grad / grad_scale`` per element in the state dtype, in
  both phases (phase 1's statistics are of the unscaled gradient);
- ``found_inf`` (fp32, one element): when nonzero, phase 2 changes nothing (params, master
  copies, moments, step counts); phase 1 writes its statistics all the same (they are not used);
- ``master_params`` (fp32, aligned with params, laid out like them): ``w`` is read from the
  master in both phases; phase 2 writes ``w'`` to the master and ``w'`` rounded to nearest to
  the param;
- ``rounding_seeds`` (int64 0-dim, bf16 params): phase 2 rounds ``w'`` into the param
  stochastically (:mod:`ndadam_fused.rounding`) with ``t`` the step after its increment and ``i``
  the element's index in the LOCAL piece, row-major (``row * local_row_length + column``).

Shapes: ``params[i]``, ``grads[i]``, ``exp_avgs[i]``: ``[rows_i, *]`` with rows contiguous
(each row's local elements flattened); ``exp_avg_sqs[i]``: ``[rows_i]``; ``statistics``:
``[Σ rows_i, 6]`` in the state dtype (fp32, or fp64 for fp64 params), tensor ``i``'s rows after
those of tensors ``0 .. i-1``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..rounding import stochastic_round_to_bfloat16

__all__ = ["row_statistics", "apply_row_statistics"]


def _rows(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    rows = tensor.shape[0]
    return tensor.reshape(rows, math.prod(tensor.shape[1:])).to(dtype)


def _gradient_rows(grad: Tensor, dtype: torch.dtype, grad_scale: Tensor | None) -> Tensor:
    """ḡ as ``[rows, local length]`` in the state dtype, divided by ``grad_scale`` when given."""
    g_bar = _rows(grad, dtype)
    if grad_scale is not None:
        g_bar = g_bar / grad_scale.to(g_bar.device, dtype).reshape(())
    return g_bar


def _check_statistics(params: list[Tensor], statistics: Tensor) -> None:
    rows = sum(p.shape[0] for p in params)
    if statistics.shape != (rows, 6):
        raise ValueError(
            f"row statistics: the buffer has shape {list(statistics.shape)}, but the {len(params)} tensors "
            f"have {rows} rows in all; expected [{rows}, 6]"
        )


def row_statistics(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    statistics: Tensor,
    *,
    grad_scale: Tensor | None = None,
    master_params: list[Tensor] | None = None,
) -> None:
    """Phase 1: ``statistics[row] = [ḡ·w, ḡ·ḡ, w·w, m·w, m·m, m·ḡ]`` over each row's local elements
    (``w`` from ``master_params`` when given, ``ḡ = grad / grad_scale``)."""
    _check_statistics(params, statistics)
    offset = 0
    for index, (param, grad, exp_avg) in enumerate(zip(params, grads, exp_avgs)):
        rows = param.shape[0]
        dtype = statistics.dtype
        source = master_params[index] if master_params is not None else param
        w, g_bar, m = _rows(source, dtype), _gradient_rows(grad, dtype, grad_scale), _rows(exp_avg, dtype)
        out = statistics[offset : offset + rows]
        for column, (x, y) in enumerate(((g_bar, w), (g_bar, g_bar), (w, w), (m, w), (m, m), (m, g_bar))):
            out[:, column] = (x * y).sum(dim=1)
        offset += rows


def apply_row_statistics(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    statistics: Tensor,
    *,
    hyper: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: list[Tensor] | None = None,
    rounding_seeds: list[Tensor] | None = None,
) -> None:
    """Phase 2: each tensor's step is incremented, then its rows updated from the reduced statistics.

    Nothing changes where ``found_inf`` is nonzero (the reference may read the flag back; the
    fused kernels read it on the device).
    """
    _check_statistics(params, statistics)
    if found_inf is not None and bool(found_inf.to("cpu", torch.float32) != 0):
        return
    lr = hyper[0].to(statistics.device)
    offset = 0
    for index, (param, grad, exp_avg, exp_avg_sq, step_t) in enumerate(
        zip(params, grads, exp_avgs, exp_avg_sqs, state_steps)
    ):
        step_t += 1
        t = step_t.item()
        rows = param.shape[0]
        dtype = statistics.dtype
        a, b, c, d, e, f = statistics[offset : offset + rows].unbind(dim=1)
        offset += rows

        a_sq = a * a
        grad_sq_norm = ((b - 2 * a_sq) + a_sq * c).clamp(min=0)
        m_dot_g = f - a * d
        w_dot_g = a - a * c
        v = exp_avg_sq.mul_(beta2).add_(grad_sq_norm, alpha=1 - beta2)
        denominator = (v / (1 - beta2**t)).sqrt().add_(eps)
        denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        step_size = ((lr / (1 - beta1**t)) / denominator).to(dtype)
        m_new_sq_norm = (
            beta1 * beta1 * e + 2 * beta1 * (1 - beta1) * m_dot_g + (1 - beta1) * (1 - beta1) * grad_sq_norm
        ).clamp(min=0)
        w_dot_m_new = beta1 * d + (1 - beta1) * w_dot_g
        w_bar_sq_norm = c - 2 * step_size * w_dot_m_new + step_size * step_size * m_new_sq_norm
        zero_update = (m_new_sq_norm == 0) | (lr == 0)
        scale = torch.where(zero_update, torch.ones_like(w_bar_sq_norm), 1 / w_bar_sq_norm.sqrt())

        source = master_params[index] if master_params is not None else param
        w, g_bar = _rows(source, dtype), _gradient_rows(grad, dtype, grad_scale)
        m = exp_avg.view(rows, math.prod(exp_avg.shape[1:]))
        m.mul_(beta1).add_(g_bar - a.unsqueeze(1) * w, alpha=1 - beta1)
        w_new = (w - step_size.unsqueeze(1) * m) * scale.unsqueeze(1)
        if master_params is not None:
            source.copy_(w_new.view(source.shape))
        if rounding_seeds is not None:
            param.copy_(stochastic_round_to_bfloat16(w_new, rounding_seeds[index], step_t).view(param.shape))
        else:
            param.copy_(w_new.view(param.shape))
