"""The reference backend: Algorithm 1 of the ND-Adam paper, line by line, one tensor at a time.

This is the oracle the fused backends are tested against, written to be read next to the paper
(``../shared/seed``, Algorithm 1) rather than to be fast. Tensors are:

- ``param``: any shape ``[rows, *]`` with ``dim() >= 2``; row ``i`` is ``w_i``.
- ``grad``: ``ḡ``, same shape; never modified.
- ``exp_avg``: ``m``, same shape, fp32 (fp64 for fp64 params).
- ``exp_avg_sq``: ``v``, shape ``[rows]``: ONE second moment per row.
- ``step``: a 0-dim fp32 tensor ``t`` on the param's device, incremented before use.

The math runs in the state's dtype (fp32, or fp64), so bf16 and fp16 params are read up and
rounded once when the new row is written back.

For rows split across ranks (tensor parallelism) it exposes the two-phase step of
:mod:`.row_statistics`, in plain PyTorch too.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..rounding import stochastic_round_to_bfloat16
from .row_statistics import apply_row_statistics, row_statistics
from .scalars import adam_step

__all__ = ["vector_step", "scalar_step", "row_statistics", "apply_row_statistics"]


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
) -> None:
    """θ^v update of Algorithm 1 for each tensor in turn (weight decay is a no-op on unit rows).

    ``hyper`` holds (α, β1, β2, ε) as the fused kernels read them (the floats are the same values).
    With ``grad_scale`` the gradients are divided by it; with ``found_inf`` set nothing changes,
    step counts included. With ``master_params`` (fp32, one per low-precision param) the rows are
    read from and written to the master copy, and the param gets its rounded value; with
    ``rounding_seeds`` (bf16 params) the param gets it rounded stochastically
    (:mod:`ndadam_fused.rounding`).
    """
    # The oracle may read the flag back; the fused kernels read it on the device.
    if found_inf is not None and bool(found_inf.to("cpu", torch.float32) != 0):
        return
    lr = hyper[0]
    for index, (param, grad, exp_avg, exp_avg_sq, step_t) in enumerate(
        zip(params, grads, exp_avgs, exp_avg_sqs, state_steps)
    ):
        step_t += 1
        t = step_t
        rows = param.shape[0]
        compute_dtype = exp_avg.dtype
        source = master_params[index] if master_params is not None else param
        w = source.reshape(rows, -1).to(compute_dtype)  # w_{i,t-1}, unit rows
        g_bar = grad.reshape(rows, -1).to(compute_dtype)  # ḡ_t(w_i)
        if grad_scale is not None:
            g_bar = g_bar / grad_scale.to(g_bar.device, compute_dtype)
        m = exp_avg.view(rows, -1)
        v = exp_avg_sq

        # g_t(w_i) ← ḡ_t(w_i) − (ḡ_t(w_i) · w_{i,t−1}) w_{i,t−1}
        g = g_bar - (g_bar * w).sum(dim=1, keepdim=True) * w
        # m_t(w_i) ← β1 m_{t−1}(w_i) + (1 − β1) g_t(w_i)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        # v_t(w_i) ← β2 v_{t−1}(w_i) + (1 − β2) ||g_t(w_i)||²
        v.mul_(beta2).add_(g.square().sum(dim=1), alpha=1 - beta2)
        # m̂_t ← m_t / (1 − β1^t);  v̂_t ← v_t / (1 − β2^t)   (β^t in float64, as the kernels take it)
        m_hat = m / (1 - beta1 ** t.double())
        v_hat = v / (1 - beta2 ** t.double())
        # w̄_{i,t} ← w_{i,t−1} − α m̂_t / (sqrt(v̂_t) + ε)
        denom = v_hat.sqrt().add_(eps)
        # v̂ = 0 means every projected gradient so far was 0, so m̂ = 0 and the step is 0; with
        # eps = 0 that would be 0/0, so divide by 1 there instead.
        denom = torch.where(denom > 0, denom, torch.ones_like(denom))
        w_bar = w - lr * m_hat / denom.unsqueeze(1)
        # w_{i,t} ← w̄_{i,t} / ||w̄_{i,t}||, except where the update is exactly zero (lr = 0, or
        # m = 0: a step with zero gradients from fresh state, as distributed checkpointing runs
        # to create state): there w̄ = w, and dividing by its norm would only move rounding bits.
        zero_update = (m == 0).all(dim=1, keepdim=True) | (lr == 0)
        w_new = torch.where(zero_update, w, w_bar / w_bar.norm(dim=1, keepdim=True))
        if master_params is not None:
            source.copy_(w_new.view(source.shape))
        if rounding_seeds is not None:
            param.copy_(stochastic_round_to_bfloat16(w_new, rounding_seeds[index], t).view(param.shape))
        else:
            param.copy_(w_new.view(param.shape))


#: θ^s of Algorithm 1: torch.optim's own single-tensor Adam with L2 weight decay.
scalar_step = functools.partial(adam_step, implementation="single_tensor")
