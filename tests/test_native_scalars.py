"""The native backend's scalar op, ``ndadam_fused::scalar_step_`` (csrc/cpu/scalar_step_cpu.cpp):
Adam with L2 weight decay over every scalar tensor of a call on the CPU, checked against torch's
own fused Adam (the implementation it replaces there) and against float64.

A missing extension fails this module as it fails test_native.py (NDADAM_NO_EXTENSION=1 skips it).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.optim.adam import adam
from torch.utils._python_dispatch import TorchDispatchMode

import backend_cases
from ndadam_fused import NDAdam
from ndadam_fused.backends import native

if native._C is None:
    if os.environ.get("NDADAM_NO_EXTENSION") == "1":
        pytest.skip("NDADAM_NO_EXTENSION=1: the native extension is not built", allow_module_level=True)
    raise RuntimeError(f"the native tests need the extension: {native.unavailable_reason(torch.device('cpu'))}")

OP = torch.ops.ndadam_fused.scalar_step_.default
ALL_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
#: Odd lengths (1, one past a vector of 16, one past the op's pieces of 16,384 elements), a 2-D
#: scalar (a "vector": False group's matrix), and an empty tensor.
SHAPES = [(1,), (17,), (3, 5), (16385,), (0,)]
STEPS = 6


def scalar_arguments(shapes, dtype, seed=0):
    """Params, grads (one list per step), first and second moments, step counts: fresh, random."""
    generator = torch.Generator().manual_seed(seed)

    def randn(shape, scale=1.0):
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    params = [randn(s) for s in shapes]
    grads = [[randn(s, 0.1) for s in shapes] for _ in range(STEPS)]
    exp_avgs = [randn(s, 0.01) for s in shapes]
    exp_avg_sqs = [randn(s, 0.01).abs() for s in shapes]
    steps = [torch.tensor(2.0) for _ in shapes]
    return params, grads, exp_avgs, exp_avg_sqs, steps


def hyper(lr, beta1=0.9, beta2=0.99, eps=1e-8):
    return torch.tensor([lr, beta1, beta2, eps], dtype=torch.float64)


def clone(tensors):
    return [t.clone() for t in tensors]


def run_op(arguments, weight_decay, lrs):
    params, grads, exp_avgs, exp_avg_sqs, steps = (clone(a) if i != 1 else a for i, a in enumerate(arguments))
    for step, lr in enumerate(lrs):
        OP(params, clone(grads[step]), exp_avgs, exp_avg_sqs, steps, hyper(lr), weight_decay, None, None)
    return params, exp_avgs, exp_avg_sqs, steps


def run_torch_adam(arguments, weight_decay, lrs, fused, dtype=None):
    """torch's functional Adam (L2 weight decay), on copies cast to ``dtype`` when given."""
    cast = (lambda ts: [t.to(dtype) for t in ts]) if dtype else clone
    params, grads, exp_avgs, exp_avg_sqs, steps = arguments
    params, exp_avgs, exp_avg_sqs, steps = cast(params), cast(exp_avgs), cast(exp_avg_sqs), clone(steps)
    for step, lr in enumerate(lrs):
        adam(params, cast(grads[step]), exp_avgs, exp_avg_sqs, [], steps, foreach=False, fused=fused,
             capturable=False, differentiable=False, amsgrad=False, beta1=0.9, beta2=0.99, lr=lr,
             weight_decay=weight_decay, eps=1e-8, maximize=False)
    return params, exp_avgs, exp_avg_sqs, steps


