"""ND-Adam (normalized direction-preserving Adam): the optimizer and its functional form.

The layout follows ``torch/optim/adam.py``: a thin :class:`NDAdam` class (validation, param
group splitting, lazy state), a functional :func:`ndadam` that picks an implementation, and
one module per implementation under :mod:`ndadam_fused.backends`.

The math is Algorithm 1 of Zhang, "Improved Adam Optimizer for Deep Neural Networks"; see
``DESIGN.md`` section 1. Every row of a vector tensor (one per hidden unit, see
:mod:`ndadam_fused.rows`) is one hidden unit's input weight vector ``w``; per step::

    g   = ḡ - (ḡ·w) w
    m   = β1 m + (1-β1) g                  (per element)
    v   = β2 v + (1-β2) ||g||²             (one scalar per row)
    w̄  = w - α (m / (1-β1^t)) / (sqrt(v / (1-β2^t)) + ε)
    w   = w̄ / ||w̄||

Scalars (biases, norm gains, every tensor of a ``"vector": False`` group) use Adam with L2
weight decay, computed by ``torch.optim``'s own functional Adam.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import backends, distributed
from .rounding import tensor_seed
from .rows import (
    RowMajorViews,
    new_exp_avg,
    normalize_rows_unchecked_,
    row_length,
    state_dtype,
    zero_rows,
)

__all__ = ["NDAdam", "ndadam", "hyperparameter_tensor"]

# Checked for every parameter at every step: see distributed.PLAIN_TENSOR_TYPES.
_DTENSOR = distributed.DTENSOR_TYPE
_PLAIN = distributed.PLAIN_TENSOR_TYPES

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]


def _describe(param: Tensor, name: str | None, group_index: int, param_index: int) -> str:
    """How errors name a parameter: its name when known, its place and its shape."""
    label = f"'{name}' " if name else ""
    return (
        f"parameter {label}(param_groups[{group_index}]['params'][{param_index}], "
        f"shape {list(param.shape)})"
    )


def _check_hyperparameters(
    *, lr: Any, betas: Any, eps: Any, weight_decay: Any, backend: Any, where: str, lr_name: str = "lr"
) -> None:
    def _is_finite_number(value: Any, low: float = 0.0) -> bool:
        if isinstance(value, Tensor):
            if value.numel() != 1 or not value.is_floating_point():
                return False
            value = float(value)
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        return math.isfinite(value) and value >= low

    if not _is_finite_number(lr):
        raise ValueError(f"{where}: invalid {lr_name}: {lr!r} (must be a finite number >= 0)")
    if not _is_finite_number(eps):
        raise ValueError(f"{where}: invalid eps: {eps!r} (must be a finite number >= 0)")
    if not _is_finite_number(weight_decay):
        raise ValueError(f"{where}: invalid weight_decay: {weight_decay!r} (must be a finite number >= 0)")
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(_is_finite_number(b) and float(b) < 1.0 for b in betas)
    ):
        raise ValueError(f"{where}: invalid betas: {betas!r} (must be two numbers in [0, 1))")
    backends.check_name(backend, where=where)


#: DTensor vector params whose all-zero-row check waits for one agreed verdict across ranks:
#: (param, unit_dim, how errors name it).
DeferredChecks = list[tuple[Tensor, int, str]]


def _check_param(
    param: Any, name: str | None, vector: bool, unit_dim: int, group_index: int, param_index: int,
    deferred: DeferredChecks,
) -> None:
    """Everything about one tensor that can be checked before a step; raises, never modifies.

    The all-zero-row check of a DTensor goes to ``deferred`` (see :func:`_check_deferred_zero_rows`).
    """
    if not isinstance(param, Tensor):
        raise TypeError(
            f"NDAdam can only optimize Tensors, but param_groups[{group_index}]['params']"
            f"[{param_index}] is {torch.typename(param)}"
        )
    where = _describe(param, name, group_index, param_index)
    if param.is_complex() or not param.is_floating_point():
        raise ValueError(f"NDAdam: {where} has dtype {param.dtype}; ND-Adam needs real floating-point tensors")
    if distributed.is_dtensor(param) and not (vector and param.dim() < 2):
        distributed.check_placements(param, vector, unit_dim if 0 <= unit_dim < param.dim() else 0, where)
    if not vector:
        return
    if param.dim() < 2:
        raise ValueError(
            f"NDAdam: {where} is in a group with 'vector': True but has {param.dim()} dim(s); "
            "a vector tensor needs at least 2 dims (one row per hidden unit). Put it in a group "
            "with 'vector': False to update it with Adam."
        )
    if not 0 <= unit_dim < param.dim():
        raise ValueError(
            f"NDAdam: {where} is in a group with 'unit_dim': {unit_dim}, but it has {param.dim()} dims; "
            "unit_dim is the dim that indexes hidden units (0 for nn.Linear and convs, 1 for [in, out] weights)"
        )
    if param.numel() == 0:
        return
    if row_length(param, unit_dim) == 1:
        warnings.warn(
            f"NDAdam: {where} has rows of length 1 along unit_dim {unit_dim}: ND-Adam keeps such a row at "
            "±1 forever (a direction in one dimension cannot change), so it will never train. Put it in a "
            "group with 'vector': False to update it with Adam.",
            stacklevel=4,
        )
    if param.requires_grad:
        _check_zero_rows(param, unit_dim, where, deferred)


def _zero_row_error(where: str, count: int, first: str) -> ValueError:
    return ValueError(
        f"NDAdam: {where} has an all-zero row ({count} in all, {first}); ND-Adam "
        "keeps every row at unit norm and a zero row cannot be normalized. Initialize it with "
        "nonzero values, or pass it in a param group with 'vector': False to update it with Adam."
    )


def _check_zero_rows(param: Tensor, unit_dim: int, where: str, deferred: DeferredChecks) -> None:
    if distributed.is_dtensor(param):
        deferred.append((param, unit_dim, where))
        return
    if param.is_meta:  # no values yet: checked when it is normalized or first stepped
        return
    count, first = zero_rows(param, unit_dim)
    if count:
        raise _zero_row_error(where, count, f"the first is row {first}")


def _check_deferred_zero_rows(deferred: DeferredChecks) -> None:
    """The all-zero-row check of DTensors: on local rows, one verdict agreed by all ranks."""
    if not deferred:
        return
    params = [param for param, _, _ in deferred]
    unit_dims = [unit_dim for _, unit_dim, _ in deferred]
    sums = distributed.row_sums_of_squares(params, unit_dims)
    for (_, _, where), (count, first) in zip(deferred, distributed.agreed_zero_rows(params, unit_dims, sums)):
        if count:
            raise _zero_row_error(
                where, count, f"the first on this rank is its local row {first}" if first >= 0 else "none on this rank"
            )


def _is_automatic_vector(param: Tensor, unit_dim: int) -> bool:
    """The automatic split: tensors with 2+ dims are vectors, unless their rows have length 1."""
    return param.dim() >= 2 and unit_dim < param.dim() and (param.numel() == 0 or row_length(param, unit_dim) > 1)


def _split_param_group(
    param_group: dict[str, Any], defaults: dict[str, Any], group_index: int, deferred: DeferredChecks
) -> tuple[list[dict[str, Any]], bool]:
    """Check a user's param group and split it into vector and scalar groups (no side effects).

    A group that carries ``"vector"`` is kept whole; a vector group without an ``"lr"`` of its
    own takes ``vector_lr`` when one is given. A group without ``"vector"`` becomes a vector
    group (tensors with 2+ dims whose rows are longer than 1; lr = ``vector_lr`` when given) and
    a scalar group, each with its own ``"lr"`` so that every lr scheduler schedules both.
    Returns the pieces and whether the constructor's ``vector_lr`` set a piece's lr.
    """
    if not isinstance(param_group, dict):
        raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
    params = param_group["params"]
    if isinstance(params, Tensor):
        params = [params]
    elif isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, not sets")
    params = list(params)
    names = [p[0] if isinstance(p, tuple) else None for p in params]
    tensors = [p[1] if isinstance(p, tuple) else p for p in params]

    settings = {**defaults, **{k: v for k, v in param_group.items() if k != "params"}}
    where = f"NDAdam param_groups[{group_index}]"
    vector_lr = settings.pop("vector_lr", None)
    group_vector_lr = param_group.get("vector_lr")
    if vector_lr is not None:
        _check_hyperparameters(
            lr=vector_lr, betas=settings["betas"], eps=settings["eps"],
            weight_decay=settings["weight_decay"], backend=settings["backend"],
            where=where, lr_name="vector_lr",
        )
    _check_hyperparameters(
        lr=settings["lr"], betas=settings["betas"], eps=settings["eps"],
        weight_decay=settings["weight_decay"], backend=settings["backend"], where=where,
    )
    unit_dim = settings.setdefault("unit_dim", 0)
    if not isinstance(unit_dim, int) or isinstance(unit_dim, bool) or unit_dim < 0:
        raise ValueError(f"{where}: 'unit_dim' must be an int >= 0, got {unit_dim!r}")
    for key in ("master_weights", "stochastic_rounding"):
        if not isinstance(settings.setdefault(key, False), bool):
            raise ValueError(f"{where}: '{key}' must be True or False, got {settings[key]!r}")
    if settings["master_weights"] and settings["stochastic_rounding"]:
        raise ValueError(
            f"{where}: master_weights and stochastic_rounding are two ways to keep small updates of "
            "bf16 parameters; choose one"
        )
    if settings["stochastic_rounding"]:
        for i, (param, name) in enumerate(zip(tensors, names)):
            if isinstance(param, Tensor) and param.dtype == torch.float16:
                raise ValueError(
                    f"NDAdam: {_describe(param, name, group_index, i)} is float16: stochastic_rounding "
                    "rounds to bfloat16 only; use master_weights=True for float16 parameters"
                )

    if settings["backend"] != "auto":
        for param in tensors:
            # A tensor on the meta device gets its real device later (to_empty); the step checks it then.
            if isinstance(param, Tensor) and not param.is_meta:
                reason = backends.unavailable_reason(settings["backend"], param.device)
                if reason is not None:
                    raise RuntimeError(
                        f"{where}: backend {settings['backend']!r} is not available on {param.device}: {reason}"
                    )

    if "vector" in param_group:
        vector = param_group["vector"]
        if not isinstance(vector, bool):
            raise ValueError(f"{where}: 'vector' must be True or False, got {vector!r}")
        if group_vector_lr is not None and (not vector or "lr" in param_group):
            raise ValueError(
                f"{where}: the group sets 'vector_lr' but "
                + ("it is a scalar group ('vector': False)" if not vector else "also its own 'lr'")
                + "; vector_lr is the lr of vector groups that have no 'lr' of their own. Set 'lr' only."
            )
        for i, (param, name) in enumerate(zip(tensors, names)):
            _check_param(param, name, vector, unit_dim, group_index, i, deferred)
        lr_from_vector_lr = vector and "lr" not in param_group and vector_lr is not None
        lr = vector_lr if lr_from_vector_lr else settings["lr"]
        piece = {**settings, "params": params, "vector": vector, "lr": lr}
        return [piece], lr_from_vector_lr and group_vector_lr is None

    is_vector = [isinstance(p, Tensor) and _is_automatic_vector(p, unit_dim) for p in tensors]
    for i, (param, name) in enumerate(zip(tensors, names)):
        _check_param(param, name, is_vector[i], unit_dim, group_index, i, deferred)
    vector_params = [p for p, v in zip(params, is_vector) if v]
    scalar_params = [p for p, v in zip(params, is_vector) if not v]
    if group_vector_lr is not None and not vector_params:
        raise ValueError(
            f"{where}: the group sets 'vector_lr' but holds no vector tensor (tensors with 2+ dims whose "
            "rows are longer than 1); remove vector_lr or pass the weights it is meant for"
        )
    pieces = []
    if vector_params:
        lr = settings["lr"] if vector_lr is None else vector_lr
        pieces.append({**settings, "params": vector_params, "vector": True, "lr": lr})
    if scalar_params or not vector_params:
        pieces.append({**settings, "params": scalar_params, "vector": False})
    return pieces, bool(vector_params) and vector_lr is not None and group_vector_lr is None


def _tensor_of(param: Any) -> Any:
    return param[1] if isinstance(param, tuple) else param


def _by_device_and_dtype(lists: list[list[Any]]) -> list[tuple[torch.device, list[list[Any]]]]:
    """The lists split by the params' (device, dtype), in first-seen order: torch's own grouping
    (C++) in eager mode, and a plain loop that torch.compile traces (under compile torch's returns
    one group without its device)."""
    if not torch.compiler.is_compiling():
        # torch's grouping checks dtypes index by index: master copies (fp32) and rounding seeds
        # (int64) of bf16 params would fail it, so they follow by index.
        grouped = Optimizer._group_tensors_by_device_and_dtype([lists[0]], with_indices=True)
        groups = [(device, indices) for (device, _), (_, indices) in grouped.items()]
    else:
        keys: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index, param in enumerate(lists[0]):
            keys.setdefault((param.device, param.dtype), []).append(index)
        groups = [(device, indices) for (device, _), indices in keys.items()]
    if len(groups) == 1:
        return [(groups[0][0], lists)]
    return [(device, [[x[i] for i in indices] for x in lists]) for device, indices in groups]


class NDAdam(Optimizer):
    r"""Normalized direction-preserving Adam (ND-Adam).

    Tensors with ``dim() >= 2`` are *vector* tensors: each hidden unit's input weights (a
    Linear weight's row, a conv kernel's output channel) are kept at unit L2 norm and updated
    along their tangent space with a per-element first moment and ONE second moment per unit.
    Every other tensor is a *scalar* and is updated by Adam with L2 weight decay.

    Args:
        params: tensors, ``(name, tensor)`` pairs, or param-group dicts. A group with
            ``"vector": True/False`` is kept as it is (a vector group without an ``"lr"`` of its
            own takes ``vector_lr``); a group without that key is split into a vector group
            (lr = ``vector_lr`` when given) and a scalar group. A group may set ``"unit_dim"``:
            the dim of its tensors that indexes hidden units (default 0; 1 for weights stored
            ``[in, out]`` such as Hugging Face's ``Conv1D``: :func:`ndadam_fused.param_groups`
            sets it). Tensors whose rows have length 1 are scalars in the automatic split.
        lr: learning rate of scalar groups, and of vector groups when ``vector_lr`` is None.
        vector_lr: learning rate of the vector groups that have no ``"lr"`` of their own. The
            paper's official code uses 50x the scalar lr. Given but used by no group, it is an
            error rather than silently dropped.
        betas: ``(β1, β2)``, each in [0, 1).
        eps: added to ``sqrt(v̂)``.
        weight_decay: L2 penalty for scalars. On vectors it is a no-op: the projection removes
            ``λw`` exactly, since every row has unit norm.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"native"``; see
            :func:`ndadam_fused.backends.available_backends`. It belongs to this machine: loading
            a state dict keeps it.
        master_weights: keep an fp32 copy of every bf16/fp16 parameter in the state
            (``"master_param"``), step the copy and write its rounded value to the parameter, so
            that updates below half a bf16 ulp accumulate (fp32/fp64 parameters need none).
        stochastic_rounding: round the new value of every bf16 parameter stochastically (see
            :mod:`ndadam_fused.rounding`), a cheaper way to keep small updates on average: no
            extra copy, reproducible, resumed bit for bit. Not with ``master_weights``; not for
            fp16 parameters (use ``master_weights``).

    Distributed: build it over the DTensors that ``fully_shard`` (FSDP2) or ``parallelize_module``
    leave on the model; each rank steps and keeps state for its local pieces only, with no
    communication where rows are whole on a rank and one all-reduce per group and step where
    tensor parallelism splits them (see :mod:`ndadam_fused.distributed`). Checkpoint with
    ``torch.distributed.checkpoint``. Under ``ZeroRedundancyOptimizer`` every param group must
    carry ``"vector"`` and its own ``"lr"``.

    ``step()`` takes part in ``torch.amp.GradScaler`` the way torch's fused Adam does
    (``_step_supports_amp_scaling``): the scaler sets ``grad_scale`` and ``found_inf`` on the
    optimizer, the kernels unscale gradients on the fly and skip the whole step (params, moments,
    step counts) where ``found_inf`` is set, with no host synchronization.

    Rows of trainable vector tensors are normalized in place at construction (frozen ones,
    ``requires_grad=False``, are left untouched until their first step). Loading weights
    into the model after building the optimizer: call :meth:`normalize_rows_`. When resuming,
    build the model and the optimizer, then load both state dicts: the run continues bit for bit.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        vector_lr: float | Tensor | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        backend: str = "auto",
        *,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
    ) -> None:
        _check_hyperparameters(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, backend=backend, where="NDAdam")
        if vector_lr is not None:
            _check_hyperparameters(
                lr=vector_lr, betas=betas, eps=eps, weight_decay=weight_decay, backend=backend,
                where="NDAdam", lr_name="vector_lr",
            )
        defaults = dict(
            lr=lr, vector_lr=vector_lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, backend=backend,
            master_weights=master_weights, stochastic_rounding=stochastic_rounding,
        )
        if isinstance(params, Tensor):
            raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts")
        param_groups = list(params)
        if param_groups and not isinstance(param_groups[0], dict):
            param_groups = [{"params": param_groups}]
        # Check every group before torch's constructor adds (and normalizes) any of them, so
        # that an error in the last group leaves every tensor untouched.
        seen: dict[int, int] = {}
        vector_lr_used = False
        deferred: DeferredChecks = []
        zero_redundancy = distributed.zero_redundancy_owner()
        if zero_redundancy is not None:
            distributed.check_zero_redundancy_groups(param_groups)
        for index, group in enumerate(param_groups):
            pieces, used = _split_param_group(group, defaults, index, deferred)
            vector_lr_used |= used
            self._check_no_repeats(pieces, index, seen)
        if vector_lr is not None and not vector_lr_used:
            raise ValueError(
                f"NDAdam: vector_lr={vector_lr!r} is used by no param group: every vector group sets its "
                "own 'lr' (or there is no vector tensor). Leave 'lr' out of the vector groups (e.g. "
                "param_groups(model) without lr/vector_lr) or drop vector_lr."
            )
        _check_deferred_zero_rows(deferred)
        if zero_redundancy is not None:
            distributed.normalize_zero_redundancy_replicas_(zero_redundancy)
        self._row_buffers: MutableMapping[Tensor, Tensor] = {}
        self._hyper: dict[tuple[int, torch.device], tuple[Tensor, list[Any]]] = {}
        # The DTensors were checked above, with one verdict for all groups: torch's constructor
        # adds the groups one by one, and their checks need not be agreed again.
        self._dtensor_rows_checked = True
        try:
            super().__init__(param_groups, defaults)
        finally:
            self._dtensor_rows_checked = False

    @staticmethod
    def _check_no_repeats(pieces: list[dict[str, Any]], group_index: int, seen: dict[int, int]) -> None:
        """A tensor may appear once: a fused launch that writes the same rows twice would race."""
        in_this_group: set[int] = set()
        for piece in pieces:
            for param_index, param in enumerate(piece["params"]):
                tensor = _tensor_of(param)
                key = id(tensor)
                name = param[0] if isinstance(param, tuple) else None
                if key in in_this_group:
                    raise ValueError(
                        f"NDAdam: {_describe(tensor, name, group_index, param_index)} appears twice in param "
                        f"group {group_index}; pass each tensor once"
                    )
                if key in seen:
                    raise ValueError(
                        f"NDAdam: {_describe(tensor, name, group_index, param_index)} also appears in param group "
                        f"{seen[key]}; some parameters appear in more than one parameter group"
                    )
                in_this_group.add(key)
        for key in in_this_group:
            seen[key] = group_index

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._row_buffers = {}
        self._hyper = {}
        for group in self.param_groups:
            group.setdefault("backend", "auto")
            group.setdefault("unit_dim", 0)
            group.setdefault("master_weights", False)
            group.setdefault("stochastic_rounding", False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; a group without ``"vector"`` is split as in the constructor."""
        deferred: DeferredChecks = []
        pieces, _ = _split_param_group(param_group, self.defaults, len(self.param_groups), deferred)
        seen = {id(p): i for i, group in enumerate(self.param_groups) for p in group["params"]}
        self._check_no_repeats(pieces, len(self.param_groups), seen)
        if not getattr(self, "_dtensor_rows_checked", False):
            _check_deferred_zero_rows(deferred)
        added = 0
        try:
            for piece in pieces:
                super().add_param_group(piece)
                added += 1
        except Exception:
            del self.param_groups[len(self.param_groups) - added :]
            raise
        for group in self.param_groups[len(self.param_groups) - added :]:
            # torch fills every default into the group; vector_lr has done its work in the split.
            group.pop("vector_lr", None)
            if group["vector"]:
                normalize_rows_unchecked_([p for p in group["params"] if p.requires_grad and p.numel()], group["unit_dim"])

    @torch.no_grad()
    def normalize_rows_(self) -> None:
        """Divide every row of every vector tensor by its norm (rows already unit are left as they are).

        Needed after loading weights into the model once the optimizer exists (pretrained
        weights, a model checkpoint loaded without the optimizer's): the step assumes unit rows.
        An all-zero row raises before anything is modified.
        """
        groups = [g for g in self.param_groups if g["vector"]]
        deferred: DeferredChecks = []
        for group_index, group in enumerate(self.param_groups):
            if group["vector"]:
                names = group.get("param_names")
                for param_index, param in enumerate(group["params"]):
                    if param.numel():
                        name = names[param_index] if names else None
                        where = _describe(param, name, group_index, param_index)
                        _check_zero_rows(param, group["unit_dim"], where, deferred)
        _check_deferred_zero_rows(deferred)
        for group in groups:
            normalize_rows_unchecked_([p for p in group["params"] if p.numel()], group["unit_dim"])

    def _check_step_inputs(self) -> None:
        """Everything a step can fail on, for every group, before any tensor or state is touched:
        each gradient's layout, dtype, device and shape, all-zero rows of vector tensors about to
        get their first step, and the backends. Raises naming the parameter."""
        deferred: DeferredChecks = []
        for group_index, group in enumerate(self.param_groups):
            devices, split_devices = set(), set()
            names = group.get("param_names")
            unit_dim = group.get("unit_dim", 0)
            for param_index, param in enumerate(group["params"]):
                grad = param.grad
                if grad is None or param.numel() == 0:
                    continue
                is_dtensor = type(param) not in _PLAIN and isinstance(param, _DTENSOR)
                if (
                    grad.layout is not torch.strided
                    or grad.dtype is not param.dtype
                    or grad.device != param.device
                    or grad.shape != param.shape
                    or (type(grad) not in _PLAIN and isinstance(grad, _DTENSOR)) is not is_dtensor
                ):
                    self._raise_for_gradient(group_index, group, param_index)
                if group["vector"] and not self.state.get(param):
                    where = _describe(param, names[param_index] if names else None, group_index, param_index)
                    _check_zero_rows(param, unit_dim, where, deferred)
                devices.add(param.device)
                if is_dtensor and group["vector"] and distributed.row_layout(param, unit_dim).rows_split:
                    split_devices.add(param.device)
            for device in devices:
                backends.resolve(group["backend"], device)  # raises, saying how to get it, when missing
            for device in split_devices:
                backends.resolve_row_split(group["backend"], device)
        # DTensors: one verdict on their local rows, agreed by every rank (so all raise together).
        _check_deferred_zero_rows(deferred)

    def _init_group(
        self,
        group_index: int,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
        master_params: list[Tensor | None],
        rounding_seeds: list[Tensor | None],
    ) -> None:
        """Collect the group's tensors that have a gradient into the lists, creating missing state.

        The call for group 0 first checks every group (:meth:`_check_step_inputs`), so that an
        error leaves everything as it was; what follows cannot fail. Shaped like torch's
        optimizers' ``_init_group`` (lists filled in place, nothing returned): torch.compile runs
        it eagerly, outside the graph, as it does theirs, so first-step work (normalizing rows,
        master copies) never enters a compiled graph.
        """
        if group_index == 0:
            self._check_step_inputs()
        created = []
        for param_index, param in enumerate(group["params"]):
            grad = param.grad
            if grad is None or param.numel() == 0:
                continue
            state = self.state[param]
            if len(state) == 0:
                self._init_state(group_index, group, param_index, param, state)
                created.append(param)
            params.append(param)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])
            master_params.append(state.get("master_param"))
            rounding_seeds.append(state.get("rounding_seed"))
        if created and group["vector"] and group["master_weights"]:
            # Unit in fp32, not only to bf16's precision: the projection assumes it.
            masters = [self.state[p]["master_param"] for p in created if "master_param" in self.state[p]]
            normalize_rows_unchecked_(masters, group.get("unit_dim", 0))

    @torch.no_grad()
    def _init_state(self, group_index: int, group: dict[str, Any], param_index: int, param: Tensor,
                    state: dict[str, Any]) -> None:
        vector = group["vector"]
        unit_dim = group.get("unit_dim", 0)
        low_precision = param.dtype in (torch.bfloat16, torch.float16)
        if vector:
            # Unit rows from the first step on: normalized at construction (then this changes no
            # bit), or frozen then and never normalized. (Rows were checked by _check_step_inputs.)
            normalize_rows_unchecked_([param], unit_dim)
        # On the param's device, as fused Adam keeps it: the fused kernels read it there.
        # A plain tensor for DTensors too: every rank counts the same steps.
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        if vector:
            dtype = state_dtype(param, vector)
            if distributed.is_dtensor(param):
                state["exp_avg"], state["exp_avg_sq"] = distributed.new_vector_state(param, unit_dim, dtype)
            else:
                state["exp_avg"] = new_exp_avg(param, unit_dim, dtype)
                state["exp_avg_sq"] = torch.zeros(param.shape[unit_dim], dtype=dtype, device=param.device)
        else:
            # Scalars with a master copy or stochastic rounding are stepped in fp32: so is their state.
            extended = low_precision and (group["master_weights"] or group["stochastic_rounding"])
            dtype = torch.float32 if extended else param.dtype
            state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        if group["stochastic_rounding"] and param.dtype == torch.bfloat16:
            state["rounding_seed"] = torch.tensor(
                tensor_seed(group_index, param_index), dtype=torch.int64, device=param.device
            )
        if group["master_weights"] and low_precision:
            if vector and distributed.is_dtensor(param):
                master = distributed.new_vector_state(param, unit_dim, torch.float32)[0].copy_(param)
            elif vector:
                master = new_exp_avg(param, unit_dim, torch.float32).copy_(param)
            else:
                master = param.detach().to(torch.float32, memory_format=torch.preserve_format).clone()
            state["master_param"] = master

    def _hyperparameters(self, group_index: int, group: dict[str, Any], device: torch.device) -> Tensor:
        """The group's (lr, β1, β2, ε) as a float64 [4] tensor on ``device``, which the kernels read.

        Eager: one tensor per (group, device), refilled only where a value changed (a fill kernel
        per change, no host synchronization; a tensor lr is copied at every step, so a CUDA graph
        that captured the step replays the copy). Under torch.compile the tensor is made from the
        group's numbers by arithmetic, which dynamo traces without guarding on their values: an lr
        schedule causes no recompile.
        """
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        values = (lr, beta1, beta2, group["eps"])
        if torch.compiler.is_compiling():
            return hyperparameter_tensor(lr, beta1, beta2, group["eps"], device)
        cached = self._hyper.get((group_index, device))
        if cached is None:
            cached = (torch.zeros(4, dtype=torch.float64, device=device), [None] * 4)
            self._hyper[(group_index, device)] = cached
        hyper, known = cached
        for index, value in enumerate(values):
            if isinstance(value, Tensor):
                hyper[index].copy_(value.reshape(()), non_blocking=True)
                known[index] = None
            elif known[index] != value:
                hyper[index].fill_(value)
                known[index] = value
        return hyper

    @staticmethod
    def _raise_for_gradient(group_index: int, group: dict[str, Any], param_index: int) -> None:
        param = group["params"][param_index]
        grad = param.grad
        if grad.layout is not torch.strided:
            problem = "a sparse gradient; NDAdam supports dense gradients only"
        elif grad.is_complex():
            problem = f"a complex gradient ({grad.dtype}); ND-Adam is defined for real tensors"
        elif grad.dtype is not param.dtype:
            problem = (
                f"a {grad.dtype} gradient for a {param.dtype} parameter; NDAdam needs gradients in the "
                "parameter's dtype (cast the gradient, or keep the parameter in the gradient's dtype)"
            )
        elif grad.device != param.device:
            problem = f"its gradient on {grad.device} but lives on {param.device}"
        elif distributed.is_dtensor(param) != distributed.is_dtensor(grad):
            problem = (
                "a DTensor gradient for a plain tensor" if distributed.is_dtensor(grad) else
                f"a plain-tensor gradient for a DTensor (placements {tuple(param.placements)}); the gradient "
                "must be a DTensor laid out like its parameter, as FSDP2 and tensor parallelism leave it"
            )
        else:
            problem = f"a gradient of shape {list(grad.shape)} that does not match the parameter"
        names = group.get("param_names")
        name = names[param_index] if names else None
        raise RuntimeError(f"NDAdam: {_describe(param, name, group_index, param_index)} has {problem}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step.

        Every gradient of every group is checked before any state is created or tensor updated:
        an error leaves params and state as they were.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        collected: list[list[list[Any]]] = []
        for group_index, group in enumerate(self.param_groups):
            lists: list[list[Any]] = [[], [], [], [], [], [], []]
            self._init_group(group_index, group, *lists)
            collected.append(lists)
        # GradScaler's protocol (torch.amp.GradScaler sets these on the optimizer before step()).
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group_index, (group, lists) in enumerate(zip(self.param_groups, collected)):
            if not lists[0]:
                continue
            beta1, beta2 = group["betas"]
            # One call per (device, dtype): within a call every param has a master copy or none,
            # a rounding seed or none.
            for device, (params, grads, exp_avgs, exp_avg_sqs, state_steps, master_params, rounding_seeds) in (
                _by_device_and_dtype(lists)
            ):
                ndadam(
                    params, grads, exp_avgs, exp_avg_sqs, state_steps,
                    vector=group["vector"], lr=group["lr"], beta1=beta1, beta2=beta2,
                    eps=group["eps"], weight_decay=group["weight_decay"], unit_dim=group.get("unit_dim", 0),
                    backend=group["backend"], row_buffers=self._row_buffers,
                    hyper=self._hyperparameters(group_index, group, device),
                    grad_scale=grad_scale, found_inf=found_inf,
                    master_params=None if master_params[0] is None else master_params,
                    rounding_seeds=None if rounding_seeds[0] is None else rounding_seeds,
                )
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict.

        Vector state and master copies keep their fp32 (fp64) dtype and row-contiguous layout
        whatever the param's dtype; a plain-number ``step`` (older checkpoints) becomes a tensor; each group keeps the
        backend it was built with (the backend belongs to this machine, not to the checkpoint).
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) == len(self.param_groups):
            id_to_param = {
                saved_id: (
                    param, saved_group.get("vector", group["vector"]), saved_group.get("unit_dim", 0),
                    group_index, param_index,
                )
                for group_index, (saved_group, group) in enumerate(zip(saved_groups, self.param_groups))
                for param_index, (saved_id, param) in enumerate(zip(saved_group["params"], group["params"]))
            }
            for saved_id, saved_state in state_dict["state"].items():
                if saved_id not in id_to_param:
                    continue
                param, vector, unit_dim, group_index, param_index = id_to_param[saved_id]
                expected = {
                    "exp_avg": tuple(param.shape),
                    "exp_avg_sq": (param.shape[unit_dim],) if vector else tuple(param.shape),
                }
                for key, shape in expected.items():
                    value = saved_state.get(key)
                    if isinstance(value, Tensor) and distributed.is_dtensor(value) != distributed.is_dtensor(param):
                        raise ValueError(
                            f"NDAdam.load_state_dict: state '{key}' of {_describe(param, None, group_index, param_index)} "
                            + ("is a DTensor but the parameter is a plain tensor" if distributed.is_dtensor(value) else
                               f"is a plain tensor but the parameter is a DTensor (placements {tuple(param.placements)})")
                            + "; load distributed state with torch.distributed.checkpoint.state_dict."
                            "set_optimizer_state_dict (or set_state_dict), which lays it out like the parameters"
                        )
                    if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                        found = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
                        raise ValueError(
                            f"NDAdam.load_state_dict: state '{key}' of "
                            f"{_describe(param, None, group_index, param_index)} is {found}, expected "
                            f"shape {list(shape)}; is this the state of a different optimizer or model?"
                        )
        else:
            id_to_param = {}
        machine_backends = [group["backend"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        self._row_buffers = {}
        for group, backend in zip(self.param_groups, machine_backends):
            group["backend"] = backend
            group.setdefault("unit_dim", 0)
        # torch casts every floating state tensor to the param's dtype; vector state stays fp32.
        for saved_id, saved_state in state_dict["state"].items():
            if saved_id not in id_to_param:
                continue
            param, vector, unit_dim, _, _ = id_to_param[saved_id]
            state = self.state[param]
            dtype = state_dtype(param, vector)
            if vector and distributed.is_dtensor(param):
                exp_avg, exp_avg_sq = distributed.new_vector_state(param, unit_dim, dtype)
                state["exp_avg"] = exp_avg.copy_(saved_state["exp_avg"])
                state["exp_avg_sq"] = exp_avg_sq.copy_(saved_state["exp_avg_sq"])
            elif vector:
                state["exp_avg"] = new_exp_avg(param, unit_dim, dtype).copy_(saved_state["exp_avg"])
            else:
                state["exp_avg"] = saved_state["exp_avg"].to(device=param.device, dtype=dtype)
            if not (vector and distributed.is_dtensor(param)):
                state["exp_avg_sq"] = saved_state["exp_avg_sq"].to(device=param.device, dtype=dtype)
            master = saved_state.get("master_param")
            if isinstance(master, Tensor):
                # torch cast it to the param's dtype: the master copy is fp32 by definition.
                if vector and distributed.is_dtensor(param):
                    state["master_param"] = distributed.new_vector_state(param, unit_dim, torch.float32)[0].copy_(master)
                elif vector:
                    state["master_param"] = new_exp_avg(param, unit_dim, torch.float32).copy_(master)
                else:
                    state["master_param"] = master.to(device=param.device, dtype=torch.float32)
            seed = saved_state.get("rounding_seed")
            if isinstance(seed, Tensor):
                # torch cast it to the param's dtype too: a bf16 seed keeps 8 of its 32 bits.
                state["rounding_seed"] = seed.to(device=param.device, dtype=torch.int64)
            step = saved_state.get("step")
            if step is not None:
                step_value = step if isinstance(step, Tensor) else torch.tensor(float(step))
                state["step"] = step_value.to(device=param.device, dtype=torch.float32).reshape(())


def hyperparameter_tensor(lr: float | Tensor, beta1: float, beta2: float, eps: float, device: torch.device) -> Tensor:
    """(lr, β1, β2, ε) as the float64 [4] tensor on ``device`` that the kernels read.

    Made by arithmetic on a tensor of ones: torch.compile traces that without guarding on the
    values (``torch.tensor([...])`` or ``fill_`` would specialize on them and recompile).
    """
    one = torch.ones((), dtype=torch.float64, device=device)
    return torch.stack(
        [v.to(device, torch.float64).reshape(()) if isinstance(v, Tensor) else one * v for v in (lr, beta1, beta2, eps)]
    )


def ndadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    vector: bool,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    unit_dim: int = 0,
    backend: str = "auto",
    row_buffers: MutableMapping[Tensor, Tensor] | None = None,
    hyper: Tensor | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: list[Tensor] | None = None,
    rounding_seeds: list[Tensor] | None = None,
) -> None:
    r"""Functional ND-Adam: one step over one group's tensors, in place.

    Args:
        params: the group's tensors that have a gradient.
        grads: their gradients (never modified), in the params' dtypes and on their devices.
        exp_avgs: first moments, shaped like ``params`` (fp32 for vectors, fp64 for fp64).
        exp_avg_sqs: second moments: shape ``[p.shape[unit_dim]]`` for vectors, ``p.shape`` for scalars.
        state_steps: one 0-dim step tensor per param; each is incremented.
        vector: True for a vector group (Algorithm 1), False for scalars (Adam with L2).
        weight_decay: applied to scalars only; on unit rows it is removed by the projection.
        unit_dim: the dim of the vector tensors that indexes hidden units (their rows).
        backend: a name from :data:`ndadam_fused.backends.BACKEND_NAMES` or ``"auto"``.
        row_buffers: where to keep the contiguous work copies of params whose rows are not
            contiguous in memory, from step to step (see :class:`ndadam_fused.rows.RowMajorViews`).
        hyper: (lr, β1, β2, ε) as a float64 [4] tensor on the params' device (made from the
            numbers when None; :class:`NDAdam` keeps one per group and device).
        grad_scale, found_inf: GradScaler's tensors: gradients are divided by ``grad_scale``, and
            nothing changes (step counts included) where ``found_inf`` is nonzero.
        master_params: fp32 master copies of bf16/fp16 params (stepped; the params get their
            rounded values), or None.
        rounding_seeds: per-param int64 seeds for stochastic rounding of bf16 params, or None.
    """
    if not params:
        return
    device = params[0].device
    implementation = backends.resolve(backend, device)
    if hyper is None:
        hyper = hyperparameter_tensor(lr, beta1, beta2, eps, device)
    options = dict(hyper=hyper, beta1=beta1, beta2=beta2, eps=eps, grad_scale=grad_scale, found_inf=found_inf,
                   master_params=master_params, rounding_seeds=rounding_seeds)
    if not _PLAIN.issuperset(map(type, params)) and any(map(distributed.is_dtensor, params)):
        # FSDP2 / tensor-parallel parameters: the kernels step their local pieces.
        if vector:
            distributed.vector_step(implementation, params, grads, exp_avgs, exp_avg_sqs, state_steps,
                                    unit_dim=unit_dim, backend=backend, row_buffers=row_buffers, **options)
        else:
            distributed.scalar_step(implementation, params, grads, exp_avgs, exp_avg_sqs, state_steps,
                                    weight_decay=weight_decay, **options)
    elif vector:
        views = RowMajorViews(params, grads, exp_avgs, unit_dim, row_buffers, master_params)
        options["master_params"] = views.master_params
        implementation.vector_step(views.params, views.grads, views.exp_avgs, exp_avg_sqs, state_steps, **options)
        views.finish()
    else:
        implementation.scalar_step(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, weight_decay=weight_decay, **options
        )
