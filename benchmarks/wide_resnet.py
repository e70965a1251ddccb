"""Wide residual networks (Zagoruyko and Komodakis, 2016), as the paper trains them.

WRN-d-k: a 3x3 stem conv with 16 channels, then three stages of ``(d - 4) / 6`` pre-activation
basic blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3) with ``16k``, ``32k`` and ``64k`` channels, the
second and third stage starting with stride 2; then BN-ReLU, global average pooling and the
classifier. WRN-28-10 is the paper's largest network; WRN-10-1 (one block per stage, 16/32/64
channels, about 78k parameters) is the small residual CNN of ``benchmarks/generalization.py``.

The classifier is ``nn.Linear`` (a vector tensor for ND-Adam, as the official code's 1x1
classifier conv is), optionally followed by :class:`ndadam_fused.nn.BatchNormSoftmax`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ndadam_fused.nn import BatchNormSoftmax

__all__ = ["WideResNet"]


class _Block(nn.Module):
    """Pre-activation basic block; a 1x1 conv on the shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            if in_channels != out_channels or stride != 1
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        # As in the WRN code: the projection shortcut takes the activated input.
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """WRN-depth-width for ``in_channels`` x H x W images.

    Args:
        depth: ``6n + 4`` (10, 16, 22, 28, ...).
        width: the widening factor k.
        num_classes: the number of logits.
        in_channels: 3 for CIFAR, 1 for grey digits.
        stem_stride: stride of the stem conv; 2 halves the resolution of every stage, which makes
            28x28 inputs cost what 14x14 ones do.
        bn_softmax_scale: when given, the classifier has no bias and its logits go through
            ``BatchNormSoftmax(num_classes, scale=bn_softmax_scale)`` (the paper's BN-Softmax).
    """

    def __init__(
        self,
        depth: int = 28,
        width: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        stem_stride: int = 1,
        bn_softmax_scale: float | None = None,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet: depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if width < 1:
            raise ValueError(f"WideResNet: width must be >= 1, got {width}")
        blocks_per_stage = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.depth, self.width = depth, width
        self.stem = nn.Conv2d(in_channels, 16, 3, stride=stem_stride, padding=1, bias=False)
        stages = []
        in_width = 16
        for out_width, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for index in range(blocks_per_stage):
                blocks.append(_Block(in_width, out_width, stride if index == 0 else 1))
                in_width = out_width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_bn = nn.BatchNorm2d(in_width)
        self.classifier = nn.Linear(in_width, num_classes, bias=bn_softmax_scale is None)
        self.logit_norm = None if bn_softmax_scale is None else BatchNormSoftmax(num_classes, scale=bn_softmax_scale)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: Tensor) -> Tensor:
        features = F.relu(self.final_bn(self.stages(self.stem(images))))
        logits = self.classifier(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))
        return logits if self.logit_norm is None else self.logit_norm(logits)
