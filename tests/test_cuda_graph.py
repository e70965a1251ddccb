"""A CUDA graph that captured a whole NDAdam step (vectors and scalars) reads, at every replay,
what the device tensors hold then: the lr (a tensor lr, which the optimizer copies into its
hyper tensor inside the graph), GradScaler's grad_scale and found_inf. Both fused backends.
Issue 12 item 3.

GPU only (benchmarks/gpu_check.sh runs it); the CPU tests of the same reads are in
test_triton_options.py (a launch replayed with the hyper tensor changed in place) and
test_native.py; the table-cache churn under a graph is in test_native.py and test_triton_host.py.
"""

import copy
import os

import pytest
import torch

from ndadam_fused import NDAdam
from ndadam_fused.backends import unavailable_reason

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(INTERPRETER or not torch.cuda.is_available(),
                                reason="CUDA graphs need a GPU: benchmarks/gpu_check.sh runs this")


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_replays_read_lr_grad_scale_and_found_inf_from_the_device(backend):
    reason = unavailable_reason(backend, torch.device("cuda"))
    if reason is not None:
        pytest.fail(f"{backend} cannot run on this GPU: {reason}")
    torch.manual_seed(0)
    shapes = [(64, 27), (32, 1440), (4, 9000), (300, 5), (48,)]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    lr = torch.tensor(0.05, device="cuda")
    opt = NDAdam(params, lr=lr, betas=(0.9, 0.99), backend=backend)
    grads = [torch.randn_like(p) for p in params]
    # torch's fused Adam (the scalars) writes the unscaled gradients back: refilled before each replay.
    static_grads = [g.clone() for g in grads]
    for p, g in zip(params, static_grads):
        p.grad = g
    grad_scale, found_inf = torch.tensor(4.0, device="cuda"), torch.tensor(0.0, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.grad_scale, opt.found_inf = grad_scale, found_inf
        for _ in range(2):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin_lr = torch.tensor(0.05, device="cuda")
    twin = NDAdam(twin_params, lr=twin_lr, betas=(0.9, 0.99), backend=backend)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin.param_groups[0]["lr"] = twin.param_groups[1]["lr"] = twin_lr
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    torch.cuda.synchronize()
    # Replays: lr changes, an overflow step (found_inf), a new scale; the twin steps eagerly.
    schedule = [(0.05, 0.0, 4.0), (0.02, 0.0, 4.0), (0.02, 1.0, 4.0), (0.01, 0.0, 8.0)]
    for step_lr, inf, scale in schedule:
        lr.fill_(step_lr)
        found_inf.fill_(inf)
        grad_scale.fill_(scale)
        for static, g in zip(static_grads, grads):
            static.copy_(g)
        graph.replay()
        twin_lr.fill_(step_lr)
        for p, g in zip(twin_params, grads):
            p.grad = g.clone()
        twin.grad_scale, twin.found_inf = torch.tensor(scale, device="cuda"), torch.tensor(inf, device="cuda")
        twin.step()
    torch.cuda.synchronize()
    for p, q in zip(params, twin_params):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)
        assert opt.state[p]["step"].item() == twin.state[q]["step"].item() == 2 + 3  # the skipped replay did not count
        torch.testing.assert_close(opt.state[p]["exp_avg"], twin.state[q]["exp_avg"], rtol=0, atol=1e-6)
