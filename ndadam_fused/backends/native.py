"""The native backend: the compiled extension ``ndadam_fused._C`` (``csrc/``).

Vector groups go through ONE op, ``torch.ops.ndadam_fused.vector_step_``, defined once in
``csrc/ndadam_op.cpp`` with a C++ CPU kernel and a CUDA kernel registered under it. Each call
updates every row of every tensor it is given (one CUDA kernel launch), so this module makes one
call per (device, dtype) of a group. The fake implementation below lets ``torch.compile`` trace
the op as one opaque, mutating node.

Scalar groups use torch's own fused Adam (``torch.optim.adam.adam(fused=True)``, on CUDA and on
CPU): ND-Adam's scalars are plain Adam with L2 weight decay, which torch already fuses.

The cut-over between the kernels' exact single-pass path and the two-pass statistics path is
:data:`SINGLE_PASS_MAX_ROW_LENGTH` (None: the kernels' default, ``_C.SINGLE_PASS_MAX_ROW_LENGTH``);
tests set it to force either path.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from .scalars import adam_step

__all__ = ["SINGLE_PASS_MAX_ROW_LENGTH", "scalar_step", "unavailable_reason", "vector_step"]

#: Rows longer than this take the statistics path; None means the compiled default (8192).
#: On CUDA it cannot exceed the default: the exact path keeps the whole row in registers.
SINGLE_PASS_MAX_ROW_LENGTH: int | None = None

_HOW_TO_BUILD = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(or `python setup.py build_ext --inplace`); this needs a C++ compiler and ninja"
)

try:
    from .. import _C
except (ImportError, OSError) as error:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = f"{type(error).__name__}: {error}"
else:
    _IMPORT_ERROR = None

    @torch.library.register_fake("ndadam_fused::vector_step_")
    def _vector_step_fake(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, eps, max_single_pass_row_length=-1
    ) -> None:
        # The op only mutates its inputs in place: no outputs to describe.
        return None


def unavailable_reason(device: torch.device) -> str | None:
    """None when the extension can step tensors on ``device``, else why not and how to build it."""
    device = torch.device(device)
    if _C is None:
        return f"the compiled extension ndadam_fused._C could not be imported ({_IMPORT_ERROR}); {_HOW_TO_BUILD}"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if _C.BUILT_WITH_CUDA:
            return None
        return (
            "ndadam_fused._C was built without its CUDA kernel (a CPU build of torch, no nvcc found, or "
            "NDADAM_NO_CUDA=1); rebuild it with nvcc on the PATH and CUDA_HOME set to the CUDA toolkit, "
            "e.g. `CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .`"
        )
    return f"the native kernels run on CPU and CUDA tensors, not {device.type}"


# One 0-dim float64 lr tensor per device, refilled when the lr changes: the op reads lr from a
# tensor on the params' device, and refilling it is one small kernel instead of a blocking copy.
_lr_tensors: dict[torch.device, tuple[float, Tensor]] = {}


def _lr_tensor(lr: float | Tensor, device: torch.device) -> Tensor:
    if isinstance(lr, Tensor):
        if lr.device == device and lr.dtype in (torch.float32, torch.float64):
            return lr.reshape(())
        return lr.to(device=device, dtype=torch.float64).reshape(())
    lr = float(lr)
    cached = _lr_tensors.get(device)
    if cached is None:
        cached = (lr, torch.full((), lr, dtype=torch.float64, device=device))
        _lr_tensors[device] = cached
    elif cached[0] != lr:
        cached[1].fill_(lr)
        cached = (lr, cached[1])
        _lr_tensors[device] = cached
    return cached[1]


def _single_pass_limit() -> int:
    return -1 if SINGLE_PASS_MAX_ROW_LENGTH is None else int(SINGLE_PASS_MAX_ROW_LENGTH)


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
) -> None:
    """θ^v update of Algorithm 1: one op call (one kernel launch) per (device, dtype)."""
    # torch's own grouping (C++, as its fused optimizers use): by the params' (device, dtype).
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, state_steps])
    for (device, _), ((group_params, group_grads, group_exp_avgs, group_exp_avg_sqs, group_steps), _) in grouped.items():
        group_params, group_exp_avgs = list(group_params), list(group_exp_avgs)
        # The kernels walk rows of contiguous memory. A non-contiguous param (a channels_last
        # conv weight) is stepped through a contiguous copy and copied back.
        copied = [
            i for i, (p, m) in enumerate(zip(group_params, group_exp_avgs)) if not (p.is_contiguous() and m.is_contiguous())
        ]
        originals = {i: (group_params[i], group_exp_avgs[i]) for i in copied}
        for i in copied:
            group_params[i] = group_params[i].contiguous()
            group_exp_avgs[i] = group_exp_avgs[i].contiguous()
        torch.ops.ndadam_fused.vector_step_(
            group_params,
            [g.contiguous() for g in group_grads],
            group_exp_avgs,
            list(group_exp_avg_sqs),
            list(group_steps),
            _lr_tensor(lr, device),
            beta1,
            beta2,
            eps,
            _single_pass_limit(),
        )
        for i, (param, exp_avg) in originals.items():
            param.copy_(group_params[i])
            exp_avg.copy_(group_exp_avgs[i])


#: θ^s of Algorithm 1: torch's fused Adam (CPU and CUDA) with L2 weight decay.
scalar_step = functools.partial(adam_step, implementation="fused")


# ---- The rows-split step (rows split across ranks; see ndadam_fused.backends.row_statistics) ----
# Two ops, ndadam_fused::row_statistics_ and ndadam_fused::apply_row_statistics_, defined in
# csrc/split_rows_op.cpp with their C++ CPU kernels in csrc/cpu/split_rows_cpu.cpp;
# ndadam_fused.distributed runs the all-reduce between them.

_ROW_SPLIT_OPS = ("ndadam_fused::row_statistics_", "ndadam_fused::apply_row_statistics_")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def row_split_unavailable_reason(device: torch.device) -> str | None:
    """None when the extension has kernels of the rows-split ops for ``device``, else which are missing."""
    device = torch.device(device)
    reason = unavailable_reason(device)
    if reason is not None:
        return reason
    key = _DISPATCH_KEYS.get(device.type)
    missing = [
        op for op in _ROW_SPLIT_OPS
        if key is None or not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
    ]
    if missing:
        return f"ndadam_fused._C has no {device.type} kernel for {', '.join(missing)}"
    return None


def _dtype_runs(params: list[Tensor]) -> list[tuple[int, int, int]]:
    """(start, end, rows) of each run of consecutive params of one (device, dtype): one op call each."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for index in range(1, len(params) + 1):
        if index == len(params) or (params[index].device, params[index].dtype) != (params[start].device, params[start].dtype):
            runs.append((start, index, sum(p.shape[0] for p in params[start:index])))
            start = index
    return runs


