"""Gradient-leakage attack (DLG, Zhu et al. 2019) for the paper's Figure 5.

DLG rebuilds a training image from a shared gradient: it optimizes a dummy image (and a
dummy soft label) until the gradient it produces, under the *same loss function and
weights*, matches the observed one. The attack needs to rehearse the loss; that is the
point of the paper's argument for DRDFL, which shares a Learngene whose training loss
passes through modules the receiver never sees.

Three observations of one image, as in Figure 5:

* :func:`classifier_gradient`: what a FedAvg/FedNova client reveals, the gradient of
  the classifier's cross-entropy on the image; the attacker has the classifier.
* the same plus Gaussian noise (:func:`with_gaussian_noise`), the usual DP-style defence.
* :func:`learngene_gradient`: the gradient of the DRDFL Learngene's own losses on the
  image. This is more than DRDFL sends (it sends weights after a whole local epoch, plus
  class statistics that average over a class); granting it to the attacker makes the
  comparison a worst case for DRDFL. The attacker holds the Learngene but not the
  private PersonaNet, decoder and adversarial head, so it can rehearse only the
  Learngene's KL term (:func:`learngene_rehearsal`). As a control,
  :func:`learngene_oracle_rehearsal` is the attacker that also holds them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from drdfl_flwr.data import PIXEL_RANGE
from drdfl_flwr.methods.drdfl import kl_to_standard_normal

Gradients = list[torch.Tensor]
# (dummy image, dummy soft label) -> the gradient that the attacker's loss gives them
Rehearsal = Callable[[torch.Tensor, torch.Tensor], Gradients]


def psnr(reconstruction: torch.Tensor, original: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB (Hore & Ziou 2010) of images in PIXEL_RANGE."""
    if reconstruction.shape != original.shape:
        raise ValueError(
            f"psnr: shapes differ, {tuple(reconstruction.shape)} vs {tuple(original.shape)}"
        )
    low, high = PIXEL_RANGE
    mse = F.mse_loss(reconstruction.clamp(low, high), original).item()
    if mse == 0:
        return float("inf")
    return 10.0 * math.log10((high - low) ** 2 / mse)


class DLGLeNet(nn.Module):
    """The network DLG was demonstrated on (Zhu et al. 2019): three 5x5 convolutions
    with sigmoid activations and one dense layer, initialized as DLG's release does.
    Smooth activations are what make the attack converge; against ReLU and max-pooling
    networks plain DLG fails (see the Privacy notebook)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.body = nn.Sequential(
            nn.Conv2d(c, 12, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1),
            nn.Sigmoid(),
            nn.Flatten(),
        )
        self.fc = nn.Linear(12 * ((h + 3) // 4) * ((w + 3) // 4), num_classes)
        # DLG's release draws every weight and bias from U(-0.5, 0.5): with PyTorch's
        # default init the attack stalled on CIFAR-10 (8.5-9.2 dB, noise level, on two
        # images; 50-64 dB with this init, 100 L-BFGS iterations)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against softmax(target_logits): DLG's differentiable dummy label."""
    return torch.sum(-F.softmax(target_logits, -1) * F.log_softmax(logits, -1), -1).mean()


def classifier_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Gradients:
    """The gradient a FedAvg/FedNova client's update reveals for the batch (x, y)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(x), y)
    return [g.detach() for g in torch.autograd.grad(loss, params)]


def classifier_rehearsal(model: nn.Module) -> Rehearsal:
    """The attacker knows the classifier and its loss: it can rehearse both exactly."""
    params = [p for p in model.parameters() if p.requires_grad]

    def rehearse(x: torch.Tensor, label_logits: torch.Tensor) -> Gradients:
        loss = soft_cross_entropy(model(x), label_logits)
        return list(torch.autograd.grad(loss, params, create_graph=True))

    return rehearse


def with_gaussian_noise(grads: Sequence[torch.Tensor], std: float, seed: int = 0) -> Gradients:
    """The gradient plus N(0, std^2) noise on every entry (the defence of Figure 5)."""
    if std < 0:
        raise ValueError(f"std={std}: a noise standard deviation must be >= 0")
    gen = torch.Generator().manual_seed(seed)
    return [g + std * torch.randn(g.shape, generator=gen).to(g) for g in grads]


def _learngene_loss_gradient(
    learner, x: torch.Tensor, y: torch.Tensor, seed: int, create_graph: bool
) -> Gradients:
    params = list(learner.learngene.parameters())
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the losses draw z_l and the reconstruction noise
        total = sum(learner.losses(x, y).values())
    grads = torch.autograd.grad(total, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def learngene_gradient(learner, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> Gradients:
    """The gradient of a DRDFL node's min-step losses with respect to its Learngene.

    ``learner`` is a :class:`~drdfl_flwr.methods.drdfl.DRDFLLearner`; every loss term
    that reaches the Learngene counts (KL, the uniform adversarial loss through the
    private head, the reconstruction through the private decoder). ``seed`` fixes the
    losses' random draws."""
    return [g.detach() for g in _learngene_loss_gradient(learner, x, y, seed, create_graph=False)]


