"""The Triton backend's launch options (issue 12), called as the optimizer calls it.

Each test runs the kernel's own source: under TRITON_INTERPRET=1 on the CPU (CI), on CUDA in
benchmarks/gpu_check.sh. The oracle is backends/reference.py with the same options, and
ndadam_fused/rounding.py for stochastic rounding, bit for bit.

- the hyperparameter tensor is read by the kernel at launch: a replayed launch sees it changed;
- grad_scale divides the gradients, found_inf changes nothing (step counts included);
- master weights: w read from the master, the master gets w', the param w' rounded to nearest;
- stochastic rounding: exactly rounding.py's hash;
- tensors with 0 rows or 0 columns; non-contiguous tensors passed directly are refused;
- the custom op torch.compile sees (opcheck).
"""

import math
import os

import pytest
import torch

from ndadam_fused.backends import reference, triton_backend
from ndadam_fused.optimizer import hyperparameter_tensor
from ndadam_fused.rounding import stochastic_round_to_bfloat16

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cpu"] if INTERPRETER else (["cuda"] if torch.cuda.is_available() else [])
PATHS = [pytest.param(None, id="exact"), pytest.param(0, id="statistics")]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
# Several rows per tensor (element indices past the first row), one row, rows of length 1, a
# 3-D tensor: every tile path sees a mix. Small: the interpreter costs per program.
SHAPES = [(6, 40), (1, 300), (5, 1), (3, 4, 5)]
BETAS = (0.9, 0.99)


