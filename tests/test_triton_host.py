"""The Triton backend's host code: cached tables, alignment, hyperparameters, the zero-step guard.

Each test here was written against a bug planted in the host code (issue 13 item 9) that the
rest of the suite did not see, and fails on it. They compare values with the reference
backend, never launch arguments.
"""

import os

import pytest
import torch

import backend_cases

from ndadam_fused import NDAdam
from ndadam_fused.backends import triton_backend

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cpu"] if INTERPRETER else (["cuda"] if torch.cuda.is_available() else [])
FP64_TOLERANCE = 1e-10


def _assert_same_params(params, references):
    for p, r in zip(params, references):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=0, atol=FP64_TOLERANCE)


class _FixedAddresses:
    """Param, grad and state of ONE vector parameter carved from fixed flat buffers, so that a
    second parameter of another shape but the same element count gets exactly the same
    addresses for every tensor the backend sees."""

    def __init__(self, numel, device):
        self.param = torch.empty(numel, dtype=torch.float64, device=device)
        self.grad = torch.empty(numel, dtype=torch.float64, device=device)
        self.exp_avg = torch.empty(numel, dtype=torch.float64, device=device)
        self.exp_avg_sq = torch.empty(numel, dtype=torch.float64, device=device)
        self.step = torch.empty(1, dtype=torch.float32, device=device)

    def optimizer(self, shape, backend, generator):
        rows = shape[0]
        param = torch.nn.Parameter(self.param.view(shape))
        param.data.copy_(torch.randn(shape, generator=generator, dtype=torch.float64))
        opt = NDAdam([param], lr=0.1, betas=(0.9, 0.99), backend=backend)
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        self.step.zero_()
        opt.state[param] = {
            "step": self.step.view(()),
            "exp_avg": self.exp_avg.view(shape),
            "exp_avg_sq": self.exp_avg_sq[:rows],
        }
        param.grad = self.grad.view(shape)
        return param, opt


@pytest.mark.parametrize("device", DEVICES)
def test_same_addresses_with_a_new_shape_get_a_new_table(device):
    """Planted bug: a cache key without the params' shapes. A 4x12 and a 6x8 parameter at the
    same addresses would share the 4x12 table (rows 12 long where they are 8)."""
    triton_buffers, reference_buffers = _FixedAddresses(48, device), _FixedAddresses(48, device)
    for shape in [(4, 12), (6, 8), (4, 12)]:
        generators = [torch.Generator().manual_seed(sum(shape)) for _ in range(2)]
        param, opt = triton_buffers.optimizer(shape, "triton", generators[0])
        reference, ref_opt = reference_buffers.optimizer(shape, "reference", generators[1])
        for _ in range(2):
            grad = torch.randn(shape, generator=generators[0], dtype=torch.float64)
            param.grad.copy_(grad)
            reference.grad.copy_(grad)
            opt.step()
            ref_opt.step()
        assert param.data_ptr() == triton_buffers.param.data_ptr()
        _assert_same_params([param], [reference])
        torch.testing.assert_close(opt.state[param]["exp_avg"], ref_opt.state[reference]["exp_avg"], rtol=0, atol=FP64_TOLERANCE)


