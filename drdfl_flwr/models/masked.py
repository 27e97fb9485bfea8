"""Masked networks for DSLTH (paper 003): fixed random weights, learned scores, top-r masks.

Every masked layer computes with ``w * m / sqrt(r)`` where

* ``w`` is a fixed random weight, a *buffer* drawn from a generator seeded with the run
  seed only, so every node builds the identical tensor without ever sending it. It is
  not persistent (not in ``state_dict``): it is regenerated from the seed on load, and
  a persistent checksum (:attr:`MaskedNet.weight_checksum`) catches a node whose seed
  differs from the one its saved state was trained with;
* ``m`` keeps exactly ``max(1, round(r * n))`` of the layer's ``n`` entries: those with
  the largest ``|s|``, ``s`` being the layer's learned real-valued scores (private);
* the gradient of the top-r selection is the straight-through one: ``dL/d|s| = dL/dm``,
  so every score, kept or not, learns (``dL/ds = dL/dm * sign(s)`` through ``|.|``);
* ``1 / sqrt(r)`` is a per-node constant that restores the Kaiming variance of the kept
  sub-network; it scales logits only, never the shared ``w``, so nodes with different
  ``r`` still share identical weights.

Layers have no biases: the paper's convolutions have none, and the strong-lottery-ticket
setting it proves its result in has none either.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_INITS = ("signed-constant", "kaiming-normal", "uniform")


class TopRMask(torch.autograd.Function):
    """Forward: 1 at the ``k`` largest entries of the magnitudes, 0 elsewhere.
    Backward: the straight-through estimator (the incoming gradient, unchanged)."""

    @staticmethod
    def forward(ctx, magnitudes: torch.Tensor, k: int) -> torch.Tensor:
        flat = magnitudes.detach().flatten()
        mask = torch.zeros_like(flat)
        mask[flat.topk(k, sorted=False).indices] = 1.0
        return mask.view_as(magnitudes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def kept_entries(num_entries: int, keep_ratio: float) -> int:
    """How many entries a top-r mask keeps: round(r * n), at least one."""
    return max(1, min(num_entries, round(keep_ratio * num_entries)))


def fixed_weight(
    shape: tuple[int, ...], fan_in: int, init: str, generator: torch.Generator
) -> torch.Tensor:
    """A fixed random weight drawn only from ``generator`` (the shared seed)."""
    std = math.sqrt(2.0 / fan_in)  # Kaiming, ReLU gain
    if init == "signed-constant":
        signs = torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
        return signs * std
    if init == "kaiming-normal":
        return torch.randn(shape, generator=generator) * std
    if init == "uniform":  # the paper's U[-1, 1]
        return torch.rand(shape, generator=generator) * 2 - 1
    raise ValueError(f"unknown DSLTH weight init {init!r}; choose one of {WEIGHT_INITS}")


class MaskedLayer(nn.Module):
    """Shared machinery of masked convolutions and dense layers."""

    def __init__(
        self,
        shape: tuple[int, ...],
        keep_ratio: float,
        init: str,
        weight_generator: torch.Generator,
        score_generator: torch.Generator,
    ) -> None:
        super().__init__()
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep ratio must lie in (0, 1], got {keep_ratio}")
        fan_in = math.prod(shape[1:])
        self.keep_ratio = float(keep_ratio)
        self.register_buffer(
            "weight", fixed_weight(shape, fan_in, init, weight_generator), persistent=False
        )
        bound = 1.0 / math.sqrt(fan_in)  # torch's default (Kaiming-uniform, a = sqrt 5)
        self.scores = nn.Parameter((torch.rand(shape, generator=score_generator) * 2 - 1) * bound)

    @property
    def num_entries(self) -> int:
        return self.weight.numel()

    @property
    def num_kept(self) -> int:
        return kept_entries(self.num_entries, self.keep_ratio)

    def mask(self) -> torch.Tensor:
        """The float 0/1 mask, differentiable (straight-through) with respect to the scores."""
        return TopRMask.apply(self.scores.abs(), self.num_kept)

    @torch.no_grad()
    def binary_mask(self) -> torch.Tensor:
        return TopRMask.apply(self.scores.abs(), self.num_kept).bool()

    def effective_weight(self) -> torch.Tensor:
        return self.weight * self.mask() / math.sqrt(self.keep_ratio)

    def group_norms(self) -> torch.Tensor:
        """||s_g||_2 for each output filter (conv) or output unit (dense): the lasso groups."""
        return self.scores.flatten(1).norm(dim=1)


class MaskedConv2d(MaskedLayer):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        padding: int,
        keep_ratio: float,
        init: str,
        weight_generator: torch.Generator,
        score_generator: torch.Generator,
    ) -> None:
        super().__init__(
            (out_channels, in_channels, kernel_size, kernel_size),
            keep_ratio,
            init,
            weight_generator,
            score_generator,
        )
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), padding=self.padding)


class MaskedLinear(MaskedLayer):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        keep_ratio: float,
        init: str,
        weight_generator: torch.Generator,
        score_generator: torch.Generator,
    ) -> None:
        super().__init__(
            (out_features, in_features), keep_ratio, init, weight_generator, score_generator
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight())


class MaskedNet(nn.Module):
    """A network of masked layers (``features`` then ``head``) plus DSLTH bookkeeping."""

    features: nn.Sequential
    head: nn.Sequential

    def _finish(self) -> None:
        """Call at the end of a subclass's ``__init__``: records the weights' checksum."""
        self.register_buffer("weight_checksum", self.compute_checksum())
        # Set when received masks were fused into the scores and the personalized
        # fine-tuning step has not run yet; persistent, so it survives a state round-trip.
        self.register_buffer("pending_finetune", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def masked_layers(self) -> dict[str, MaskedLayer]:
        """Masked layers by module name, in forward order (the payload's key order)."""
        return {n: m for n, m in self.named_modules() if isinstance(m, MaskedLayer)}

    def set_keep_ratio(self, keep_ratio: float) -> None:
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep ratio must lie in (0, 1], got {keep_ratio}")
        for layer in self.masked_layers().values():
            layer.keep_ratio = float(keep_ratio)

    @torch.no_grad()
    def compute_checksum(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for i, layer in enumerate(self.masked_layers().values()):
            w = layer.weight.detach().double().cpu().flatten()
            position = torch.arange(1, w.numel() + 1, dtype=torch.float64)
            total += (i + 1) * (w * position.remainder(997)).sum()
        return total

    def check_weights(self) -> None:
        """Raise if the regenerated fixed weights are not those the state was saved with."""
        recomputed = self.compute_checksum().to(self.weight_checksum.device)
        if not torch.allclose(recomputed, self.weight_checksum, rtol=1e-9, atol=1e-6):
            raise ValueError(
                "DSLTH fixed weights differ from those this state was trained with "
                "(different seed or weight init?)"
            )

    def group_lasso(self) -> torch.Tensor:
        """sum over layers and filters of ||s_filter||_2 (paper's R(z) without lambda)."""
        return sum(layer.group_norms().sum() for layer in self.masked_layers().values())


def _generators(weight_seed: int, score_seed: int) -> tuple[torch.Generator, torch.Generator]:
    weights = torch.Generator().manual_seed(int(weight_seed))
    scores = torch.Generator().manual_seed(int(score_seed))
    return weights, scores


class MaskedAlexNet(MaskedNet):
    """The paper's AlexNet-style CNN: three bias-free 5x5 convs (64, 128, 256 filters; padding
    2, each followed by ReLU and 2x2 max-pooling), then dense 1024 -> 192 -> K."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        keep_ratio: float,
        weight_seed: int,
        score_seed: int,
        init: str = "signed-constant",
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        if h < 8 or w < 8:
            raise ValueError(f"alexnet-dslth needs images of at least 8x8, got {h}x{w}")
        gw, gs = _generators(weight_seed, score_seed)
        args = (keep_ratio, init, gw, gs)
        self.features = nn.Sequential(
            MaskedConv2d(c, 64, 5, 2, *args),
            nn.ReLU(),
            nn.MaxPool2d(2),
            MaskedConv2d(64, 128, 5, 2, *args),
            nn.ReLU(),
            nn.MaxPool2d(2),
            MaskedConv2d(128, 256, 5, 2, *args),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = 256 * (h // 2 // 2 // 2) * (w // 2 // 2 // 2)
        self.head = nn.Sequential(
            MaskedLinear(flat, 1024, *args),
            nn.ReLU(),
            MaskedLinear(1024, 192, *args),
            nn.ReLU(),
            MaskedLinear(192, num_classes, *args),
        )
        self._finish()


class MaskedSmallCNN(MaskedNet):
    """:class:`drdfl_flwr.models.classifiers.SmallCNN`'s layer sizes, masked and bias-free."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        keep_ratio: float,
        weight_seed: int,
        score_seed: int,
        init: str = "signed-constant",
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        if h % 4 or w % 4:
            raise ValueError(f"small-cnn needs height and width divisible by 4, got {h}x{w}")
        gw, gs = _generators(weight_seed, score_seed)
        args = (keep_ratio, init, gw, gs)
        self.features = nn.Sequential(
            MaskedConv2d(c, 32, 3, 1, *args),
            nn.ReLU(),
            nn.MaxPool2d(2),
            MaskedConv2d(32, 64, 3, 1, *args),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            MaskedLinear(64 * (h // 4) * (w // 4), 128, *args),
            nn.ReLU(),
            MaskedLinear(128, num_classes, *args),
        )
        self._finish()


MASKED_CLASSIFIERS: dict[str, type[MaskedNet]] = {
    "small-cnn": MaskedSmallCNN,
    "alexnet-dslth": MaskedAlexNet,
}


def build_masked_classifier(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    keep_ratio: float,
    weight_seed: int,
    score_seed: int,
    init: str = "signed-constant",
) -> MaskedNet:
    """A masked network by ``classifier`` name; weights depend on ``weight_seed`` only."""
    if init not in WEIGHT_INITS:
        raise ValueError(f"unknown DSLTH weight init {init!r}; choose one of {WEIGHT_INITS}")
    try:
        cls = MASKED_CLASSIFIERS[name]
    except KeyError:
        raise ValueError(
            f"classifier {name!r} has no masked version; DSLTH supports "
            f"{', '.join(MASKED_CLASSIFIERS)}"
        ) from None
    return cls(input_shape, num_classes, keep_ratio, weight_seed, score_seed, init)
