"""The reference backend against the independent float64 Algorithm 1 in tests/oracle.py."""

import numpy as np
import pytest
import torch

from conftest import SCALAR_SHAPES, VECTOR_SHAPES
from ndadam_fused import NDAdam
from oracle import ScalarOracle, VectorOracle

# The section-7 shapes include rows of length 1 on purpose (they must stay exactly ±1).
pytestmark = pytest.mark.filterwarnings("ignore:.*rows of length 1")

STEPS = 25
SETTINGS = [
    dict(lr=1e-2, vector_lr=5e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    dict(lr=3e-3, vector_lr=0.2, betas=(0.9, 0.99), eps=1e-6, weight_decay=5e-4),
    dict(lr=1e-3, vector_lr=1e-3, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.1),
]
# DESIGN.md section 7: max abs error after 25 steps, on unit rows.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def _make_problem(dtype, seed=0):
    rng = np.random.default_rng(seed)
    shapes = VECTOR_SHAPES + SCALAR_SHAPES
    initial = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1) for s in shapes] for _ in range(STEPS)]
    params = [torch.nn.Parameter(torch.tensor(x, dtype=dtype)) for x in initial]
    return shapes, params, grads


def _optimizer(params, setting):
    """Explicit groups: the length-1 rows of VECTOR_SHAPES would be scalars in the automatic split."""
    options = {k: v for k, v in setting.items() if k != "vector_lr"}
    return NDAdam(
        [{"params": [p for p in params if p.dim() >= 2], "vector": True, "lr": setting["vector_lr"]},
         {"params": [p for p in params if p.dim() < 2], "vector": False}],
        backend="reference", **options,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("setting", SETTINGS, ids=["default", "official", "low-beta"])
def test_reference_matches_float64_algorithm_1(dtype, setting):
    shapes, params, grads = _make_problem(dtype)
    b1, b2 = setting["betas"]
    oracles = [
        (VectorOracle if p.dim() >= 2 else ScalarOracle)(p.detach().double().numpy(), b1, b2, setting["eps"])
        for p in params
    ]
    opt = _optimizer(params, setting)
    for t in range(STEPS):
        for p, oracle, g in zip(params, oracles, grads[t]):
            p.grad = torch.tensor(g, dtype=dtype)
            lr = setting["vector_lr"] if p.dim() >= 2 else setting["lr"]
            oracle.step(g, lr, setting["weight_decay"])
        opt.step()

    tol = TOLERANCE[dtype]
    for shape, p, oracle in zip(shapes, params, oracles):
        state = opt.state[p]
        assert state["step"].item() == STEPS
        np.testing.assert_allclose(p.detach().double().numpy(), oracle.param, rtol=0, atol=tol, err_msg=f"param {shape}")
        exp_avg = state["exp_avg"].double().numpy()
        # m is not unit-scaled: compare it relative to its own size.
        m_scale = max(1.0, np.abs(oracle.exp_avg).max())
        np.testing.assert_allclose(exp_avg, oracle.exp_avg, rtol=0, atol=tol * m_scale, err_msg=f"exp_avg {shape}")
        if p.dim() >= 2:
            assert state["exp_avg_sq"].shape == (shape[0],)
            v_scale = max(1.0, oracle.v.max())
            np.testing.assert_allclose(state["exp_avg_sq"].double().numpy(), oracle.v, rtol=0, atol=tol * v_scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lr_schedule_both_groups_against_oracle(dtype):
    """An lr that changes every step (as a scheduler sets it) reaches both sets of tensors."""
    setting = SETTINGS[1]
    shapes, params, grads = _make_problem(dtype, seed=1)
    b1, b2 = setting["betas"]
    oracles = [
        (VectorOracle if p.dim() >= 2 else ScalarOracle)(p.detach().double().numpy(), b1, b2, setting["eps"])
        for p in params
    ]
    opt = _optimizer(params, setting)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    for t in range(STEPS):
        lrs = {g["vector"]: g["lr"] for g in opt.param_groups}
        for p, oracle, g in zip(params, oracles, grads[t]):
            p.grad = torch.tensor(g, dtype=dtype)
            oracle.step(g, lrs[p.dim() >= 2], setting["weight_decay"])
        opt.step()
        schedule.step()
    assert {g["vector"]: g["lr"] for g in opt.param_groups} == pytest.approx({True: 0.0, False: 0.0}, abs=1e-12)
    for p, oracle in zip(params, oracles):
        np.testing.assert_allclose(p.detach().double().numpy(), oracle.param, rtol=0, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_low_precision_params_keep_fp32_state(dtype):
    setting = SETTINGS[0]
    shapes, params, grads = _make_problem(dtype, seed=2)
    b1, b2 = setting["betas"]
    oracles = [
        (VectorOracle if p.dim() >= 2 else ScalarOracle)(p.detach().double().numpy(), b1, b2, setting["eps"])
        for p in params
    ]
    opt = _optimizer(params, setting)
    for t in range(STEPS):
        for p, oracle, g in zip(params, oracles, grads[t]):
            p.grad = torch.tensor(g, dtype=dtype)
            oracle.step(p.grad.double().numpy(), setting["vector_lr"] if p.dim() >= 2 else setting["lr"])
        opt.step()
    # One rounding of a unit-sized element costs eps/2; 25 steps of them stayed under 2 eps when measured.
    tol = 4 * torch.finfo(dtype).eps
    for p, oracle in zip(params, oracles):
        if p.dim() >= 2:
            assert opt.state[p]["exp_avg"].dtype == torch.float32
            assert opt.state[p]["exp_avg_sq"].dtype == torch.float32
            np.testing.assert_allclose(p.detach().double().numpy(), oracle.param, rtol=0, atol=tol)
