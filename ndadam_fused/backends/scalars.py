"""Scalars (biases, norm gains, ``"vector": False`` groups): Adam with L2 weight decay.

Every backend updates them with torch.optim's own functional Adam; backends differ only in
which of its implementations they pick (single-tensor, foreach or fused).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor
from torch.optim.adam import adam


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
    implementation: Literal["single_tensor", "foreach", "fused"],
) -> None:
    """One Adam step (L2 weight decay, ε after bias correction) with torch's ``implementation``."""
    adam(
        params, grads, exp_avgs, exp_avg_sqs, [], state_steps,
        foreach=implementation == "foreach", fused=implementation == "fused",
        capturable=False, differentiable=False, amsgrad=False,
        beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=False,
    )
