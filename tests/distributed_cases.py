"""Jobs the distributed tests run on every rank of a gloo worker pool (tests/distributed_harness.py).

Each job builds its own device mesh, runs the same problem distributed and in one process (on
every rank, from the same seeds, without communication), and returns what the test asserts on:
errors against the one-process run, counts of collectives, error messages. Jobs that expect an
error return its message rather than raising, so that the test sees every rank's.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from ndadam_fused import NDAdam, normalize_rows_

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
BETAS = (0.9, 0.99)

# Odd row counts and lengths: uneven shards on 2 ranks (5 -> 3 + 2 rows or columns), a 1-row
# tensor (rank 1 holds 0 of its rows under Shard(0)), a conv kernel, a tensor whose Shard(1)
# leaves rank 1 no column at all ((3, 1, 5)), and scalars (a bias; a 1-element gain).
VECTOR_SHAPES = [(5, 7), (1, 6), (3, 4, 3, 3), (3, 1, 5), (6, 5, 2)]
SCALAR_SHAPES = [(5,), (1,)]


def _mesh_1d():
    return init_device_mesh("cpu", (dist.get_world_size(),))


def _full_values(shapes, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in shapes]


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.full_tensor() if isinstance(a, DTensor) else a
    b = b.full_tensor() if isinstance(b, DTensor) else b
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _errors(dist_params, plain_params, dist_opt, plain_opt) -> dict[str, float]:
    errors = {"param": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0, "step": 0.0}
    for p, q in zip(dist_params, plain_params):
        errors["param"] = max(errors["param"], _max_abs(p.detach(), q.detach()))
        state, plain_state = dist_opt.state[p], plain_opt.state[q]
        for key in ("exp_avg", "exp_avg_sq"):
            errors[key] = max(errors[key], _max_abs(state[key], plain_state[key]))
        errors["step"] = max(errors["step"], abs(state["step"].item() - plain_state["step"].item()))
    return errors


def _collectives(mode: CommDebugMode) -> dict[str, int]:
    return {str(op): count for op, count in mode.get_comm_counts().items()}


def _replicas_identical(tensors: list[torch.Tensor]) -> bool:
    """Whether every rank holds the same bits in ``tensors`` (checked with one all-gather)."""
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors]) if tensors else torch.zeros(0)
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered)


# ---- The optimizer alone: explicit gradients, every placement ---------------------------------


def explicit_gradients(placement: str, backend: str, dtype_name: str, steps: int = 25) -> dict:
    """Train ``VECTOR_SHAPES`` + ``SCALAR_SHAPES`` as DTensors with ``placement`` on a 1-D mesh and
    as plain tensors in one process, with the same seeded full gradients; returns the errors,
    the collectives of the last step and whether the replicas of split rows' state agree."""
    dtype = getattr(torch, dtype_name)
    mesh = _mesh_1d()
    vector_placement = {"shard0": Shard(0), "shard1": Shard(1), "replicate": Replicate()}[placement]
    scalar_placement = Replicate() if placement == "replicate" else Shard(0)
    full = _full_values(VECTOR_SHAPES + SCALAR_SHAPES, dtype, seed=1)
    placements = [vector_placement] * len(VECTOR_SHAPES) + [scalar_placement] * len(SCALAR_SHAPES)
    dist_params = [nn.Parameter(distribute_tensor(x.clone(), mesh, [pl])) for x, pl in zip(full, placements)]
    plain_params = [nn.Parameter(x.clone()) for x in full]

    def groups(params):
        return [
            {"params": params[: len(VECTOR_SHAPES)], "vector": True, "lr": 0.05},
            {"params": params[len(VECTOR_SHAPES) :], "vector": False, "lr": 0.01},
        ]

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*rows of length 1")
        dist_opt = NDAdam(groups(dist_params), betas=BETAS, weight_decay=1e-3, backend=backend)
        plain_opt = NDAdam(groups(plain_params), betas=BETAS, weight_decay=1e-3, backend=backend)
    after_construction = max(_max_abs(p.detach(), q.detach()) for p, q in zip(dist_params, plain_params))
    generator = torch.Generator().manual_seed(2)
    mode = None
    for step in range(steps):
        grads = [torch.randn(x.shape, generator=generator, dtype=torch.float64).to(dtype) for x in full]
        for p, q, g, pl in zip(dist_params, plain_params, grads, placements):
            p.grad = distribute_tensor(g.clone(), mesh, [pl])
            q.grad = g.clone()
        if step == steps - 1:
            mode = CommDebugMode()
            with mode:
                dist_opt.step()
        else:
            dist_opt.step()
        plain_opt.step()
    errors = _errors(dist_params, plain_params, dist_opt, plain_opt)
    local_rows = [p.to_local().shape[0] for p in dist_params[: len(VECTOR_SHAPES)]]
    return {
        "errors": errors,
        "after_construction": after_construction,
        "collectives": _collectives(mode),
        "steps": [dist_opt.state[p]["step"].item() for p in dist_params],
        "local_rows": local_rows,
        "local_numel": [p.to_local().numel() for p in dist_params],
        # Where every rank holds every row (or a piece of it), its second moments must agree bit for bit.
        "state_replicas_identical": None if placement == "shard0" else _replicas_identical(
            [dist_opt.state[p]["exp_avg_sq"].to_local() for p in dist_params[: len(VECTOR_SHAPES)]]
        ),
        "state_is_dtensor": all(
            isinstance(dist_opt.state[p][key], DTensor) for p in dist_params for key in ("exp_avg", "exp_avg_sq")
        ),
        "exp_avg_sq_placements": [str(dist_opt.state[p]["exp_avg_sq"].placements) for p in dist_params[: len(VECTOR_SHAPES)]],
    }