def max_error(tensors, exact):
    return max(((a.double() - b.double()).abs().max().item() for a, b in zip(tensors, exact) if a.numel()), default=0.0)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_scalar_op_matches_torch_fused_adam(dtype, weight_decay):
    """Params and both moments after steps with a changing lr, against torch's fused Adam: within
    the dtype's tolerance for float32/float64; bfloat16/float16 no further from a float64 run than
    twice torch's own error (plus one unit in the last place of a value about 1)."""
    arguments = scalar_arguments(SHAPES, dtype)
    lrs = [0.01 * (1 + step) for step in range(STEPS)]  # an lr schedule: the op reads hyper at every call
    ours = run_op(arguments, weight_decay, lrs)
    theirs = run_torch_adam(arguments, weight_decay, lrs, fused=True)
    assert [s.item() for s in ours[3]] == [s.item() for s in theirs[3]] == [2.0 + STEPS] * len(SHAPES)
    if dtype in backend_cases.TOLERANCE:
        tolerance = backend_cases.TOLERANCE[dtype]
        for name, mine, torchs in zip(("params", "exp_avgs", "exp_avg_sqs"), ours, theirs):
            assert max_error(mine, torchs) <= tolerance, f"{name} differ from torch's fused Adam ({dtype})"
        return
    exact = run_torch_adam(arguments, weight_decay, lrs, fused=False, dtype=torch.float64)
    unit = torch.finfo(dtype).eps
    for name, mine, torchs, exacts in zip(("params", "exp_avgs", "exp_avg_sqs"), ours, theirs, exact):
        error, torch_error = max_error(mine, exacts), max_error(torchs, exacts)
        assert error <= 2 * torch_error + unit, f"{name} ({dtype}): {error:.3g} from float64, torch's fused {torch_error:.3g}"


def test_scalar_op_unscales_gradients_in_place_and_skips_on_found_inf():
    """With GradScaler's tensors: the step of the unscaled gradients, which are written back (as
    torch's fused Adam leaves them); with found_inf set, nothing changes, step counts included."""
    params, grads, exp_avgs, exp_avg_sqs, steps = scalar_arguments(SHAPES, torch.float32)
    expected = run_op((params, grads, exp_avgs, exp_avg_sqs, steps), 0.1, [0.05])
    scale = torch.tensor([1024.0])
    scaled = [g * 1024.0 for g in grads[0]]
    mine = clone(params), clone(exp_avgs), clone(exp_avg_sqs), clone(steps)
    OP(mine[0], scaled, mine[1], mine[2], mine[3], hyper(0.05), 0.1, scale, torch.tensor([0.0]))
    for got, want in zip(mine, expected):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(s, g) for s, g in zip(scaled, grads[0]))

    before = [clone(t) for t in mine]
    rescaled = [g * 1024.0 for g in grads[0]]
    OP(mine[0], rescaled, mine[1], mine[2], mine[3], hyper(0.05), 0.1, scale, torch.tensor([1.0]))
    for got, saved in zip(mine, before):
        assert all(torch.equal(a, b) for a, b in zip(got, saved))
    assert all(torch.equal(r, g * 1024.0) for r, g in zip(rescaled, grads[0]))


def test_scalar_op_runs_over_threads_as_on_one():
    """Enough elements to spread the op over the threads: the same bits as on one thread."""
    shapes = [(70000,), (5,), (40000,)]
    arguments = scalar_arguments(shapes, torch.float32)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_op(arguments, 0.1, [0.05, 0.02])
        torch.set_num_threads(3)
        many = run_op(arguments, 0.1, [0.05, 0.02])
    finally:
        torch.set_num_threads(previous)
    for a_list, b_list in zip(one, many):
        assert all(torch.equal(a, b) for a, b in zip(a_list, b_list))
    theirs = run_torch_adam(arguments, 0.1, [0.05, 0.02], fused=True)
    assert max_error(many[0], theirs[0]) <= backend_cases.TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    params, grads, exp_avgs, exp_avg_sqs, steps = scalar_arguments([(4,), (3, 5), (1,)], dtype)
    torch.library.opcheck(OP, (params, grads[0], exp_avgs, exp_avg_sqs, steps, hyper(0.05), 0.1, None, None))
    torch.library.opcheck(
        OP, (params, grads[0], exp_avgs, exp_avg_sqs, steps, hyper(0.05), 0.0, torch.tensor([2.0]), torch.tensor([0.0]))
    )