def _state(shapes, dtype, device, seed=0, step=3.0):
    """Unit rows, gradients, moments as after a few steps, and the step counts."""
    generator = torch.Generator().manual_seed(seed)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
    for shape in shapes:
        rows = torch.randn(shape, generator=generator, dtype=torch.float64).reshape(shape[0], math.prod(shape[1:]))
        params.append((rows / rows.norm(dim=1, keepdim=True)).reshape(shape).to(device, dtype))
        grads.append(torch.randn(shape, generator=generator, dtype=torch.float64).to(device, dtype))
        exp_avgs.append((0.01 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(device, state_dtype))
        exp_avg_sqs.append((0.01 * torch.rand(shape[0], generator=generator, dtype=torch.float64)).to(device, state_dtype))
        steps.append(torch.tensor(step, device=device))
    return [params, grads, exp_avgs, exp_avg_sqs, steps]


def _clone(lists):
    return [[t.clone() for t in tensors] for tensors in lists]


def _hyper(lr, device, eps=1e-8):
    return hyperparameter_tensor(lr, *BETAS, eps, torch.device(device))


def _step(backend, lists, lr, device, single_pass_max=None, **options):
    kwargs = dict(hyper=_hyper(lr, device), beta1=BETAS[0], beta2=BETAS[1], eps=1e-8, **options)
    if backend is triton_backend:
        kwargs["single_pass_max"] = single_pass_max
    backend.vector_step(*lists, **kwargs)


def _assert_close(actual, expected, dtype):
    tolerance = TOLERANCE[torch.float64 if dtype == torch.float64 else torch.float32]
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        if a.numel():
            assert (a.double() - e.double()).abs().max().item() <= tolerance


# ---------------------------------------------------------------- the hyperparameter tensor


class _RecordedLaunches:
    """Stands in for the kernel: launches it and keeps each launch's arguments for a replay."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch

    def replay(self):
        for grid, args, kwargs in self.launches:
            self.kernel[grid](*args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("single_pass_max", PATHS)
def test_a_replayed_launch_reads_the_lr_the_hyper_tensor_holds_then(monkeypatch, device, single_pass_max):
    """What a CUDA graph does: the same launch, same arguments, replayed after the optimizer
    changed its hyper tensor in place. The kernel reads (lr, β1, β2, ε) from that tensor at every
    launch; a copy of it taken at the first step (a table's, a host cache's) would replay the
    old lr."""
    recorder = _RecordedLaunches(triton_backend._ndadam_rows_kernel)
    monkeypatch.setattr(triton_backend, "_ndadam_rows_kernel", recorder)
    lists = _state(SHAPES, torch.float64, device)
    expected = _clone(lists)
    hyper = _hyper(0.1, device)
    triton_backend.vector_step(*lists, hyper=hyper, beta1=BETAS[0], beta2=BETAS[1], eps=1e-8, single_pass_max=single_pass_max)
    _step(reference, expected, 0.1, device)
    generator = torch.Generator().manual_seed(1)
    for g, e in zip(lists[1], expected[1]):  # gradients updated in place, as a graph's static inputs are
        g.copy_(torch.randn(g.shape, generator=generator, dtype=torch.float64))
        e.copy_(g)
    hyper.copy_(_hyper(0.02, device))
    recorder.replay()
    _step(reference, expected, 0.02, device)
    assert [s.item() for s in lists[4]] == [5.0] * len(SHAPES)
    _assert_close(lists[0], expected[0], torch.float64)
    _assert_close(lists[2], expected[2], torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_a_wrong_hyper_tensor_is_refused(device):
    lists = _state(SHAPES, torch.float32, device)
    before = _clone(lists)
    for hyper, match in [(torch.zeros(4, device=device), "float64 \\[4\\]"), (torch.zeros(3, dtype=torch.float64, device=device), "got torch.float64 \\[3\\]")]:
        with pytest.raises(ValueError, match=f"hyper must be .*{match}"):
            triton_backend.vector_step(*lists, hyper=hyper, beta1=0.9, beta2=0.99, eps=1e-8)
    assert all(torch.equal(a, b) for x, y in zip(lists, before) for a, b in zip(x, y))


# ---------------------------------------------------------------- GradScaler


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("single_pass_max", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_grad_scale_divides_every_gradient(device, single_pass_max, dtype):
    """ḡ = grad / grad_scale per element (3 is not a power of two: a product by 1/3 would differ)."""
    lists = _state(SHAPES, dtype, device)
    lists[1] = [(3.0 * g.double()).to(dtype) for g in lists[1]]
    expected = _clone(lists)
    grad_scale = torch.tensor(3.0, device=device)
    _step(triton_backend, lists, 0.05, device, single_pass_max, grad_scale=grad_scale)
    _step(reference, expected, 0.05, device, grad_scale=grad_scale)
    if dtype == torch.float16:  # the params are rounded to float16: judge the state
        for p, e in zip(lists[0], expected[0]):
            assert (p.double() - e.double()).abs().max().item() <= 2 * torch.finfo(torch.float16).eps
    else:
        _assert_close(lists[0], expected[0], dtype)
    _assert_close(lists[2], expected[2], dtype)
    _assert_close(lists[3], expected[3], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("single_pass_max", PATHS)
@pytest.mark.parametrize("mode", ["plain", "master", "stochastic"])
def test_found_inf_changes_nothing_then_the_next_step_is_the_reference_step(device, single_pass_max, mode):
    dtype = torch.float32 if mode == "plain" else torch.bfloat16
    lists = _state(SHAPES, dtype, device)
    options = {}
    if mode == "master":
        options["master_params"] = [p.float() for p in lists[0]]
    if mode == "stochastic":
        options["rounding_seeds"] = [torch.tensor(7 + i, device=device) for i in range(len(SHAPES))]
    before = _clone(lists) + [[t.clone() for t in options.get("master_params", [])]]
    for flag in (1.0, float("inf")):
        _step(triton_backend, lists, 0.05, device, single_pass_max, grad_scale=torch.tensor(2.0, device=device),
              found_inf=torch.tensor(flag, device=device), **options)
        after = lists + [options.get("master_params", [])]
        assert all(torch.equal(a, b) for x, y in zip(after, before) for a, b in zip(x, y)), "a skipped step changed something"
    expected = _clone(lists)
    expected_options = {key: [t.clone() for t in value] for key, value in options.items()}
    _step(triton_backend, lists, 0.05, device, single_pass_max, found_inf=torch.tensor(0.0, device=device), **options)
    _step(reference, expected, 0.05, device, found_inf=torch.tensor(0.0, device=device), **expected_options)
    assert [s.item() for s in lists[4]] == [4.0] * len(SHAPES)
    _assert_close(lists[2], expected[2], dtype)
    if mode == "master":
        _assert_close(options["master_params"], expected_options["master_params"], dtype)


# ---------------------------------------------------------------- master weights


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("single_pass_max", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_master_weights_step_the_master_and_round_it_into_the_param(device, single_pass_max, dtype):
    """w is read from the master (not the rounded param), the master gets w' (float32), the param
    gets exactly the master rounded to nearest."""
    lists = _state(SHAPES, dtype, device)
    masters = [p.float() + 1e-4 * torch.randn(p.shape, device=device) for p in lists[0]]  # off the bf16 grid
    expected, expected_masters = _clone(lists), [m.clone() for m in masters]
    for _ in range(2):
        _step(triton_backend, lists, 0.05, device, single_pass_max, master_params=masters)
        _step(reference, expected, 0.05, device, master_params=expected_masters)
    _assert_close(masters, expected_masters, torch.float32)
    _assert_close(lists[2], expected[2], torch.float32)
    for p, m in zip(lists[0], masters):
        assert torch.equal(p, m.to(dtype)), "the param is not its master rounded to nearest"


# ---------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("single_pass_max", PATHS)
def test_stochastic_rounding_is_the_hash_of_rounding_py_bit_for_bit(device, single_pass_max):
    """Two launches from the same state: one with float32 master copies (its masters get the
    float32 w', computed as the stochastic launch computes it, since the masters hold exactly
    the bf16 params), one with rounding seeds. The stochastic launch's params must be
    rounding.stochastic_round_to_bfloat16(w', seed, t) to the bit: seeds past 2³¹ and negative
    (their low 32 bits count), t past 2¹⁶ (products that wrap), element indices past one row."""
    lists = _state(SHAPES, torch.bfloat16, device, step=70_000.0)
    seeds = [torch.tensor(s, device=device) for s in (0x9E3779B9, -1234567890123, 5, 2**40 + 17)]
    with_master = _clone(lists)
    masters = [p.float() for p in with_master[0]]
    _step(triton_backend, with_master, 0.05, device, single_pass_max, master_params=masters)
    _step(triton_backend, lists, 0.05, device, single_pass_max, rounding_seeds=seeds)
    step = torch.tensor(70_001.0)
    assert all(s.item() == step.item() for s in lists[4])
    rounded_differently = 0
    for param, master, seed in zip(lists[0], masters, seeds):
        expected = stochastic_round_to_bfloat16(master.cpu(), seed.cpu(), step)
        assert torch.equal(param.cpu().view(torch.int16), expected.view(torch.int16))
        rounded_differently += int((expected != master.cpu().to(torch.bfloat16)).sum())
    assert rounded_differently > 0, "no element rounded other than to nearest: the test cannot tell the two apart"
    _assert_close(lists[2], with_master[2], torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("single_pass_max", PATHS)
@pytest.mark.parametrize("mode", ["master", "stochastic"])
def test_a_zero_update_keeps_every_bit_with_master_weights_and_stochastic_rounding(device, single_pass_max, mode):
    """lr = 0: the row is written back as it was (master and param), stochastic rounding of a
    bf16 value included."""
    lists = _state(SHAPES, torch.bfloat16, device)
    options = {"master_params": [p.float() + 1e-4 for p in lists[0]]} if mode == "master" else \
        {"rounding_seeds": [torch.tensor(3 + i, device=device) for i in range(len(SHAPES))]}
    params = [p.clone() for p in lists[0]]
    masters = [m.clone() for m in options.get("master_params", [])]
    _step(triton_backend, lists, 0.0, device, single_pass_max, **options)
    if mode == "master":
        assert all(torch.equal(a, b) for a, b in zip(options["master_params"], masters))
        assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(lists[0], masters))
    else:
        assert all(torch.equal(a, b) for a, b in zip(lists[0], params))


# ---------------------------------------------------------------- shapes and layouts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("single_pass_max", PATHS)
def test_tensors_with_no_rows_or_no_columns_take_their_step(device, single_pass_max):
    """A rank's piece of a sharded tensor can have 0 rows or rows of 0 elements: no error, its
    step counts, every other tensor is stepped as the reference steps it."""
    shapes = [(0, 5), (4, 6), (2, 0), (0, 9000), (3, 9)]
    lists = _state(shapes, torch.float64, device)
    # The reference reshapes rows with -1, which a 0-row tensor cannot: it steps the others.
    with_rows = [1, 2, 4]
    expected = [[tensors[i].clone() for i in with_rows] for tensors in lists]
    _step(triton_backend, lists, 0.05, device, single_pass_max)
    _step(reference, expected, 0.05, device)
    assert [s.item() for s in lists[4]] == [4.0] * len(shapes)
    _assert_close([lists[0][i] for i in with_rows], expected[0], torch.float64)
    _assert_close([lists[3][i] for i in with_rows], expected[3], torch.float64)
    only_empty = _state([(0, 3), (0, 7)], torch.float64, device)
    _step(triton_backend, only_empty, 0.05, device, single_pass_max)
    assert [s.item() for s in only_empty[4]] == [4.0, 4.0]


def test_a_zero_row_tensor_gets_one_empty_slot():
    plan = triton_backend.plan_tiles([0, 3, 0], [5, 5, 9000], [True, True, True])
    slots = plan.slot_table[plan.slot_table[:, 0] >= 0]
    assert sorted(map(tuple, slots.tolist())) == [(0, -1), (1, 0), (1, 1), (1, 2), (2, -1)]
    assert plan.tiles_per_tensor.tolist() == [1, 1, 1]
    assert plan.elements == 15


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["param", "exp_avg"])
def test_a_non_contiguous_tensor_passed_directly_is_refused_naming_it(device, which):
    """NDAdam hands the kernels row-major tensors (rows.RowMajorViews); a direct caller that
    passes a transposed one gets an error naming it, and nothing is modified."""
    lists = _state(SHAPES, torch.float32, device)
    square = torch.randn(6, 6, device=device)
    index = 0 if which == "param" else 2
    lists[0].append(square.t() if which == "param" else square.clone())
    lists[1].append(torch.randn(6, 6, device=device))
    lists[2].append(torch.zeros(6, 6, device=device).t() if which == "exp_avg" else torch.zeros(6, 6, device=device))
    lists[3].append(torch.zeros(6, device=device))
    lists[4].append(torch.tensor(0.0, device=device))
    before = _clone(lists)
    message = r"params\[4\] \(shape \[6, 6\], torch.float32\) " + ("is not contiguous" if which == "param" else "has an exp_avg .*contiguous: False")
    with pytest.raises(RuntimeError, match=message):
        _step(triton_backend, lists, 0.05, device)
    assert all(torch.equal(a, b) for x, y in zip(lists, before) for a, b in zip(x, y))
    assert lists[index][4].is_contiguous() is False


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("device", DEVICES)
def test_the_vector_step_op_passes_opcheck(device):
    """Schema (what it mutates), fake implementation, and the op under torch.compile's tracing."""
    lists = _state([(3, 8), (2, 5)], torch.bfloat16, device)
    masters = [p.float() for p in lists[0]]
    torch.library.opcheck(
        torch.ops.ndadam_fused_triton.vector_step_.default,
        (*lists, _hyper(0.05, device), torch.tensor(2.0, device=device), torch.tensor(0.0, device=device), masters, [], 8192),
    )
    lists = _state([(3, 8)], torch.bfloat16, device)
    torch.library.opcheck(
        torch.ops.ndadam_fused_triton.vector_step_.default,
        (*lists, _hyper(0.05, device), None, None, [], [torch.tensor(11, device=device)], 0),
    )