def learngene_rehearsal(learngene: nn.Module) -> Rehearsal:
    """What an attacker holding only the shared Learngene can rehearse: its KL term."""
    params = list(learngene.parameters())

    def rehearse(x: torch.Tensor, label_logits: torch.Tensor) -> Gradients:
        loss = kl_to_standard_normal(*learngene(x))
        return list(torch.autograd.grad(loss, params, create_graph=True))

    return rehearse


def learngene_oracle_rehearsal(learner, y: torch.Tensor, seed: int = 0) -> Rehearsal:
    """The control: an attacker that also holds the node's private modules, the true
    label and the losses' random draws, so it rehearses the Learngene's gradient exactly.
    If this attacker succeeds where :func:`learngene_rehearsal` fails, what protects the
    image is the privacy of those modules, not the Learngene's architecture."""

    def rehearse(x: torch.Tensor, label_logits: torch.Tensor) -> Gradients:
        return _learngene_loss_gradient(learner, x, y, seed, create_graph=True)

    return rehearse


@dataclass
class Reconstruction:
    image: torch.Tensor
    gradient_distance: list[float] = field(default_factory=list)  # per optimizer step


def dlg(
    observed: Sequence[torch.Tensor],
    rehearse: Rehearsal,
    image_shape: Sequence[int],
    num_classes: int,
    steps: int = 200,
    seed: int = 0,
) -> Reconstruction:
    """DLG as published: L-BFGS on a dummy image and dummy label logits, minimizing the
    squared distance between the rehearsed and the observed gradient, ``steps``
    optimizer iterations."""
    if steps < 1:
        raise ValueError(f"steps={steps}: DLG needs at least one optimization step")
    gen = torch.Generator().manual_seed(seed)
    low, high = PIXEL_RANGE
    x = (low + (high - low) * torch.rand(tuple(image_shape), generator=gen)).requires_grad_(True)
    label = torch.randn((image_shape[0], num_classes), generator=gen).requires_grad_(True)
    optimizer = torch.optim.LBFGS([x, label], lr=1.0)
    observed = [g.detach() for g in observed]
    expected = [tuple(g.shape) for g in rehearse(x, label)]
    if expected != [tuple(g.shape) for g in observed]:
        raise ValueError(
            f"dlg: the observed gradient has shapes {[tuple(g.shape) for g in observed]}, "
            f"the rehearsed loss gives {expected}: they must come from the same parameters"
        )
    result = Reconstruction(image=x)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        rehearsed = rehearse(x, label)
        distance = sum(((r - o) ** 2).sum() for r, o in zip(rehearsed, observed, strict=True))
        distance.backward()
        return distance

    for _ in range(steps):
        value = float(optimizer.step(closure).detach())
        result.gradient_distance.append(value)
        if not torch.isfinite(torch.tensor(value)):
            break  # L-BFGS diverged; the image so far is the attack's answer
    result.image = x.detach().nan_to_num(0.0).clamp(low, high)
    return result


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels: the natural-image prior of
    feature inversion (Mahendran & Vedaldi 2015)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (
        x[..., :, 1:] - x[..., :, :-1]
    ).abs().mean()


def feature_inversion(
    encoder: nn.Module,
    target: torch.Tensor,
    image_shape: Sequence[int],
    steps: int = 500,
    tv_weight: float = 0.01,
    lr: float = 0.05,
    seed: int = 0,
) -> Reconstruction:
    """The attack on what DRDFL-VF sends: a class's mean feature ``target`` (shape (d,))
    under the shared trunk ``encoder``, which the receiver holds. Adam on a dummy image
    (one, ``image_shape`` without the batch axis) until ``encoder`` maps it to ``target``,
    with a total-variation prior; ``gradient_distance`` records the feature distance.
    A class held by one image sends that image's feature itself: the worst case."""
    if steps < 1:
        raise ValueError(f"steps={steps}: an inversion needs at least one optimization step")
    gen = torch.Generator().manual_seed(seed)
    low, high = PIXEL_RANGE
    x = (low + (high - low) * torch.rand((1, *image_shape), generator=gen)).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    target = target.detach().reshape(1, -1)
    result = Reconstruction(image=x)
    encoder.eval()
    for _ in range(steps):
        distance = F.mse_loss(encoder(x), target, reduction="sum")
        loss = distance + tv_weight * total_variation(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            x.clamp_(low, high)
        result.gradient_distance.append(float(distance.detach()))
    result.image = x.detach()
    return result
