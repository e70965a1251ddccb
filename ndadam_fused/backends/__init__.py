"""Backends: which implementation performs a step, and how to get one that is missing.

One module per implementation, each with the same two functions:

- ``vector_step(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps)``
- ``scalar_step(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay)``

``reference`` (:mod:`.reference`) is Algorithm 1 in plain PyTorch, one tensor at a time: the
oracle every other backend is tested against.
"""

from __future__ import annotations

from types import ModuleType

import torch

__all__ = ["BACKEND_NAMES", "available_backends", "check_name", "resolve", "unavailable_reason"]

#: Backends that can be asked for by name, fastest first ("auto" picks the first available).
BACKEND_NAMES = ("native", "triton", "reference")

_PLANNED = {
    "triton": "the Triton backend is not part of this version of ndadam_fused yet",
    "native": "the compiled extension backend is not part of this version of ndadam_fused yet",
}


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """None when backend ``name`` can run on ``device``, else why not and how to get it."""
    check_name(name, where="unavailable_reason")
    if name == "reference":
        return None
    return _PLANNED[name]


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run on ``device`` (any device when None), fastest first."""
    return [name for name in BACKEND_NAMES if unavailable_reason(name, device) is None]


def check_name(name: object, *, where: str) -> None:
    """Raise ValueError for a name that is neither a backend nor "auto"."""
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(f"{where}: unknown backend {name!r}; choose one of 'auto', " + ", ".join(repr(n) for n in BACKEND_NAMES))


def _module(name: str) -> ModuleType:
    if name == "reference":
        from . import reference

        return reference
    raise AssertionError(f"backend {name!r} has no module")  # guarded by unavailable_reason


def resolve(name: str, device: torch.device | str) -> ModuleType:
    """The implementation module for backend ``name`` on ``device``.

    ``"auto"`` takes the fastest available backend. A backend asked for by name that cannot
    run raises RuntimeError saying why and how to get it; there is no silent fallback.
    """
    if name == "auto":
        name = available_backends(device)[0]
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"NDAdam backend {name!r} is not available on {device}: {reason}")
    return _module(name)
