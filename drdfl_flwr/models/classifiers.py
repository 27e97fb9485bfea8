"""Classifiers: a small CNN for CPU runs, CIFAR-style ResNet-8 (DFML) and ResNet-18.

``norm`` chooses the normalization layers: ``batch`` (BatchNorm, what FedBN keeps on the
node), ``group`` (GroupNorm with up to 32 groups, as DisPFL and DFedPGP build ResNet-18)
or ``none``; ``auto`` is each network's usual one (none for the small CNN, BatchNorm for
the ResNets).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from drdfl_flwr.models.resnet8 import resnet8_cifar

Norm = Callable[[int], nn.Module]


def norm_layer(kind: str) -> Norm:
    """channels -> normalization module of ``kind`` (batch, group, none)."""
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "group":
        return lambda c: nn.GroupNorm(math.gcd(32, c), c)
    if kind == "none":
        return lambda c: nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose one of batch, group, none")


class SmallCNN(nn.Module):
    """Two conv blocks and two dense layers; works for 8x8 digits and 32x32 CIFAR alike."""

    def __init__(
        self, in_channels: int, height: int, width: int, num_classes: int, norm: Norm
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            norm(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            norm(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(64 * (height // 4) * (width // 4), 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def resnet18_cifar(in_channels: int, num_classes: int, norm: Norm = nn.BatchNorm2d) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool)."""
    # imported here: torchvision pulls in torch._dynamo, 2-4 s per process, which every
    # deployed message (a fresh ClientApp process) would pay for the smaller classifiers
    import torchvision

    net = torchvision.models.resnet18(num_classes=num_classes, norm_layer=norm)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def build_classifier(
    name: str, input_shape: tuple[int, int, int], num_classes: int, norm: str = "auto"
) -> nn.Module:
    c, h, w = input_shape
    if norm == "auto":
        norm = "none" if name == "small-cnn" else "batch"
    if name == "small-cnn":
        if h % 4 or w % 4:
            raise ValueError(f"small-cnn needs height and width divisible by 4, got {h}x{w}")
        return SmallCNN(c, h, w, num_classes, norm_layer(norm))
    if name in ("resnet8", "resnet18") and norm == "none":
        raise ValueError(f"{name} needs a norm layer (batch or group), got none")
    if name == "resnet8":
        return resnet8_cifar(c, num_classes, norm_layer(norm))
    if name == "resnet18":
        return resnet18_cifar(c, num_classes, norm_layer(norm))
    raise ValueError(f"unknown classifier {name!r}")
