"""Distributed tensors: what a DTensor's placements mean for ND-Adam's rows, and the step on them.

This is the one module of the package that reads ``DTensor`` placements (DESIGN.md section 6);
the kernels only ever see plain local tensors. A vector tensor ``p`` with ``unit_dim`` ``u`` has
one row per index of dim ``u`` (see :mod:`ndadam_fused.rows`). Per mesh dim, its placement is:

- ``Replicate()``: every rank holds every row of the other mesh dims' piece;
- ``Shard(u)`` (and ``_StridedShard(u)``, which FSDP2 uses over tensor parallelism): the rows are
  divided among ranks, each row stays whole on its rank;
- ``Shard(d)`` with ``d != u``: every row is split across the ranks of that mesh dim;
- anything else (``Partial``): refused, naming the parameter and its placements.

**Rows whole** (no mesh dim splits rows; FSDP2's ``fully_shard`` gives ``Shard(0)``, uneven,
possibly 0 local rows): state is made as DTensors (``exp_avg`` with the param's placements,
``exp_avg_sq`` ``[rows]`` with ``Shard(0)`` where the param shards rows, else ``Replicate()``),
and the backend's ``vector_step`` steps the local tensors: no communication at all.

**Rows split**: two phases per group and step. ``row_statistics`` writes the six statistics of
every local row ``[a, b, c, d, e, f] = [ḡ·w, ḡ·ḡ, w·w, m·w, m·m, m·ḡ]`` (each a sum over the
row's local elements) into ONE buffer ``[Σ rows, 6]``; ONE sum all-reduce over the mesh dims
that split rows makes them the full rows' statistics (24 bytes per fp32 row); then
``apply_row_statistics`` finishes with the closed forms of DESIGN.md section 4::

    ||g||² = b - 2a² + a²c                 m·g = f - a·d              w·g = a - a·c
    v'     = β2 v + (1-β2) ||g||²          s = α / (1-β1^t) / (sqrt(v' / (1-β2^t)) + ε)
    ||m'||² = β1² e + 2β1(1-β1)(m·g) + (1-β1)² ||g||²      w·m' = β1 d + (1-β1)(w·g)
    ||w̄||² = c - 2s (w·m') + s² ||m'||²
    m' = β1 m + (1-β1)(ḡ - a w)            w' = (w - s m') / ||w̄||   (w' = w where lr = 0 or m' = 0)

Every rank of a split row computes the same ``v'`` and ``||w̄||`` from the same reduced
statistics, so the replicas of ``exp_avg_sq`` stay bit-identical.

Construction (:func:`row_sums_of_squares`, :func:`agreed_zero_rows`): the all-zero-row check
runs on local rows (split rows: on sums of squares all-reduced over the splitting mesh dims),
and its verdict is agreed by one all-reduce of the per-tensor counts over each mesh, so that
every rank raises together or none does. Tensors on the meta device hold no values: they are
neither checked nor normalized (the first step, or :func:`ndadam_fused.normalize_rows_` once
they are materialized, does it).
"""

from __future__ import annotations

import math
import sys
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "RowLayout",
    "agreed_zero_rows",
    "is_dtensor",
    "local",
    "new_vector_state",
    "normalize_local_rows_",
    "row_layout",
    "row_sums_of_squares",
    "scalar_step",
    "vector_step",
]

#: Statistics per row in the rows-split step's buffer: a, b, c, d, e, f.
ROW_STATISTICS = 6

if torch.distributed.is_available():
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard

    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # older torch: FSDP2 over tensor parallelism cannot produce it either
        _StridedShard = None
else:  # a torch build without distributed support has no DTensors
    dist = None
    DTensor = None


class _NoDTensor:
    """Stands for DTensor where torch has none: no tensor is an instance."""


DTENSOR_TYPE: type = DTensor if DTensor is not None else _NoDTensor
#: Types that are never DTensors. isinstance() against a tensor class goes through torch's
#: metaclass (about 0.2 us); a set lookup of type() settles the common case first (0.03 us), which
#: counts in loops over thousands of parameters per step.
PLAIN_TENSOR_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})