def unit_dim_one(placement: str, backend: str) -> dict:
    """A weight stored ``[in, out]`` (unit_dim 1): Shard(1) keeps its rows whole, Shard(0) splits them."""
    mesh = _mesh_1d()
    dtype = torch.float64
    full = _full_values([(7, 5), (6, 3)], dtype, seed=3)
    pl = Shard(0) if placement == "shard0" else Shard(1)
    dist_params = [nn.Parameter(distribute_tensor(x.clone(), mesh, [pl])) for x in full]
    plain_params = [nn.Parameter(x.clone()) for x in full]
    dist_opt = NDAdam([{"params": dist_params, "vector": True, "unit_dim": 1}], lr=0.05, betas=BETAS, backend=backend)
    plain_opt = NDAdam([{"params": plain_params, "vector": True, "unit_dim": 1}], lr=0.05, betas=BETAS, backend=backend)
    generator = torch.Generator().manual_seed(4)
    for _ in range(10):
        for p, q in zip(dist_params, plain_params):
            g = torch.randn(p.shape, generator=generator, dtype=dtype)
            p.grad = distribute_tensor(g.clone(), mesh, [pl])
            q.grad = g
        mode = CommDebugMode()
        with mode:
            dist_opt.step()
        plain_opt.step()
    return {
        "errors": _errors(dist_params, plain_params, dist_opt, plain_opt),
        "collectives": _collectives(mode),
        # [in, out] weights step through row-major work buffers, kept from step to step under
        # the DTensor parameter itself (one per parameter, however many steps).
        "buffer_keys": sorted(type(key).__name__ for key in dist_opt._row_buffers),
    }


# ---- FSDP2 and tensor parallelism on models ---------------------------------------------------


