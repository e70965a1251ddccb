"""NDAdam on distributed tensors: FSDP2, tensor parallelism, DCP, ZeRO (DESIGN.md section 6).

Multi-process tests run their jobs (tests/distributed_cases.py) on 2 gloo ranks (4 for the 2-D
mesh) of a worker pool (tests/distributed_harness.py): every job compares the distributed run
with the same problem stepped in one process. The rest run here, in one process: the rows-split
ops against each other and against the one-process step, with the ranks' column pieces summed by
hand, and the backend registry.

Tolerances are DESIGN.md section 7's (fp32 1e-5, fp64 1e-10, max abs on the unit rows). Where
rows are whole on every rank the kernels see exactly the rows one process sees, and the result
must be the same to the bit.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import distributed_cases as cases
import distributed_harness
from ndadam_fused import NDAdam, backends
from ndadam_fused.backends import native, reference, row_statistics
from ndadam_fused.optimizer import hyperparameter_tensor

NATIVE_BUILT = native._C is not None
if not NATIVE_BUILT and os.environ.get("NDADAM_NO_EXTENSION") != "1":
    raise RuntimeError(f"the distributed tests need the extension: {native.unavailable_reason(torch.device('cpu'))}")
NATIVE = "native"
_NO_NATIVE = pytest.mark.skipif(not NATIVE_BUILT, reason="NDADAM_NO_EXTENSION=1")


def case(*values):
    """One parameter set; skipped knowingly where it needs the native extension and it is not built."""
    return pytest.param(*values, marks=_NO_NATIVE if NATIVE in values else ())


def cases_of(*rows):
    return [case(*(row if isinstance(row, tuple) else (row,))) for row in rows]
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


@pytest.fixture
def ranks():
    return distributed_harness.pool(2)


@pytest.fixture
def four_ranks():
    return distributed_harness.pool(4)


def _same_on_all_ranks(results, key):
    values = [r[key] for r in results]
    assert all(v == values[0] for v in values), f"{key} differs between ranks: {values}"
    return values[0]


# ---- Rows whole: Shard(0) (FSDP2) and Replicate -------------------------------------------


@pytest.mark.parametrize(
    "placement, backend, dtype",
    cases_of(("shard0", NATIVE, "float32"), ("shard0", "reference", "float64"), ("shard0", "reference", "float32"),
             ("replicate", NATIVE, "float32")),
)
def test_rows_whole_step_locally_exactly_as_one_process(ranks, placement, backend, dtype):
    results = ranks.run(cases.explicit_gradients, placement=placement, backend=backend, dtype_name=dtype)
    for rank, result in enumerate(results):
        assert result["errors"] == {"param": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0, "step": 0.0}, (rank, result["errors"])
        assert result["after_construction"] == 0.0
        assert result["collectives"] == {}, f"rank {rank}: the step communicated: {result['collectives']}"
        assert result["state_is_dtensor"]
        assert result["steps"] == [25.0] * 7
        expected = "(Shard(dim=0),)" if placement == "shard0" else "(Replicate(),)"
        assert result["exp_avg_sq_placements"] == [expected] * 5
    if placement == "shard0":
        # Uneven shards, and rank 1 holds none of the 1-row tensor's rows nor the 1-element gain.
        assert results[0]["local_rows"] == [3, 1, 2, 2, 3] and results[1]["local_rows"] == [2, 0, 1, 1, 3]
        assert results[1]["local_numel"][1] == 0 and results[1]["local_numel"][-1] == 0


@pytest.mark.parametrize("backend, dtype", cases_of((NATIVE, "float32"), ("reference", "float64")))
def test_fsdp2_training_matches_one_process(ranks, backend, dtype):
    results = ranks.run(cases.fsdp_parity, backend=backend, dtype_name=dtype)
    for rank, result in enumerate(results):
        assert result["error"] <= TOLERANCE[dtype], (rank, result["error"])
        assert result["step_collectives"] == {}, f"rank {rank}: NDAdam's step communicated: {result['step_collectives']}"
        assert result["head_step"] == 25.0
    # The 1-row head: rank 1 holds no row of it and no state, and still counts its steps.
    assert results[1]["head_local_rows"] == 0
    assert results[1]["head_state_local_shapes"] == [(0, 7), (0,)]
    assert results[0]["head_state_local_shapes"] == [(1, 7), (1,)]


def test_triton_under_its_interpreter_steps_fsdp2_rows(ranks):
    for result in ranks.run(cases.triton_rows_whole):
        assert result["error"] <= TOLERANCE["float32"]


# ---- Rows split: Shard(1), tensor parallelism ----------------------------------------------


@pytest.mark.parametrize(
    "backend, dtype", cases_of((NATIVE, "float32"), (NATIVE, "float64"), ("reference", "float64"), ("reference", "float32"))
)
def test_rows_split_shard1_matches_one_process_with_one_all_reduce(ranks, backend, dtype):
    results = ranks.run(cases.explicit_gradients, placement="shard1", backend=backend, dtype_name=dtype)
    for rank, result in enumerate(results):
        errors = result["errors"]
        assert errors["param"] <= TOLERANCE[dtype] and errors["exp_avg"] <= TOLERANCE[dtype], (rank, errors)
        assert result["after_construction"] <= TOLERANCE[dtype]
        assert errors["step"] == 0.0
        assert result["collectives"] == {"c10d.allreduce_": 1}, f"rank {rank}: {result['collectives']}"
        assert result["state_replicas_identical"]
        assert result["exp_avg_sq_placements"] == ["(Replicate(),)"] * 5
    # Uneven columns: (5, 7) splits 4 + 3; rank 1 holds no column of (3, 1, 5) and still steps it.
    assert results[0]["local_numel"][:4] == [20, 3, 54, 15] and results[1]["local_numel"][:4] == [15, 3, 54, 0]
    # Second moments are relative to their size: the squared gradient norms reach ~100 here.
    assert results[0]["errors"]["exp_avg_sq"] <= TOLERANCE[dtype] * 100


@pytest.mark.parametrize(
    "placement, backend, collectives", cases_of(("shard0", NATIVE, {"c10d.allreduce_": 1}), ("shard1", "reference", {}))
)
def test_unit_dim_1_rows_are_columns(ranks, placement, backend, collectives):
    """unit_dim 1 ([in, out] weights): Shard(1) keeps its rows whole, Shard(0) splits them."""
    for result in ranks.run(cases.unit_dim_one, placement=placement, backend=backend):
        assert result["errors"]["param"] <= TOLERANCE["float64"]
        assert result["collectives"] == collectives
        assert result["buffer_keys"] and set(result["buffer_keys"]) == {"DTensor"}


@pytest.mark.parametrize("backend, dtype", cases_of((NATIVE, "float32"), ("reference", "float64")))
def test_parallelize_module_colwise_rowwise_matches_one_process(ranks, backend, dtype):
    results = ranks.run(cases.tensor_parallel_parity, backend=backend, dtype_name=dtype)
    for result in results:
        assert result["placements"]["up.weight"] == "(Shard(dim=0),)"
        assert result["placements"]["down.weight"] == "(Shard(dim=1),)"
        assert result["after_construction"] <= TOLERANCE[dtype]
        assert result["error"] <= TOLERANCE[dtype], result["error"]
        assert result["step_collectives"] == {"c10d.allreduce_": 1}
        assert result["state_replicas_identical"]


@pytest.mark.parametrize("backend, dtype", cases_of((NATIVE, "float32"), ("reference", "float64")))
def test_fsdp2_with_tensor_parallel_on_a_2d_mesh(four_ranks, backend, dtype):
    results = four_ranks.run(cases.fsdp_tensor_parallel_2d, backend=backend, dtype_name=dtype)
    for result in results:
        assert result["placements"]["down.weight"] == "(Shard(dim=0), Shard(dim=1))"
        assert result["placements"]["up.weight"].startswith("(_StridedShard(dim=0")
        assert result["error"] <= TOLERANCE[dtype], result["error"]
        assert result["step_collectives"] == {"c10d.allreduce_": 1}


@pytest.mark.parametrize("backend", cases_of(NATIVE, "reference"))
def test_partial_gradients_are_reduced_to_the_params_placements(ranks, backend):
    for result in ranks.run(cases.partial_gradient, backend=backend):
        assert result["errors"]["param"] <= TOLERANCE["float64"]
        assert result["errors"]["exp_avg"] <= TOLERANCE["float64"]


def test_plain_gradient_or_state_for_a_dtensor_is_refused(ranks):
    for result in ranks.run(cases.mismatched_layouts):
        assert "'fc.weight'" in result["gradient"] and "a plain-tensor gradient for a DTensor" in result["gradient"]
        assert "is a plain tensor but the parameter is a DTensor" in result["state"]
        assert "set_optimizer_state_dict" in result["state"]
        assert result["state_after_gradient_error"] == 0 and result["state_after_load_error"] == 0
        assert result["unchanged"]


# ---- Construction -------------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["shard0", "shard1"])
def test_zero_row_on_one_rank_raises_on_every_rank(ranks, placement):
    results = ranks.run(cases.zero_row_on_one_rank, placement=placement)
    for result in results:
        assert result["message"] is not None and "all-zero row (1 in all" in result["message"]
        assert "param_groups[0]['params'][0]" in result["message"]
        assert result["unchanged"]


def test_row_zero_on_some_ranks_columns_is_normalized_by_its_full_norm(ranks):
    for result in ranks.run(cases.zero_row_on_one_rank, placement="shard1-partly"):
        assert result["message"] is None
        assert result["error_vs_one_process"] <= 1e-6


@pytest.mark.parametrize("placement, exact, collectives", [("shard0", True, 1), ("shard1", False, 2)])
def test_normalize_rows_on_dtensors_is_idempotent(ranks, placement, exact, collectives):
    for result in ranks.run(cases.normalize_idempotent, placement=placement):
        assert result["second_call_changed"] == 0
        assert result["error_vs_one_process"] == 0.0 if exact else result["error_vs_one_process"] <= 1e-6
        # Whole rows: only the agreed verdict; split rows: their sums of squares, then the verdict.
        assert result["collectives"] == {"c10d.allreduce_": collectives}


def test_meta_device_init_then_normalize_rows(ranks):
    for result in ranks.run(cases.meta_device_init, backend="native" if NATIVE_BUILT else "reference"):
        assert result["after_init"] == 0.0
        assert result["error"] <= TOLERANCE["float32"]


def test_partial_placement_is_refused_naming_the_parameter(ranks):
    for result in ranks.run(cases.refused_placement):
        message = result["message"]
        assert message is not None and "'encoder.weight'" in message and "Partial(sum)" in message
        assert result["unchanged"]


def test_backend_without_the_rows_split_step_is_refused_before_any_change(ranks):
    for result in ranks.run(cases.missing_row_split_backend, backend="triton", hidden=backends.ROW_SPLIT_FUNCTIONS):
        message = result["message"]
        assert message is not None and "'triton'" in message
        assert "row_statistics, apply_row_statistics" in message
        assert result["unchanged"] and result["state"] == 0


# ---- Distributed checkpoints --------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("backend", cases_of(NATIVE, "reference"))
def test_dcp_resume_is_bit_exact_and_reshards_to_one_process(ranks, backend, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    results = ranks.run(cases.dcp_resume, backend=backend, checkpoint_dir=str(tmp_path / "checkpoint"))
    for rank, result in enumerate(results):
        assert result["dcp_init_changed_elements"] == 0, f"rank {rank}: DCP's state-initializing step moved weights"
        assert result["loaded_differs_from_saved"] == 0
        assert result["resumed_differs_from_uninterrupted"] == 0
    assert results[1]["state_local_shapes"][-2:] == [(0, 7), (0,)]

    # The 2-rank checkpoint into one process (no process group): the full tensors, bit for bit.
    torch.manual_seed(99)
    model = cases.OddNet()
    opt = NDAdam(model.parameters(), lr=0.01, vector_lr=0.05, betas=cases.BETAS, backend=backend)
    model_state, optim_state = get_state_dict(model, opt)
    state_dict = {"model": model_state, "optim": optim_state}
    dcp.load(state_dict, checkpoint_id=str(tmp_path / "checkpoint"))
    set_state_dict(model, opt, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"])
    saved_params, saved_state = results[0]["saved"]
    loaded_params, loaded_state = cases._full_state(model, opt)
    for a, b in zip(saved_params + saved_state, loaded_params + loaded_state):
        assert torch.equal(a, b)
    # ... and it trains on from there like the 2-rank run (its gradients are averaged over ranks).
    batches = cases._batches(8, 8, torch.float32, seed=14)[4:]
    cases._train(model, opt, batches)
    uninterrupted_params, _ = results[0]["uninterrupted"]
    error = max((p.detach() - q).abs().max().item() for p, q in zip(model.parameters(), uninterrupted_params))
    assert error <= TOLERANCE["float32"]


@pytest.mark.parametrize("backend", cases_of(NATIVE, "reference"))
def test_dcp_resume_under_fsdp2_and_tensor_parallel_is_bit_exact(four_ranks, backend, tmp_path):
    results = four_ranks.run(cases.dcp_resume, backend=backend, checkpoint_dir=str(tmp_path / "checkpoint"), layout="fsdp-tp")
    for rank, result in enumerate(results):
        assert result["dcp_init_changed_elements"] == 0, f"rank {rank}: DCP's state-initializing step moved weights"
        assert result["loaded_differs_from_saved"] == 0
        assert result["resumed_differs_from_uninterrupted"] == 0
    # up (Colwise, then FSDP2): rows interleaved over the 2-D mesh; down (Rowwise): rows split over tp.
    assert results[0]["exp_avg_sq_placements"][0] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert results[0]["exp_avg_sq_placements"][2] == "(Shard(dim=0), Replicate())"


@pytest.mark.parametrize("backend", cases_of(NATIVE, "reference"))
def test_dcp_init_step_changes_no_bit_of_split_rows(ranks, backend):
    for result in ranks.run(cases.dcp_init_tensor_parallel, backend=backend):
        assert result["dcp_init_changed_elements"] == 0


# ---- ZeroRedundancyOptimizer --------------------------------------------------------------


@pytest.mark.parametrize("backend", cases_of(NATIVE, "reference"))
def test_zero_redundancy_optimizer_matches_one_process(ranks, backend):
    results = ranks.run(cases.zero_redundancy, backend=backend)
    assert sum(r["owned"] for r in results) == 6  # each rank steps its own partition
    for result in results:
        assert result["after_construction"] == 0.0  # every replica normalized, not only the owned ones
        assert result["error"] == 0.0


@pytest.mark.parametrize("case, needle", [("plain-list", "has no 'vector' key"), ("vector-lr", "has vector_lr=0.05")])
def test_zero_redundancy_optimizer_refuses_what_it_cannot_map(ranks, case, needle):
    for result in ranks.run(cases.zero_redundancy_refused, case=case):
        assert result["message"] is not None and needle in result["message"]
        assert "param_groups(model, lr=1e-3, vector_lr=0.05)" in result["message"]
        assert result["unchanged"]


# ---- The rows-split ops in one process: ranks' pieces summed by hand ------------------------

ROW_SPLIT_BACKENDS = [pytest.param(native, marks=_NO_NATIVE, id="native"), pytest.param(reference, id="reference")]
SPLIT_SHAPES = [(5, 7), (1, 6), (3, 4, 3, 3), (3, 1, 5), (2, 9000)]


def _unit(shape, dtype, generator):
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    rows = x.reshape(shape[0], -1)
    return (rows / rows.norm(dim=1, keepdim=True)).reshape(shape).to(dtype)


def _problem(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    params = [_unit(s, dtype, generator) for s in SPLIT_SHAPES]
    grads = [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for s in SPLIT_SHAPES]
    exp_avgs = [torch.randn(s, generator=generator, dtype=torch.float64).mul(0.01).to(state_dtype) for s in SPLIT_SHAPES]
    exp_avg_sqs = [torch.rand(s[0], generator=generator, dtype=torch.float64).mul(0.01).to(state_dtype) for s in SPLIT_SHAPES]
    steps = [torch.tensor(3.0) for _ in SPLIT_SHAPES]
    return params, grads, exp_avgs, exp_avg_sqs, steps


def _hyper(lr, beta1=0.9, beta2=0.99, eps=1e-8):
    return hyperparameter_tensor(lr, beta1, beta2, eps, torch.device("cpu"))


def _columns(tensor, pieces):
    """``tensor`` cut along dim 1 as torch.chunk cuts a Shard(1) DTensor (a piece may be empty)."""
    size = tensor.shape[1]
    chunk = math.ceil(size / pieces)
    return [tensor.narrow(1, min(i * chunk, size), max(0, min(chunk, size - i * chunk))).contiguous() for i in range(pieces)]


@pytest.mark.parametrize("implementation", ROW_SPLIT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pieces", [1, 2, 3])
def test_rows_split_ops_equal_the_one_process_step(implementation, dtype, pieces):
    """Statistics of each column piece, summed (what the all-reduce does), then each piece
    applied: the one-process reference step, within DESIGN.md section 7's tolerances."""
    _check_split_step_equals_one_process(implementation, dtype, pieces)