def is_dtensor(tensor: Any) -> bool:
    return type(tensor) not in PLAIN_TENSOR_TYPES and isinstance(tensor, DTENSOR_TYPE)


def local(tensor: Tensor) -> Tensor:
    """The rank's own piece of a DTensor (its memory, not a copy); a plain tensor as it is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def _sharded_dim(placement: Any) -> int | None:
    """The tensor dim a Shard-like placement splits; None for Replicate; raises for the rest."""
    if placement.is_replicate():
        return None
    if isinstance(placement, Shard) or (_StridedShard is not None and isinstance(placement, _StridedShard)):
        return placement.dim
    raise _PlacementError(placement)


class _PlacementError(Exception):
    def __init__(self, placement: Any) -> None:
        super().__init__(placement)
        self.placement = placement


@dataclass(frozen=True)
class RowLayout:
    """Where the rows of one DTensor vector parameter live.

    ``row_mesh_dims``: mesh dims that divide the rows among ranks (each row whole on its rank);
    ``split_mesh_dims``: mesh dims that split every row across ranks.
    """

    mesh: Any
    placements: tuple[Any, ...]
    row_mesh_dims: tuple[int, ...]
    split_mesh_dims: tuple[int, ...]

    @property
    def rows_split(self) -> bool:
        return bool(self.split_mesh_dims)

    @property
    def replicas(self) -> int:
        """How many ranks of the mesh hold each row (or each piece of a split row)."""
        return self.mesh.size() // math.prod(self.mesh.size(d) for d in self.row_mesh_dims)


def _placement_error(param: Tensor, placement: Any, where: str, what: str) -> ValueError:
    return ValueError(
        f"NDAdam: {where} is a DTensor with placements {tuple(param.placements)} on {param.device_mesh}; "
        f"its placement {placement} is not supported for {what}: NDAdam steps DTensors whose placements "
        "are Replicate() or Shard(d) (FSDP2's fully_shard, tensor parallelism). Redistribute it, e.g. "
        "to Replicate(), or keep it out of the optimizer."
    )


def check_placements(param: Tensor, vector: bool, unit_dim: int, where: str) -> None:
    """Raise ValueError, naming the parameter and its placements, for placements the step cannot take."""
    if vector:
        row_layout(param, unit_dim, where)
        return
    for placement in param.placements:
        try:
            _sharded_dim(placement)
        except _PlacementError:
            raise _placement_error(param, placement, where, "a parameter") from None


def row_layout(param: Tensor, unit_dim: int, where: str = "a parameter") -> RowLayout:
    """How the placements of DTensor ``param`` lay out its rows (``unit_dim`` indexes them)."""
    row_mesh_dims, split_mesh_dims = [], []
    for mesh_dim, placement in enumerate(param.placements):
        try:
            dim = _sharded_dim(placement)
        except _PlacementError:
            raise _placement_error(param, placement, where, "a vector parameter (rows of unit norm)") from None
        if dim is None:
            continue
        if dim % param.dim() == unit_dim:
            row_mesh_dims.append(mesh_dim)
        else:
            split_mesh_dims.append(mesh_dim)
    return RowLayout(param.device_mesh, tuple(param.placements), tuple(row_mesh_dims), tuple(split_mesh_dims))


def _exp_avg_sq_placements(layout: RowLayout) -> tuple[Any, ...]:
    """``[rows]``: sharded like the param's rows where the param shards them, replicated elsewhere."""
    placements = []
    for mesh_dim, placement in enumerate(layout.placements):
        if mesh_dim not in layout.row_mesh_dims:
            placements.append(Replicate())
        elif _StridedShard is not None and isinstance(placement, _StridedShard):
            # The same interleaving of row indices (tested first: older torch derives it from Shard).
            placements.append(_StridedShard(0, split_factor=placement.split_factor))
        else:
            placements.append(Shard(0))
    return tuple(placements)