def _broken(what):
    params, grads, exp_avgs, exp_avg_sqs, steps = scalar_arguments([(3,), (4, 2)], torch.float32)
    grads, h, weight_decay = grads[0], hyper(0.05), 0.1
    if what == "grads[1] shape":
        grads[1] = torch.zeros(8)
    elif what == "exp_avgs[0] dtype":
        exp_avgs[0] = exp_avgs[0].double()
    elif what == "exp_avg_sqs[1] non-contiguous":
        exp_avg_sqs[1] = torch.zeros(2, 4).t()
    elif what == "params[1] dtype":
        params[1] = params[1].double()
    elif what == "state_steps[0] dtype":
        steps[0] = torch.tensor(2, dtype=torch.int64)
    elif what == "list lengths":
        exp_avgs.pop()
    elif what == "weight_decay":
        weight_decay = -0.1
    elif what == "hyper dtype":
        h = h.float()
    elif what == "hyper beta1":
        h = hyper(0.05, beta1=1.0)
    return params, grads, exp_avgs, exp_avg_sqs, steps, h, weight_decay


@pytest.mark.parametrize("what, message", [
    ("grads[1] shape", r"grads\[1\]"),
    ("exp_avgs[0] dtype", r"exp_avgs\[0\].*kept in its dtype"),
    ("exp_avg_sqs[1] non-contiguous", r"exp_avg_sqs\[1\].*contiguous"),
    ("params[1] dtype", r"params\[1\].*once per \(device, dtype\)"),
    ("state_steps[0] dtype", r"state_steps\[0\]"),
    ("list lengths", r"one entry per param"),
    ("weight_decay", r"weight_decay must be a finite number >= 0"),
    ("hyper dtype", r"hyper must be a contiguous float64 tensor of 4 elements"),
    ("hyper beta1", r"hyper\[1\] \(beta1\)"),
])
def test_bad_input_is_named_and_nothing_is_modified(what, message):
    arguments = _broken(what)
    snapshot = [clone(a) if isinstance(a, list) else a.clone() if isinstance(a, torch.Tensor) else a for a in arguments]
    with pytest.raises(RuntimeError, match=message):
        OP(*arguments, None, None)
    for given, saved in zip(arguments[:6], snapshot[:6]):
        for tensor, copy in zip(given if isinstance(given, list) else [given], saved if isinstance(saved, list) else [saved]):
            assert torch.equal(tensor, copy)


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("master_weights", [False, True])
def test_native_backend_steps_cpu_scalars_with_the_op(master_weights):
    """NDAdam (native, CPU) sends its plain scalars to scalar_step_ in one call, and bfloat16
    scalars with fp32 master copies to torch's fused Adam, whose wrapper handles the copies; both
    match the reference backend."""
    dtype = torch.bfloat16 if master_weights else torch.float32
    results = {}
    for backend in ("native", "reference"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in [(6, 4), (4,), (7,), (1,)]]
        opt = NDAdam(params, lr=0.01, vector_lr=0.05, weight_decay=0.1, master_weights=master_weights, backend=backend)
        for step in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step + p.numel())).to(dtype)
            with RecordOps() as recorder:
                opt.step()
        results[backend] = [p.detach().clone() for p in params]
        if backend == "native":
            scalar_calls = [n for n in recorder.names if "scalar_step_" in n]
            assert scalar_calls == ([] if master_weights else ["ndadam_fused.scalar_step_.default"])
            assert master_weights == any("fused_adam" in n for n in recorder.names)
    tolerance = 1e-2 if master_weights else backend_cases.TOLERANCE[torch.float32]
    for mine, reference in zip(results["native"], results["reference"]):
        assert (mine.double() - reference.double()).abs().max().item() <= tolerance