def _check_split_step_equals_one_process(implementation, dtype, pieces):
    params, grads, exp_avgs, exp_avg_sqs, steps = _problem(dtype)
    expected = [[t.clone() for t in group] for group in (params, grads, exp_avgs, exp_avg_sqs, steps)]
    reference.vector_step(*expected, hyper=hyperparameter_tensor(0.05, 0.9, 0.99, 1e-8, torch.device("cpu")), beta1=0.9, beta2=0.99, eps=1e-8)

    param_pieces = [_columns(p, pieces) for p in params]
    grad_pieces = [_columns(g, pieces) for g in grads]
    exp_avg_pieces = [_columns(m, pieces) for m in exp_avgs]
    rows = sum(p.shape[0] for p in params)
    state_dtype = exp_avgs[0].dtype
    summed = torch.zeros(rows, 6, dtype=state_dtype)
    for k in range(pieces):
        statistics = torch.empty(rows, 6, dtype=state_dtype)
        implementation.row_statistics([p[k] for p in param_pieces], [g[k] for g in grad_pieces], [m[k] for m in exp_avg_pieces], statistics)
        summed += statistics
    for k in range(pieces):
        piece_sqs = [v.clone() for v in exp_avg_sqs]
        piece_steps = [s.clone() for s in steps]
        implementation.apply_row_statistics(
            [p[k] for p in param_pieces], [g[k] for g in grad_pieces], [m[k] for m in exp_avg_pieces],
            piece_sqs, piece_steps, summed, hyper=_hyper(0.05), beta1=0.9, beta2=0.99, eps=1e-8,
        )
        if k == 0:
            result_sqs, result_steps = piece_sqs, piece_steps
        else:  # every piece computes the same second moments from the same statistics
            assert all(torch.equal(a, b) for a, b in zip(piece_sqs, result_sqs))
    assert [s.item() for s in result_steps] == [4.0] * len(SPLIT_SHAPES)
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for i in range(len(SPLIT_SHAPES)):
        param = torch.cat(param_pieces[i], dim=1)
        exp_avg = torch.cat(exp_avg_pieces[i], dim=1)
        assert (param.double() - expected[0][i].double()).abs().max() <= tolerance, SPLIT_SHAPES[i]
        assert (exp_avg.double() - expected[2][i].double()).abs().max() <= tolerance
        scale = max(1.0, expected[3][i].abs().max().item())
        assert (result_sqs[i].double() - expected[3][i].double()).abs().max() <= tolerance * scale