class OddNet(nn.Module):
    """Conv and linear layers with odd row counts: on 2 ranks, 5 output channels split 3 + 2,
    7 rows 4 + 3, and the 1-row head leaves rank 1 no row at all."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.fc = nn.Linear(5, 7)
        self.head = nn.Linear(7, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc(x)))


def _batches(steps: int, batch: int, dtype, seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 3, 6, 6, generator=generator, dtype=torch.float64).to(dtype),
         torch.randn(batch, 1, generator=generator, dtype=torch.float64).to(dtype))
        for _ in range(steps)
    ]


def _train(model, opt, batches, rank_slice=slice(None)) -> None:
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x[rank_slice]), y[rank_slice])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _fsdp(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for module in model.children():
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full_state(model, opt) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = [p.detach().full_tensor() if isinstance(p, DTensor) else p.detach().clone() for p in model.parameters()]
    state = []
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            value = opt.state[p][key]
            state.append(value.full_tensor() if isinstance(value, DTensor) else value.clone())
    return params, state


def _model_errors(model, reference) -> float:
    return max(_max_abs(p.detach(), q.detach()) for p, q in zip(model.parameters(), reference.parameters()))


def fsdp_parity(backend: str, dtype_name: str, steps: int = 25) -> dict:
    """FSDP2 (``fully_shard``, Shard(0), uneven) training vs one process on the whole batch."""
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(6)
    reference = OddNet().to(dtype)
    model = OddNet().to(dtype)
    model.load_state_dict(reference.state_dict())
    _fsdp(model, _mesh_1d())
    opt = NDAdam(model.parameters(), lr=0.01, vector_lr=0.05, betas=BETAS, backend=backend)
    reference_opt = NDAdam(reference.parameters(), lr=0.01, vector_lr=0.05, betas=BETAS, backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = _batches(steps, 4 * world, dtype)
    per_rank = slice(4 * rank, 4 * (rank + 1))
    _train(model, opt, batches[:-1], per_rank)
    _train(reference, reference_opt, batches[:-1])
    # The last step with the collectives counted: FSDP2's own all-gather and reduce-scatter run
    # in forward and backward, none in NDAdam's step.
    x, y = batches[-1]
    torch.nn.functional.mse_loss(model(x[per_rank]), y[per_rank]).backward()
    mode = CommDebugMode()
    with mode:
        opt.step()
    opt.zero_grad(set_to_none=True)
    _train(reference, reference_opt, batches[-1:])
    head = model.head.weight
    return {
        "error": _model_errors(model, reference),
        "step_collectives": _collectives(mode),
        "head_local_rows": head.to_local().shape[0],
        "head_step": opt.state[head]["step"].item(),
        "head_state_local_shapes": [tuple(opt.state[head][k].to_local().shape) for k in ("exp_avg", "exp_avg_sq")],
    }


class MLP(nn.Module):
    """Tensor parallel as Megatron: ``up`` ColwiseParallel (rows whole: Shard(0)), ``down``
    RowwiseParallel (every row split: Shard(1)), then a LayerNorm (replicated)."""

    def __init__(self, width: int = 6, hidden: int = 8, out: int = 5) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, out)
        self.norm = nn.LayerNorm(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(torch.relu(self.up(x))))


def _tensor_parallel(model, mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    return parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})


def _mlp_batches(steps: int, batch: int, dtype, width: int = 6, out: int = 5, seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, width, generator=generator, dtype=torch.float64).to(dtype),
         torch.randn(batch, out, generator=generator, dtype=torch.float64).to(dtype))
        for _ in range(steps)
    ]


def tensor_parallel_parity(backend: str, dtype_name: str, steps: int = 25) -> dict:
    """parallelize_module (ColwiseParallel + RowwiseParallel) vs one process, same data on all ranks."""
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(8)
    reference = MLP().to(dtype)
    model = MLP().to(dtype)
    model.load_state_dict(reference.state_dict())
    _tensor_parallel(model, _mesh_1d())
    opt = NDAdam(model.parameters(), lr=0.01, vector_lr=0.05, betas=BETAS, backend=backend)
    reference_opt = NDAdam(reference.parameters(), lr=0.01, vector_lr=0.05, betas=BETAS, backend=backend)
    after_construction = _model_errors(model, reference)
    batches = _mlp_batches(steps, 4, dtype)
    _train(model, opt, batches[:-1])
    _train(reference, reference_opt, batches[:-1])
    x, y = batches[-1]
    torch.nn.functional.mse_loss(model(x), y).backward()
    mode = CommDebugMode()
    with mode:
        opt.step()
    opt.zero_grad(set_to_none=True)
    _train(reference, reference_opt, batches[-1:])
    return {
        "after_construction": after_construction,
        "error": _model_errors(model, reference),
        "step_collectives": _collectives(mode),
        "placements": {n: str(getattr(p, "placements", "plain")) for n, p in model.named_parameters()},
        "state_replicas_identical": _replicas_identical([opt.state[model.down.weight]["exp_avg_sq"].to_local()]),
    }


def fsdp_tensor_parallel_2d(backend: str, dtype_name: str, steps: int = 10) -> dict:
    """FSDP2 over data parallelism x tensor parallelism on a 2 x 2 mesh (4 ranks) vs one process."""
    from torch.distributed.fsdp import fully_shard

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(9)
    reference = MLP().to(dtype)
    model = MLP().to(dtype)
    model.load_state_dict(reference.state_dict())
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    _tensor_parallel(model, mesh["tp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = NDAdam(model.parameters(), lr=0.01, vector_lr=0.05, betas=BETAS, backend=backend)
    reference_opt = NDAdam(reference.parameters(), lr=0.01, vector_lr=0.05, betas=BETAS, backend=backend)
    dp_rank = mesh["dp"].get_local_rank()
    batches = _mlp_batches(steps, 4, dtype)
    _train(model, opt, batches[:-1], slice(2 * dp_rank, 2 * dp_rank + 2))
    _train(reference, reference_opt, batches[:-1])
    x, y = batches[-1]
    torch.nn.functional.mse_loss(model(x[2 * dp_rank : 2 * dp_rank + 2]), y[2 * dp_rank : 2 * dp_rank + 2]).backward()
    mode = CommDebugMode()
    with mode:
        opt.step()
    _train(reference, reference_opt, batches[-1:])
    return {
        "error": _model_errors(model, reference),
        "step_collectives": _collectives(mode),
        "placements": {n: str(getattr(p, "placements", "plain")) for n, p in model.named_parameters()},
    }


# ---- Construction: checks, normalization, meta-device init ---------------------------------


def zero_row_on_one_rank(placement: str) -> dict:
    """An all-zero row that only rank 1 holds (Shard(0)), or a row split over both ranks that is
    zero on rank 0's columns only (Shard(1): not an error) or on all of them (an error)."""
    mesh = _mesh_1d()
    full = _full_values([(5, 4), (3, 6)], torch.float32, seed=10)
    if placement == "shard0":
        full[0][4] = 0  # row 4: the second of rank 1's rows
        pl = Shard(0)
    elif placement == "shard1-partly":
        full[0][2, :2] = 0  # zero on rank 0's columns only: the row's norm is not
        pl = Shard(1)
    else:
        full[0][2] = 0
        pl = Shard(1)
    params = [nn.Parameter(distribute_tensor(x.clone(), mesh, [pl])) for x in full]
    before = [p.to_local().clone() for p in params]
    message = None
    try:
        NDAdam(params, lr=0.1)
    except ValueError as error:
        message = str(error)
    unchanged = all(torch.equal(b, p.to_local()) for b, p in zip(before, params))
    plain = [x.clone() for x in full]
    if message is None:
        normalize_rows_(plain)
    return {
        "message": message,
        "unchanged": unchanged,
        "error_vs_one_process": max(_max_abs(p.detach(), q) for p, q in zip(params, plain)),
    }