def _tensors_in_aligned_tiles(opt, params) -> set[int]:
    """Which of ``params`` (positions) the Triton table puts in tiles of 128-bit accesses."""
    state = [opt.state[p] for p in params]
    table = triton_backend.group_table(list(params), [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state],
                                       [s["step"] for s in state])
    plan = table.parts[0].plan
    found = set()
    for class_index, first_slot in plan.tile_table:
        _, _, slots_per_tile, aligned = plan.classes[class_index]
        if aligned:
            found.update(int(t) for t in plan.slot_table[first_slot:first_slot + slots_per_tile, 0] if t >= 0)
    return found


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shifted_first", [False, True], ids=["aligned-first", "shifted-first"])
def test_views_off_16_byte_alignment_are_stepped_right(device, dtype, shifted_first):
    """Planted bug: an alignment flag that ignores ``data_ptr() % 16``. Rows of 8 elements are
    a multiple of 16 bytes, but a view one element into a flat buffer does not start on 16
    bytes: with 128-bit accesses (or offsets rounded to them) it would read its neighbour. The
    interpreter does not model access widths, so the table's plan is checked as well: the view
    must get no 128-bit tile, whichever tensor the offsets count from."""
    generator = torch.Generator().manual_seed(3)
    flat = torch.randn(1 + 6 * 8 + 7, generator=generator, dtype=dtype).to(device)
    flat_grad = torch.empty(1 + 6 * 8, dtype=dtype, device=device)
    aligned = torch.nn.Parameter(torch.randn(6, 8, generator=generator, dtype=dtype).to(device))
    shifted = torch.nn.Parameter(flat[1 : 1 + 48].view(6, 8))
    assert shifted.data_ptr() % 16 != 0 and aligned.data_ptr() % 16 == 0
    order = [shifted, aligned] if shifted_first else [aligned, shifted]
    references = [torch.nn.Parameter(p.detach().clone()) for p in (aligned, shifted)]
    opt = NDAdam(order, lr=0.1, backend="triton")
    ref_opt = NDAdam(references, lr=0.1, backend="reference")
    for _ in range(3):
        aligned.grad = torch.randn(6, 8, generator=generator, dtype=dtype).to(device)
        flat_grad.copy_(torch.randn(1 + 48, generator=generator, dtype=dtype))
        shifted.grad = flat_grad[1:].view(6, 8)
        for p, r in zip((aligned, shifted), references):
            r.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    assert _tensors_in_aligned_tiles(opt, order) == {1 if shifted_first else 0}  # the aligned param only
    tolerance = FP64_TOLERANCE if dtype == torch.float64 else 1e-6
    for p, r in zip((aligned, shifted), references):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=0, atol=tolerance)
    # The rest of the flat buffer is not the optimizer's: it must be untouched.
    torch.testing.assert_close(flat[49:].cpu(), torch.randn(1 + 6 * 8 + 7, generator=torch.Generator().manual_seed(3), dtype=dtype)[49:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("limit", [None, 0], ids=["exact", "statistics"])
def test_eps_zero_with_zero_gradients_is_a_zero_step(monkeypatch, device, limit):
    """Planted bug: the ``denom > 0`` guard removed. With eps = 0 and a gradient that was
    always 0 (v = 0, m = 0), the step is 0/0: the reference takes a zero step, the row
    stays what it was, and so must the kernel's (no NaN)."""
    if limit is not None:
        monkeypatch.setattr(triton_backend, "SINGLE_PASS_MAX", limit)
    generator = torch.Generator().manual_seed(5)
    shapes = [(3, 10), (2, 1), (1, 7)]
    params = [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64).to(device)) for s in shapes]
    references = [torch.nn.Parameter(p.detach().clone()) for p in params]
    # Explicit vector groups: the (2, 1) tensor has rows of length 1 (a scalar in the automatic
    # split, where torch's Adam with eps = 0 and zero gradients would make 0/0 itself).
    with pytest.warns(UserWarning, match="rows of length 1"):
        opt = NDAdam([{"params": params, "vector": True}], lr=0.1, eps=0.0, backend="triton")
        ref_opt = NDAdam([{"params": references, "vector": True}], lr=0.1, eps=0.0, backend="reference")
    start = [p.detach().clone() for p in params]
    for _ in range(3):
        for p, r in zip(params, references):
            p.grad = torch.zeros_like(p)
            r.grad = torch.zeros_like(r)
        opt.step()
        ref_opt.step()
    for p, s in zip(params, start):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach(), s, rtol=0, atol=FP64_TOLERANCE)
    _assert_same_params(params, references)


