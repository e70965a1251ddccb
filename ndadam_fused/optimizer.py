"""ND-Adam (normalized direction-preserving Adam): the optimizer and its functional form.

The layout follows ``torch/optim/adam.py``: a thin :class:`NDAdam` class (validation, param
group splitting, lazy state), a functional :func:`ndadam` that picks an implementation, and
one module per implementation under :mod:`ndadam_fused.backends`.

The math is Algorithm 1 of Zhang, "Improved Adam Optimizer for Deep Neural Networks"; see
``DESIGN.md`` section 1. Every row of a vector tensor (``p.reshape(p.shape[0], -1)``) is one
hidden unit's input weight vector ``w``; per step::

    g   = ḡ - (ḡ·w) w
    m   = β1 m + (1-β1) g                  (per element)
    v   = β2 v + (1-β2) ||g||²             (one scalar per row)
    w̄  = w - α (m / (1-β1^t)) / (sqrt(v / (1-β2^t)) + ε)
    w   = w̄ / ||w̄||

Scalars (biases, norm gains, every tensor of a ``"vector": False`` group) use Adam with L2
weight decay, computed by ``torch.optim``'s own functional Adam.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import backends

__all__ = ["NDAdam", "ndadam"]

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
    def _is_number(value: Any) -> bool:
        return isinstance(value, (int, float)) or (isinstance(value, Tensor) and value.numel() == 1)

    if not _is_number(lr) or not float(lr) >= 0.0:
        raise ValueError(f"{where}: invalid {lr_name}: {lr!r} (must be a number >= 0)")
    if not _is_number(eps) or not float(eps) >= 0.0:
        raise ValueError(f"{where}: invalid eps: {eps!r} (must be a number >= 0)")
    if not _is_number(weight_decay) or not float(weight_decay) >= 0.0:
        raise ValueError(f"{where}: invalid weight_decay: {weight_decay!r} (must be >= 0)")
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(_is_number(b) and 0.0 <= float(b) < 1.0 for b in betas)
    ):
        raise ValueError(f"{where}: invalid betas: {betas!r} (must be two numbers in [0, 1))")
    backends.check_name(backend, where=where)


def _row_view(tensor: Tensor) -> Tensor:
    """A vector tensor as [rows, row_length]: each row is one hidden unit's input weights."""
    return tensor.reshape(tensor.shape[0], -1)


def _state_dtype(param: Tensor, vector: bool) -> torch.dtype:
    """Vector state is fp32 (fp64 for fp64 params); scalar state follows torch.optim.Adam."""
    if not vector:
        return param.dtype
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _unit_tolerance(dtype: torch.dtype, row_length: int) -> float:
    """How far from 1 a row's norm may be for the row to count as already unit.

    Dividing such a row again would only move rounding bits; leaving it alone keeps a resumed
    run bit-exact in whichever order the model and the optimizer are rebuilt. A step's output
    rows were measured within 3 eps (fp32) and 9 eps (fp64) of unit norm at 20,000 elements.
    A row of length 1 is always divided: x / |x| is exactly ±1.
    """
    if row_length <= 1:
        return 0.0
    return 4.0 * torch.finfo(dtype).eps * (1.0 + row_length**0.5 / 32.0)