def normalize_idempotent(placement: str) -> dict:
    """Public normalize_rows_ on DTensors: one process's result, and a second call changes no bit."""
    mesh = _mesh_1d()
    full = _full_values([(5, 7), (3, 4, 3, 3), (1, 6)], torch.float32, seed=11)
    pl = Shard(0) if placement == "shard0" else Shard(1)
    params = [distribute_tensor(x.clone(), mesh, [pl]) for x in full]
    normalize_rows_(params)
    once = [p.to_local().clone() for p in params]
    mode = CommDebugMode()
    with mode:
        normalize_rows_(params)
    plain = [x.clone() for x in full]
    normalize_rows_(plain)
    return {
        "second_call_changed": sum(int((a != p.to_local()).sum()) for a, p in zip(once, params)),
        "error_vs_one_process": max(_max_abs(p, q) for p, q in zip(params, plain)),
        "collectives": _collectives(mode),
    }


def meta_device_init(backend: str) -> dict:
    """FSDP2 on a model built on the meta device: NDAdam is built before the weights exist; after
    ``to_empty`` and initialization, ``normalize_rows_`` gives one process's unit rows."""
    torch.manual_seed(12)
    reference = OddNet()
    with torch.device("meta"):
        model = OddNet()
    _fsdp(model, _mesh_1d())
    opt = NDAdam(model.parameters(), lr=0.01, vector_lr=0.05, betas=BETAS, backend=backend)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters()):
            p.copy_(distribute_tensor(q.detach().clone(), p.device_mesh, p.placements))
    opt.normalize_rows_()
    reference_opt = NDAdam(reference.parameters(), lr=0.01, vector_lr=0.05, betas=BETAS, backend=backend)
    after_init = _model_errors(model, reference)
    batches = _batches(5, 4 * dist.get_world_size(), torch.float32)
    rank = dist.get_rank()
    _train(model, opt, batches, slice(4 * rank, 4 * (rank + 1)))
    _train(reference, reference_opt, batches)
    return {"after_init": after_init, "error": _model_errors(model, reference)}


