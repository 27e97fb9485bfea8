"""DRDFL's generative parts: the two encoders (PersonaNet, Learngene) and the decoder.

The paper fixes no architecture for these; they are kept small on purpose, because the
Learngene is what travels the ring every round (the paper's budget is 0.58 M parameters
in the ResNet-18 setting) and the classifier is where the capacity belongs.
"""

from __future__ import annotations

import torch
from torch import nn


def _trunk(in_channels: int) -> nn.Sequential:
    """Two stride-2 convs and one stride-1 conv: (C, H, W) -> (64, H/4, W/4)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 4, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(32, 64, 4, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
    )


class PersonaNet(nn.Module):
    """Private encoder x -> z_p (the mean code the Gaussian-mixture losses act on)."""

    def __init__(self, input_shape: tuple[int, int, int], latent_dim: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.net = nn.Sequential(_trunk(c), nn.Linear(64 * (h // 4) * (w // 4), latent_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Learngene(nn.Module):
    """Shared encoder x -> (mu, log_var) of q(z_l | x); the module that travels the ring."""

    def __init__(self, input_shape: tuple[int, int, int], latent_dim: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.trunk = _trunk(c)
        self.moments = nn.Linear(64 * (h // 4) * (w // 4), 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_var = self.moments(self.trunk(x)).chunk(2, dim=1)
        return mu, log_var.clamp(-10.0, 10.0)


class Decoder(nn.Module):
    """[z_p, z_l] -> x' in [-1, 1] (the data's scale)."""

    def __init__(self, input_shape: tuple[int, int, int], latent_dim: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.grid = (64, h // 4, w // 4)
        self.fc = nn.Linear(latent_dim, 64 * (h // 4) * (w // 4))
        self.net = nn.Sequential(
            nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(32, c, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(-1, *self.grid))


class AdversarialHead(nn.Module):
    """q_vartheta(y | z_l): tries to read the label from the Learngene code."""

    def __init__(self, latent_dim: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)