@pytest.mark.parametrize("device", DEVICES)
def test_lr_schedule_with_gradients_updated_in_place_steps_with_each_lr(device):
    """Planted bug: the hyperparameter tensor written only while unset. With gradients updated
    in place the cached table is reused at every step, and the kernel would keep the first lr."""
    generator = torch.Generator().manual_seed(7)
    weights = [torch.nn.Parameter(torch.randn(5, 9, generator=generator, dtype=torch.float64).to(device)) for _ in range(2)]
    references = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    opt = NDAdam(weights, lr=0.2, backend="triton")
    ref_opt = NDAdam(references, lr=0.2, backend="reference")
    schedules = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.3) for o in (opt, ref_opt)]
    for w, r in zip(weights, references):
        w.grad = torch.zeros_like(w)
        r.grad = torch.zeros_like(r)
    for _ in range(4):
        for w, r in zip(weights, references):
            grad = torch.randn(5, 9, generator=generator, dtype=torch.float64)
            w.grad.copy_(grad)
            r.grad.copy_(grad)
        opt.step()
        ref_opt.step()
        for schedule in schedules:
            schedule.step()
    _assert_same_params(weights, references)


# ---- issue 13 items 4-6: tables keyed without gradients, no host sync, steps in the kernel ----


def _table_buffers():
    """Addresses of every device buffer of every cached Triton table."""
    tables = list(triton_backend._TABLE_CACHE.values()) + list(triton_backend._CAPTURED_TABLES.values())
    return {buffer.data_ptr() for table in tables for part in table.parts
            for buffer in (part.tensor_table, part.slot_table, part.tile_table, part.grad_offsets, part.arrivals)}


class _HostTraffic:
    """Records, while active, every Tensor.copy_ from host memory to the device (on the CPU:
    into a Triton table's buffers) and every call that would make the host wait for a CUDA
    device (item, tolist, cpu, synchronize)."""

    def __init__(self, monkeypatch, device):
        self.copies, self.syncs = [], []
        self.active = False
        copy = torch.Tensor.copy_

        def recording_copy(tensor, source, non_blocking=False):
            if self.active and source.device.type == "cpu":
                if tensor.device.type == "cuda":
                    self.copies.append((tensor.device.type, non_blocking, source.is_pinned()))
                elif tensor.data_ptr() in _table_buffers():
                    self.copies.append((tensor.device.type, non_blocking, None))
            return copy(tensor, source, non_blocking)

        monkeypatch.setattr(torch.Tensor, "copy_", recording_copy)
        if device == "cuda":  # on the CPU these do not wait for anything (and the interpreter uses them)
            for name in ("item", "tolist", "cpu"):
                original = getattr(torch.Tensor, name)

                def recording(tensor, *args, _original=original, _name=name, **kwargs):
                    if self.active:
                        self.syncs.append(_name)
                    return _original(tensor, *args, **kwargs)

                monkeypatch.setattr(torch.Tensor, name, recording)
            synchronize = torch.cuda.synchronize
            monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: (self.syncs.append("synchronize"), synchronize(*a, **k))[1])


@pytest.mark.parametrize("device", DEVICES)
def test_fresh_gradients_at_every_step_rebuild_no_table_and_never_wait(monkeypatch, device):
    """Issue 13 items 4 and 6: with new gradient tensors at every step (FSDP2,
    zero_grad(set_to_none=True)), and a channels_last conv weight stepped through a buffer,
    steady-state steps find their table (no rebuild), copy the gradients' offsets from pinned
    memory asynchronously, and never wait for the device."""
    generator = torch.Generator().manual_seed(17)
    conv = torch.randn(8, 3, 3, 3, generator=generator, dtype=torch.float64).to(device).contiguous(memory_format=torch.channels_last)
    weights = [torch.nn.Parameter(conv)] + [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64).to(device)) for s in [(5, 7), (3, 64), (2, 1)]]
    assert not weights[0].is_contiguous()
    references = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    opt = NDAdam(weights, lr=0.1, backend="triton")
    ref_opt = NDAdam(references, lr=0.1, backend="reference")
    traffic = _HostTraffic(monkeypatch, device)
    kept = []
    for step in range(4):
        grads = [torch.randn(w.shape, generator=generator, dtype=torch.float64).to(device) for w in weights]
        grads[0] = grads[0].contiguous(memory_format=torch.channels_last)
        kept.append([w.grad for w in weights])  # the old ones stay alive: the new ones get new addresses
        for w, r, g in zip(weights, references, grads):
            w.grad, r.grad = g, g.clone()
        builds = triton_backend.table_builds
        traffic.active = step > 0
        opt.step()
        traffic.active = False
        ref_opt.step()
        if step > 0:
            assert triton_backend.table_builds == builds, "a steady-state step rebuilt its table"
    assert traffic.syncs == []
    assert traffic.copies and all(non_blocking for _, non_blocking, _ in traffic.copies), traffic.copies
    assert all(pinned for where, _, pinned in traffic.copies if where == "cuda"), traffic.copies
    assert not weights[0].is_contiguous()
    _assert_same_params(weights, references)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_updated_in_place_copy_nothing(monkeypatch, device):
    """With the gradients where they were at the last step, their offsets on the device are
    still right: a steady-state step copies nothing from the host (lr unchanged)."""
    weights = [torch.nn.Parameter(torch.randn(4, 6, dtype=torch.float64, device=device)) for _ in range(3)]
    opt = NDAdam(weights, lr=0.1, backend="triton")
    for w in weights:
        w.grad = torch.randn_like(w)
    opt.step()
    traffic = _HostTraffic(monkeypatch, device)
    traffic.active = True
    for _ in range(2):
        for w in weights:
            w.grad.normal_()
        opt.step()
    assert traffic.copies == [] and traffic.syncs == []


