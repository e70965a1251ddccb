"""Scalars (biases, norm gains, ``"vector": False`` groups): Adam with L2 weight decay.

Every backend updates them with torch.optim's own functional Adam; backends differ only in
which of its implementations they pick (single-tensor or fused). Around it, for what torch's
Adam does not do itself:

- GradScaler: the fused implementation unscales and skips on ``found_inf`` in its kernel; for
  the single-tensor one (the reference) the gradients are divided here and the flag is read back.
- bf16/fp16 params with a master copy (``master_params``, fp32): Adam steps the master with the
  gradients in fp32, and the param gets the master's rounded value.
- bf16 params with stochastic rounding (``rounding_seeds``): Adam steps an fp32 copy, which is
  rounded stochastically into the param (:mod:`ndadam_fused.rounding`); their state is fp32.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.optim.adam import adam

from ..rounding import stochastic_round_to_bfloat16


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
    hyper: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    implementation: Literal["single_tensor", "fused"],
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: list[Tensor] | None = None,
    rounding_seeds: list[Tensor] | None = None,
) -> None:
    """One Adam step (L2 weight decay, ε after bias correction) with torch's ``implementation``.

    ``hyper``: float64 [4] (lr, β1, β2, ε) on the params' device; its lr is what Adam reads.
    """
    lr = hyper[0]
    if implementation == "single_tensor" and (grad_scale is not None or found_inf is not None):
        if found_inf is not None and bool(found_inf.to("cpu", torch.float32) != 0):
            return
        if grad_scale is not None:
            # As torch's fused Adam does (the other implementation): the gradients are unscaled
            # in place, where they own their memory.
            grads = [g.div_(grad_scale.to(g.device, g.dtype)) if _dense(g) else g / grad_scale.to(g.device, g.dtype)
                     for g in grads]
        grad_scale = found_inf = None
    given_grads = grads
    targets = params
    if master_params is not None:
        targets = master_params
    elif rounding_seeds is not None:
        targets = [p.detach().to(torch.float32, memory_format=torch.preserve_format) for p in params]
    if targets is not params:
        grads = [g.to(torch.float32, memory_format=torch.preserve_format) for g in grads]

    if implementation == "fused":
        # torch's fused kernels walk a param, its gradient and its state in memory order, as if
        # all were laid out alike: a stride-0 or transposed gradient would be read wrongly. Such
        # a gradient is copied into the param's layout; a param that is not dense, or whose state
        # is laid out otherwise, is stepped by the single-tensor implementation (the same math).
        grads = [g if _laid_out_like(p, g) else torch.empty_like(p, dtype=g.dtype).copy_(g) for p, g in zip(targets, grads)]
        unfused = [
            i for i, (p, m, v) in enumerate(zip(targets, exp_avgs, exp_avg_sqs))
            if not (_laid_out_like(p, m) and _laid_out_like(p, v) and _dense(p))
        ]
        if unfused:
            if grad_scale is not None or found_inf is not None:
                raise RuntimeError(
                    "NDAdam: a scalar parameter that is not dense, or whose state is laid out unlike it, "
                    "cannot be stepped with a GradScaler's grad_scale/found_inf; make it contiguous"
                )
            lists = (targets, grads, exp_avgs, exp_avg_sqs, state_steps)
            _adam([[x[i] for i in unfused] for x in lists], lr, beta1, beta2, eps, weight_decay, fused=False)
            keep = [i for i in range(len(targets)) if i not in set(unfused)]
            if keep:
                _adam([[x[i] for i in keep] for x in lists], lr, beta1, beta2, eps, weight_decay, fused=True)
        else:
            _adam([targets, grads, exp_avgs, exp_avg_sqs, state_steps], lr, beta1, beta2, eps, weight_decay,
                  fused=True, grad_scale=grad_scale, found_inf=found_inf)
            if grad_scale is not None:
                # torch's fused Adam wrote the unscaled gradients into the copies (fp32 ones for a
                # master copy, or ones laid out like the param): into the given gradients too, where
                # they own their memory, as for every other scalar.
                for given, used in zip(given_grads, grads):
                    if used is not given and _dense(given):
                        given.copy_(used)
    else:
        _adam([targets, grads, exp_avgs, exp_avg_sqs, state_steps], lr, beta1, beta2, eps, weight_decay, fused=False)

    if master_params is not None:
        for param, master in zip(params, master_params):
            param.copy_(master)
    elif rounding_seeds is not None:
        for param, stepped_copy, seed, step in zip(params, targets, rounding_seeds, state_steps):
            param.copy_(stochastic_round_to_bfloat16(stepped_copy, seed, step))


def _adam(lists, lr, beta1, beta2, eps, weight_decay, *, fused: bool, grad_scale=None, found_inf=None) -> None:
    params, grads, exp_avgs, exp_avg_sqs, state_steps = lists
    if fused:
        if torch.compiler.is_compiling():
            # One opaque op for torch.compile (torch marks its fused Adam as not traceable, which
            # would break the graph inside our step).
            fused_adam_(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay,
                        grad_scale, found_inf)
        else:
            # Eager: torch's fused Adam itself. The custom op's Python wrapper bumps the version
            # of every mutated tensor one by one, about 1 µs each: 2.5 ms a step on 500 scalars.
            _fused_adam(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay,
                        grad_scale, found_inf)
        return
    adam(
        params, grads, exp_avgs, exp_avg_sqs, [], state_steps,
        foreach=False, fused=False, capturable=False, differentiable=False, amsgrad=False,
        beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=False,
    )


# grads are mutated too: with a grad_scale, torch's fused Adam writes the unscaled gradients back
# (as GradScaler.unscale_ would have left them).
@torch.library.custom_op("ndadam_fused_scalars::fused_adam_",
                         mutates_args=("params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps"))
def fused_adam_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    lr: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """torch's fused Adam (L2 weight decay) as one custom op; lr is a 0-dim tensor on the params' device."""
    _fused_adam(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay,
                grad_scale, found_inf)


def _fused_adam(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay,
                grad_scale, found_inf) -> None:
    adam(
        params, grads, exp_avgs, exp_avg_sqs, [], state_steps,
        foreach=False, fused=True, capturable=False, differentiable=False, amsgrad=False,
        beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=False,
        grad_scale=grad_scale, found_inf=found_inf,
    )


@fused_adam_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay, grad_scale, found_inf):
    return None
