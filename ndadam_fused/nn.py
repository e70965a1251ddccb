"""Regularized softmax: the paper's two ways to keep the logits' magnitude in check.

With plain softmax cross-entropy the gradient that reaches the logits, ``softmax(z) - onehot(y)``,
vanishes as soon as the logits of a well-classified example grow large, so the learning signal
depends on the overall magnitude of the logits rather than on how well the example is
classified. Zhang (2017) regularizes that magnitude in one of two ways:

- an L2 penalty on the logits, ``loss += λ · 0.5 · mean_over_batch(||z||²)``; the official code
  uses ``λ = 1e-3`` (:func:`logit_l2_penalty`, :func:`cross_entropy_with_logit_l2`,
  :class:`CrossEntropyWithLogitL2`);
- batch normalization of the logits with a FIXED scale ``γ`` and a learned bias ``β``
  ("BN-Softmax"); the official code uses ``γ = 2.5`` for CIFAR-10, ``γ = 1`` for CIFAR-100 and
  BN ``ε = 1e-3`` (:class:`BatchNormSoftmax`).

Both work with any optimizer; the paper pairs them with ND-Adam.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "BatchNormSoftmax",
    "CrossEntropyWithLogitL2",
    "OFFICIAL_LOGIT_L2",
    "cross_entropy_with_logit_l2",
    "logit_l2_penalty",
]

#: The logit L2 weight λ of the official code.
OFFICIAL_LOGIT_L2 = 1e-3


def _check_logits(logits: Tensor, where: str) -> None:
    if logits.dim() != 2:
        raise ValueError(f"{where}: expected logits of shape [batch, classes], got {list(logits.shape)}")


def logit_l2_penalty(logits: Tensor, weight: float = OFFICIAL_LOGIT_L2) -> Tensor:
    """``weight · 0.5 · mean over the batch of ||z||²``, for logits ``z`` of shape [batch, classes].

    Returns a 0-dim tensor that carries gradient to ``logits``: ``weight · z / batch``.
    """
    _check_logits(logits, "logit_l2_penalty")
    if weight < 0:
        raise ValueError(f"logit_l2_penalty: weight must be >= 0, got {weight}")
    return weight * 0.5 * logits.pow(2).sum(dim=1).mean()


def cross_entropy_with_logit_l2(
    logits: Tensor, target: Tensor, weight: float = OFFICIAL_LOGIT_L2, **cross_entropy_kwargs
) -> Tensor:
    """Mean cross-entropy plus :func:`logit_l2_penalty`; extra kwargs go to ``F.cross_entropy``."""
    return F.cross_entropy(logits, target, **cross_entropy_kwargs) + logit_l2_penalty(logits, weight)


class CrossEntropyWithLogitL2(nn.Module):
    """:func:`cross_entropy_with_logit_l2` as a loss module: ``criterion(logits, target)``."""

    def __init__(self, weight: float = OFFICIAL_LOGIT_L2, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"CrossEntropyWithLogitL2: weight must be >= 0, got {weight}")
        self.weight = weight
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return cross_entropy_with_logit_l2(logits, target, self.weight, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, label_smoothing={self.label_smoothing}"


class BatchNormSoftmax(nn.Module):
    """The logit layer of BN-Softmax: batch-normalized logits times a fixed ``scale``, plus a learned bias.

    ``out = scale · (z - mean) / sqrt(var + eps) + bias`` per class, with batch statistics in
    training mode and running statistics in eval mode, as ``nn.BatchNorm1d`` keeps them. The
    output is still logits: follow it with ``F.cross_entropy`` (which applies the softmax).

    The scale is a constant (a buffer, not a parameter): a learned scale would let the logits
    grow again, which is what the normalization is there to prevent. A bias of the layer that
    feeds this one is redundant (the mean is subtracted), so give that layer ``bias=False``.

    Args:
        num_classes: the number of logits.
        scale: the fixed γ; the official code uses 2.5 for CIFAR-10 and 1 for CIFAR-100.
        eps: added to the variance; 1e-3 in the official code (TensorFlow's default).
        momentum: weight of the newest batch in the running statistics (``nn.BatchNorm1d``'s).
    """

    def __init__(self, num_classes: int, scale: float = 2.5, eps: float = 1e-3, momentum: float = 0.1) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"BatchNormSoftmax: num_classes must be >= 1, got {num_classes}")
        if not scale > 0:
            raise ValueError(f"BatchNormSoftmax: scale must be > 0, got {scale}")
        if not eps > 0:
            raise ValueError(f"BatchNormSoftmax: eps must be > 0, got {eps}")
        self.num_classes = num_classes
        self.eps = eps
        self.momentum = momentum
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.register_buffer("running_mean", torch.zeros(num_classes))
        self.register_buffer("running_var", torch.ones(num_classes))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)

    def forward(self, logits: Tensor) -> Tensor:
        _check_logits(logits, "BatchNormSoftmax")
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"BatchNormSoftmax: built for {self.num_classes} classes, got logits of shape {list(logits.shape)}"
            )
        normalized = F.batch_norm(
            logits, self.running_mean, self.running_var, weight=None, bias=None,
            training=self.training, momentum=self.momentum, eps=self.eps,
        )
        return normalized * self.scale + self.bias

    def extra_repr(self) -> str:
        return f"{self.num_classes}, scale={float(self.scale)}, eps={self.eps}, momentum={self.momentum}"
