"""What a new user hit (issue 9): partial updates, wrong steps, options that did nothing, GPT-2.

Each test reproduces one report and holds for every backend that runs on the CPU (the Triton
kernel under its interpreter).
"""

import copy

import pytest
import torch
from torch import nn

from ndadam_fused import NDAdam, normalize_rows_, param_groups

BACKENDS = ["reference", "native", "triton"]


def _snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def _same(before, tensors):
    return all(torch.equal(a, b) for a, b in zip(before, tensors))


# ---------------------------------------------------------------- 1. every gradient checked first


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("bad", ["scalar-bf16", "vector-fp64", "scalar-sparse"])
def test_a_bad_gradient_in_a_later_group_changes_nothing(backend, tensor_lr, bad):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 5))
    b = nn.Parameter(torch.randn(4))
    v = nn.Parameter(torch.randn(3, 6))
    lr = torch.tensor(0.1) if tensor_lr else 0.1
    opt = NDAdam([("w", w), ("b", b), ("v", v)], lr=lr, backend=backend)
    w.grad, b.grad, v.grad = torch.randn(4, 5), torch.randn(4), torch.randn(3, 6)
    name = "b" if bad.startswith("scalar") else "v"
    target = b if name == "b" else v
    target.grad_dtype = None  # torch 2.14 lets a gradient differ from its param's dtype when asked
    if bad == "scalar-bf16":
        b.grad = torch.randn(4).bfloat16()
        message = r"'b' \(param_groups\[1\]\['params'\]\[0\], shape \[4\]\) has a torch.bfloat16 gradient for a torch.float32"
    elif bad == "vector-fp64":
        v.grad = torch.randn(3, 6, dtype=torch.float64)
        message = r"'v' \(param_groups\[0\]\['params'\]\[1\], shape \[3, 6\]\) has a torch.float64 gradient"
    else:
        b.grad = torch.randn(4).to_sparse()
        message = r"'b' .* has a sparse gradient"
    before = _snapshot([w, b, v])
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    assert _same(before, [w, b, v])
    assert len(opt.state) == 0
    # With the gradient fixed, the same optimizer steps every group.
    target.grad = torch.randn_like(target)
    opt.step()
    assert all(opt.state[p]["step"].item() == 1 for p in (w, b, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_reaches_vectors_and_scalars_in_every_backend(backend):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4, 5)), nn.Parameter(torch.randn(4))]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    opt = NDAdam(params, lr=torch.tensor(0.05), backend=backend)
    ref = NDAdam(twins, lr=0.05, backend="reference")
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)


def test_a_backend_that_cannot_run_is_found_before_any_group_is_updated(monkeypatch):
    import ndadam_fused.backends as backends

    torch.manual_seed(0)
    w, v = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(2, 5))
    opt = NDAdam([{"params": [w]}, {"params": [v], "backend": "native"}], lr=0.1)
    # The extension became unusable after construction (say, a rebuild against another torch).
    monkeypatch.setitem(backends._REASONS, "native", lambda device: "ndadam_fused._C could not be imported")
    monkeypatch.setattr(backends, "_slow_backend_warned", False)  # once per process: maybe spent
    backends.clear_resolved()
    w.grad, v.grad = torch.randn(3, 4), torch.randn(2, 5)
    before = _snapshot([w, v])
    with pytest.raises(RuntimeError, match=r"backend 'native' is not available on cpu"), \
            pytest.warns(backends.SlowBackendWarning, match="because ndadam_fused._C could not be imported"):
        opt.step()
    assert _same(before, [w, v]) and len(opt.state) == 0
    monkeypatch.undo()
    backends.clear_resolved()


# ---------------------------------------------------------------- 2. non-contiguous scalar gradients


@pytest.mark.parametrize("backend", BACKENDS)
def test_stride_0_and_transposed_scalar_gradients_step_correctly(backend):
    p = nn.Parameter(torch.zeros(5))
    table = nn.Parameter(torch.randn(6, 3))  # a 2-D scalar (an embedding), stepped by Adam
    table_twin = nn.Parameter(table.detach().clone())
    opt = NDAdam([{"params": [p, table], "vector": False}], lr=0.1, backend=backend)
    twin_opt = torch.optim.Adam([table_twin], lr=0.1)
    p.grad = torch.tensor([1.0]).expand(5)
    grad = torch.randn(3, 6)
    table.grad, table_twin.grad = grad.t(), grad.t().contiguous()
    opt.step()
    twin_opt.step()
    torch.testing.assert_close(p.detach(), torch.full((5,), -0.1), rtol=0, atol=1e-6)
    torch.testing.assert_close(table.detach(), table_twin.detach(), rtol=0, atol=1e-7)


# ---------------------------------------------------------------- 3. the backend belongs to the machine


