"""The native backend: the compiled extension ``ndadam_fused._C`` (``csrc/``).

Vector groups go through ONE op, ``torch.ops.ndadam_fused.vector_step_``, defined once in
``csrc/ndadam_op.cpp`` with a C++ CPU kernel and a CUDA kernel registered under it. Each call
updates every row of every tensor it is given (one CUDA kernel launch), so this module makes one
call per (device, dtype) of a group. The fake implementation below lets ``torch.compile`` trace
the op as one opaque, mutating node.

Scalar groups (ND-Adam's scalars are plain Adam with L2 weight decay) go through
``torch.ops.ndadam_fused.scalar_step_`` on the CPU (``csrc/cpu/scalar_step_cpu.cpp``: one loop
over all of them) and through torch's own fused Adam (``torch.optim.adam.adam(fused=True)``) on
CUDA, where it is one multi-tensor launch, and wherever the op does not take the tensors (see
:func:`scalar_step`).

The cut-over between the kernels' exact single-pass path and the two-pass statistics path is
:data:`SINGLE_PASS_MAX_ROW_LENGTH` (None: the kernels' default, ``_C.SINGLE_PASS_MAX_ROW_LENGTH``);
tests set it to force either path.
"""

from __future__ import annotations

import functools
import threading
from types import ModuleType

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import _jit
from .scalars import adam_step

__all__ = ["SINGLE_PASS_MAX_ROW_LENGTH", "extension", "scalar_step", "unavailable_reason", "vector_step"]

#: Rows longer than this take the statistics path; None means the compiled default (8192).
#: On CUDA it cannot exceed the default: the exact path keeps the whole row in registers.
SINGLE_PASS_MAX_ROW_LENGTH: int | None = None

_HOW_TO_BUILD = (
    "It is built at first use where a C++ compiler and ninja are found (unless "
    f"{_jit.OPT_OUT_VARIABLE}=1); or build it ahead from the source tree with "
    "`pip install --no-build-isolation -e .` (or `pip install --no-build-isolation .`, "
    "or `python setup.py build_ext --inplace`)"
)

# The extension: the one built at install time (setup.py, CMake) when it imports; otherwise it
# is built at first use by extension() below, and stays None when that is impossible.
try:
    from .. import _C
except (ImportError, OSError) as error:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR: str | None = f"{type(error).__name__}: {error}"
else:
    _IMPORT_ERROR = None
#: Why the build at first use failed (None: not tried, or it worked).
_BUILD_ERROR: str | None = None
_build_lock = threading.Lock()
#: Whether the loaded extension has the CPU scalar op (one built before it was added has not);
#: set where the extension is loaded (_register_fake), read by scalar_step at every step.
_HAS_SCALAR_OP = False


def _register_fake() -> None:
    global _HAS_SCALAR_OP
    # The ops only mutate their inputs in place: no outputs to describe.
    @torch.library.register_fake("ndadam_fused::vector_step_")
    def _vector_step_fake(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, hyper, grad_scale=None, found_inf=None, master_params=(),
        rounding_seeds=(), max_single_pass_row_length=-1,
    ) -> None:
        return None

    _HAS_SCALAR_OP = hasattr(torch.ops.ndadam_fused, "scalar_step_")
    if _HAS_SCALAR_OP:

        @torch.library.register_fake("ndadam_fused::scalar_step_")
        def _scalar_step_fake(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, hyper, weight_decay, grad_scale=None, found_inf=None,
        ) -> None:
            return None

    if not hasattr(torch.ops.ndadam_fused, "row_statistics_"):
        return  # an extension built without the rows-split ops (row_split_unavailable_reason says so)

    @torch.library.register_fake("ndadam_fused::row_statistics_")
    def _row_statistics_fake(params, grads, exp_avgs, statistics, grad_scale=None, master_params=()) -> None:
        return None

    @torch.library.register_fake("ndadam_fused::apply_row_statistics_")
    def _apply_row_statistics_fake(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, statistics, hyper, grad_scale=None, found_inf=None,
        master_params=(), rounding_seeds=(),
    ) -> None:
        return None


if _C is not None:
    _register_fake()


def extension() -> ModuleType | None:
    """``ndadam_fused._C``; built at first call (see :mod:`._jit`) when the install did not build it.

    None when it is neither built nor buildable; :func:`unavailable_reason` then says why.
    """
    global _C, _BUILD_ERROR
    if _C is not None or _BUILD_ERROR is not None:
        return _C
    with _build_lock:
        if _C is None and _BUILD_ERROR is None:
            try:
                module = _jit.load_extension()
            except _jit.JitBuildError as error:
                _BUILD_ERROR = str(error)
            else:
                _register_fake()
                _C = module
    return _C


def unavailable_reason(device: torch.device) -> str | None:
    """None when the extension can step tensors on ``device``, else why not and how to build it.

    On CPU and CUDA devices this builds the extension first when it is missing (:func:`extension`).
    """
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return f"the native kernels run on CPU and CUDA tensors, not {device.type}"
    if extension() is None:
        return (
            f"the compiled extension ndadam_fused._C is not built ({_IMPORT_ERROR}) and was not built at "
            f"first use: {_BUILD_ERROR}. {_HOW_TO_BUILD}"
        )
    if device.type == "cpu":
        return None
    if _C.BUILT_WITH_CUDA:
        return None
    return (
        "ndadam_fused._C was built without its CUDA kernel (a CPU build of torch, no nvcc found, or "
        "NDADAM_NO_CUDA=1); rebuild it with nvcc on the PATH and CUDA_HOME set to the CUDA toolkit, "
        "e.g. `CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .`, or, for the build at "
        "first use, set CUDA_HOME so that nvcc is found and start Python again"
    )


