"""The optimizee architectures of the paper's Section 5 (plus LeNet and the NAS-Bench-201 cell).

Batch norm uses batch statistics only (``track_running_stats=False``): the optimizee is always in
training mode, as in the paper's code, and ``functional_call`` then needs no buffers.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """MLP-orig (784-20-10 sigmoid), MLP-ReLU, MLP-deeper (784-20-20-10)."""

    def __init__(self, in_features: int, hidden: Sequence[int], activation=nn.Sigmoid, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            layers += [nn.Linear(in_features, width), activation()]
            in_features = width
        layers.append(nn.Linear(in_features, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


class ConvNet(nn.Module):
    """Conv-MNIST / Conv-CIFAR: conv3x3x16 -> BN -> ReLU -> maxpool2; conv5x5x32 -> BN -> ReLU -> maxpool2;
    FC -> 10 with ReLU on the logits (as in the paper's code). VALID padding; stride 1 (MNIST) or 2 (CIFAR)."""

    def __init__(self, in_channels: int, size: int, stride: int = 1, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, stride=stride), nn.BatchNorm2d(16, track_running_stats=False), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, stride=stride), nn.BatchNorm2d(32, track_running_stats=False), nn.ReLU(),
            nn.MaxPool2d(2))
        s = _conv_out(size, 3, stride) // 2
        s = _conv_out(s, 5, stride) // 2
        self.fc = nn.Linear(32 * s * s, classes)

    def forward(self, x):
        return torch.relu(self.fc(self.features(x).flatten(1)))


class LeNet(nn.Module):
    """LeNet-5: conv5x5x6 -> sigmoid -> pool2 -> conv5x5x16 -> sigmoid -> pool2 -> FC120 -> FC84 -> FC10
    (sigmoid activations); 28x28 inputs are padded by 2 so both datasets reach 5x5x16 features."""

    def __init__(self, in_channels: int, size: int, classes: int = 10):
        super().__init__()
        pad = 2 if size == 28 else 0
        s = ((size + 2 * pad - 4) // 2 - 4) // 2
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=pad), nn.Sigmoid(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5), nn.Sigmoid(), nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(16 * s * s, 120), nn.Sigmoid(), nn.Linear(120, 84), nn.Sigmoid(), nn.Linear(84, classes))

    def forward(self, x):
        return self.net(x)


class ReLUConvBN(nn.Sequential):
    def __init__(self, channels: int, kernel: int):
        super().__init__(nn.ReLU(), nn.Conv2d(channels, channels, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(channels, track_running_stats=False))


class AvgPool3x3(nn.Module):
    """``nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)`` as a fixed depthwise convolution.

    Same function (to float rounding), about 5x faster forward+backward on CPU, where ``avg_pool2d`` was a fifth of
    the NAS cell's step. No parameters or buffers: the box kernel and the border counts are made on the fly."""

    def forward(self, x):
        channels = x.shape[1]
        box = torch.ones(channels, 1, 3, 3, dtype=x.dtype, device=x.device)
        sums = F.conv2d(x, box, padding=1, groups=channels)
        counts = F.conv2d(torch.ones_like(x[:1, :1]), box[:1], padding=1)
        return sums / counts


class NASCell(nn.Module):
    """The NAS-Bench-201 cell of the paper's footnote 4:
    ``|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|``::

        n1 = conv3x3(n0);  n2 = conv3x3(n0) + avgpool3x3(n1);  n3 = n0 + conv3x3(n1) + n2
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv_01 = ReLUConvBN(channels, 3)
        self.conv_02 = ReLUConvBN(channels, 3)
        self.pool_12 = AvgPool3x3()
        self.conv_13 = ReLUConvBN(channels, 3)

    def forward(self, n0):
        n1 = self.conv_01(n0)
        n2 = self.conv_02(n0) + self.pool_12(n1)
        return n0 + self.conv_13(n1) + n2


class NASCellNet(nn.Module):
    """Stem conv3x3 (C=8) + BN -> the footnote-4 cell -> BN -> ReLU -> global average pool -> FC.
    A single cell keeps the optimizee affordable on a CPU (the benchmark's macro skeleton stacks 15)."""

    def __init__(self, in_channels: int, channels: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels, track_running_stats=False))
        self.cell = NASCell(channels)
        self.head = nn.Sequential(nn.BatchNorm2d(channels, track_running_stats=False), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))

    def forward(self, x):
        return self.head(self.cell(self.stem(x)))
