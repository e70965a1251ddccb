"""The native backend (csrc/, ndadam_fused._C): DESIGN.md section 7's matrix against the reference.

Every test runs on CPU (the C++ kernel) and, where a GPU and a CUDA build of the extension are
present, on CUDA (the CUDA kernel); the CUDA variants skip elsewhere. A missing extension fails
this module instead of skipping it, so that CI cannot pass without running the native tests;
set NDADAM_NO_EXTENSION=1 to skip it knowingly.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import backend_cases
from backend_cases import MANY_SMALL_SHAPES, SCALAR_SHAPES, SECTION_7_SHAPES
from ndadam_fused import NDAdam, backends
from ndadam_fused.backends import native
from ndadam_fused.rows import unit_tolerance as _unit_tolerance

if native._C is None:
    if os.environ.get("NDADAM_NO_EXTENSION") == "1":
        pytest.skip("NDADAM_NO_EXTENSION=1: the native extension is not built", allow_module_level=True)
    raise RuntimeError(f"the native tests need the extension: {native.unavailable_reason(torch.device('cpu'))}")

CUDA_READY = torch.cuda.is_available() and bool(native._C.BUILT_WITH_CUDA)
NEEDS_CUDA = pytest.mark.skipif(not CUDA_READY, reason="needs a GPU and a CUDA build of ndadam_fused._C")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
ALL_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
STEPS = 25
LONGEST_EXACT_ROW = native._C.SINGLE_PASS_MAX_ROW_LENGTH
OP = torch.ops.ndadam_fused.vector_step_.default


@pytest.fixture
def single_pass_limit(monkeypatch):
    """Sets the cut-over between the exact and the statistics path for one test."""

    def set_limit(limit):
        monkeypatch.setattr(native, "SINGLE_PASS_MAX_ROW_LENGTH", limit)

    return set_limit


class CountVectorStepCalls(TorchDispatchMode):
    """Records every call of the op: (device, dtype, number of tensors)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is OP:
            self.calls.append((args[0][0].device.type, args[0][0].dtype, len(args[0])))
        return func(*args, **(kwargs or {}))