@pytest.mark.parametrize("device", DEVICES)
def test_a_moved_param_gets_a_new_table(device):
    """The table is keyed on what stays put: replacing a param's storage rebuilds it."""
    weights = [torch.nn.Parameter(torch.randn(4, 6, dtype=torch.float64, device=device)) for _ in range(2)]
    references = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    opt = NDAdam(weights, lr=0.1, backend="triton")
    ref_opt = NDAdam(references, lr=0.1, backend="reference")
    for step in range(3):
        if step == 2:
            builds = triton_backend.table_builds
            for w, r in zip(weights, references):
                w.data = w.data.clone()
        for w, r in zip(weights, references):
            w.grad = torch.randn_like(w)
            r.grad = w.grad.clone()
        opt.step()
        ref_opt.step()
    assert triton_backend.table_builds == builds + 1
    _assert_same_params(weights, references)


@pytest.mark.parametrize("device", DEVICES)
def test_steps_of_tensors_spread_over_many_tiles_and_sharing_tiles(device):
    """The kernel counts each tensor's step once per launch however many tiles hold its rows
    (1100 rows of 3: three tiles of 512) and however many tensors share a tile."""
    shapes = [(1100, 3), (7, 3), (600, 5), (3, 5), (2, 9000), (1, 9000), (5, 1440)]
    backend_cases.compare_with_reference("triton", shapes, torch.float64, steps=3, device=device)


def test_host_only_benchmark_reports_triton_host_time_next_to_native(tmp_path, capsys):
    """benchmarks/step.py --host-only: the Triton backend's host work per step (launch stubbed)
    with gradients in place and fresh, next to the native backend's whole step."""
    import csv

    from benchmarks import step
    from ndadam_fused import backends

    assert step.main(["--host-only", "--sets", "many-small", "--repeats", "3", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "step_cpu_host.csv")))
    candidates = {r["candidate"]: r for r in rows}
    expected = {"ndadam-triton-host", "ndadam-triton-host-fresh-grads"}
    if backends.unavailable_reason("native", "cpu") is None:
        expected.add("ndadam-native")
    assert set(candidates) == expected
    # Both measure a whole NDAdam.step over the same 2,000 tensors (1,500 of them vectors).
    assert candidates["ndadam-triton-host"]["tensors"] == candidates.get("ndadam-native", {"tensors": "2000"})["tensors"] == "2000"
    for row in rows:
        assert float(row["median_ms"]) > 0 and row["machine"] and row["set"] == "many-small"
    assert "x native" in capsys.readouterr().out


