"""The Triton backend's rows-split step (issue 11 item 2): row_statistics, then apply_row_statistics.

A rank holding a column piece of every row runs phase 1 on its piece, the pieces' statistics are
summed (the all-reduce), and phase 2 finishes every piece. Here the pieces are cut by hand in one
process (as tests/test_distributed.py does for the other backends): the result must be the
one-process step of backends/reference.py on the whole rows, with the same options. One test runs
the real thing on 2 gloo ranks.

The kernel runs under TRITON_INTERPRET=1 on the CPU (CI), on CUDA in benchmarks/gpu_check.sh.
"""

import math
import os

import pytest
import torch

from ndadam_fused import backends
from ndadam_fused.backends import reference, row_statistics, triton_backend
from ndadam_fused.optimizer import hyperparameter_tensor
from ndadam_fused.rounding import stochastic_round_to_bfloat16

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cpu"] if INTERPRETER else (["cuda"] if torch.cuda.is_available() else [])
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}
BETAS = (0.9, 0.99)
# Rows of 7, 6, 36 (a conv), 5 (dim 1 of size 1: pieces 2 and 3 get no column), 9000 (the
# chunked path), and a tensor with no rows.
SHAPES = [(5, 7), (1, 6), (3, 4, 3, 3), (3, 1, 5), (2, 9000), (0, 4)]