def _single_pass_limit() -> int:
    return -1 if SINGLE_PASS_MAX_ROW_LENGTH is None else int(SINGLE_PASS_MAX_ROW_LENGTH)


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
    """θ^v update of Algorithm 1: one op call (one kernel launch) per (device, dtype).

    Everything goes to the kernels, which read ``hyper``, ``grad_scale`` and ``found_inf`` where
    they are (on CUDA: on the device), so that a step reads nothing back to the host and a CUDA
    graph that captured it sees later changes of those tensors. ``master_params`` and
    ``rounding_seeds`` follow ``params`` index by index.
    """
    # Rows are contiguous here: ndadam() and distributed.vector_step hand the backends row-major
    # work views (rows.RowMajorViews, stable from step to step), and the op refuses anything
    # else. torch's own grouping (C++) by the params' (device, dtype): NDAdam calls this once per
    # (device, dtype) already, so the lists go to the op as they are; master copies (fp32) and
    # seeds (int64) follow by index.
    grouped = Optimizer._group_tensors_by_device_and_dtype([params], with_indices=True)
    for (device, _), (_, indices) in grouped.items():
        lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps, master_params or [], rounding_seeds or [])
        if len(grouped) > 1:
            lists = tuple([x[i] for i in indices] if x else x for x in lists)
        torch.ops.ndadam_fused.vector_step_(
            *lists[:5], _on(hyper, device), _on(grad_scale, device), _on(found_inf, device), *lists[5:],
            _single_pass_limit(),
        )


def _on(tensor: Tensor | None, device: torch.device) -> Tensor | None:
    """``tensor`` on ``device`` (the kernels read it there); the same tensor where it already is,
    so that a CUDA graph replays reads of the caller's tensor, not of a copy."""
    if tensor is None or tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=True)


_fused_adam_step = functools.partial(adam_step, implementation="fused")


def scalar_step(
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
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: list[Tensor] | None = None,
    rounding_seeds: list[Tensor] | None = None,
) -> None:
    """θ^s of Algorithm 1, Adam with L2 weight decay: ``ndadam_fused::scalar_step_`` (one C++ loop
    over every tensor, step counters included) for CPU tensors that it takes, torch's fused Adam
    (the same math, in ``ndadam_fused.backends.scalars``) for the rest.

    The op takes contiguous tensors with their state in their own dtype. torch's fused Adam
    steps CUDA tensors in one multi-tensor launch already, and master copies, stochastic
    rounding and other layouts are its wrapper's business; on the CPU it forks the intra-op
    threads once per tensor.
    """
    if (
        params
        and params[0].device.type == "cpu"
        and master_params is None
        and rounding_seeds is None
        and _HAS_SCALAR_OP
        and all(
            p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()
            and m.dtype == p.dtype and v.dtype == p.dtype
            for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs)
        )
    ):
        torch.ops.ndadam_fused.scalar_step_(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, _on(hyper, params[0].device), float(weight_decay),
            _on(grad_scale, params[0].device), _on(found_inf, params[0].device),
        )
        return
    _fused_adam_step(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, hyper=hyper, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, grad_scale=grad_scale, found_inf=found_inf, master_params=master_params,
        rounding_seeds=rounding_seeds,
    )


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


def row_statistics(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    statistics: Tensor,
    *,
    grad_scale: Tensor | None = None,
    master_params: list[Tensor] | None = None,
) -> None:
    """Phase 1 of the rows-split step (see :mod:`ndadam_fused.backends.row_statistics`): one op
    call per run of params of one dtype, each writing its rows of ``statistics`` ``[Σ rows, 6]``."""
    device = statistics.device
    offset = 0
    for start, end, rows in _dtype_runs(params):
        torch.ops.ndadam_fused.row_statistics_(
            list(params[start:end]), [g.contiguous() for g in grads[start:end]], list(exp_avgs[start:end]),
            statistics.narrow(0, offset, rows), _on(grad_scale, device),
            [] if master_params is None else list(master_params[start:end]),
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
    hyper: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: list[Tensor] | None = None,
    rounding_seeds: list[Tensor] | None = None,
) -> None:
    """Phase 2 of the rows-split step: steps incremented, rows updated from the reduced ``statistics``
    (the kernels read ``hyper``, ``grad_scale`` and ``found_inf`` where they are)."""
    device = statistics.device
    offset = 0
    for start, end, rows in _dtype_runs(params):
        torch.ops.ndadam_fused.apply_row_statistics_(
            list(params[start:end]), [g.contiguous() for g in grads[start:end]], list(exp_avgs[start:end]),
            list(exp_avg_sqs[start:end]), list(state_steps[start:end]), statistics.narrow(0, offset, rows),
            _on(hyper, device), _on(grad_scale, device), _on(found_inf, device),
            [] if master_params is None else list(master_params[start:end]),
            [] if rounding_seeds is None else list(rounding_seeds[start:end]),
        )
        offset += rows