# ---- issue 10 item 4: CUDA graphs ----------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_a_table_used_in_a_capture_outlives_the_cache(monkeypatch, device):
    """A table that a CUDA graph captured is read at every replay: more distinct tables than
    the LRU holds must not evict it, and eager steps after the capture must rewrite what a
    replay overwrites (the gradient offsets) even when their own values did not change. The capture and the replay's copies are simulated here (CPU); the GPU test below
    captures and replays for real."""
    generator = torch.Generator().manual_seed(19)
    weights = [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64).to(device)) for s in [(6, 5), (3, 40)]]
    references = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    opt = NDAdam(weights, lr=0.1, backend="triton")
    ref_opt = NDAdam(references, lr=0.1, backend="reference")
    kept = []

    def step(capture=False, in_place=False):
        for w, r in zip(weights, references):
            grad = torch.randn(w.shape, generator=generator, dtype=torch.float64)
            if in_place:
                w.grad.copy_(grad)
                r.grad.copy_(grad)
            else:
                kept.append(w.grad)
                w.grad, r.grad = grad.to(device), grad.to(device)
        with monkeypatch.context() as patch:
            if capture:
                patch.setattr(triton_backend, "_is_capturing", lambda tensor: True)
            opt.step()
        ref_opt.step()

    def table():
        return triton_backend.group_table(weights, *[[opt.state[w][k] for w in weights] for k in ("exp_avg", "exp_avg_sq", "step")])

    step()
    opt.param_groups[0]["lr"] = ref_opt.param_groups[0]["lr"] = 0.3
    step(capture=True)
    captured = table()
    replay_writes = [part.grad_offsets.clone() for part in captured.parts]
    buffers = [part.tile_table.data_ptr() for part in captured.parts]
    for i in range(triton_backend._TABLE_CACHE_SIZE + 4):
        other = torch.nn.Parameter(torch.randn(2, 3 + i, dtype=torch.float64, device=device))
        other.grad = torch.randn_like(other)
        NDAdam([other], lr=0.1, backend="triton").step()
    assert len(triton_backend._TABLE_CACHE) <= triton_backend._TABLE_CACHE_SIZE
    assert table() is captured and [part.tile_table.data_ptr() for part in captured.parts] == buffers
    opt.param_groups[0]["lr"] = ref_opt.param_groups[0]["lr"] = 0.1
    step()  # eager: new gradients, another lr
    for part, grad_offsets in zip(captured.parts, replay_writes):  # what a replay copies
        part.grad_offsets.copy_(grad_offsets)
    step(in_place=True)  # the same gradients and lr as the last eager step
    _assert_same_params(weights, references)


@pytest.mark.skipif(INTERPRETER or not torch.cuda.is_available(), reason="CUDA graphs need a GPU: benchmarks/gpu_check.sh runs this")
def test_cuda_graph_replays_after_table_churn_and_memory_reuse():
    """Issue 10 item 4, on a GPU: warm up on a side stream, give the step new gradient tensors
    (as zero_grad(set_to_none=True) and a backward would), capture opt.step(), run more eager
    steps with distinct tables than the cache holds, allocate and fill memory, then replay:
    the replays must equal eager steps from the same state."""
    import copy

    torch.manual_seed(0)
    shapes = [(64, 27), (32, 1440), (16, 8192), (4, 9000), (300, 5)]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    opt = NDAdam(params, lr=0.05, betas=(0.9, 0.99), backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    static_grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, static_grads):
        p.grad = g
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    torch.cuda.synchronize()
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = NDAdam(twin_params, lr=0.05, betas=(0.9, 0.99), backend="triton")
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    for i in range(triton_backend._TABLE_CACHE_SIZE + 8):
        other = torch.nn.Parameter(torch.randn(3, 4 + i, device="cuda"))
        other.grad = torch.randn_like(other)
        NDAdam([other], lr=0.1, backend="triton").step()
    del other
    filler = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(64)]
    for _ in range(2):
        graph.replay()
        for p, g in zip(twin_params, static_grads):
            p.grad = g.clone()
        twin.step()
    torch.cuda.synchronize()
    del filler
    for p, q in zip(params, twin_params):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)
        assert opt.state[p]["step"].item() == twin.state[q]["step"].item() == 6
        torch.testing.assert_close(opt.state[p]["exp_avg"], twin.state[q]["exp_avg"], rtol=0, atol=1e-6)