def test_loading_a_state_dict_keeps_the_constructors_backend():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4))
    saved = NDAdam([w], lr=0.1, backend="native")
    w.grad = torch.randn(3, 4)
    saved.step()
    state = saved.state_dict()
    # As if saved on a GPU machine with the Triton backend, or by a version with another name.
    for name in ("triton", "no-such-backend"):
        state["param_groups"][0]["backend"] = name
        opt = NDAdam([w], lr=0.1, backend="reference")
        opt.load_state_dict(copy.deepcopy(state))
        assert opt.param_groups[0]["backend"] == "reference"
        opt.step()  # runs on this machine
    opt = NDAdam([w], lr=0.1)
    opt.load_state_dict(state)
    assert opt.param_groups[0]["backend"] == "auto"


# ---------------------------------------------------------------- 4. vector_lr is used or refused


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_vector_lr_applies_to_the_vector_groups_of_param_groups():
    opt = NDAdam(param_groups(_tiny_model()), lr=1e-3, vector_lr=0.05)
    assert [(g["vector"], g["lr"]) for g in opt.param_groups] == [(True, 0.05), (False, 1e-3)]


def test_vector_lr_applies_to_explicit_vector_groups_without_their_own_lr():
    model = _tiny_model()
    opt = NDAdam(
        [{"params": [model[0].weight], "vector": True},
         {"params": [model[2].weight], "vector": True, "lr": 0.3},
         {"params": [model[0].bias, model[2].bias], "vector": False}],
        lr=1e-3, vector_lr=0.05,
    )
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.3, 1e-3]


def test_vector_lr_that_no_group_uses_is_refused():
    model = _tiny_model()
    before = _snapshot(model.parameters())
    with pytest.raises(ValueError, match=r"vector_lr=0.05 is used by no param group"):
        NDAdam(param_groups(model, lr=1e-3), vector_lr=0.05)
    with pytest.raises(ValueError, match=r"vector_lr=0.05 is used by no param group"):
        NDAdam([{"params": [model[0].weight], "vector": True, "lr": 0.1}], vector_lr=0.05)
    assert _same(before, list(model.parameters()))


def test_group_level_vector_lr_on_a_group_that_cannot_use_it_is_refused():
    model = _tiny_model()
    with pytest.raises(ValueError, match=r"param_groups\[0\]: the group sets 'vector_lr' but also its own 'lr'"):
        NDAdam([{"params": [model[0].weight], "vector": True, "lr": 0.1, "vector_lr": 0.2}])
    with pytest.raises(ValueError, match=r"param_groups\[0\]: the group sets 'vector_lr' but it is a scalar group"):
        NDAdam([{"params": [model[0].bias], "vector": False, "vector_lr": 0.2}])
    with pytest.raises(ValueError, match=r"param_groups\[0\]: the group sets 'vector_lr' but holds no vector"):
        NDAdam([{"params": [model[0].bias], "vector_lr": 0.2}])


# ---------------------------------------------------------------- 5. units along dim 1 (GPT-2: tests/test_gpt2.py)


def test_unit_dim_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"'unit_dim': 2, but it has 2 dims"):
        NDAdam([{"params": [nn.Parameter(torch.randn(3, 4))], "vector": True, "unit_dim": 2}])


# ---------------------------------------------------------------- 6. what construction may touch


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weights_are_not_normalized_until_they_train(backend):
    torch.manual_seed(0)
    frozen = nn.Parameter(torch.randn(3, 4) * 5, requires_grad=False)
    trained = nn.Parameter(torch.randn(2, 4) * 5)
    before = frozen.detach().clone()
    opt = NDAdam([frozen, trained], lr=0.1, backend=backend)
    assert torch.equal(frozen, before)
    torch.testing.assert_close(trained.norm(dim=1), torch.ones(2))
    trained.grad = torch.randn(2, 4)
    opt.step()
    assert torch.equal(frozen, before)
    # Unfrozen later: its rows are normalized when it first gets a step, then stepped, exactly as
    # a tensor normalized at construction would be.
    twin = nn.Parameter(before / before.norm(dim=1, keepdim=True))
    twin_opt = NDAdam([twin], lr=0.1, backend="reference")
    frozen.requires_grad_(True)
    frozen.grad = torch.randn(3, 4)
    twin.grad = frozen.grad.clone()
    opt.step()
    twin_opt.step()
    torch.testing.assert_close(frozen.detach(), twin.detach(), rtol=0, atol=1e-6)
    assert opt.state[frozen]["step"].item() == 1


def test_frozen_all_zero_weight_is_accepted_until_it_trains():
    zero = nn.Parameter(torch.zeros(2, 3), requires_grad=False)
    opt = NDAdam([zero, nn.Parameter(torch.randn(2, 3))])
    zero.requires_grad_(True)
    zero.grad = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*all-zero row"):
        opt.step()
    assert len(opt.state) == 0