def new_vector_state(param: Tensor, unit_dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Zero ``(exp_avg, exp_avg_sq)`` DTensors for vector DTensor ``param``, made from local tensors.

    ``exp_avg``: the param's shape and placements, rows contiguous in memory (the kernels'
    layout); ``exp_avg_sq``: ``[rows]``, see :func:`_exp_avg_sq_placements`. No communication:
    global shapes and strides are given, so uneven shards need no all-gather of sizes.
    """
    from .rows import new_exp_avg

    layout = row_layout(param, unit_dim)
    local_param = param.to_local()
    local_exp_avg = new_exp_avg(local_param, unit_dim, dtype)
    global_stride = new_exp_avg(torch.empty(param.shape, device="meta"), unit_dim, dtype).stride()
    exp_avg = DTensor.from_local(
        local_exp_avg, layout.mesh, layout.placements, run_check=False, shape=param.shape, stride=global_stride
    )
    local_exp_avg_sq = torch.zeros(local_param.shape[unit_dim], dtype=dtype, device=local_param.device)
    exp_avg_sq = DTensor.from_local(
        local_exp_avg_sq, layout.mesh, _exp_avg_sq_placements(layout), run_check=False,
        shape=torch.Size([param.shape[unit_dim]]), stride=(1,),
    )
    return exp_avg, exp_avg_sq


def local_grad(param: Tensor, grad: Tensor) -> Tensor:
    """The local piece of ``grad`` laid out as ``param``'s: a gradient with other placements
    (a ``Partial`` sum left by tensor parallelism) is redistributed first, as torch's own
    optimizers do implicitly through DTensor ops."""
    if not is_dtensor(grad):
        return grad
    if grad.placements != param.placements or grad.device_mesh != param.device_mesh:
        grad = grad.redistribute(param.device_mesh, param.placements)
    return grad.to_local()


def _all_reduce(buffer: Tensor, mesh: Any, mesh_dims: Sequence[int]) -> None:
    """Sum ``buffer`` over the ranks that differ only in ``mesh_dims`` of ``mesh``: one all-reduce
    (one per mesh dim where several dims of a mesh that is not the whole world are involved)."""
    if len(mesh_dims) == mesh.ndim and mesh.size() == dist.get_world_size():
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        return
    for mesh_dim in mesh_dims:
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=mesh.get_group(mesh_dim))


def _grouped(keys: Sequence[Any]) -> list[tuple[Any, list[int]]]:
    """Indices grouped by key, groups in order of first appearance (the same on every rank)."""
    groups: dict[Any, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.items())


def _mesh_key(mesh: Any) -> Any:
    # DeviceMesh compares by its ranks and layout; equal meshes share one collective.
    return mesh


# ---- Construction: checks and normalization -------------------------------------------------


def row_sums_of_squares(params: Sequence[Tensor], unit_dims: Sequence[int]) -> list[Tensor | None]:
    """Per DTensor: the fp64 sums of squares of its local rows, shape ``[local rows]``.

    For rows split across ranks the sums are all-reduced over the splitting mesh dims (one
    all-reduce per mesh and set of dims for all such tensors), so they are the full rows'. None
    for a tensor on the meta device (no values to read).
    """
    from .rows import unit_rows

    sums: list[Tensor | None] = []
    split_keys: list[Any] = []
    for param, unit_dim in zip(params, unit_dims):
        local_param = param.to_local()
        if local_param.is_meta:
            sums.append(None)
            split_keys.append(None)
            continue
        sums.append(unit_rows(local_param.detach(), unit_dim).double().square().sum(dim=1))
        layout = row_layout(param, unit_dim)
        split_keys.append((_mesh_key(layout.mesh), layout.split_mesh_dims) if layout.rows_split else None)
    for key, indices in _grouped(split_keys):
        if key is None:
            continue
        mesh, mesh_dims = key
        buffer = torch.cat([sums[i] for i in indices])
        _all_reduce(buffer, mesh, mesh_dims)
        for i, piece in zip(indices, buffer.split([sums[i].numel() for i in indices])):
            sums[i] = piece
    return sums


def agreed_zero_rows(params: Sequence[Tensor], unit_dims: Sequence[int], sums: Sequence[Tensor | None]) -> list[tuple[int, int]]:
    """Per DTensor: (all-zero rows in the whole tensor, this rank's first such local row or -1).

    The counts are summed by one all-reduce per mesh (over every rank of the mesh), so every rank
    gets the same verdict and raises together: an error on one rank alone would leave the others
    waiting in the step's first collective. Meta tensors count 0.
    """
    local_counts = []
    firsts = []
    for row_sums in sums:
        if row_sums is None:
            local_counts.append(0)
            firsts.append(-1)
            continue
        is_zero = row_sums == 0
        count = int(is_zero.sum())
        local_counts.append(count)
        firsts.append(int(is_zero.to(torch.int8).argmax()) if count else -1)
    layouts = [row_layout(p, u) for p, u in zip(params, unit_dims)]
    totals = [0] * len(params)
    for mesh, indices in _grouped([_mesh_key(layout.mesh) for layout in layouts]):
        device = params[indices[0]].to_local().device
        if device.type == "meta":
            device = torch.device(mesh.device_type)
        counts = torch.tensor([local_counts[i] for i in indices], dtype=torch.int64, device=device)
        _all_reduce(counts, mesh, range(mesh.ndim))
        for i, total in zip(indices, counts.tolist()):
            totals[i] = total // layouts[i].replicas
    return list(zip(totals, firsts))


def normalize_local_rows_(param: Tensor, unit_dim: int, row_sums: Tensor | None) -> None:
    """Divide every row of DTensor ``param`` by its norm, in place, on local data only.

    Rows whole: exactly what one process does to the same rows (:func:`ndadam_fused.rows._normalize_`
    on the local tensor). Rows split: from ``row_sums``, the all-reduced sums of squares of
    :func:`row_sums_of_squares`; a row already unit within rounding keeps its bits.
    """
    from .rows import _normalize_, state_dtype, unit_rows, unit_tolerance

    local_param = param.to_local()
    if row_sums is None or local_param.numel() == 0:
        return
    if not row_layout(param, unit_dim).rows_split:
        _normalize_(local_param, unit_dim)
        return
    moved = local_param.movedim(unit_dim, 0)
    rows = unit_rows(local_param, unit_dim)
    norms = row_sums.sqrt().unsqueeze(1)
    already_unit = (norms - 1).abs() <= unit_tolerance(param.dtype, param.numel() // param.shape[unit_dim])
    compute_dtype = state_dtype(param, True)
    divisor = torch.where(already_unit, torch.ones_like(norms), norms).to(compute_dtype)
    moved.copy_((rows.to(compute_dtype) / divisor).view(moved.shape))


# ---- The step ---------------------------------------------------------------------------------


def vector_step(
    implementation: ModuleType,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    unit_dim: int,
    backend: str,
    row_buffers: MutableMapping[Tensor, Tensor] | None,
    master_params: list[Tensor] | None = None,
    rounding_seeds: list[Tensor] | None = None,
    **options: Any,
) -> None:
    """One ND-Adam step of a vector group holding DTensors (and possibly plain tensors).

    Rows whole (and plain tensors): ONE ``implementation.vector_step`` call on the local tensors,
    no communication. Rows split: :func:`_rows_split_step`. ``options``: the backends'
    hyperparameter and GradScaler arguments (``hyper``, ``beta1``, ``beta2``, ``eps``,
    ``grad_scale``, ``found_inf``).
    """
    from .rows import RowMajorViews

    whole, split = [], []
    for index, param in enumerate(params):
        if is_dtensor(param) and row_layout(param, unit_dim).rows_split:
            split.append(index)
        else:
            whole.append(index)
    # A rank may hold none of a tensor's rows (FSDP2's uneven Shard(0)): its step still counts,
    # but the kernels only ever see tensors with elements.
    found_inf = options.get("found_inf")
    for index in [i for i in whole if local(params[i]).numel() == 0]:
        # A skipped step (GradScaler found an inf) does not count, as in the kernels; no host read.
        state_steps[index] += 1 if found_inf is None else (found_inf.to(state_steps[index].device) == 0).float()
    whole = [i for i in whole if local(params[i]).numel()]
    if whole:
        masters = None if master_params is None else [local(master_params[i]) for i in whole]
        views = RowMajorViews(
            [local(params[i]) for i in whole], [local_grad(params[i], grads[i]) for i in whole],
            [local(exp_avgs[i]) for i in whole], unit_dim, row_buffers, masters, keys=[params[i] for i in whole],
        )
        implementation.vector_step(
            views.params, views.grads, views.exp_avgs, [local(exp_avg_sqs[i]) for i in whole],
            [state_steps[i] for i in whole], master_params=views.master_params,
            rounding_seeds=None if rounding_seeds is None else [rounding_seeds[i] for i in whole], **options,
        )
        views.finish()
    if split:
        from . import backends

        _rows_split_step(
            backends.resolve_row_split(backend, local(params[split[0]]).device),
            [params[i] for i in split], [grads[i] for i in split], [exp_avgs[i] for i in split],
            [exp_avg_sqs[i] for i in split], [state_steps[i] for i in split],
            master_params=None if master_params is None else [master_params[i] for i in split],
            rounding_seeds=None if rounding_seeds is None else [rounding_seeds[i] for i in split],
            unit_dim=unit_dim, row_buffers=row_buffers, **options,
        )


def _rows_split_step(
    implementation: ModuleType,
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
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    master_params: list[Tensor] | None,
    rounding_seeds: list[Tensor] | None,
    unit_dim: int,
    row_buffers: MutableMapping[Tensor, Tensor] | None,
) -> None:
    """The two-phase step for DTensors whose rows are split across ranks (see the module doc).

    Tensors are grouped by (mesh, splitting mesh dims, state dtype): one statistics buffer and
    one all-reduce per such group (a model has one). Within a group, tensors of one param dtype
    are adjacent in the buffer, so that a backend steps each dtype with one call. GradScaler's
    ``grad_scale`` unscales the gradients in both phases; with ``found_inf`` set the all-reduce
    still runs (every rank takes part in it), and the apply phase changes nothing. Master copies
    (DTensors laid out like their params) are stepped through their local pieces.
    """
    from .rows import RowMajorViews, state_dtype

    layouts = [row_layout(p, unit_dim) for p in params]
    keys = [
        (_mesh_key(layout.mesh), layout.split_mesh_dims, state_dtype(p, True))
        for layout, p in zip(layouts, params)
    ]
    views = RowMajorViews(
        [local(p) for p in params], [local_grad(p, g) for p, g in zip(params, grads)],
        [local(m) for m in exp_avgs], unit_dim, row_buffers,
        None if master_params is None else [local(m) for m in master_params], keys=params,
    )
    for (mesh, mesh_dims, dtype), indices in _grouped(keys):
        indices = sorted(indices, key=lambda i: str(params[i].dtype))
        group_params = [views.params[i] for i in indices]
        rows = sum(p.shape[0] for p in group_params)
        statistics = torch.empty((rows, ROW_STATISTICS), dtype=dtype, device=group_params[0].device)
        group_grads = [views.grads[i] for i in indices]
        group_exp_avgs = [views.exp_avgs[i] for i in indices]
        group_masters = None if views.master_params is None else [views.master_params[i] for i in indices]
        implementation.row_statistics(
            group_params, group_grads, group_exp_avgs, statistics, grad_scale=grad_scale, master_params=group_masters
        )
        _all_reduce(statistics, mesh, mesh_dims)
        implementation.apply_row_statistics(
            group_params, group_grads, group_exp_avgs, [local(exp_avg_sqs[i]) for i in indices],
            [state_steps[i] for i in indices], statistics, hyper=hyper, beta1=beta1, beta2=beta2, eps=eps,
            grad_scale=grad_scale, found_inf=found_inf, master_params=group_masters,
            rounding_seeds=None if rounding_seeds is None else [rounding_seeds[i] for i in indices],
        )
    views.finish()


def scalar_step(
    implementation: ModuleType,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    **hyperparameters: Any,
) -> None:
    """Adam on the local pieces: elementwise, so every Replicate/Shard placement steps locally."""
    masters = hyperparameters.pop("master_params", None)
    implementation.scalar_step(
        [local(p) for p in params], [local_grad(p, g) for p, g in zip(params, grads)],
        [local(m) for m in exp_avgs], [local(v) for v in exp_avg_sqs], state_steps,
        master_params=None if masters is None else [local(m) for m in masters], **hyperparameters,
    )


# ---- ZeroRedundancyOptimizer ------------------------------------------------------------------


def zero_redundancy_owner() -> Any | None:
    """The ``ZeroRedundancyOptimizer`` whose constructor is building an NDAdam right now, or None.

    ZeRO builds ``optimizer_class(groups_of_this_rank, **defaults)`` from its own constructor
    (``_init_local_optimizer``), with no argument that says so; the caller's frames do.
    """
    if dist is None:
        return None
    from torch.distributed.optim import ZeroRedundancyOptimizer

    frame = sys._getframe(1)
    for _ in range(12):  # NDAdam.__init__ <- _init_local_optimizer <- ZeroRedundancyOptimizer.__init__
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, ZeroRedundancyOptimizer):
            return owner
        frame = frame.f_back
    return None


def check_zero_redundancy_groups(param_groups: Sequence[Any]) -> None:
    """Under ZeRO every param group must say whether it holds vectors: ZeRO maps the groups of
    each rank's optimizer one to one onto its own, so NDAdam cannot split a group in two. And
    ZeRO copies its keyword arguments into every group, so a ``vector_lr`` given to it would
    reach every group: each group carries its own ``lr`` instead."""
    for index, group in enumerate(param_groups):
        if isinstance(group, dict) and group.get("vector_lr") is not None:
            raise ValueError(
                f"NDAdam under ZeroRedundancyOptimizer: param group {index} has vector_lr="
                f"{group['vector_lr']!r}. ZeRO copies its keyword arguments into every param group, so the "
                "vector groups cannot be told apart from the rest by it: give each group its own 'lr', e.g. "
                "groups from ndadam_fused.param_groups(model, lr=1e-3, vector_lr=0.05), and no vector_lr "
                "to ZeroRedundancyOptimizer."
            )
        if not isinstance(group, dict) or "vector" not in group:
            raise ValueError(
                f"NDAdam under ZeroRedundancyOptimizer: param group {index} has no 'vector' key. ZeRO maps the "
                "param groups of each rank's optimizer one to one onto its own, so NDAdam cannot split a group "
                "into vector and scalar groups there. Pass groups that say what they hold, e.g. "
                "ZeroRedundancyOptimizer([{**g, 'params': [p for _, p in g['params']]} for g in "
                "ndadam_fused.param_groups(model, lr=1e-3, vector_lr=0.05)], optimizer_class=NDAdam), or "
                "[{'params': weights, 'vector': True, 'lr': 0.05}, {'params': others, 'vector': False, 'lr': 1e-3}]."
            )


@torch.no_grad()
def normalize_zero_redundancy_replicas_(zero: Any) -> None:
    """Normalize the rows of EVERY vector parameter of ZeRO's groups, on every rank.

    Each rank's NDAdam owns (and would normalize) only its partition, but every rank runs the
    forward pass with all parameters: their replicas must all start with unit rows. The replicas
    are identical on all ranks and so are the results; the owners' NDAdam then finds its rows
    unit and leaves their bits alone. An all-zero row raises on every rank alike.
    """
    from .rows import normalize_rows_unchecked_, zero_rows

    vector_groups = [(i, g) for i, g in enumerate(zero.param_groups) if g.get("vector")]
    for group_index, group in vector_groups:
        for param_index, param in enumerate(group["params"]):
            if param.requires_grad and param.numel() and not param.is_meta:
                count, first = zero_rows(param, group.get("unit_dim", 0))
                if count:
                    raise ValueError(
                        f"NDAdam: ZeroRedundancyOptimizer's param_groups[{group_index}]['params'][{param_index}] "
                        f"(shape {list(param.shape)}) has an all-zero row ({count} in all, the first is row {first}); "
                        "a zero row cannot be normalized. Initialize it with nonzero values, or put it in a group "
                        "with 'vector': False."
                    )
    for _, group in vector_groups:
        normalize_rows_unchecked_(
            [p for p in group["params"] if p.requires_grad and p.numel()], group.get("unit_dim", 0)
        )