def row_statistics(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], statistics: Tensor) -> None:
    """Phase 1 of the rows-split step (see :mod:`ndadam_fused.backends.row_statistics`): one op
    call per run of params of one dtype, each writing its rows of ``statistics`` ``[Σ rows, 6]``."""
    offset = 0
    for start, end, rows in _dtype_runs(params):
        torch.ops.ndadam_fused.row_statistics_(
            list(params[start:end]), [g.contiguous() for g in grads[start:end]], list(exp_avgs[start:end]),
            statistics.narrow(0, offset, rows),
        )
        offset += rows


def apply_row_statistics(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    statistics: Tensor,
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """Phase 2 of the rows-split step: steps incremented, rows updated from the reduced ``statistics``."""
    offset = 0
    for start, end, rows in _dtype_runs(params):
        torch.ops.ndadam_fused.apply_row_statistics_(
            list(params[start:end]), [g.contiguous() for g in grads[start:end]], list(exp_avgs[start:end]),
            list(exp_avg_sqs[start:end]), list(state_steps[start:end]), statistics.narrow(0, offset, rows),
            _lr_tensor(lr, statistics.device), beta1, beta2, eps,
        )
        offset += rows


if _C is not None:
    # Both ops only mutate their inputs in place: no outputs to describe.
    @torch.library.register_fake("ndadam_fused::row_statistics_")
    def _row_statistics_fake(params, grads, exp_avgs, statistics) -> None:
        return None

    @torch.library.register_fake("ndadam_fused::apply_row_statistics_")
    def _apply_row_statistics_fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, statistics, lr, beta1, beta2, eps) -> None:
        return None
