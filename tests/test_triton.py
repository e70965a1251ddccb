"""The Triton backend against the reference: on CPU under TRITON_INTERPRET=1, on CUDA when present.

The interpreter costs per program and per op, not per element, so the shapes here are small
and the programs few; the matrix is DESIGN.md section 7's.
"""

import math
import os

import pytest
import torch

import backend_cases
from ndadam_fused import NDAdam
from ndadam_fused.backends import triton_backend

# The interpreter runs CPU tensors (CI); compiled Triton runs CUDA tensors (the GPU check,
# with TRITON_INTERPRET=0). The two do not mix in one process.
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cpu"] if INTERPRETER else (["cuda"] if torch.cuda.is_available() else [])
ALL_SHAPES = backend_cases.SECTION_7_SHAPES + backend_cases.SCALAR_SHAPES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_section_7_shapes_two_groups_25_steps(device, dtype):
    backend_cases.compare_with_reference(
        "triton", ALL_SHAPES, dtype, steps=25, device=device, vector_lrs=(0.05, 0.2), realloc_grads=True
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_with_fp32_state(device, dtype):
    backend_cases.compare_with_reference(
        "triton", ALL_SHAPES, dtype, steps=10, device=device, vector_lrs=(0.05, 0.2), realloc_grads=True
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path, limit", [("statistics", 0), ("exact", 8192)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_each_path_on_every_shape(monkeypatch, device, path, limit, dtype):
    """limit 0 sends every row through the two-pass statistics path; with 8192 every row but
    the 9000-long one takes the exact single-pass path (float32 and float64 state alike: the
    section-7 rows are at most 4096 long)."""
    monkeypatch.setattr(triton_backend, "SINGLE_PASS_MAX", limit)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    classes = {length: triton_backend.width_class(length, limit, state_dtype)
               for length in (math.prod(s[1:]) for s in backend_cases.SECTION_7_SHAPES)}
    if path == "statistics":
        assert set(classes.values()) == {None}
    else:
        assert [length for length, c in classes.items() if c is None] == [9000]
    backend_cases.compare_with_reference("triton", backend_cases.SECTION_7_SHAPES, dtype, steps=8, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_two_hundred_small_tensors_in_one_launch(device):
    backend_cases.compare_with_reference("triton", backend_cases.MANY_SMALL_SHAPES, torch.float32, steps=3, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_params_and_grads(device):
    weight = torch.nn.Parameter(torch.randn(6, 9, dtype=torch.float64, device=device).t())
    reference = torch.nn.Parameter(weight.detach().clone())
    opt = NDAdam([weight], lr=0.1, backend="triton")
    ref_opt = NDAdam([reference], lr=0.1, backend="reference")
    for _ in range(4):
        grad = torch.randn(6, 9, dtype=torch.float64, device=device).t()
        weight.grad, reference.grad = grad, grad.clone()
        opt.step()
        ref_opt.step()
    assert not weight.is_contiguous()
    torch.testing.assert_close(weight.detach(), reference.detach(), rtol=0, atol=1e-12)


class _CountingKernel:
    """Stands in for the Triton kernel: counts launches and records their non-tensor arguments."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("device", DEVICES)
def test_one_launch_per_group_and_dtype_however_many_tensors(monkeypatch, device):
    counter = _CountingKernel(triton_backend._ndadam_rows_kernel)
    monkeypatch.setattr(triton_backend, "_ndadam_rows_kernel", counter)
    fp32 = [torch.nn.Parameter(torch.randn(1 + i % 4, 3 + i % 5, device=device)) for i in range(60)]
    bf16 = [torch.nn.Parameter(torch.randn(2, 5 + i, dtype=torch.bfloat16, device=device)) for i in range(20)]
    second_group = [torch.nn.Parameter(torch.randn(3, 40, device=device)) for _ in range(30)]
    biases = [torch.nn.Parameter(torch.randn(4, device=device)) for _ in range(10)]
    opt = NDAdam([{"params": fp32 + bf16 + biases}, {"params": second_group, "vector": True, "lr": 0.3}], backend="triton")
    for p in fp32 + bf16 + second_group + biases:
        p.grad = torch.randn_like(p)
    foreach_add, added_to = torch._foreach_add_, []

    def recording_foreach_add(tensors, *args, **kwargs):
        added_to.extend(id(t) for t in tensors)
        return foreach_add(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_add_", recording_foreach_add)
    opt.step()
    vector_steps = {id(opt.state[p]["step"]) for p in fp32 + bf16 + second_group}
    assert not vector_steps & set(added_to), "vector steps are counted in the kernel, not by a foreach launch"
    # group 0: fp32 and bf16 vectors; group 1: fp32 vectors. Scalars go to torch's Adam.
    assert len(counter.launches) == 3
    # Short rows of many tensors share tiles: one tile per (width class, alignment), not one
    # per tensor. fp32 rows of 3-7: widths 3, 4, 5, 6, 8 (4 aligned); bf16 rows of 5-24: 8
    # widths, 3 of them aligned; the second group: 90 rows of 40 in one tile.
    programs = sorted(grid[0] for grid, _ in counter.launches)
    assert programs == [1, 5, 11]
    for p in fp32 + bf16 + second_group:
        assert opt.state[p]["step"].item() == 1


@pytest.mark.parametrize("device", DEVICES)
def test_lr_changes_never_change_the_launch_arguments(monkeypatch, device):
    """lr is read from a device tensor: a schedule cannot trigger a recompile."""
    counter = _CountingKernel(triton_backend._ndadam_rows_kernel)
    monkeypatch.setattr(triton_backend, "_ndadam_rows_kernel", counter)
    weight = torch.nn.Parameter(torch.randn(8, 20, device=device))
    opt = NDAdam([weight], lr=0.1, backend="triton")
    schedule = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    for _ in range(3):
        weight.grad = torch.randn_like(weight)
        opt.step()
        schedule.step()
    assert len(counter.launches) == 3
    assert all(launch == counter.launches[0] for launch in counter.launches)


@pytest.mark.parametrize("device", DEVICES)
def test_tensor_lr_matches_float_lr(device):
    weights = [torch.nn.Parameter(torch.randn(5, 7, dtype=torch.float64, device=device)) for _ in range(2)]
    weights[1].data.copy_(weights[0].data)
    optimizers = [
        NDAdam([weights[0]], lr=0.1, backend="triton"),
        NDAdam([weights[1]], lr=torch.tensor(0.1, dtype=torch.float64, device=device), backend="triton"),
    ]
    for _ in range(3):
        grad = torch.randn(5, 7, dtype=torch.float64, device=device)
        for w, opt in zip(weights, optimizers):
            w.grad = grad.clone()
            opt.step()
    assert torch.equal(weights[0], weights[1])


def test_auto_is_reference_on_cpu_and_triton_on_cuda():
    from ndadam_fused import backends

    assert backends.auto_backend("cpu") == "reference" or backends.auto_backend("cpu") == "native"
    if torch.cuda.is_available():
        assert backends.auto_backend("cuda") in ("native", "triton")


@pytest.mark.parametrize("device", DEVICES)
def test_addresses_reused_by_new_tensors_give_correct_steps(device):
    """The caching allocator hands freed addresses to new tensors: a table is a function of
    addresses and shapes only, so whatever it finds cached for them is right for them."""
    for round_index in range(3):
        weights = [torch.nn.Parameter(torch.randn(4, 12, dtype=torch.float64, device=device) * (round_index + 1)) for _ in range(3)]
        references = [torch.nn.Parameter(w.detach().clone()) for w in weights]
        opt = NDAdam(weights, lr=0.1, backend="triton")
        ref_opt = NDAdam(references, lr=0.1, backend="reference")
        for _ in range(2):
            for w, r in zip(weights, references):
                w.grad = torch.randn_like(w)
                r.grad = w.grad.clone()
            opt.step()
            ref_opt.step()
        for w, r in zip(weights, references):
            torch.testing.assert_close(w.detach(), r.detach(), rtol=0, atol=1e-12)
        del weights, references, opt, ref_opt
