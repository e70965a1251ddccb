"""Backends: which implementation performs a step, and how to get one that is missing.

One module per implementation, each with the same two functions:

- ``vector_step(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps)``
- ``scalar_step(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay)``

and, where it implements the two-phase step for rows split across ranks (tensor parallelism,
DESIGN.md section 6; :mod:`ndadam_fused.backends.row_statistics` documents the math and shapes),
the two functions named in :data:`ROW_SPLIT_FUNCTIONS`:

- ``row_statistics(params, grads, exp_avgs, statistics)``
- ``apply_row_statistics(params, grads, exp_avgs, exp_avg_sqs, state_steps, statistics, *, lr, beta1, beta2, eps)``

plus, optionally, ``row_split_unavailable_reason(device)`` (None, or why they cannot run on
``device``). A backend asked for by name that lacks them raises an error naming what is
missing when a parameter's rows are split (:func:`resolve_row_split`); nothing falls back.

``reference`` (:mod:`.reference`) is Algorithm 1 in plain PyTorch, one tensor at a time: the
oracle every other backend is tested against.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from types import ModuleType

import torch

__all__ = [
    "BACKEND_NAMES",
    "SlowBackendWarning",
    "ROW_SPLIT_FUNCTIONS",
    "auto_backend",
    "available_backends",
    "check_name",
    "resolve",
    "resolve_row_split",
    "row_split_unavailable_reason",
    "unavailable_reason",
]

#: Backends that can be asked for by name, fastest first (see auto_backend).
BACKEND_NAMES = ("native", "triton", "reference")
#: The functions of the two-phase step for rows split across ranks (see the module doc).
ROW_SPLIT_FUNCTIONS = ("row_statistics", "apply_row_statistics")


class SlowBackendWarning(UserWarning):
    """``"auto"`` fell back to the reference backend because no fused backend could be had."""


_slow_backend_warned = False


def _triton_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed; `pip install triton` (it comes with CUDA builds of torch on Linux)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing ndadam_fused"
    return f"Triton kernels run on CUDA devices, not {device.type}"


def _native_reason(device: torch.device) -> str | None:
    from . import native

    return native.unavailable_reason(device)


_REASONS = {"triton": _triton_reason, "native": _native_reason}


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """None when backend ``name`` can run on ``device``, else why not and how to get it.

    With ``device=None``: None when the backend can run on some device of this machine.
    """
    check_name(name, where="unavailable_reason")
    if name == "reference":
        return None
    if device is None:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        reasons = [_REASONS[name](d) for d in devices]
        return None if None in reasons else reasons[0]
    return _REASONS[name](torch.device(device))


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
    if name == "triton":
        from . import triton_backend

        return triton_backend
    from . import native

    return native


def resolve(name: str, device: torch.device | str) -> ModuleType:
    """The implementation module for backend ``name`` on ``device``.

    ``"auto"`` takes the fastest available backend; on CPU and CUDA this builds the native
    extension when it is missing (the first step of a process pays for it, once). When "auto"
    ends up on the reference backend there, the process gets one :class:`SlowBackendWarning`
    saying why and how to fix it. A backend asked for by name that cannot run raises
    RuntimeError saying why and how to get it; there is no silent fallback.
    """
    device = torch.device(device)
    module = _RESOLVED.get((name, device))
    if module is None:
        module = _resolve(name, device)
        _RESOLVED[(name, device)] = module
    return module


# A plain dict (not functools.lru_cache): torch.compile traces a lookup in it.
_RESOLVED: dict[tuple[str, torch.device], ModuleType] = {}


def _caller_stacklevel() -> int:
    """warnings.warn's stacklevel of the first frame outside this package and torch (the step
    hooks, no_grad): the user's ``opt.step()`` line, whichever path led here."""
    inside = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _warn_slow_fallback(device: torch.device) -> None:
    global _slow_backend_warned
    if _slow_backend_warned:
        return
    _slow_backend_warned = True
    # Through the same table that auto_backend consulted, so that the reason given is the one
    # that decided.
    reason = unavailable_reason("native", device)
    if device.type == "cuda":
        reason += f"; and the 'triton' backend is not available either: {unavailable_reason('triton', device)}"
    warnings.warn(
        f"ndadam_fused: NDAdam(backend='auto') steps {device.type} tensors with the 'reference' backend, "
        f"Algorithm 1 in plain PyTorch, about 10-20x slower than the fused 'native' backend, because "
        f"{reason}",
        SlowBackendWarning,
        stacklevel=_caller_stacklevel(),
    )


def _resolve(name: str, device: torch.device) -> ModuleType:
    if name == "auto":
        name = auto_backend(device)
        # Only CPU and CUDA have a fused backend to miss; elsewhere the reference is all there is.
        if name == "reference" and device.type in ("cpu", "cuda"):
            _warn_slow_fallback(device)
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"NDAdam backend {name!r} is not available on {device}: {reason}")
    return _module(name)


def clear_resolved() -> None:
    """Forget which module each (backend, device) resolved to (after an install or in tests)."""
    _RESOLVED.clear()


def auto_backend(device: torch.device | str) -> str:
    """What ``"auto"`` means on ``device``: native when built (or buildable at first use, which
    this then does), else triton on CUDA, else reference.

    Triton on CPU is its interpreter, a testing tool, so "auto" never picks it there.
    """
    device = torch.device(device)
    for name in BACKEND_NAMES:
        if name == "triton" and device.type != "cuda":
            continue
        if unavailable_reason(name, device) is None:
            return name
    return "reference"


def row_split_unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """None when backend ``name`` can run the rows-split step on ``device``, else what is missing."""
    device = torch.device(device)
    reason = unavailable_reason(name, device)
    if reason is not None:
        return reason
    module = _module(name)
    missing = [function for function in ROW_SPLIT_FUNCTIONS if not callable(getattr(module, function, None))]
    if missing:
        return (
            f"the {name!r} backend module ({module.__name__}) does not define {', '.join(missing)}, the "
            "two-phase step for rows split across ranks"
        )
    device_reason = getattr(module, "row_split_unavailable_reason", None)
    return device_reason(device) if device_reason is not None else None


def resolve_row_split(name: str, device: torch.device | str) -> ModuleType:
    """The implementation module of the rows-split step (tensor-parallel rows) for ``name`` on ``device``.

    A backend asked for by name that lacks it raises RuntimeError naming what is missing;
    ``"auto"`` takes the fastest backend that has it on ``device`` (as it takes the fastest
    available backend for any step).
    """
    device = torch.device(device)
    if name == "auto":
        for candidate in BACKEND_NAMES:
            if candidate == "triton" and device.type != "cuda":
                continue
            if row_split_unavailable_reason(candidate, device) is None:
                return _module(candidate)
        name = "reference"
    reason = row_split_unavailable_reason(name, device)
    if reason is not None:
        implemented = [n for n in BACKEND_NAMES if row_split_unavailable_reason(n, device) is None]
        raise RuntimeError(
            f"NDAdam backend {name!r} cannot step parameters whose rows are split across ranks (a DTensor "
            f"with Shard(d) off the unit dim, e.g. RowwiseParallel) on {device}: {reason}. Backends that can: "
            f"{', '.join(repr(n) for n in implemented)}; pass one of them (or 'auto') as backend= for the "
            "param group of such parameters."
        )
    return _module(name)