def _check_param(
    param: Any, name: str | None, vector: bool, group_index: int, param_index: int
) -> None:
    if not isinstance(param, Tensor):
        raise TypeError(
            f"NDAdam can only optimize Tensors, but param_groups[{group_index}]['params']"
            f"[{param_index}] is {torch.typename(param)}"
        )
    where = _describe(param, name, group_index, param_index)
    if param.is_complex() or not param.is_floating_point():
        raise ValueError(f"NDAdam: {where} has dtype {param.dtype}; ND-Adam needs real floating-point tensors")
    if not vector or param.numel() == 0:
        return
    if param.dim() < 2:
        raise ValueError(
            f"NDAdam: {where} is in a group with 'vector': True but has {param.dim()} dim(s); "
            "a vector tensor needs at least 2 dims (one row per hidden unit). Put it in a group "
            "with 'vector': False to update it with Adam."
        )
    norms = _row_view(param.detach()).to(_state_dtype(param, True)).norm(dim=1)
    zero_rows = (norms == 0).nonzero().flatten()
    if zero_rows.numel() > 0:
        raise ValueError(
            f"NDAdam: {where} has an all-zero row ({zero_rows.numel()} in all, the first is row "
            f"{int(zero_rows[0])}); ND-Adam keeps every row at unit norm and a zero row cannot be "
            "normalized. Initialize it with nonzero values, or pass it in a param group with "
            "'vector': False to update it with Adam."
        )


def _split_param_group(
    param_group: dict[str, Any], defaults: dict[str, Any], group_index: int
) -> list[dict[str, Any]]:
    """Check a user's param group and split it into vector and scalar groups (no side effects).

    A group that carries ``"vector"`` is kept whole. A group without it becomes a vector group
    (the tensors with ``dim() >= 2``, lr = ``vector_lr`` when given) and a scalar group, each
    with its own ``"lr"`` so that every lr scheduler schedules both.
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

    if settings["backend"] != "auto":
        for param in tensors:
            if isinstance(param, Tensor):
                reason = backends.unavailable_reason(settings["backend"], param.device)
                if reason is not None:
                    raise RuntimeError(
                        f"{where}: backend {settings['backend']!r} is not available on {param.device}: {reason}"
                    )

    if "vector" in param_group:
        vector = param_group["vector"]
        if not isinstance(vector, bool):
            raise ValueError(f"{where}: 'vector' must be True or False, got {vector!r}")
        for i, (param, name) in enumerate(zip(tensors, names)):
            _check_param(param, name, vector, group_index, i)
        return [{**settings, "params": params, "vector": vector}]

    for i, (param, name) in enumerate(zip(tensors, names)):
        _check_param(param, name, False, group_index, i)
    is_vector = [p.dim() >= 2 for p in tensors]
    for i, (param, name) in enumerate(zip(tensors, names)):
        if is_vector[i]:
            _check_param(param, name, True, group_index, i)
    vector_params = [p for p, v in zip(params, is_vector) if v]
    scalar_params = [p for p, v in zip(params, is_vector) if not v]
    pieces = []
    if vector_params:
        lr = settings["lr"] if vector_lr is None else vector_lr
        pieces.append({**settings, "params": vector_params, "vector": True, "lr": lr})
    if scalar_params or not vector_params:
        pieces.append({**settings, "params": scalar_params, "vector": False})
    return pieces


@torch.no_grad()
def _normalize_rows_(param: Tensor) -> None:
    """Algorithm 1's initialization: divide every row by its L2 norm, in place."""
    if param.numel() == 0:
        return
    rows = _row_view(param).to(_state_dtype(param, True))
    norms = rows.norm(dim=1, keepdim=True)
    # Judged in fp64 so that the check itself adds no rounding of its own.
    tolerance = _unit_tolerance(param.dtype, rows.shape[1])
    already_unit = (_row_view(param).double().norm(dim=1, keepdim=True) - 1).abs() <= tolerance
    param.copy_((rows / torch.where(already_unit, torch.ones_like(norms), norms)).view(param.shape))