def test_rows_of_length_one_are_scalars_in_the_automatic_split_and_in_param_groups():
    model = nn.Sequential(nn.Linear(1, 6), nn.ReLU(), nn.Linear(6, 2))
    opt = NDAdam(model.parameters())
    assert [(g["vector"], [tuple(p.shape) for p in g["params"]]) for g in opt.param_groups] == [
        (True, [(2, 6)]), (False, [(6, 1), (6,), (2,)])
    ]
    groups = param_groups(model)
    assert [(g["vector"], [n for n, _ in g["params"]]) for g in groups] == [
        (True, ["2.weight"]), (False, ["0.weight", "0.bias", "2.bias"])
    ]
    g = nn.Parameter(torch.randn(5, 1))  # weight_norm's g
    with pytest.warns(UserWarning, match=r"shape \[5, 1\]\) has rows of length 1 .* will never train"):
        NDAdam([{"params": [g], "vector": True}])


# ---------------------------------------------------------------- 7. infinite hyperparameters


@pytest.mark.parametrize("name", ["lr", "vector_lr", "eps", "weight_decay"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_hyperparameters_are_refused(name, value):
    w = nn.Parameter(torch.randn(3, 4))
    before = w.detach().clone()
    with pytest.raises(ValueError, match=rf"invalid {name}: (inf|nan) \(must be a finite number >= 0\)"):
        NDAdam([w], **{name: value})
    with pytest.raises(ValueError, match=rf"invalid {name}"):
        NDAdam([w], **{name: torch.tensor(value)})
    assert torch.equal(w, before)


# ---------------------------------------------------------------- 8. plain-number steps


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_with_a_plain_number_step_loads(backend):
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3))
    opt = NDAdam([w, b], lr=0.1, backend=backend)
    for p in (w, b):
        p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state_dict()
    for entry in state["state"].values():
        entry["step"] = float(entry["step"])  # as older torch checkpoints hold it
    resumed = NDAdam([w, b], lr=0.1, backend=backend)
    resumed.load_state_dict(state)
    for p in (w, b):
        step = resumed.state[p]["step"]
        assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.item() == 1.0
    resumed.step()
    assert all(resumed.state[p]["step"].item() == 2.0 for p in (w, b))


# ---------------------------------------------------------------- 9. a zero update changes no bit


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["lr-0", "zero-grads-fresh-state"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_step_whose_update_is_exactly_zero_changes_no_bit(backend, case, dtype):
    torch.manual_seed(0)
    # Rows as they come out of earlier steps: unit within rounding, not bit-exact unit.
    weights = []
    for shape in [(30, 40), (5, 3, 3, 3), (2, 9000)]:
        w = torch.randn(shape, dtype=torch.float64).reshape(shape[0], -1)
        w = w / w.norm(dim=1, keepdim=True) * (1 + 0.5 * torch.finfo(dtype).eps * torch.randn(shape[0], 1, dtype=torch.float64))
        weights.append(nn.Parameter(w.to(dtype).reshape(shape)))
    before = _snapshot(weights)
    opt = NDAdam(weights, lr=0.0 if case == "lr-0" else 0.1, backend=backend)
    assert _same(before, weights)  # within the unit tolerance: not re-divided at construction
    for w in weights:
        w.grad = torch.randn_like(w) if case == "lr-0" else torch.zeros_like(w)
    opt.step()
    changed = sum(int((a != b).sum()) for a, b in zip(before, weights))
    assert changed == 0


# ---------------------------------------------------------------- 10. a tensor passed twice


def test_a_tensor_twice_in_one_group_is_named():
    w = nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"parameter \(param_groups\[0\]\['params'\]\[1\], shape \[3, 4\]\) appears twice in param group 0"):
        NDAdam([w, w])
    with pytest.raises(ValueError, match=r"'dup' \(param_groups\[1\]\['params'\]\[0\].*also appears in param group 0"):
        NDAdam([{"params": [("w", w)]}, {"params": [("dup", w)]}])


# ---------------------------------------------------------------- weights loaded after the optimizer


def test_normalize_rows_after_loading_weights_into_a_model_with_an_optimizer():
    model = _tiny_model()
    opt = NDAdam(model.parameters(), lr=1e-3)
    pretrained = _tiny_model().state_dict()  # rows not unit
    model.load_state_dict(pretrained)
    assert not torch.allclose(model[0].weight.norm(dim=1), torch.ones(8))
    opt.normalize_rows_()
    torch.testing.assert_close(model[0].weight.norm(dim=1), torch.ones(8))
    before = _snapshot(model.parameters())
    opt.normalize_rows_()  # idempotent: not a bit moves
    normalize_rows_([model[0].weight, model[2].weight])
    assert _same(before, list(model.parameters()))
    torch.testing.assert_close(model[0].bias, pretrained["0.bias"])  # scalars untouched
