"""torch.compile and host synchronization (issue 12): lr schedules never recompile the step, the
fused step is one custom op in the graph, a compiled training step equals eager, and the fused
backends read nothing back to the host.

Compiles cost seconds each on the CPU (BUILD-NOTES.md): the tests here are few and small.
"""

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from ndadam_fused import NDAdam

BACKENDS = ["reference", "native", "triton"]


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _with_grads(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)


SCHEDULERS = {
    "exponential": lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t)),
    "one-cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20, cycle_momentum=False),
}


@pytest.mark.parametrize(
    "backend, scheduler",
    [(b, "exponential") for b in BACKENDS] + [("native", "cosine"), ("native", "lambda"), ("native", "one-cycle")],
)
def test_an_lr_schedule_causes_no_recompile(backend, scheduler):
    model = _model()
    opt = NDAdam(model.parameters(), lr=0.01, vector_lr=0.05, backend=backend)
    schedule = SCHEDULERS[scheduler](opt)
    _with_grads(model)
    opt.step()  # state exists before the compiled steps, as after any first step

    # The step itself (type(opt).step: the scheduler's own wrapper of opt.step is not traceable,
    # for torch's optimizers too), with fullgraph: any graph break in our code fails here.
    @torch.compile(fullgraph=True)
    def compiled_step():
        type(opt).step(opt)

    torch._dynamo.reset()
    counters.clear()
    lrs = set()
    for _ in range(10):
        compiled_step()
        schedule.step()
        lrs.add(opt.param_groups[0]["lr"])
    assert len(lrs) == 10
    assert counters["stats"]["unique_graphs"] <= 2


def _graph_ops(fn):
    """The call_function targets of every graph dynamo makes for ``fn()``."""
    ops = []

    def capture(graph_module, example_inputs):
        ops.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True)()
    return ops


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_the_fused_step_is_one_custom_op_in_the_graph(backend):
    model = _model()
    opt = NDAdam(model.parameters(), lr=0.01, backend=backend)
    _with_grads(model)
    opt.step()
    ops = _graph_ops(lambda: type(opt).step(opt))
    vector_ops = [op for op in ops if "ndadam" in op and "vector_step" in op]
    # torch's fused Adam, or on the CPU the native backend's own scalar op.
    scalar_ops = [op for op in ops if "fused_adam" in op or ("ndadam" in op and "scalar_step" in op)]
    # One vector group, one scalar group: one op each, no per-tensor ops of ours.
    assert len(vector_ops) == 1, ops
    assert len(scalar_ops) == 1, ops


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compiled_training_step_equals_eager(backend):
    def train(compiled):
        model = _model()
        opt = NDAdam(model.parameters(), lr=0.01, vector_lr=0.05, backend=backend)
        schedule = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)

        def train_step(x, y):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        step = torch.compile(train_step) if compiled else train_step
        generator = torch.Generator().manual_seed(3)
        for _ in range(4):
            step(torch.randn(5, 8, generator=generator), torch.randn(5, 4, generator=generator))
            schedule.step()
        return [p.detach().clone() for p in model.parameters()]

    torch._dynamo.reset()
    for eager, compiled in zip(train(False), train(True)):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- no host synchronization


class _NoHostReads(TorchDispatchMode):
    """Fails on any op that brings a tensor's value back to the host (.item(), bool(t), tolist,
    a device-to-host copy): what a capturable step must not do."""

    FORBIDDEN = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.FORBIDDEN:
            raise AssertionError(f"the step read a tensor back to the host: {name}")
        if name in ("aten::_to_copy", "aten::copy_") and args:
            source = args[1] if name == "aten::copy_" else args[0]
            target_device = args[0].device if name == "aten::copy_" else (kwargs or {}).get("device")
            if isinstance(source, torch.Tensor) and source.device.type != "cpu" and target_device is not None \
                    and torch.device(target_device).type == "cpu":
                raise AssertionError(f"the step copied a tensor to the host: {name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "grad-scaler"])
def test_a_steady_state_step_reads_nothing_back_to_the_host(backend, scaler):
    model = _model()
    opt = NDAdam(model.parameters(), lr=0.01, vector_lr=0.05, backend=backend)
    schedule = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    _with_grads(model)
    opt.step()
    if scaler:
        opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
    for seed in range(3):
        _with_grads(model, seed)
        with _NoHostReads():
            opt.step()
        schedule.step()


def test_the_host_read_detector_catches_item():
    with pytest.raises(AssertionError, match="_local_scalar_dense"):
        with _NoHostReads():
            torch.ones(()).item()
    with pytest.raises(AssertionError, match="is_nonzero|_local_scalar_dense"):
        with _NoHostReads():
            bool(torch.ones(()) > 0)