def unit_rows(shape, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    rows = x.reshape(shape[0], -1)
    return (rows / rows.norm(dim=1, keepdim=True)).reshape(shape).to(device=device, dtype=dtype)


def hyper_tensor(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, device="cpu"):
    """The op's hyperparameter tensor: float64 [lr, β1, β2, ε] on ``device``."""
    return torch.tensor([lr, beta1, beta2, eps], dtype=torch.float64, device=device)


#: The op's arguments after ``hyper`` when no option is used: grad_scale, found_inf, master_params, rounding_seeds.
NO_OPTIONS = (None, None, [], [])


def op_arguments(shapes, dtype=torch.float32, device="cpu", lr=0.05):
    """Fresh arguments of vector_step_ for ``shapes`` (params with unit rows, state, grads) up to
    its ``hyper`` tensor (lr, β1 = 0.9, β2 = 0.99, ε = 1e-8)."""
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    params = [unit_rows(s, dtype, device, seed=i) for i, s in enumerate(shapes)]
    grads = [torch.randn(s, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]
    exp_avgs = [torch.randn(s, dtype=torch.float64).mul(0.01).to(device=device, dtype=state_dtype) for s in shapes]
    exp_avg_sqs = [torch.rand(s[0], dtype=torch.float64).mul(0.01).to(device=device, dtype=state_dtype) for s in shapes]
    steps = [torch.tensor(3.0, device=device) for _ in shapes]
    return params, grads, exp_avgs, exp_avg_sqs, steps, hyper_tensor(lr, device=device)


# ---- DESIGN.md section 7 against the reference ---------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_section_7_matrix_matches_reference(device, dtype):
    """Row lengths 1, 2, 27, 1000, 4096, 9000; one-row tensors; two groups with different lr;
    grads re-allocated every other step; scalars alongside; 25 steps."""
    backend_cases.compare_with_reference(
        "native", SECTION_7_SHAPES + SCALAR_SHAPES, dtype, STEPS, device=device, vector_lrs=(0.05, 0.2), realloc_grads=True
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_statistics_path_forced_on_every_shape(device, dtype, single_pass_limit):
    single_pass_limit(0)
    backend_cases.compare_with_reference(
        "native", SECTION_7_SHAPES, dtype, STEPS, device=device, vector_lrs=(0.05, 0.2), realloc_grads=True
    )


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_single_pass_forced_on_the_long_rows_cpu(dtype, single_pass_limit):
    # The CPU kernel has no on-chip limit: force the exact path past the default cut-over.
    single_pass_limit(1 << 30)
    backend_cases.compare_with_reference("native", [(1, 9000), (2, 20000), (3, 1000)], dtype, STEPS, vector_lrs=(0.05,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_exact_path_at_its_longest_row(device, dtype, single_pass_limit):
    # The longest row the exact path holds (CUDA: 1024 threads x 8 elements), with the cut-over
    # at that length, and one element more, which takes the statistics path.
    single_pass_limit(LONGEST_EXACT_ROW)
    backend_cases.compare_with_reference(
        "native", [(2, LONGEST_EXACT_ROW), (1, LONGEST_EXACT_ROW + 1), (1, LONGEST_EXACT_ROW - 3)], dtype, STEPS, device=device
    )


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_runs_of_rows_past_the_cut_over_cpu(dtype):
    # Past the default cut-over, the CPU kernel sums each row's six statistics in the sweep that
    # writes the row before it (same tensor, same thread): several such rows in one tensor, at the
    # default limit, and a tensor after them.
    backend_cases.compare_with_reference(
        "native", [(4, LONGEST_EXACT_ROW + 5), (3, LONGEST_EXACT_ROW + 1000), (2, 300)], dtype, 6, vector_lrs=(0.05,)
    )


#: Tensors of several of the CPU kernel's runs (about 65,536 elements of whole rows) each, with
#: rows of unequal cost: longer than L1, past the cut-over, one row longer than a run, short.
RUNS_OF_UNEQUAL_COST = [(40, 5000), (3, 9000), (300, 300), (2, 70000), (5, 7)]


def test_runs_claimed_by_any_number_of_threads_match_reference_cpu():
    # The threads claim runs one at a time: every run is stepped once whatever the thread count,
    # and a row's result does not depend on which thread stepped it.
    previous = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            backend_cases.compare_with_reference("native", RUNS_OF_UNEQUAL_COST, torch.float32, 3)
            params, opt = backend_cases.run("native", RUNS_OF_UNEQUAL_COST, torch.float32, 3)
            results[threads] = [(p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]) for p in params]
    finally:
        torch.set_num_threads(previous)
    for threads in (2, 3):
        for one, many in zip(results[1], results[threads]):
            assert all(torch.equal(a, b) for a, b in zip(one, many)), f"{threads} threads differ from one"


@pytest.mark.parametrize("device", DEVICES)
def test_the_two_paths_really_differ(device, single_pass_limit):
    """Forcing a path changes which code runs: the two paths round differently (same math)."""
    results = []
    for limit in (0, None):
        single_pass_limit(limit)
        params, _ = backend_cases.run("native", [(3, 1000)], torch.float32, 5, device=device)
        results.append(params[0].detach().cpu())
    assert not torch.equal(results[0], results[1])
    assert (results[0] - results[1]).abs().max() < 1e-6


def _cpu_runs(instruction_set: str) -> bool:
    """Whether this CPU and build run the kernel's copy for ``instruction_set``."""
    args = op_arguments([(2, 3)])
    os.environ["NDADAM_CPU_INSTRUCTION_SET"] = instruction_set
    try:
        OP(*args, *NO_OPTIONS)
        return True
    except RuntimeError as error:
        if "does not have" in str(error):
            return False
        raise
    finally:
        del os.environ["NDADAM_CPU_INSTRUCTION_SET"]


@pytest.mark.parametrize("instruction_set", ["baseline", "x86-64-v3", "x86-64-v4"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("limit", [None, 0], ids=["default", "statistics"])
def test_every_cpu_instruction_set_copy_matches_reference(instruction_set, dtype, limit, monkeypatch, single_pass_limit):
    """The CPU kernel is compiled once per instruction set and picks the best at run time; the
    others are checked by asking for them."""
    if not _cpu_runs(instruction_set):
        pytest.skip(f"this CPU or build has no {instruction_set} copy")
    monkeypatch.setenv("NDADAM_CPU_INSTRUCTION_SET", instruction_set)
    single_pass_limit(limit)
    backend_cases.compare_with_reference("native", SECTION_7_SHAPES, dtype, STEPS, vector_lrs=(0.05, 0.2))


def test_unknown_cpu_instruction_set_is_an_error_that_changes_nothing(monkeypatch):
    args = op_arguments([(3, 8)])
    before = args[0][0].clone()
    monkeypatch.setenv("NDADAM_CPU_INSTRUCTION_SET", "avx9000")
    with pytest.raises(RuntimeError, match="NDADAM_CPU_INSTRUCTION_SET=avx9000 is not one of"):
        OP(*args, *NO_OPTIONS)
    assert args[4][0].item() == 3.0 and torch.equal(args[0][0], before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_many_small_tensors_in_one_call(device, dtype):
    backend_cases.compare_with_reference("native", MANY_SMALL_SHAPES, dtype, STEPS, device=device, realloc_grads=True)
    with CountVectorStepCalls() as counter:
        backend_cases.run("native", MANY_SMALL_SHAPES, dtype, 3, device=device)
    # All 200 tensors in one call, one call per step.
    assert counter.calls == [(torch.device(device).type, dtype, len(MANY_SMALL_SHAPES))] * 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("limit", [None, 0], ids=["exact", "statistics"])
def test_length_one_rows_stay_exactly_unit(device, dtype, limit, single_pass_limit):
    single_pass_limit(limit)
    params, opt = backend_cases.run("native", [(64, 1), (5, 1, 1)], dtype, STEPS, device=device)
    for p in params:
        assert torch.equal(p.detach().abs(), torch.ones_like(p)), "a length-1 row left ±1"
        assert torch.equal(opt.state[p]["exp_avg"], torch.zeros_like(opt.state[p]["exp_avg"]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("limit", [None, 0], ids=["exact", "statistics"])
def test_eps_zero_and_zero_gradient_rows_make_no_step(device, limit, single_pass_limit):
    """eps = 0 and v̂ = 0: the reference divides by 1, so the row does not move (no NaN)."""
    single_pass_limit(limit)
    shapes = [(4, 33), (2, 1000)]
    params = [torch.nn.Parameter(unit_rows(s, device=device, seed=i)) for i, s in enumerate(shapes)]
    start = [p.detach().clone() for p in params]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = NDAdam(params, lr=0.1, eps=0.0, backend="native")
    ref_opt = NDAdam(reference, lr=0.1, eps=0.0, backend="reference")
    for step in range(3):
        for p, q in zip(params, reference):
            grad = torch.randn(p.shape, device=device)
            grad[1] = 0.0  # row 1 never gets a gradient
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    for p, q, p0 in zip(params, reference, start):
        assert torch.isfinite(p).all()
        # Row 1 does not move (re-normalizing a unit row only moves rounding bits).
        assert (p.detach()[1] - p0[1]).abs().max() < 1e-6
        assert opt.state[p]["exp_avg_sq"][1].item() == 0.0
        assert torch.equal(opt.state[p]["exp_avg"][1], torch.zeros_like(p0[1]))
        assert (p.detach() - q.detach()).abs().max() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_tensor_lr_and_one_call_per_group_and_dtype(device):
    """Groups of mixed dtypes: one op call per (group, dtype); a tensor lr works like a float."""
    params = [torch.nn.Parameter(unit_rows(s, dtype, device, seed=i)) for i, (s, dtype) in enumerate([
        ((4, 30), torch.float32), ((3, 8), torch.bfloat16), ((5, 16), torch.float32), ((2, 7), torch.float64),
        ((6, 12), torch.float32),
    ])]
    groups = [
        {"params": params[:4], "lr": torch.tensor(0.05), "vector": True},
        {"params": params[4:], "lr": 0.2, "vector": True},
    ]
    opt = NDAdam(groups, backend="native")
    for p in params:
        p.grad = torch.randn_like(p)
    with CountVectorStepCalls() as counter:
        opt.step()
    device_type = torch.device(device).type
    # Group 1: one call per dtype, in whichever order the dtypes are grouped; then group 2.
    assert len(counter.calls) == 4
    assert sorted(counter.calls[:3], key=str) == sorted(
        [(device_type, torch.float32, 2), (device_type, torch.bfloat16, 1), (device_type, torch.float64, 1)], key=str
    )
    assert counter.calls[3] == (device_type, torch.float32, 1)
    for p in params:
        rows = p.detach().double().reshape(p.shape[0], -1)
        assert (rows.norm(dim=1) - 1).abs().max() < 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_conv_weight_matches_reference(device):
    def make(backend):
        conv = torch.nn.Conv2d(8, 6, 3, bias=False).to(device).to(memory_format=torch.channels_last)
        torch.nn.init.normal_(conv.weight, generator=torch.Generator(device).manual_seed(0))
        opt = NDAdam([conv.weight], lr=0.05, backend=backend)
        generator = torch.Generator(device).manual_seed(1)
        for _ in range(5):
            conv.weight.grad = torch.randn(conv.weight.shape, device=device, generator=generator).contiguous(
                memory_format=torch.channels_last
            )
            opt.step()
        return conv.weight.detach()

    native_weight, reference_weight = make("native"), make("reference")
    assert native_weight.is_contiguous(memory_format=torch.channels_last)
    assert (native_weight - reference_weight).abs().max() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("limit", [None, 0], ids=["exact", "statistics"])
def test_rows_stay_within_the_unit_norm_tolerance_of_construction(device, dtype, limit, single_pass_limit):
    """A stepped row must count as unit when the optimizer is rebuilt on it (optimizer._unit_tolerance),
    or a resumed run would re-normalize it and stop being bit-exact."""
    single_pass_limit(limit)
    params, _ = backend_cases.run("native", SECTION_7_SHAPES, dtype, STEPS, device=device, vector_lrs=(0.05, 0.2))
    for p in params:
        rows = p.detach().reshape(p.shape[0], -1)
        worst = (rows.double().norm(dim=1) - 1).abs().max().item()
        assert worst <= _unit_tolerance(dtype, rows.shape[1]), (tuple(p.shape), worst)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("limit", [None, 0], ids=["exact", "statistics"])
def test_eps_zero_and_subnormal_second_moment_take_the_reference_step(device, limit, single_pass_limit):
    """eps = 0 and ||g||² about 1e-37 at step 1: v' is subnormal in fp32. The reference takes a
    full step (Adam is scale-free); flushing subnormals to zero would make v̂ = 0 and no step."""
    single_pass_limit(limit)
    shapes = [(3, 64), (2, 1000)]
    params = [torch.nn.Parameter(unit_rows(s, device=device, seed=i)) for i, s in enumerate(shapes)]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    start = [p.detach().clone() for p in params]
    opt = NDAdam(params, lr=0.05, eps=0.0, backend="native")
    ref_opt = NDAdam(reference, lr=0.05, eps=0.0, backend="reference")
    generator = torch.Generator().manual_seed(0)
    for p, q in zip(params, reference):
        grad = (torch.randn(p.shape, generator=generator) * 4e-20).to(device)
        p.grad, q.grad = grad.clone(), grad.clone()
    opt.step()
    ref_opt.step()
    for p, q, p0 in zip(params, reference, start):
        v = opt.state[p]["exp_avg_sq"]
        assert ((v > 0) & (v < torch.finfo(torch.float32).tiny)).all(), "the test's v' is not subnormal"
        assert (q.detach() - p0).abs().max() > 1e-3, "the reference did not step"
        assert (p.detach() - q.detach()).abs().max() < 1e-5


def _flat_views(shape, offset, device, dtype=torch.float32):
    """A tensor of `shape` viewing a flat buffer from element `offset`, and that buffer."""
    buffer = torch.zeros(offset + math.prod(shape) + 64, dtype=dtype, device=device)
    return buffer[offset:offset + math.prod(shape)].view(shape), buffer


@pytest.mark.parametrize("device", DEVICES)
def test_same_addresses_with_a_new_shape_step_the_new_rows(device):
    """The same buffers stepped as 4 x 256 and then as 16 x 64 (one tensor reused with another
    shape): a table keyed without the shapes would step the second call with the first's rows."""
    param_buffer = torch.zeros(1024, device=device)
    grad_buffer = torch.zeros(1024, device=device)
    m_buffer = torch.zeros(1024, device=device)
    v_buffer = torch.zeros(16, device=device)
    step = torch.zeros((), device=device)
    hyper = hyper_tensor(0.05, 0.9, 0.999, 1e-8, device=device)
    for rows, length in [(4, 256), (16, 64), (4, 256)]:
        w = param_buffer.view(rows, length)
        w.copy_(unit_rows((rows, length), device=device, seed=rows))
        grad_buffer.copy_(torch.randn(1024, generator=torch.Generator().manual_seed(length)).to(device))
        m_buffer.zero_()
        v_buffer.zero_()
        step.zero_()
        expected = w.clone()
        reference = torch.nn.Parameter(expected)
        ref_opt = NDAdam([reference], lr=0.05, betas=(0.9, 0.999), eps=1e-8, backend="reference")
        reference.grad = grad_buffer.view(rows, length).clone()
        ref_opt.step()
        OP([w], [grad_buffer.view(rows, length)], [m_buffer.view(rows, length)], [v_buffer[:rows]], [step], hyper,
           *NO_OPTIONS)
        assert (w - reference.detach()).abs().max() < 1e-5, (rows, length)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [1, 2, 3])
def test_views_off_the_access_width_step_correctly(device, offset):
    """Params, grads and moments viewing flat buffers `offset` elements in (4 * offset bytes off
    a 16-byte boundary): the kernel must not use 16-byte accesses on them (on a GPU they fault or
    read the wrong elements)."""
    shapes = [(3, 64), (2, 1000), (5, 8)]
    params, grads, exp_avgs, exp_avg_sqs, steps, hyper = op_arguments(shapes, device=device)
    views = []
    for tensors in (params, grads, exp_avgs):
        moved = []
        for t in tensors:
            view, _ = _flat_views(tuple(t.shape), offset, device)
            view.copy_(t)
            moved.append(view)
        views.append(moved)
    assert all(v.data_ptr() % 16 != 0 for v in views[0])
    expected = [p.clone() for p in params]
    view_exp_avg_sqs = [v.clone() for v in exp_avg_sqs]
    OP(params, grads, exp_avgs, exp_avg_sqs, [s.clone() for s in steps], hyper, *NO_OPTIONS)
    OP(views[0], views[1], views[2], view_exp_avg_sqs, steps, hyper, *NO_OPTIONS)
    for aligned, view, start in zip(params, views[0], expected):
        assert not torch.equal(aligned, start)
        assert (aligned - view).abs().max() < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_lr_schedule_with_gradients_updated_in_place_follows_the_schedule(device):
    """An lr scheduler changes the group's lr every step while the gradients are written in place
    (same tensors, same tables): every step must use that step's lr, as the reference does."""
    shapes = [(6, 40), (3, 100)]

    def train(backend):
        params = [torch.nn.Parameter(unit_rows(s, device=device, seed=i)) for i, s in enumerate(shapes)]
        opt = NDAdam(params, lr=0.1, backend=backend)
        schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.3)
        generator = torch.Generator().manual_seed(3)
        for p in params:
            p.grad = torch.zeros_like(p)
        for _ in range(6):
            for p in params:
                p.grad.copy_(torch.randn(p.shape, generator=generator).to(device))
            opt.step()
            schedule.step()
        return params

    for p, q in zip(train("native"), train("reference")):
        assert (p.detach() - q.detach()).abs().max() < 1e-5


def _mlp(seed, device="cuda"):
    """A small MLP whose weights are all vectors (no biases: scalars step through torch's Adam)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(48, 40, bias=False), torch.nn.Tanh(), torch.nn.Linear(40, 24, bias=False), torch.nn.Tanh(),
        torch.nn.Linear(24, 10, bias=False),
    ).to(device)


def _train_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


@NEEDS_CUDA
def test_cuda_fresh_gradients_build_no_table_and_never_synchronize():
    """Steady state with fresh gradient tensors every step (zero_grad(set_to_none=True), FSDP2):
    no device table is built, and opt.step() makes no synchronizing call (sync debug mode)."""
    model = _mlp(0)
    params = list(model.parameters())
    opt = NDAdam([{"params": params[:2], "lr": 0.05, "vector": True}, {"params": params[2:], "lr": 0.2, "vector": True}],
                 backend="native")
    x, y = torch.randn(32, 48, device="cuda"), torch.randn(32, 10, device="cuda")
    kept = []  # the old gradients stay alive, so every step's gradients are at new addresses
    for _ in range(2):
        _train_step(model, opt, x, y)
        kept.append([p.grad for p in params])
    builds = native._C.cuda_table_builds()
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        kept.append([p.grad for p in params])
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    addresses = [tuple(g.data_ptr() for g in grads) for grads in kept]
    assert len(set(addresses)) == len(addresses), "the test meant fresh gradient addresses every step"
    assert native._C.cuda_table_builds() == builds
    torch.cuda.synchronize()
    for p in params:
        assert (p.detach().norm(dim=1) - 1).abs().max() < 1e-5


@NEEDS_CUDA
def test_cuda_graph_replays_match_eager_steps_after_cache_churn():
    """The torch.cuda.graph recipe: warm up on a side stream, zero_grad(set_to_none=True), capture
    forward, backward and opt.step(). Between replays: more eager steps with distinct tables than
    the table cache keeps, and memory allocated and filled with NaN. Every replay must equal the
    same step taken eagerly (two groups with different lr: the captured lr must be each group's)."""

    def make():
        model = _mlp(0)
        params = list(model.parameters())
        groups = [{"params": params[::2], "lr": 0.05, "vector": True}, {"params": params[1::2], "lr": 0.2, "vector": True}]
        return model, NDAdam(groups, backend="native")

    generator = torch.Generator(device="cuda").manual_seed(1)
    data = [(torch.randn(32, 48, device="cuda", generator=generator), torch.randn(32, 10, device="cuda", generator=generator))
            for _ in range(7)]
    graph_model, graph_opt = make()
    eager_model, eager_opt = make()
    static_x, static_y = data[0][0].clone(), data[0][1].clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in data[:3]:
            _train_step(graph_model, graph_opt, x, y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in data[:3]:
        _train_step(eager_model, eager_opt, x, y)

    graph = torch.cuda.CUDAGraph()
    graph_opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        torch.nn.functional.mse_loss(graph_model(static_x), static_y).backward()
        graph_opt.step()

    for x, y in data[3:]:
        for k in range(20):  # the cache keeps 16 eager tables
            p = torch.nn.Parameter(torch.randn(3 + k, 7, device="cuda"))
            other = NDAdam([p], backend="native")
            p.grad = torch.randn_like(p)
            other.step()
        junk = [torch.full((1 << 18,), float("nan"), device="cuda") for _ in range(16)]
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        _train_step(eager_model, eager_opt, x, y)
        del junk
        torch.cuda.synchronize()
        for a, b in zip(graph_model.parameters(), eager_model.parameters()):
            assert torch.isfinite(a).all()
            assert (a - b).abs().max() < 1e-6
        for a, b in zip(graph_model.parameters(), eager_model.parameters()):
            assert graph_opt.state[a]["step"].item() == eager_opt.state[b]["step"].item()


# ---- The op: schema, fake implementation, torch.compile ------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck(dtype):
    args = op_arguments([(4, 9), (3, 16), (1, 1), (2, 3, 3)], dtype=dtype)
    torch.library.opcheck(OP, (*args, *NO_OPTIONS, -1))
    torch.library.opcheck(OP, (*args, *NO_OPTIONS, 0))


def test_op_updates_in_place_and_increments_steps():
    params, grads, exp_avgs, exp_avg_sqs, steps, hyper = op_arguments([(4, 9), (2, 5)])
    before = [p.clone() for p in params]
    OP(params, grads, exp_avgs, exp_avg_sqs, steps, hyper, *NO_OPTIONS)
    assert [s.item() for s in steps] == [4.0, 4.0]
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    for p in params:
        assert (p.reshape(p.shape[0], -1).norm(dim=1) - 1).abs().max() < 1e-6


def test_torch_compile_sees_one_opaque_op():
    from torch._dynamo.testing import CompileCounterWithBackend

    shapes = [(4, 9), (3, 16)]
    eager_args = op_arguments(shapes)
    compiled_args = [[t.clone() for t in group] if isinstance(group, list) else group.clone() for group in eager_args]

    def step(params, grads, exp_avgs, exp_avg_sqs, steps, hyper):
        OP(params, grads, exp_avgs, exp_avg_sqs, steps, hyper, *NO_OPTIONS)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    frames_after_first_call = None
    for _ in range(3):
        step(*eager_args)
        compiled(*compiled_args)
        frames_after_first_call = frames_after_first_call or counter.frame_count
    assert counter.frame_count == frames_after_first_call  # no recompilation as the state changes
    graph_ops = [n.target for graph in counter.graphs for n in graph.graph.nodes if n.op == "call_function"]
    assert graph_ops == [OP]  # the whole step is one opaque node
    for eager, compiled_group in zip(eager_args[:5], compiled_args[:5]):
        for a, b in zip(eager, compiled_group):
            assert torch.equal(a, b)


# ---- Bad input: a clear error naming the argument, nothing modified -----------------------


def _break(args, what):
    params, grads, exp_avgs, exp_avg_sqs, steps, hyper = args
    if what == "grads[1] shape":
        grads[1] = grads[1][:, :-1].contiguous()
    elif what == "exp_avgs[1] dtype":
        exp_avgs[1] = exp_avgs[1].double()
    elif what == "exp_avg_sqs[0] shape":
        exp_avg_sqs[0] = exp_avg_sqs[0][:-1]
    elif what == "state_steps[1] dtype":
        steps[1] = steps[1].double()
    elif what == "params[1] dtype":
        params[1] = params[1].double()
    elif what == "params[0] 1-D":
        params[0], grads[0], exp_avgs[0] = params[0][0], grads[0][0], exp_avgs[0][0]
    elif what == "grads[0] non-contiguous":
        grads[0] = grads[0].t().contiguous().t()
    elif what == "list lengths":
        exp_avgs.pop()
    elif what == "hyper shape":
        hyper = torch.ones(2, dtype=torch.float64)
    elif what == "hyper dtype":
        hyper = hyper.float()
    return params, grads, exp_avgs, exp_avg_sqs, steps, hyper


@pytest.mark.parametrize("what, message", [
    ("grads[1] shape", r"grads\[1\]"),
    ("exp_avgs[1] dtype", r"exp_avgs\[1\]"),
    ("exp_avg_sqs[0] shape", r"exp_avg_sqs\[0\].*one second moment per row"),
    ("state_steps[1] dtype", r"state_steps\[1\]"),
    ("params[1] dtype", r"params\[1\].*once per \(device, dtype\)"),
    ("params[0] 1-D", r"params\[0\].*at least 2 dims"),
    ("grads[0] non-contiguous", r"grads\[0\].*contiguous"),
    ("list lengths", r"one entry per param"),
    ("hyper shape", r"hyper must be a contiguous float64 tensor of 4 elements"),
    ("hyper dtype", r"hyper must be a contiguous float64 tensor of 4 elements"),
])
def test_bad_input_is_named_and_nothing_is_modified(what, message):
    args = _break(list(op_arguments([(3, 8), (2, 8)])), what)
    snapshot = [[t.clone() for t in group] if isinstance(group, list) else group.clone() for group in args]
    with pytest.raises(RuntimeError, match=message):
        OP(*args, *NO_OPTIONS)
    for group, saved in zip(args, snapshot):
        for tensor, copy in zip(group if isinstance(group, list) else [group], saved if isinstance(saved, list) else [saved]):
            assert torch.equal(tensor, copy)


@pytest.mark.parametrize("lr, beta1, beta2, eps, limit, message", [
    (0.05, 1.0, 0.99, 1e-8, -1, r"hyper\[1\] \(beta1\)"), (0.05, 0.9, -0.1, 1e-8, -1, r"hyper\[2\] \(beta2\)"),
    (0.05, 0.9, 0.99, -1.0, -1, r"hyper\[3\] \(eps\)"), (-0.1, 0.9, 0.99, 1e-8, -1, r"hyper\[0\] \(lr\)"),
    (math.inf, 0.9, 0.99, 1e-8, -1, r"hyper\[0\] \(lr\)"), (0.05, 0.9, 0.99, 1e-8, -2, "max_single_pass_row_length"),
])
def test_bad_hyperparameters_are_named(lr, beta1, beta2, eps, limit, message):
    """The CPU kernel reads the hyper tensor on the host and checks it before anything changes."""
    args = list(op_arguments([(3, 8)]))
    args[5] = hyper_tensor(lr, beta1, beta2, eps)
    before = args[0][0].clone()
    with pytest.raises(RuntimeError, match=message):
        OP(*args, *NO_OPTIONS, limit)
    assert args[4][0].item() == 3.0 and torch.equal(args[0][0], before)


@pytest.mark.skipif(not CUDA_READY, reason="needs a GPU and a CUDA build of ndadam_fused._C")
def test_cuda_cut_over_cannot_exceed_what_fits_on_chip():
    args = op_arguments([(3, 8)], device="cuda")
    with pytest.raises(RuntimeError, match="on chip"):
        OP(*args, *NO_OPTIONS, LONGEST_EXACT_ROW + 1)
    assert args[4][0].item() == 3.0


@pytest.mark.skipif(not CUDA_READY, reason="needs a GPU and a CUDA build of ndadam_fused._C")
def test_cuda_one_kernel_launch_per_call():
    shapes = MANY_SMALL_SHAPES + [(3, 1000), (1, 9000)]
    args = op_arguments(shapes, device="cuda")
    OP(*args, *NO_OPTIONS)  # uploads the table
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        OP(*args, *NO_OPTIONS)
        torch.cuda.synchronize()
    kernels = [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("vector_step_kernel" in name for name in kernels) == 1, kernels
    assert all(s.item() == 5.0 for s in args[4])


# ---- Availability: built, missing, without CUDA --------------------------------------------


def test_auto_picks_native_when_built():
    assert backends.unavailable_reason("native", "cpu") is None
    assert backends.auto_backend("cpu") == "native"
    assert backends.resolve("auto", "cpu") is native
    if CUDA_READY:
        assert backends.auto_backend("cuda") == "native"


def test_without_cuda_kernel_cuda_says_how_to_build(monkeypatch):
    monkeypatch.setattr(native._C, "BUILT_WITH_CUDA", 0)
    reason = native.unavailable_reason(torch.device("cuda"))
    assert "CUDA_HOME" in reason and "pip install --no-build-isolation -e ." in reason
    assert native.unavailable_reason(torch.device("cpu")) is None


def test_missing_extension_never_breaks_import():
    """With ndadam_fused._C unimportable: the package imports, "native" says how to build it,
    and "auto" takes the next best backend."""
    script = """
import sys
sys.modules["ndadam_fused._C"] = None  # makes `from .. import _C` raise ImportError
import torch
import ndadam_fused
from ndadam_fused import NDAdam, backends
assert backends.auto_backend("cpu") == "reference", backends.auto_backend("cpu")
reason = backends.unavailable_reason("native", "cpu")
assert "pip install --no-build-isolation -e ." in reason, reason
try:
    NDAdam([torch.nn.Parameter(torch.randn(3, 4))], backend="native")
except RuntimeError as error:
    assert "pip install --no-build-isolation -e ." in str(error), error
else:
    raise AssertionError("backend='native' without the extension did not raise")
p = torch.nn.Parameter(torch.randn(3, 4))
opt = NDAdam([p], backend="auto")
p.grad = torch.randn(3, 4)
opt.step()
print("ok")
"""
    # NDADAM_NO_JIT_BUILD=1: the package would otherwise build the extension at first use
    # (tests/test_install.py tests that).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "NDADAM_NO_JIT_BUILD": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
