"""The shared backend comparison can fail: a backend that is slightly off is caught."""

import pytest
import torch

import backend_cases
from ndadam_fused.backends import reference


@pytest.mark.parametrize("dtype, lr_error, message", [
    (torch.float64, 1e-4, "params differ"),
    (torch.float32, 1e-3, "params differ"),
    (torch.bfloat16, 0.5, "from the float64 run"),
])
def test_comparison_catches_a_backend_that_is_off(monkeypatch, dtype, lr_error, message):
    true_step = reference.vector_step

    def off_by_a_little(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, hyper, **options):
        hyper = hyper.clone()
        hyper[0] *= 1 + lr_error
        true_step(params, grads, exp_avgs, exp_avg_sqs, state_steps, hyper=hyper, **options)

    import ndadam_fused.backends as backends

    fake = type("FakeBackend", (), {"vector_step": staticmethod(off_by_a_little), "scalar_step": staticmethod(reference.scalar_step)})
    real_resolve = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda name, device: fake if name == "fake" else real_resolve(name, device))
    monkeypatch.setattr(backends, "check_name", lambda name, where: None)
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device=None: None)
    with pytest.raises(AssertionError, match=message):
        backend_cases.compare_with_reference("fake", [(3, 8), (2, 300)], dtype, steps=10, vector_lrs=(0.1,))
    # ... and the reference itself passes the same comparison.
    backend_cases.compare_with_reference("reference", [(3, 8), (2, 300)], dtype, steps=10, vector_lrs=(0.1,))