def refused_placement() -> dict:
    """A Partial DTensor: a clear error naming the parameter and its placements, nothing modified."""
    mesh = _mesh_1d()
    weight = nn.Parameter(DTensor.from_local(torch.randn(4, 3), mesh, [Partial()]))
    before = weight.to_local().clone()
    try:
        NDAdam([("encoder.weight", weight)], lr=0.1)
    except ValueError as error:
        return {"message": str(error), "unchanged": torch.equal(before, weight.to_local())}
    return {"message": None, "unchanged": torch.equal(before, weight.to_local())}


def missing_row_split_backend(backend: str, hidden: tuple[str, ...] = ()) -> dict:
    """A backend without the rows-split step, on a Shard(1) param: an error naming what is
    missing, raised before anything is modified (no state, params untouched). ``hidden``: the
    backend module's functions to take away for this job (every backend now has them)."""
    from ndadam_fused import backends

    module = backends._module(backend)
    taken = {name: getattr(module, name) for name in hidden}
    for name in hidden:
        delattr(module, name)
    try:
        return _missing_row_split_backend(backend)
    finally:
        for name, function in taken.items():
            setattr(module, name, function)


def _missing_row_split_backend(backend: str) -> dict:
    mesh = _mesh_1d()
    full = _full_values([(4, 6)], torch.float32, seed=13)[0]
    normalize_rows_(full)
    weight = nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(1)]))
    opt = NDAdam([weight], lr=0.1, backend=backend)
    weight.grad = distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)])
    before = weight.to_local().clone()
    message = None
    try:
        opt.step()
    except RuntimeError as error:
        message = str(error)
    return {"message": message, "unchanged": torch.equal(before, weight.to_local()), "state": len(opt.state)}


# ---- Distributed checkpoints --------------------------------------------------------------


def _dcp_init_changes(model, opt) -> int:
    """How many parameter elements DCP's state-initializing step (zero grads, lr 0) changes."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    before = [p.detach().to_local().clone() if isinstance(p, DTensor) else p.detach().clone() for p in model.parameters()]
    get_state_dict(model, opt)
    after = [p.detach().to_local() if isinstance(p, DTensor) else p.detach() for p in model.parameters()]
    assert len(opt.state) == len(before), "DCP's get_state_dict should have created the state"
    return sum(int((a != b).sum()) for a, b in zip(before, after))


def _checkpointed_model(layout: str, seed: int):
    """A model laid out for ``layout`` ("fsdp": OddNet under FSDP2 on 1-D mesh; "fsdp-tp": the MLP
    with tensor parallelism and FSDP2 on a 2 x 2 mesh), its optimizer and its rank's batch slice."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    if layout == "fsdp":
        model = _fsdp(OddNet(), _mesh_1d())
        rank = dist.get_rank()
        return model, slice(4 * rank, 4 * (rank + 1))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = _tensor_parallel(MLP(), mesh["tp"])
    fully_shard(model, mesh=mesh["dp"])
    dp_rank = mesh["dp"].get_local_rank()
    return model, slice(2 * dp_rank, 2 * dp_rank + 2)


