"""Classifiers: a small CNN for CPU runs, CIFAR-style ResNet-8 (DFML) and ResNet-18."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from drdfl_flwr.models.resnet8 import resnet8_cifar


class SmallCNN(nn.Module):
    """Two conv blocks and two dense layers; works for 8x8 digits and 32x32 CIFAR alike."""

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
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


def resnet18_cifar(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool)."""
    net = torchvision.models.resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def build_classifier(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    c, h, w = input_shape
    if name == "small-cnn":
        if h % 4 or w % 4:
            raise ValueError(f"small-cnn needs height and width divisible by 4, got {h}x{w}")
        return SmallCNN(c, h, w, num_classes)
    if name == "resnet8":
        return resnet8_cifar(c, num_classes)
    if name == "resnet18":
        return resnet18_cifar(c, num_classes)
    raise ValueError(f"unknown classifier {name!r}")
