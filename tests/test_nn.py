"""Regularized softmax (ndadam_fused.nn): values against hand-computed ones, gradients, train/eval."""

import math

import pytest
import torch
from torch.nn import functional as F

import ndadam_fused
from ndadam_fused.nn import (
    OFFICIAL_LOGIT_L2,
    BatchNormSoftmax,
    CrossEntropyWithLogitL2,
    cross_entropy_with_logit_l2,
    logit_l2_penalty,
)


def test_exported_as_a_submodule_only():
    assert ndadam_fused.nn.BatchNormSoftmax is BatchNormSoftmax
    for name in ("BatchNormSoftmax", "logit_l2_penalty", "CrossEntropyWithLogitL2"):
        assert not hasattr(ndadam_fused, name)
    assert OFFICIAL_LOGIT_L2 == 1e-3


def test_logit_l2_penalty_by_hand():
    logits = torch.tensor([[1.0, 2.0, 2.0], [0.0, -3.0, 4.0]])
    # ||z||² = 9 and 25, batch mean 17, times 0.5 and the weight.
    assert logit_l2_penalty(logits, 0.1).item() == pytest.approx(0.1 * 0.5 * 17.0)
    assert logit_l2_penalty(logits).item() == pytest.approx(1e-3 * 0.5 * 17.0)
    assert logit_l2_penalty(logits, 0.0).item() == 0.0


def test_logit_l2_penalty_gradient_is_weight_times_logits_over_batch():
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    logit_l2_penalty(logits, 0.3).backward()
    torch.testing.assert_close(logits.grad, 0.3 * logits.detach() / 5)


def test_cross_entropy_with_logit_l2_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([0, 0])
    # Cross-entropy by hand: -log softmax of the target's logit, averaged over the batch.
    ce = (-(2.0 - math.log(math.exp(2.0) + 1.0)) - (0.0 - math.log(1.0 + math.exp(1.0)))) / 2
    penalty = 0.01 * 0.5 * (4.0 + 1.0) / 2
    assert cross_entropy_with_logit_l2(logits, target, 0.01).item() == pytest.approx(ce + penalty, rel=1e-12)
    assert CrossEntropyWithLogitL2(0.01)(logits, target).item() == pytest.approx(ce + penalty, rel=1e-12)


def test_cross_entropy_with_logit_l2_gradient():
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 2, 1, 2])
    CrossEntropyWithLogitL2(0.5)(logits, target).backward()
    expected = (F.softmax(logits.detach(), dim=1) - F.one_hot(target, 3)) / 4 + 0.5 * logits.detach() / 4
    torch.testing.assert_close(logits.grad, expected)


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(2, 3, 4)])
def test_penalty_rejects_non_2d_logits(bad):
    with pytest.raises(ValueError, match="batch, classes"):
        logit_l2_penalty(bad)


def test_negative_weight_is_rejected():
    with pytest.raises(ValueError, match="weight"):
        logit_l2_penalty(torch.zeros(2, 3), -1.0)
    with pytest.raises(ValueError, match="weight"):
        CrossEntropyWithLogitL2(-1.0)


def test_batch_norm_softmax_training_value_by_hand():
    layer = BatchNormSoftmax(2, scale=2.5, eps=1e-3).double()
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.5, -1.0]))
    logits = torch.tensor([[1.0, 10.0], [3.0, 10.0], [5.0, 13.0]], dtype=torch.float64)
    out = layer(logits)
    # Column 0: mean 3, biased variance 8/3; column 1: mean 11, biased variance 2.
    expected = torch.tensor(
        [
            [2.5 * -2 / math.sqrt(8 / 3 + 1e-3) + 0.5, 2.5 * -1 / math.sqrt(2 + 1e-3) - 1.0],
            [0.5, 2.5 * -1 / math.sqrt(2 + 1e-3) - 1.0],
            [2.5 * 2 / math.sqrt(8 / 3 + 1e-3) + 0.5, 2.5 * 2 / math.sqrt(2 + 1e-3) - 1.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(out, expected)
    # Running stats: momentum 0.1 towards the batch mean and the UNBIASED batch variance.
    torch.testing.assert_close(layer.running_mean, torch.tensor([0.3, 1.1], dtype=torch.float64))
    torch.testing.assert_close(layer.running_var, torch.tensor([0.9 + 0.1 * 4.0, 0.9 + 0.1 * 3.0], dtype=torch.float64))


def test_batch_norm_softmax_eval_uses_running_stats():
    layer = BatchNormSoftmax(3, scale=1.0)
    layer.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
    layer.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    layer.eval()
    single = torch.tensor([[3.0, 2.0, 2.0]])  # one example: fine in eval, no batch stats needed
    expected = torch.tensor([[2 / math.sqrt(4.001), 1.0, -1 / math.sqrt(0.251)]])
    torch.testing.assert_close(layer(single), expected)
    before = layer.running_mean.clone()
    layer(torch.randn(8, 3))
    assert torch.equal(layer.running_mean, before)


def test_batch_norm_softmax_output_is_bounded_whatever_the_logits_scale():
    layer = BatchNormSoftmax(10, scale=2.5)
    logits = torch.randn(64, 10) * 1e4
    out = layer(logits)
    # Per class, batch-normalized values times 2.5: unit variance scaled by γ, zero mean.
    torch.testing.assert_close(out.mean(0), torch.zeros(10), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.var(0, unbiased=False), torch.full((10,), 2.5**2), atol=1e-3, rtol=1e-4)


def test_batch_norm_softmax_gradients_flow_to_bias_and_input_not_to_scale():
    layer = BatchNormSoftmax(4, scale=2.5)
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    assert "scale" in dict(layer.named_buffers())
    features = torch.randn(16, 8, requires_grad=True)
    linear = torch.nn.Linear(8, 4, bias=False)
    target = torch.randint(0, 4, (16,))
    F.cross_entropy(layer(linear(features)), target).backward()
    assert layer.bias.grad is not None and layer.bias.grad.abs().sum() > 0
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
    assert features.grad is not None and features.grad.abs().sum() > 0
    # The bias gradient of a mean cross-entropy is the batch mean of softmax - onehot.
    with torch.no_grad():
        probs = F.softmax(layer(linear(features)), dim=1)
    torch.testing.assert_close(layer.bias.grad, (probs - F.one_hot(target, 4)).mean(0), atol=1e-6, rtol=1e-5)


def test_batch_norm_softmax_state_dict_round_trip():
    layer = BatchNormSoftmax(5, scale=1.0)
    layer(torch.randn(6, 5))
    copy = BatchNormSoftmax(5, scale=2.5)
    copy.load_state_dict(layer.state_dict())
    assert float(copy.scale) == 1.0
    torch.testing.assert_close(copy.running_var, layer.running_var)


def test_batch_norm_softmax_rejects_bad_input():
    with pytest.raises(ValueError, match="scale"):
        BatchNormSoftmax(3, scale=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        BatchNormSoftmax(0)
    with pytest.raises(ValueError, match="3 classes"):
        BatchNormSoftmax(3)(torch.randn(4, 5))
    with pytest.raises(ValueError, match="batch, classes"):
        BatchNormSoftmax(3)(torch.randn(4, 3, 2))