@pytest.mark.parametrize("implementation", ROW_SPLIT_BACKENDS)
@pytest.mark.parametrize("pieces", [1, 3])
def test_rows_split_ops_with_master_copies_equal_the_one_process_step(implementation, pieces):
    """bf16 params with fp32 master copies: phase 1 reads the masters' pieces, phase 2 writes the
    masters and their rounding into the params: the one-process step with the same masters, at
    fp32's tolerance (the masters differ from the bf16 params by more than that)."""
    params, grads, exp_avgs, exp_avg_sqs, steps = _problem(torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    masters = [_unit(p.shape, torch.float32, generator) for p in params]
    params = [m.to(torch.bfloat16) for m in masters]
    expected = [[t.clone() for t in group] for group in (params, grads, exp_avgs, exp_avg_sqs, steps, masters)]
    reference.vector_step(*expected[:5], hyper=_hyper(0.05), beta1=0.9, beta2=0.99, eps=1e-8, master_params=expected[5])

    cut = [[_columns(t, pieces) for t in tensors] for tensors in (params, grads, exp_avgs, masters)]
    rows = sum(p.shape[0] for p in params)
    summed = torch.zeros(rows, 6)
    for k in range(pieces):
        statistics = torch.empty(rows, 6)
        implementation.row_statistics(*[[t[k] for t in tensors] for tensors in cut[:3]], statistics,
                                      master_params=[m[k] for m in cut[3]])
        summed += statistics
    for k in range(pieces):
        implementation.apply_row_statistics(
            *[[t[k] for t in tensors] for tensors in cut[:3]], [v.clone() for v in exp_avg_sqs],
            [s.clone() for s in steps], summed, hyper=_hyper(0.05), beta1=0.9, beta2=0.99, eps=1e-8,
            master_params=[m[k] for m in cut[3]],
        )
    for i in range(len(SPLIT_SHAPES)):
        master = torch.cat(cut[3][i], dim=1)
        assert (master.double() - expected[5][i].double()).abs().max() <= 1e-5, SPLIT_SHAPES[i]
        assert torch.equal(torch.cat(cut[0][i], dim=1), master.to(torch.bfloat16).reshape(params[i].shape))
        assert (torch.cat(cut[2][i], dim=1).double() - expected[2][i].double()).abs().max() <= 1e-5


def _native_cpu_copy_runs(instruction_set: str, monkeypatch) -> bool:
    """Whether this CPU and build run the native CPU kernels' copy for ``instruction_set``."""
    params, grads, exp_avgs, _, _ = _problem(torch.float32)
    monkeypatch.setenv("NDADAM_CPU_INSTRUCTION_SET", instruction_set)
    try:
        torch.ops.ndadam_fused.row_statistics_(params, grads, exp_avgs, torch.empty(sum(p.shape[0] for p in params), 6), None, [])
        return True
    except RuntimeError as error:
        if "does not have" in str(error):
            return False
        raise


@_NO_NATIVE
@pytest.mark.parametrize("instruction_set", ["baseline", "x86-64-v3", "x86-64-v4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_native_rows_split_every_cpu_instruction_set_copy(instruction_set, dtype, monkeypatch):
    """The rows-split CPU kernels are compiled once per instruction set, as the vector step's."""
    if not _native_cpu_copy_runs(instruction_set, monkeypatch):
        pytest.skip(f"this CPU or build has no {instruction_set} copy")
    _check_split_step_equals_one_process(native, dtype, 2)


@_NO_NATIVE
def test_native_rows_split_unknown_instruction_set_is_an_error_that_changes_nothing(monkeypatch):
    params, grads, exp_avgs, exp_avg_sqs, steps = _problem(torch.float32)
    rows = sum(p.shape[0] for p in params)
    statistics = torch.full((rows, 6), 7.0)
    before = [t.clone() for t in params + exp_avgs + exp_avg_sqs + steps + [statistics]]
    monkeypatch.setenv("NDADAM_CPU_INSTRUCTION_SET", "avx9000")
    with pytest.raises(RuntimeError, match="row_statistics_: NDADAM_CPU_INSTRUCTION_SET=avx9000 is not one of"):
        torch.ops.ndadam_fused.row_statistics_(params, grads, exp_avgs, statistics, None, [])
    with pytest.raises(RuntimeError, match="apply_row_statistics_: NDADAM_CPU_INSTRUCTION_SET=avx9000 is not one of"):
        torch.ops.ndadam_fused.apply_row_statistics_(
            params, grads, exp_avgs, exp_avg_sqs, steps, torch.ones(rows, 6), _hyper(0.05), None, None, [], []
        )
    assert all(torch.equal(a, b) for a, b in zip(before, params + exp_avgs + exp_avg_sqs + steps + [statistics]))


@pytest.mark.parametrize("implementation", ROW_SPLIT_BACKENDS)
@pytest.mark.parametrize("case", ["lr-0", "zero-grads-fresh-state"])
def test_rows_split_zero_update_keeps_every_bit(implementation, case):
    """The step DCP runs to create state (zero gradients, lr 0) writes the rows back unchanged."""
    params, grads, exp_avgs, exp_avg_sqs, steps = _problem(torch.float32, seed=1)
    if case == "zero-grads-fresh-state":
        grads = [torch.zeros_like(g) for g in grads]
        exp_avgs = [torch.zeros_like(m) for m in exp_avgs]
        exp_avg_sqs = [torch.zeros_like(v) for v in exp_avg_sqs]
    before = [p.clone() for p in params]
    statistics = torch.empty(sum(p.shape[0] for p in params), 6)
    implementation.row_statistics(params, grads, exp_avgs, statistics)
    implementation.apply_row_statistics(
        params, grads, exp_avgs, exp_avg_sqs, steps, statistics,
        hyper=_hyper(0.0 if case == "lr-0" else 0.1), beta1=0.9, beta2=0.99, eps=1e-8,
    )
    assert sum(int((a != b).sum()) for a, b in zip(before, params)) == 0


@pytest.mark.skipif(not NATIVE_BUILT, reason="NDADAM_NO_EXTENSION=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_native_rows_split_opcheck(dtype):
    params, grads, exp_avgs, exp_avg_sqs, steps = _problem(dtype)
    statistics = torch.empty(sum(p.shape[0] for p in params), 6, dtype=exp_avgs[0].dtype)
    torch.library.opcheck(torch.ops.ndadam_fused.row_statistics_.default, (params, grads, exp_avgs, statistics, None, []))
    reduced = statistics.clone()
    torch.library.opcheck(
        torch.ops.ndadam_fused.apply_row_statistics_.default,
        (params, grads, exp_avgs, exp_avg_sqs, steps, reduced, _hyper(0.05), None, None, [], []),
    )


@pytest.mark.skipif(not NATIVE_BUILT, reason="NDADAM_NO_EXTENSION=1")
def test_native_rows_split_ops_name_a_bad_argument_and_change_nothing():
    params, grads, exp_avgs, exp_avg_sqs, steps = _problem(torch.float32)
    before = [t.clone() for t in params + exp_avgs + exp_avg_sqs + steps]
    rows = sum(p.shape[0] for p in params)
    hyper = _hyper(0.05)
    with pytest.raises(RuntimeError, match=r"statistics is a Float tensor of shape \[3, 6\].*expected a contiguous tensor of shape \[14, 6\]"):
        torch.ops.ndadam_fused.row_statistics_(params, grads, exp_avgs, torch.empty(3, 6), None, [])
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[1\] is a Float tensor of shape \[2\]"):
        torch.ops.ndadam_fused.apply_row_statistics_(
            params, grads, exp_avgs, [exp_avg_sqs[0], torch.zeros(2)] + exp_avg_sqs[2:], steps,
            torch.ones(rows, 6), hyper, None, None, [], [],
        )
    with pytest.raises(RuntimeError, match=r"statistics is Double; the state dtype of Float params is float32"):
        torch.ops.ndadam_fused.apply_row_statistics_(
            params, grads, exp_avgs, exp_avg_sqs, steps, torch.ones(rows, 6, dtype=torch.float64), hyper, None, None,
            [], [],
        )
    assert all(torch.equal(a, b) for a, b in zip(before, params + exp_avgs + exp_avg_sqs + steps))


def test_registry_names_what_a_backend_lacks(monkeypatch):
    assert backends.ROW_SPLIT_FUNCTIONS == ("row_statistics", "apply_row_statistics")
    assert backends.resolve_row_split("reference", "cpu") is reference
    from ndadam_fused.backends import triton_backend

    assert backends.resolve_row_split("triton", "cpu") is triton_backend
    for name in backends.ROW_SPLIT_FUNCTIONS:
        monkeypatch.delattr(triton_backend, name)
    assert "does not define row_statistics, apply_row_statistics" in backends.row_split_unavailable_reason("triton", "cpu")
    with pytest.raises(RuntimeError, match="backend 'triton' cannot step parameters whose rows are split"):
        backends.resolve_row_split("triton", "cpu")
    # A backend that has only one of the two functions is named with the one it lacks.
    monkeypatch.delattr(reference, "apply_row_statistics")
    assert "does not define apply_row_statistics," in backends.row_split_unavailable_reason("reference", "cpu")


@pytest.mark.skipif(not NATIVE_BUILT, reason="NDADAM_NO_EXTENSION=1")
def test_native_rows_split_needs_a_kernel_for_the_device():
    assert backends.resolve_row_split("auto", "cpu") is native
    assert backends.resolve_row_split("native", "cpu") is native
    reason = native.row_split_unavailable_reason(torch.device("meta"))
    assert reason is not None and "meta" in reason
    if not torch.cuda.is_available() or not native._C.BUILT_WITH_CUDA:
        return
    # Until the CUDA kernels of these ops exist, CUDA tensors are refused by name (no fallback).
    if native.row_split_unavailable_reason(torch.device("cuda")) is not None:
        with pytest.raises(RuntimeError, match="no cuda kernel for ndadam_fused::row_statistics_"):
            backends.resolve_row_split("native", "cuda")


def test_row_statistics_reference_checks_the_buffer():
    params, grads, exp_avgs, _, _ = _problem(torch.float32)
    with pytest.raises(ValueError, match=r"the buffer has shape \[13, 6\].*expected \[14, 6\]"):
        row_statistics.row_statistics(params, grads, exp_avgs, torch.empty(13, 6))


def test_a_job_that_hangs_fails_within_its_timeout():
    """The harness's own check: a collective that one rank never joins fails the job instead of
    hanging the suite, and the next job gets a fresh pool."""
    pool = distributed_harness.pool(2)
    with pytest.raises(distributed_harness.JobTimeout, match=r"ranks \[0\] did not finish"):
        pool.run(cases.hang_on_rank_0, timeout_s=5)
    assert pool.broken
    assert distributed_harness.pool(2) is not pool
