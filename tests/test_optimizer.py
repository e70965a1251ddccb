"""NDAdam as a torch.optim.Optimizer: groups, state, closures, schedulers, checkpoints, errors."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from ndadam_fused import NDAdam


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)
    ).to(dtype)


def _batch(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 6, 6, generator=generator, dtype=dtype), torch.randint(0, 5, (8,), generator=generator)


def _train(model, opt, steps, seed=0):
    for i in range(steps):
        x, y = _batch(next(model.parameters()).dtype, seed + i)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()


def _snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def _assert_same(before, after):
    for a, b in zip(before, after):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- groups and construction


def test_groups_are_split_into_vectors_and_scalars_with_their_own_lr():
    model = _model()
    opt = NDAdam(model.parameters(), lr=1e-3, vector_lr=0.05)
    vector, scalar = opt.param_groups
    assert vector["vector"] is True and vector["lr"] == 0.05
    assert scalar["vector"] is False and scalar["lr"] == 1e-3
    assert [p.shape for p in vector["params"]] == [model[0].weight.shape, model[4].weight.shape]
    assert all(p.dim() < 2 for p in scalar["params"])
    assert "vector_lr" not in vector and "vector_lr" not in scalar


def test_vector_lr_defaults_to_lr_and_groups_with_vector_key_are_kept():
    model = _model()
    opt = NDAdam(
        [
            {"params": [model[0].weight], "vector": False, "lr": 0.3},
            {"params": [model[4].weight, model[4].bias]},
            {"params": [model[1].weight, model[1].bias, model[0].bias], "vector": False},
        ],
        lr=0.01,
    )
    assert [(g["vector"], g["lr"], len(g["params"])) for g in opt.param_groups] == [
        (False, 0.3, 1), (True, 0.01, 1), (False, 0.01, 1), (False, 0.01, 3),
    ]


def test_group_level_vector_lr_and_named_parameters():
    model = _model()
    opt = NDAdam([{"params": list(model.named_parameters()), "vector_lr": 0.2}], lr=0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.01]
    assert opt.param_groups[0]["param_names"] == ["0.weight", "4.weight"]


def test_rows_are_normalized_at_construction_and_scalars_untouched():
    model = _model()
    bias = model[0].bias.detach().clone()
    weight = model[4].weight.detach().clone()
    NDAdam(model.parameters())
    for p in (model[0].weight, model[4].weight):
        norms = p.detach().reshape(p.shape[0], -1).norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    assert torch.equal(model[0].bias, bias)
    torch.testing.assert_close(model[4].weight, weight / weight.norm(dim=1, keepdim=True))


def test_add_param_group_splits_and_normalizes():
    model = _model()
    opt = NDAdam([model[0].weight], lr=0.01, vector_lr=0.1)
    opt.add_param_group({"params": [model[4].weight, model[4].bias]})
    assert [(g["vector"], g["lr"]) for g in opt.param_groups] == [(True, 0.1), (True, 0.1), (False, 0.01)]
    assert torch.allclose(model[4].weight.norm(dim=1), torch.ones(5), atol=1e-6)
    _train(model, opt, 2)
    assert len(opt.state) == 3


# ---------------------------------------------------------------- step semantics


def test_step_returns_the_closure_loss_and_uses_its_gradients():
    model = _model()
    opt = NDAdam(model.parameters(), lr=0.01)
    x, y = _batch()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    before = _snapshot(model.parameters())
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.step() is None


def test_params_without_grad_and_empty_params_are_skipped():
    w = nn.Parameter(torch.randn(4, 3))
    frozen = nn.Parameter(torch.randn(4, 3))
    empty_rows = nn.Parameter(torch.randn(0, 3))
    empty_cols = nn.Parameter(torch.randn(3, 0))
    empty_vec = nn.Parameter(torch.randn(0))
    opt = NDAdam([w, frozen, empty_rows, empty_cols, empty_vec], lr=0.1)
    frozen_before = frozen.detach().clone()
    w_before = w.detach().clone()
    for p in (w, empty_rows, empty_cols, empty_vec):
        p.grad = torch.randn_like(p)
    opt.step()
    assert not torch.equal(w, w_before)
    assert torch.equal(frozen, frozen_before)
    assert set(opt.state) == {w}


def test_user_gradients_are_never_modified():
    model = _model()
    opt = NDAdam(model.parameters(), lr=0.01, weight_decay=0.1)
    x, y = _batch()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = _snapshot(p.grad for p in model.parameters())
    opt.step()
    _assert_same(grads, [p.grad for p in model.parameters()])


def test_state_layout():
    model = _model(torch.bfloat16)
    opt = NDAdam(model.parameters())
    _train(model, opt, 1)
    conv = opt.state[model[0].weight]
    assert conv["exp_avg"].shape == (4, 3, 3, 3) and conv["exp_avg"].dtype == torch.float32
    assert conv["exp_avg_sq"].shape == (4,) and conv["exp_avg_sq"].dtype == torch.float32
    assert conv["step"].item() == 1.0 and conv["step"].device.type == "cpu"
    bias = opt.state[model[0].bias]
    assert bias["exp_avg_sq"].shape == (4,) and bias["exp_avg_sq"].dtype == torch.bfloat16


def test_lr_scheduler_schedules_both_groups():
    model = _model()
    opt = NDAdam(model.parameters(), lr=0.01, vector_lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(4):
        _train(model, opt, 1)
        scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.025, 0.0025])


def test_lr_scheduler_steps_match_manually_set_lr():
    scheduled, manual = _model(), _model()
    opt_s = NDAdam(scheduled.parameters(), lr=0.01, vector_lr=0.1)
    opt_m = NDAdam(manual.parameters(), lr=0.01, vector_lr=0.1)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt_s, gamma=0.7)
    for i in range(3):
        _train(scheduled, opt_s, 1, seed=i)
        scheduler.step()
        _train(manual, opt_m, 1, seed=i)
        for g in opt_m.param_groups:
            g["lr"] *= 0.7
    _assert_same(list(scheduled.parameters()), list(manual.parameters()))


# ---------------------------------------------------------------- checkpoints


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("order", ["optimizer-then-model", "model-then-optimizer"])
def test_resumed_training_is_bit_for_bit(dtype, order):
    model = _model(dtype)
    opt = NDAdam(model.parameters(), lr=0.01, vector_lr=0.1, weight_decay=1e-3)
    _train(model, opt, 5)
    model_state, opt_state = _roundtrip(model.state_dict()), _roundtrip(opt.state_dict())
    _train(model, opt, 5, seed=100)

    resumed = _model(dtype)
    if order == "optimizer-then-model":
        resumed_opt = NDAdam(resumed.parameters(), lr=0.01, vector_lr=0.1, weight_decay=1e-3)
        resumed.load_state_dict(model_state)
    else:
        resumed.load_state_dict(model_state)
        resumed_opt = NDAdam(resumed.parameters(), lr=0.01, vector_lr=0.1, weight_decay=1e-3)
    resumed_opt.load_state_dict(opt_state)
    for p in resumed.parameters():
        if p.dim() >= 2:
            assert resumed_opt.state[p]["exp_avg"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _train(resumed, resumed_opt, 5, seed=100)

    _assert_same(list(model.parameters()), list(resumed.parameters()))
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], resumed_opt.state[q][key])


def test_state_dict_round_trip():
    model = _model()
    opt = NDAdam(model.parameters(), lr=0.01)
    _train(model, opt, 3)
    state = opt.state_dict()
    other = NDAdam(_model().parameters(), lr=0.5)
    other.load_state_dict(_roundtrip(state))
    reloaded = other.state_dict()
    assert reloaded["param_groups"] == state["param_groups"]
    for key, values in state["state"].items():
        for name, value in values.items():
            assert torch.equal(reloaded["state"][key][name], value)


def test_loading_another_optimizers_state_is_refused_and_changes_nothing():
    model = _model()
    adam = torch.optim.Adam(model.parameters())
    _train(model, adam, 1)
    opt = NDAdam(model.parameters())
    _train(model, opt, 1)
    before = copy.deepcopy(opt.state_dict())
    adam_state = adam.state_dict()
    adam_state["param_groups"] = before["param_groups"]
    adam_state["state"] = {i: adam_state["state"][j] for i, j in zip([0, 1], [0, 4])}
    with pytest.raises(ValueError, match=r"exp_avg_sq.*param_groups\[0\]\['params'\]\[0\].*expected shape \[4\]"):
        opt.load_state_dict(adam_state)
    after = opt.state_dict()
    for key, values in before["state"].items():
        for name, value in values.items():
            assert torch.equal(after["state"][key][name], value)


def test_deepcopy_and_pickle():
    model = _model()
    opt = NDAdam(model.parameters(), lr=0.01, vector_lr=0.1)
    _train(model, opt, 2)
    clones = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    originals = [p for g in opt.param_groups for p in g["params"]]
    torch.manual_seed(5)
    grads = [torch.randn_like(p) for p in originals]
    for optimizer in [opt, *clones]:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        assert all(p is not q for p, q in zip(params, originals)) or optimizer is opt
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    for clone in clones:
        assert clone.param_groups[0]["lr"] == 0.1 and clone.param_groups[0]["vector"] is True
        clone_params = [p for g in clone.param_groups for p in g["params"]]
        _assert_same(originals, clone_params)
        for p, q in zip(originals, clone_params):
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[p][key], clone.state[q][key])


# ---------------------------------------------------------------- errors: named, and nothing modified


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1e-3), "invalid lr"),
        (dict(vector_lr=-0.1), "invalid vector_lr"),
        (dict(eps=-1e-8), "invalid eps"),
        (dict(betas=(1.0, 0.9)), "invalid betas"),
        (dict(betas=(0.9, -0.1)), "invalid betas"),
        (dict(betas=(0.9,)), "invalid betas"),
        (dict(weight_decay=-1.0), "invalid weight_decay"),
        (dict(backend="cuda"), "unknown backend 'cuda'"),
    ],
)
def test_bad_hyperparameters_raise_and_leave_params_untouched(kwargs, message):
    model = _model()
    before = _snapshot(model.parameters())
    with pytest.raises(ValueError, match=message):
        NDAdam(model.parameters(), **kwargs)
    _assert_same(before, list(model.parameters()))


def test_bad_group_setting_names_the_group_and_touches_no_group():
    model = _model()
    before = _snapshot(model.parameters())
    with pytest.raises(ValueError, match=r"param_groups\[1\]: invalid lr"):
        NDAdam([{"params": [model[0].weight]}, {"params": [model[4].weight], "lr": -1.0}])
    _assert_same(before, list(model.parameters()))


def test_all_zero_row_is_refused_naming_the_parameter_and_nothing_is_normalized():
    first = nn.Parameter(torch.randn(3, 4))
    bad = nn.Parameter(torch.randn(5, 2, 3))
    with torch.no_grad():
        bad[3].zero_()
    before = _snapshot([first, bad])
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\], shape \[5, 2, 3\].*row 3.*'vector': False"):
        NDAdam([{"params": [first]}, {"params": [bad]}])
    _assert_same(before, [first, bad])
    # The suggested fix works: as a scalar the tensor is fine.
    NDAdam([{"params": [first]}, {"params": [bad], "vector": False}])


def test_all_zero_row_in_add_param_group_changes_nothing():
    opt = NDAdam([nn.Parameter(torch.randn(3, 4))])
    good = nn.Parameter(torch.randn(2, 4) * 3)
    bad = nn.Parameter(torch.zeros(2, 4))
    before = _snapshot([good, bad])
    with pytest.raises(ValueError, match=r"'linear\.weight'.*all-zero row"):
        opt.add_param_group({"params": [("linear.bias", good), ("linear.weight", bad)]})
    _assert_same(before, [good, bad])
    assert len(opt.param_groups) == 1


def test_one_dim_tensor_in_vector_group_is_refused():
    bias = nn.Parameter(torch.randn(4))
    before = bias.detach().clone()
    with pytest.raises(ValueError, match=r"shape \[4\]\) is in a group with 'vector': True but has 1 dim"):
        NDAdam([{"params": [bias], "vector": True}])
    assert torch.equal(bias, before)


def test_complex_params_are_refused():
    with pytest.raises(ValueError, match=r"shape \[2, 2\]\) has dtype torch.complex64"):
        NDAdam([nn.Parameter(torch.randn(2, 2, dtype=torch.complex64))])


def test_sparse_gradient_raises_before_any_group_is_updated():
    model = _model()
    opt = NDAdam(model.parameters(), lr=0.1)
    x, y = _batch()
    nn.functional.cross_entropy(model(x), y).backward()
    model[1].bias.grad = model[1].bias.grad.to_sparse()
    before = _snapshot(model.parameters())
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[2\], shape \[4\]\) has a sparse gradient"):
        opt.step()
    _assert_same(before, list(model.parameters()))
    assert len(opt.state) == 0


def test_named_backend_that_is_missing_says_so_and_how_to_get_it(monkeypatch):
    import ndadam_fused.backends as backends

    monkeypatch.setitem(backends._REASONS, "triton", lambda device: "Triton is not installed; `pip install triton`")
    w = nn.Parameter(torch.randn(2, 2))
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match=r"backend 'triton' is not available on cpu: .*pip install triton"):
        NDAdam([w], backend="triton")
    assert torch.equal(w, before)


def test_auto_never_picks_the_triton_interpreter_for_cpu_tensors():
    import ndadam_fused.backends as backends

    assert backends.auto_backend("cpu") != "triton"
