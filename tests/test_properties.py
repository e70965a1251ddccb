"""Properties of ND-Adam that hold for any shapes, gradients and settings (hypothesis)."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ndadam_fused import NDAdam
from oracle import VectorOracle

shapes = st.lists(st.integers(1, 9), min_size=2, max_size=4).map(tuple)
betas = st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.999))
lrs = st.floats(1e-4, 1.0)
seeds = st.integers(0, 2**31 - 1)
# Rows of length 1 are explicit vector groups here (they must stay exactly ±1): NDAdam warns.
pytestmark = pytest.mark.filterwarnings("ignore:.*rows of length 1")
common = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _run(shape, seed, steps, grad_scale=1.0, dtype=torch.float64, **opt_kwargs):
    """NDAdam on one vector tensor with seeded random gradients; the params after every step."""
    rng = np.random.default_rng(seed)
    param = torch.nn.Parameter(torch.tensor(rng.standard_normal(shape), dtype=dtype))
    opt = NDAdam([{"params": [param], "vector": True}], backend="reference", **opt_kwargs)
    history = [param.detach().clone()]
    for _ in range(steps):
        param.grad = torch.tensor(rng.standard_normal(shape) * grad_scale, dtype=dtype)
        opt.step()
        history.append(param.detach().clone())
    return history


@common
@given(shape=shapes, seed=seeds, lr=lrs, betas=betas, dtype=st.sampled_from([torch.float64, torch.float32]))
def test_every_row_has_unit_norm_after_every_step(shape, seed, lr, betas, dtype):
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for w in _run(shape, seed, steps=6, dtype=dtype, lr=lr, betas=betas):
        norms = w.reshape(shape[0], -1).double().norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), rtol=0, atol=tol), norms


@common
@given(shape=shapes, seed=seeds, lr=lrs, betas=betas, scale=st.floats(1e-3, 1e3))
def test_step_is_invariant_to_a_positive_gradient_scale(shape, seed, lr, betas, scale):
    # eps = 0 makes the invariance exact (as for Adam); only rounding separates the two runs.
    unscaled = _run(shape, seed, steps=5, lr=lr, betas=betas, eps=0.0)
    scaled = _run(shape, seed, steps=5, grad_scale=scale, lr=lr, betas=betas, eps=0.0)
    for a, b in zip(unscaled, scaled):
        assert torch.allclose(a, b, rtol=0, atol=1e-9)


@common
@given(rows=st.integers(1, 8), trailing=st.sampled_from([(1,), (1, 1, 1)]), seed=seeds, lr=lrs, betas=betas,
       eps=st.sampled_from([0.0, 1e-8]), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_a_row_of_length_one_never_changes(rows, trailing, seed, lr, betas, eps, dtype):
    history = _run((rows, *trailing), seed, steps=5, dtype=dtype, lr=lr, betas=betas, eps=eps)
    first = history[0]
    assert set(first.flatten().tolist()) <= {1.0, -1.0}
    for w in history[1:]:
        assert torch.equal(w, first)


@common
@given(shape=shapes, seed=seeds, lr=lrs, betas=betas, weight_decay=st.floats(1e-4, 10.0))
def test_weight_decay_on_vectors_changes_nothing(shape, seed, lr, betas, weight_decay):
    plain = _run(shape, seed, steps=5, lr=lr, betas=betas)
    decayed = _run(shape, seed, steps=5, lr=lr, betas=betas, weight_decay=weight_decay)
    for a, b in zip(plain, decayed):
        assert torch.equal(a, b)
    # ... and that is the math, not an omission: Algorithm 1 with ḡ + λw projects λw away.
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal(shape)
    without = VectorOracle(w0, *betas, eps=1e-8)
    with_decay = VectorOracle(w0, *betas, eps=1e-8)
    for _ in range(5):
        g = rng.standard_normal(shape)
        without.step(g, lr)
        with_decay.step(g, lr, weight_decay=weight_decay)
    np.testing.assert_allclose(with_decay.param, without.param, rtol=0, atol=1e-10)