def dcp_resume(backend: str, checkpoint_dir: str, layout: str = "fsdp", steps_before: int = 4, steps_after: int = 4) -> dict:
    """Save with dcp.save at a step and continue; a fresh run (other initial weights) loads the
    checkpoint with dcp.load and set_state_dict and continues; the two must agree bit for bit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    steps = steps_before + steps_after
    if layout == "fsdp":
        batches = _batches(steps, 4 * dist.get_world_size(), torch.float32, seed=14)
    else:
        batches = _mlp_batches(steps, 4, torch.float32, seed=14)

    def build(seed):
        model, per_rank = _checkpointed_model(layout, seed)
        opt = NDAdam(model.parameters(), lr=0.01, vector_lr=0.05, betas=BETAS, backend=backend)
        return model, opt, per_rank

    model, opt, per_rank = build(15)
    _train(model, opt, batches[:steps_before], per_rank)
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint_dir)
    saved_params, saved_state = _full_state(model, opt)
    _train(model, opt, batches[steps_before:], per_rank)
    uninterrupted = _full_state(model, opt)

    resumed, resumed_opt, _ = build(16)  # other initial weights: everything must come from the checkpoint
    init_changes = _dcp_init_changes(resumed, resumed_opt)
    model_state, optim_state = get_state_dict(resumed, resumed_opt)
    state_dict = {"model": model_state, "optim": optim_state}
    dcp.load(state_dict, checkpoint_id=checkpoint_dir)
    set_state_dict(resumed, resumed_opt, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"])
    loaded = _full_state(resumed, resumed_opt)
    _train(resumed, resumed_opt, batches[steps_before:], per_rank)
    after = _full_state(resumed, resumed_opt)

    def differing(a, b):
        return sum(int((x != y).sum()) for x, y in zip(a[0] + a[1], b[0] + b[1]))

    rank = dist.get_rank()
    return {
        "dcp_init_changed_elements": init_changes,
        "loaded_differs_from_saved": differing(loaded, (saved_params, saved_state)),
        "resumed_differs_from_uninterrupted": differing(after, uninterrupted),
        "saved": (saved_params, saved_state) if rank == 0 else None,
        "uninterrupted": uninterrupted if rank == 0 else None,
        "state_local_shapes": [tuple(resumed_opt.state[p]["exp_avg"].to_local().shape) for p in resumed.parameters()],
        "exp_avg_sq_placements": [str(resumed_opt.state[p]["exp_avg_sq"].placements) for p in resumed.parameters()],
    }


def dcp_init_tensor_parallel(backend: str) -> dict:
    """DCP's state-initializing step on a tensor-parallel model (rows split: the two-phase
    step with zero gradients and lr 0) changes no parameter bit either."""
    torch.manual_seed(17)
    model = _tensor_parallel(MLP(width=6, hidden=8, out=5), _mesh_1d())
    opt = NDAdam(model.parameters(), lr=0.01, vector_lr=0.05, betas=BETAS, backend=backend)
    return {"dcp_init_changed_elements": _dcp_init_changes(model, opt)}


# ---- ZeroRedundancyOptimizer --------------------------------------------------------------


def _zero_groups(model):
    from ndadam_fused import param_groups

    groups = param_groups(model, lr=0.01, vector_lr=0.05)
    return [{**g, "params": [p for _, p in g["params"]]} for g in groups]


def zero_redundancy(backend: str, steps: int = 10) -> dict:
    """ZeroRedundancyOptimizer(optimizer_class=NDAdam) with groups that say what they hold vs one
    process: same data on all ranks, so every gradient is the one-process gradient."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    torch.manual_seed(18)
    reference = OddNet()
    model = OddNet()
    model.load_state_dict(reference.state_dict())
    opt = ZeroRedundancyOptimizer(_zero_groups(model), optimizer_class=NDAdam, betas=BETAS, backend=backend)
    reference_opt = NDAdam(_zero_groups(reference), betas=BETAS, backend=backend)
    after_construction = _model_errors(model, reference)
    owned = sum(len(g["params"]) for g in opt.optim.param_groups)
    batches = _batches(steps, 8, torch.float32, seed=19)
    _train(model, opt, batches)
    _train(reference, reference_opt, batches)
    return {"after_construction": after_construction, "error": _model_errors(model, reference), "owned": owned}