class NDAdam(Optimizer):
    r"""Normalized direction-preserving Adam (ND-Adam).

    Tensors with ``dim() >= 2`` are *vector* tensors: each row of ``p.reshape(p.shape[0], -1)``
    (a Linear weight's row, a conv kernel's output channel) is kept at unit L2 norm and updated
    along its tangent space with a per-element first moment and ONE second moment per row.
    Every other tensor is a *scalar* and is updated by Adam with L2 weight decay.

    Args:
        params: tensors, ``(name, tensor)`` pairs, or param-group dicts. A group with
            ``"vector": True/False`` is kept as it is; a group without that key is split into a
            vector group (lr = ``vector_lr`` when given) and a scalar group.
        lr: learning rate of scalar groups, and of vector groups when ``vector_lr`` is None.
        vector_lr: learning rate of the vector groups made by splitting. The paper's official
            code uses 50x the scalar lr.
        betas: ``(β1, β2)``, each in [0, 1).
        eps: added to ``sqrt(v̂)``.
        weight_decay: L2 penalty for scalars. On vectors it is a no-op: the projection removes
            ``λw`` exactly, since every row has unit norm.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"native"``; see
            :func:`ndadam_fused.backends.available_backends`.

    Rows of vector tensors are normalized in place at construction. When resuming, build the
    model and the optimizer, then load both state dicts: the run continues bit for bit.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        vector_lr: float | Tensor | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        backend: str = "auto",
    ) -> None:
        _check_hyperparameters(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, backend=backend, where="NDAdam")
        if vector_lr is not None:
            _check_hyperparameters(
                lr=vector_lr, betas=betas, eps=eps, weight_decay=weight_decay, backend=backend,
                where="NDAdam", lr_name="vector_lr",
            )
        defaults = dict(
            lr=lr, vector_lr=vector_lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, backend=backend
        )
        if isinstance(params, Tensor):
            raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts")
        param_groups = list(params)
        if param_groups and not isinstance(param_groups[0], dict):
            param_groups = [{"params": param_groups}]
        # Check every group before torch's constructor adds (and normalizes) any of them, so
        # that an error in the last group leaves every tensor untouched.
        seen: set[int] = set()
        for index, group in enumerate(param_groups):
            for piece in _split_param_group(group, defaults, index):
                for param in piece["params"]:
                    tensor = param[1] if isinstance(param, tuple) else param
                    if id(tensor) in seen:
                        raise ValueError("some parameters appear in more than one parameter group")
                    seen.add(id(tensor))
        super().__init__(param_groups, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("backend", "auto")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; a group without ``"vector"`` is split as in the constructor."""
        pieces = _split_param_group(param_group, self.defaults, len(self.param_groups))
        known = {id(p) for group in self.param_groups for p in group["params"]}
        for piece in pieces:
            for param in piece["params"]:
                tensor = param[1] if isinstance(param, tuple) else param
                if id(tensor) in known:
                    raise ValueError("some parameters appear in more than one parameter group")
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
                for param in group["params"]:
                    _normalize_rows_(param)

    def _init_group(
        self,
        group_index: int,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
        created: list[Tensor],
    ) -> None:
        """Collect the group's tensors that have a gradient, checking the gradient and creating
        missing state (the params whose state is new go to ``created``, so that step() can
        take it back when a later group raises)."""
        vector = group["vector"]
        for param_index, param in enumerate(group["params"]):
            grad = param.grad
            if grad is None or param.numel() == 0:
                continue
            if grad.layout is not torch.strided or grad.is_complex() or grad.shape != param.shape:
                self._raise_for_gradient(group_index, group, param_index)
            state = self.state[param]
            if len(state) == 0:
                created.append(param)
                # On the param's device, as fused Adam keeps it: the fused kernels read it there.
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                if vector:
                    dtype = _state_dtype(param, vector)
                    state["exp_avg"] = torch.zeros(param.shape, dtype=dtype, device=param.device)
                    state["exp_avg_sq"] = torch.zeros(param.shape[0], dtype=dtype, device=param.device)
                else:
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            params.append(param)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])

    @staticmethod
    def _raise_for_gradient(group_index: int, group: dict[str, Any], param_index: int) -> None:
        param = group["params"][param_index]
        grad = param.grad
        if grad.layout is not torch.strided:
            problem = "a sparse gradient; NDAdam supports dense gradients only"
        elif grad.is_complex():
            problem = f"a complex gradient ({grad.dtype}); ND-Adam is defined for real tensors"
        else:
            problem = f"a gradient of shape {list(grad.shape)} that does not match the parameter"
        names = group.get("param_names")
        name = names[param_index] if names else None
        raise RuntimeError(f"NDAdam: {_describe(param, name, group_index, param_index)} has {problem}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Every group is checked before any is updated: a bad gradient raises with nothing modified.
        collected = []
        created: list[Tensor] = []
        try:
            for group_index, group in enumerate(self.param_groups):
                lists: tuple[list[Tensor], ...] = ([], [], [], [], [])
                self._init_group(group_index, group, *lists, created)
                collected.append(lists)
        except Exception:
            for param in created:
                del self.state[param]
            raise
        for group, (params, grads, exp_avgs, exp_avg_sqs, state_steps) in zip(self.param_groups, collected):
            beta1, beta2 = group["betas"]
            ndadam(
                params, grads, exp_avgs, exp_avg_sqs, state_steps,
                vector=group["vector"], lr=group["lr"], beta1=beta1, beta2=beta2,
                eps=group["eps"], weight_decay=group["weight_decay"], backend=group["backend"],
            )
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; vector state keeps its fp32 (fp64) dtype whatever the param's dtype."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) == len(self.param_groups):
            id_to_param = {
                saved_id: (param, saved_group.get("vector", group["vector"]), group_index, param_index)
                for group_index, (saved_group, group) in enumerate(zip(saved_groups, self.param_groups))
                for param_index, (saved_id, param) in enumerate(zip(saved_group["params"], group["params"]))
            }
            for saved_id, saved_state in state_dict["state"].items():
                if saved_id not in id_to_param:
                    continue
                param, vector, group_index, param_index = id_to_param[saved_id]
                expected = {
                    "exp_avg": tuple(param.shape),
                    "exp_avg_sq": (param.shape[0],) if vector else tuple(param.shape),
                }
                for key, shape in expected.items():
                    value = saved_state.get(key)
                    if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                        found = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
                        raise ValueError(
                            f"NDAdam.load_state_dict: state '{key}' of "
                            f"{_describe(param, None, group_index, param_index)} is {found}, expected "
                            f"shape {list(shape)}; is this the state of a different optimizer or model?"
                        )
        else:
            id_to_param = {}
        super().load_state_dict(state_dict)
        # torch casts every floating state tensor to the param's dtype; vector state stays fp32.
        for saved_id, saved_state in state_dict["state"].items():
            if saved_id not in id_to_param:
                continue
            param, vector, _, _ = id_to_param[saved_id]
            for key in ("exp_avg", "exp_avg_sq"):
                self.state[param][key] = saved_state[key].to(device=param.device, dtype=_state_dtype(param, vector))
            step = self.state[param].get("step")
            if isinstance(step, Tensor):
                self.state[param]["step"] = step.to(device=param.device, dtype=torch.float32)


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
    backend: str = "auto",
) -> None:
    r"""Functional ND-Adam: one step over one group's tensors, in place.

    Args:
        params: the group's tensors that have a gradient.
        grads: their gradients (never modified).
        exp_avgs: first moments, shaped like ``params`` (fp32 for vectors, fp64 for fp64).
        exp_avg_sqs: second moments: shape ``[p.shape[0]]`` for vectors, ``p.shape`` for scalars.
        state_steps: one 0-dim step tensor per param; each is incremented.
        vector: True for a vector group (Algorithm 1), False for scalars (Adam with L2).
        weight_decay: applied to scalars only; on unit rows it is removed by the projection.
        backend: a name from :data:`ndadam_fused.backends.BACKEND_NAMES` or ``"auto"``.
    """
    if not params:
        return
    implementation = backends.resolve(backend, params[0].device)
    if vector:
        implementation.vector_step(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps
        )
    else:
        implementation.scalar_step(
            params, grads, exp_avgs, exp_avg_sqs, state_steps,
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        )