def _problem(shapes, dtype, device, seed=0, step=3.0):
    generator = torch.Generator().manual_seed(seed)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    lists = [[], [], [], [], []]
    for shape in shapes:
        rows = torch.randn(shape, generator=generator, dtype=torch.float64).reshape(shape[0], math.prod(shape[1:]))
        lists[0].append((rows / rows.norm(dim=1, keepdim=True)).reshape(shape).to(device, dtype))
        lists[1].append(torch.randn(shape, generator=generator, dtype=torch.float64).to(device, dtype))
        lists[2].append((0.01 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(device, state_dtype))
        lists[3].append((0.01 * torch.rand(shape[0], generator=generator, dtype=torch.float64)).to(device, state_dtype))
        lists[4].append(torch.tensor(step, device=device))
    return lists


def _columns(tensor, pieces):
    """``tensor`` cut along dim 1 as torch.chunk cuts a Shard(1) DTensor (a piece may be empty)."""
    size = tensor.shape[1]
    chunk = math.ceil(size / pieces)
    return [tensor.narrow(1, min(i * chunk, size), max(0, min(chunk, size - i * chunk))).contiguous() for i in range(pieces)]


def _hyper(lr, device):
    return hyperparameter_tensor(lr, *BETAS, 1e-8, torch.device(device))


def _split_step(lists, pieces, lr, device, grad_scale=None, found_inf=None, master_params=None, rounding_seeds=None):
    """The two phases on ``pieces`` column pieces of every tensor; returns the pieces put back
    together: params, exp_avgs, masters (or None), and the second moments and steps (every
    piece computes the same ones: checked)."""
    params, grads, exp_avgs, exp_avg_sqs, steps = lists
    cut = {name: [_columns(t, pieces) for t in tensors] for name, tensors in
           (("params", params), ("grads", grads), ("exp_avgs", exp_avgs), ("masters", master_params or []))}
    rows = sum(p.shape[0] for p in params)
    state_dtype = exp_avgs[0].dtype
    summed = torch.zeros(rows, 6, dtype=state_dtype, device=device)
    for k in range(pieces):
        statistics = torch.full((rows, 6), float("nan"), dtype=state_dtype, device=device)
        masters = [m[k] for m in cut["masters"]] if master_params is not None else None
        triton_backend.row_statistics([p[k] for p in cut["params"]], [g[k] for g in cut["grads"]],
                                      [m[k] for m in cut["exp_avgs"]], statistics, grad_scale=grad_scale, master_params=masters)
        summed += statistics
    results = None
    for k in range(pieces):
        piece_sqs, piece_steps = [v.clone() for v in exp_avg_sqs], [s.clone() for s in steps]
        masters = [m[k] for m in cut["masters"]] if master_params is not None else None
        triton_backend.apply_row_statistics(
            [p[k] for p in cut["params"]], [g[k] for g in cut["grads"]], [m[k] for m in cut["exp_avgs"]],
            piece_sqs, piece_steps, summed, hyper=_hyper(lr, device), beta1=BETAS[0], beta2=BETAS[1], eps=1e-8,
            grad_scale=grad_scale, found_inf=found_inf, master_params=masters, rounding_seeds=rounding_seeds,
        )
        if results is None:
            results = piece_sqs, piece_steps
        else:
            assert all(torch.equal(a, b) for a, b in zip(piece_sqs, results[0]))
            assert all(torch.equal(a, b) for a, b in zip(piece_steps, results[1]))
    joined = [[torch.cat(pieces_of_tensor, dim=1) for pieces_of_tensor in cut[name]] for name in ("params", "exp_avgs", "masters")]
    return joined[0], joined[1], joined[2] if master_params is not None else None, results[0], results[1]


def _reference_step(lists, lr, device, **options):
    """The one-process step on whole rows (the reference reshapes rows with -1: tensors with no
    rows are left out, their steps counted here)."""
    expected = [[t.clone() for t in tensors] for tensors in lists]
    options = {k: (None if v is None else [t.clone() for t in v] if isinstance(v, list) else v) for k, v in options.items()}
    with_rows = [i for i, p in enumerate(expected[0]) if p.shape[0]]
    chosen = {k: (None if v is None else [v[i] for i in with_rows] if isinstance(v, list) else v) for k, v in options.items()}
    reference.vector_step(*[[tensors[i] for i in with_rows] for tensors in expected], hyper=_hyper(lr, device),
                          beta1=BETAS[0], beta2=BETAS[1], eps=1e-8, **chosen)
    found_inf = options.get("found_inf")
    for i, step in enumerate(expected[4]):
        if i not in with_rows and (found_inf is None or found_inf.item() == 0):
            step += 1
    return expected, options


def _max_error(actual, expected):
    return max(((a.double() - e.double()).abs().max().item() for a, e in zip(actual, expected) if a.numel()), default=0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pieces", [1, 2, 3])
def test_pieces_summed_equal_the_one_process_step(device, dtype, pieces):
    lists = _problem(SHAPES, dtype, device)
    expected, _ = _reference_step(lists, 0.05, device)
    params, exp_avgs, _, exp_avg_sqs, steps = _split_step(lists, pieces, 0.05, device)
    assert [s.item() for s in steps] == [4.0] * len(SHAPES)
    assert _max_error(params, expected[0]) <= TOLERANCE[dtype]
    assert _max_error(exp_avgs, expected[2]) <= TOLERANCE[dtype]
    scale = max(v.abs().max().item() for v in expected[3] if v.numel())
    assert _max_error(exp_avg_sqs, expected[3]) <= TOLERANCE[dtype] * max(1.0, scale)


@pytest.mark.parametrize("device", DEVICES)
def test_the_statistics_are_the_reference_phase_one(device):
    lists = _problem(SHAPES, torch.float64, device)
    rows = sum(p.shape[0] for p in lists[0])
    statistics = torch.empty(rows, 6, dtype=torch.float64, device=device)
    expected = torch.empty(rows, 6, dtype=torch.float64)
    triton_backend.row_statistics(lists[0], lists[1], lists[2], statistics)
    row_statistics.row_statistics([t.cpu() for t in lists[0]], [t.cpu() for t in lists[1]], [t.cpu() for t in lists[2]], expected)
    torch.testing.assert_close(statistics.cpu(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scale_and_found_inf(device):
    """ḡ = grad / grad_scale in both phases; found_inf set: nothing changes, steps included."""
    lists = _problem(SHAPES, torch.float64, device)
    lists[1] = [3.0 * g for g in lists[1]]
    grad_scale = torch.tensor(3.0, device=device)
    before = [[t.clone() for t in tensors] for tensors in lists]
    params, exp_avgs, _, exp_avg_sqs, steps = _split_step(lists, 2, 0.05, device, grad_scale=grad_scale,
                                                          found_inf=torch.tensor(1.0, device=device))
    for after, original in ((params, before[0]), (exp_avgs, before[2]), (exp_avg_sqs, before[3]), (steps, before[4])):
        assert all(torch.equal(a, b) for a, b in zip(after, original)), "a skipped step changed something"
    expected, _ = _reference_step(lists, 0.05, device, grad_scale=grad_scale)
    params, exp_avgs, _, exp_avg_sqs, steps = _split_step(lists, 2, 0.05, device, grad_scale=grad_scale,
                                                          found_inf=torch.tensor(0.0, device=device))
    assert [s.item() for s in steps] == [4.0] * len(SHAPES)
    assert _max_error(params, expected[0]) <= 1e-10 and _max_error(exp_avgs, expected[2]) <= 1e-10


@pytest.mark.parametrize("device", DEVICES)
def test_master_weights(device):
    """w from the master (statistics included), the master gets w', the param its rounding."""
    lists = _problem(SHAPES, torch.bfloat16, device)
    masters = [p.float() + 1e-4 * torch.randn(p.shape, device=device) for p in lists[0]]
    expected, options = _reference_step(lists, 0.05, device, master_params=masters)
    params, exp_avgs, new_masters, _, _ = _split_step(lists, 2, 0.05, device, master_params=masters)
    assert _max_error(new_masters, options["master_params"]) <= 1e-5
    assert _max_error(exp_avgs, expected[2]) <= 1e-5
    assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(params, new_masters))


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_is_the_hash_of_rounding_py_on_each_local_piece(device):
    """Bit for bit rounding.py, with i the element's index in the rank's local piece (the kernels
    see plain local tensors). With master copies and seeds in one launch, the master holds the
    float32 w' that the param's rounding starts from."""
    lists = _problem(SHAPES[:4], torch.bfloat16, device, step=70_000.0)
    pieces = 2
    seeds = [torch.tensor(s, device=device) for s in (0x9E3779B9, -987654321, 1, 2**35 + 3)]
    master_pieces = [_columns(p.float(), pieces) for p in lists[0]]
    param_pieces = [_columns(p, pieces) for p in lists[0]]
    grad_pieces = [_columns(g, pieces) for g in lists[1]]
    exp_avg_pieces = [_columns(m, pieces) for m in lists[2]]
    rows = sum(p.shape[0] for p in lists[0])
    summed = torch.zeros(rows, 6, device=device)
    for k in range(pieces):
        statistics = torch.empty(rows, 6, device=device)
        triton_backend.row_statistics([p[k] for p in param_pieces], [g[k] for g in grad_pieces], [m[k] for m in exp_avg_pieces],
                                      statistics, master_params=[m[k] for m in master_pieces])
        summed += statistics
    differently = 0
    for k in range(pieces):
        steps = [s.clone() for s in lists[4]]
        triton_backend.apply_row_statistics(
            [p[k] for p in param_pieces], [g[k] for g in grad_pieces], [m[k] for m in exp_avg_pieces],
            [v.clone() for v in lists[3]], steps, summed, hyper=_hyper(0.05, device), beta1=BETAS[0], beta2=BETAS[1],
            eps=1e-8, master_params=[m[k] for m in master_pieces], rounding_seeds=seeds,
        )
        for params_of_tensor, masters_of_tensor, seed, step in zip(param_pieces, master_pieces, seeds, steps):
            assert step.item() == 70_001.0
            expected = stochastic_round_to_bfloat16(masters_of_tensor[k].cpu(), seed.cpu(), step.cpu())
            assert torch.equal(params_of_tensor[k].cpu().view(torch.int16), expected.view(torch.int16))
            differently += int((expected != masters_of_tensor[k].cpu().to(torch.bfloat16)).sum())
    assert differently > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["lr-0", "zero-grads-fresh-state"])
def test_a_zero_update_keeps_every_bit(device, case):
    """The step DCP runs to create state (zero gradients and fresh state, or lr 0)."""
    lists = _problem(SHAPES, torch.float32, device, seed=1)
    if case == "zero-grads-fresh-state":
        for index in (1, 2, 3):
            lists[index] = [torch.zeros_like(t) for t in lists[index]]
    before = [p.clone() for p in lists[0]]
    params, _, _, _, _ = _split_step(lists, 2, 0.0 if case == "lr-0" else 0.1, device)
    assert sum(int((a != b).sum()) for a, b in zip(before, params)) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_lr_instead_of_hyper_is_the_same_step(device):
    """The reference's earlier keyword form (lr, beta1, beta2, eps as numbers) gives the same bits."""
    results = []
    for keyword in ("hyper", "lr"):
        params, grads, exp_avgs, exp_avg_sqs, steps = _problem(SHAPES[:3], torch.float32, device)
        statistics = torch.empty(sum(p.shape[0] for p in params), 6, device=device)
        triton_backend.row_statistics(params, grads, exp_avgs, statistics)
        given = {"hyper": _hyper(0.05, device)} if keyword == "hyper" else {"lr": 0.05}
        triton_backend.apply_row_statistics(params, grads, exp_avgs, exp_avg_sqs, steps, statistics,
                                            beta1=BETAS[0], beta2=BETAS[1], eps=1e-8, **given)
        results.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    with pytest.raises(ValueError, match="exactly one of hyper= .* and lr="):
        triton_backend.apply_row_statistics(params, grads, exp_avgs, exp_avg_sqs, steps, statistics,
                                            beta1=0.9, beta2=0.99, eps=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_a_wrong_statistics_buffer_is_refused_and_nothing_changes(device):
    params, grads, exp_avgs, exp_avg_sqs, steps = _problem(SHAPES, torch.float32, device)
    rows = sum(p.shape[0] for p in params)
    before = [t.clone() for t in params + exp_avgs + exp_avg_sqs + steps]
    with pytest.raises(ValueError, match=rf"the buffer has shape \[13, 6\].*{rows} rows in all; expected a contiguous \[{rows}, 6\]"):
        triton_backend.row_statistics(params, grads, exp_avgs, torch.empty(13, 6, device=device))
    with pytest.raises(ValueError, match=r"the statistics buffer is torch.float64, but torch.float32 params keep torch.float32 state"):
        triton_backend.apply_row_statistics(params, grads, exp_avgs, exp_avg_sqs, steps,
                                            torch.zeros(rows, 6, dtype=torch.float64, device=device),
                                            hyper=_hyper(0.05, device), beta1=0.9, beta2=0.99, eps=1e-8)
    assert all(torch.equal(a, b) for a, b in zip(before, params + exp_avgs + exp_avg_sqs + steps))


def test_the_registry_finds_the_rows_split_step():
    device = DEVICES[0] if DEVICES else "cuda"
    if DEVICES:
        assert backends.row_split_unavailable_reason("triton", device) is None
        assert backends.resolve_row_split("triton", device) is triton_backend
    assert all(callable(getattr(triton_backend, name)) for name in backends.ROW_SPLIT_FUNCTIONS)


@pytest.mark.parametrize("device", DEVICES)
def test_the_rows_split_ops_pass_opcheck(device):
    params, grads, exp_avgs, exp_avg_sqs, steps = _problem([(3, 8), (2, 5)], torch.bfloat16, device)
    masters = [p.float() for p in params]
    statistics = torch.zeros(5, 6, device=device)
    triton_backend.row_statistics(params, grads, exp_avgs, statistics, master_params=masters)
    torch.library.opcheck(torch.ops.ndadam_fused_triton.row_statistics_.default,
                          (params, grads, exp_avgs, statistics, torch.tensor(2.0, device=device), masters))
    torch.library.opcheck(
        torch.ops.ndadam_fused_triton.apply_row_statistics_.default,
        (params, grads, exp_avgs, exp_avg_sqs, steps, statistics, _hyper(0.05, device), torch.tensor(2.0, device=device),
         torch.tensor(0.0, device=device), masters, [torch.tensor(5, device=device), torch.tensor(6, device=device)]),
    )


@pytest.mark.skipif(not INTERPRETER, reason="the gloo ranks run CPU tensors: the interpreter")
def test_tensor_parallel_rows_on_two_ranks_match_one_process():
    """NDAdam(backend="triton") on Shard(1) DTensors (rows split): one all-reduce per step, the
    one-process Triton run's result."""
    import distributed_cases
    import distributed_harness

    results = distributed_harness.pool(2).run(distributed_cases.explicit_gradients, placement="shard1",
                                             backend="triton", dtype_name="float64", steps=4)
    for rank, result in enumerate(results):
        errors = result["errors"]
        assert errors["param"] <= 1e-10 and errors["exp_avg"] <= 1e-10 and errors["step"] == 0.0, (rank, errors)
        assert result["collectives"] == {"c10d.allreduce_": 1}, (rank, result["collectives"])
        assert result["state_replicas_identical"]