def zero_redundancy_refused(case: str) -> dict:
    """ZeRO with a plain parameter list (the automatic vector/scalar split), or with vector_lr
    (which ZeRO would copy into every group): a clear refusal, nothing modified."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = OddNet()
    before = [p.detach().clone() for p in model.parameters()]
    try:
        if case == "plain-list":
            ZeroRedundancyOptimizer(model.parameters(), optimizer_class=NDAdam, lr=0.01)
        else:
            groups = [{**g, "lr": None} for g in _zero_groups(model)]
            for g in groups:
                del g["lr"]
            ZeroRedundancyOptimizer(groups, optimizer_class=NDAdam, lr=0.01, vector_lr=0.05)
    except ValueError as error:
        message = str(error)
    else:
        message = None
    return {"message": message, "unchanged": all(torch.equal(b, p) for b, p in zip(before, model.parameters()))}


# ---- Triton under its interpreter ---------------------------------------------------------


def triton_rows_whole() -> dict:
    """FSDP2 with backend="triton" (its interpreter on CPU tensors) vs the one-process reference."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(20)
    reference = OddNet()
    model = OddNet()
    model.load_state_dict(reference.state_dict())
    _fsdp(model, _mesh_1d())
    opt = NDAdam(model.parameters(), lr=0.01, vector_lr=0.05, betas=BETAS, backend="triton")
    reference_opt = NDAdam(reference.parameters(), lr=0.01, vector_lr=0.05, betas=BETAS, backend="reference")
    rank = dist.get_rank()
    batches = _batches(3, 4 * dist.get_world_size(), torch.float32, seed=21)
    _train(model, opt, batches, slice(4 * rank, 4 * (rank + 1)))
    _train(reference, reference_opt, batches)
    return {"error": _model_errors(model, reference)}


# ---- Gradients and state laid out otherwise ---------------------------------------------------


def partial_gradient(backend: str) -> dict:
    """Replicated params whose gradients are Partial sums (as some tensor-parallel plans leave
    them): each gradient is reduced to the param's placements, and the step is one process's
    with the summed gradient."""
    mesh = _mesh_1d()
    full = _full_values([(4, 6), (5,)], torch.float64, seed=22)
    normalize_rows_(full[0])
    dist_params = [nn.Parameter(distribute_tensor(x.clone(), mesh, [Replicate()])) for x in full]
    plain_params = [nn.Parameter(x.clone()) for x in full]
    dist_opt = NDAdam(dist_params, lr=0.05, betas=BETAS, backend=backend)
    plain_opt = NDAdam(plain_params, lr=0.05, betas=BETAS, backend=backend)
    generator = torch.Generator().manual_seed(23 + dist.get_rank())
    for _ in range(3):
        for p, q in zip(dist_params, plain_params):
            mine = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            total = mine.clone()
            dist.all_reduce(total)
            p.grad = DTensor.from_local(mine, mesh, [Partial()])
            q.grad = total
        dist_opt.step()
        plain_opt.step()
    return {"errors": _errors(dist_params, plain_params, dist_opt, plain_opt)}


def mismatched_layouts() -> dict:
    """A plain gradient for a DTensor, and a plain-tensor state dict loaded into DTensor state:
    clear errors naming the parameter, nothing modified."""
    mesh = _mesh_1d()
    weight = nn.Parameter(distribute_tensor(_full_values([(4, 6)], torch.float32, seed=24)[0], mesh, [Shard(0)]))
    opt = NDAdam([("fc.weight", weight)], lr=0.1)
    before = weight.to_local().clone()
    weight.grad = torch.randn(4, 6)
    messages = {}
    try:
        opt.step()
    except RuntimeError as error:
        messages["gradient"] = str(error)
    messages["state_after_gradient_error"] = len(opt.state)
    plain = {
        "state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(4, 6), "exp_avg_sq": torch.zeros(4)}},
        "param_groups": [{**{k: v for k, v in opt.param_groups[0].items() if k != "params"}, "params": [0]}],
    }
    try:
        opt.load_state_dict(plain)
    except ValueError as error:
        messages["state"] = str(error)
    messages["state_after_load_error"] = len(opt.state)
    messages["unchanged"] = torch.equal(before, weight.to_local())
    return messages


def hang_on_rank_0() -> None:
    """Rank 0 waits in an all-reduce that rank 1 never joins: the harness must fail the job."""
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))
