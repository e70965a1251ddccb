"""Scalars (biases, norm gains, ``"vector": False`` groups): Adam with L2 weight decay.

Every backend updates them with torch.optim's own functional Adam; backends differ only in
which of its implementations they pick (single-tensor or fused).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.optim.adam import adam


def _laid_out_like(param: Tensor, tensor: Tensor) -> bool:
    return tensor.stride() == param.stride()


def _dense(param: Tensor) -> bool:
    """Whether ``param`` covers its memory without gaps or overlaps (empty_like keeps its strides)."""
    return param.is_contiguous() or torch.empty_like(param).stride() == param.stride()


def adam_step(
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
    implementation: Literal["single_tensor", "fused"],
) -> None:
    """One Adam step (L2 weight decay, ε after bias correction) with torch's ``implementation``."""
    if implementation == "fused":
        # torch's fused kernels walk a param, its gradient and its state in memory order, as if
        # all were laid out alike: a stride-0 or transposed gradient would be read wrongly. Such
        # a gradient is copied into the param's layout; a param that is not dense, or whose state
        # is laid out otherwise, is stepped by the single-tensor implementation (the same math).
        grads = [g if _laid_out_like(p, g) else torch.empty_like(p).copy_(g) for p, g in zip(params, grads)]
        unfused = [
            i for i, (p, m, v) in enumerate(zip(params, exp_avgs, exp_avg_sqs))
            if not (_laid_out_like(p, m) and _laid_out_like(p, v) and _dense(p))
        ]
        if unfused:
            lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
            _adam([[x[i] for i in unfused] for x in lists], lr, beta1, beta2, eps, weight_decay, fused=False)
            keep = sorted(set(range(len(params))) - set(unfused))
            params, grads, exp_avgs, exp_avg_sqs, state_steps = ([x[i] for i in keep] for x in lists)
            if not params:
                return
    _adam([params, grads, exp_avgs, exp_avg_sqs, state_steps], lr, beta1, beta2, eps, weight_decay,
          fused=implementation == "fused")


def _adam(lists, lr, beta1, beta2, eps, weight_decay, *, fused: bool) -> None:
    params, grads, exp_avgs, exp_avg_sqs, state_steps = lists
    adam(
        params, grads, exp_avgs, exp_avg_sqs, [], state_steps,
        foreach=False, fused=fused, capturable=False, differentiable=False, amsgrad=False,
        beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=False,
    )
