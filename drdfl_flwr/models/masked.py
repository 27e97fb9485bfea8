"""Masked networks for DSLTH / MCE-PL (paper 003): fixed random weights, learned scores.

Every masked layer computes with ``w * m`` where

* ``w`` (and, where the layer has one, the bias) is fixed and random, a *buffer* drawn
  from a generator seeded with the run seed only, so every node builds the identical
  tensor without ever sending it. It is not persistent (not in ``state_dict``): it is
  regenerated from the seed on load, and a persistent checksum
  (:attr:`MaskedNet.weight_checksum`) catches a node whose seed differs from the one its
  saved state was trained with;
* ``m`` is recomputed in *every forward pass* from the layer's private real-valued
  scores ``z`` and the mean ``m_bar`` of the neighbours' latest binary masks (a
  non-trainable buffer, set by :meth:`MaskedNet.set_neighbour_masks`), as the released
  MCE-PL code does::

      y = z + sg(mean|z|) * sg(sign z) * m_bar      (sg: treated as a constant)
      m = 1 on the largest |y| entries, keeping all but floor((1 - r) * n) of the n entries

  The scores are never overwritten by ``y``: fusion is a view, not an update, so
  scores stay bounded by their own training (weight decay) however many rounds pass;
* the top-r selection has the straight-through gradient, so
  ``dL/dz = (dL/dw_eff * w) * sign(y)``.

Before any mask arrives, ``m_bar`` is one Bernoulli(r) mask per layer that every node
shares, as the release draws a single ``mask_list`` and hands it to every client: it is
drawn from its own generator seeded with ``mask_seed`` (derived from the run seed only,
never the partition id, and independent of torch's global RNG). A node with its own
keep ratio (``dslth.keep-ratios``) thresholds the same uniform draws at its own ``r``,
so the initial masks of different ratios are nested.

``rescale`` (used by the small CNN, not by the released network) multiplies the
effective weight by ``1 / sqrt(r)``, restoring the Kaiming variance of the kept
sub-network; it scales activations only, never the shared ``w``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_INITS = ("kaiming-uniform", "signed-constant", "kaiming-normal", "uniform")


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
    """How many entries a top-r mask keeps: all but floor((1 - r) n), as released; >= 1."""
    return max(1, num_entries - math.floor((1.0 - keep_ratio) * num_entries))


def fixed_tensor(
    shape: tuple[int, ...], fan_in: int, init: str, generator: torch.Generator
) -> torch.Tensor:
    """A fixed random weight (or bias) drawn only from ``generator`` (the shared seed)."""
    if init == "kaiming-uniform":  # torch's default layer init: U(+-1/sqrt(fan_in))
        return (torch.rand(shape, generator=generator) * 2 - 1) / math.sqrt(fan_in)
    std = math.sqrt(2.0 / fan_in)  # Kaiming, ReLU gain
    if init == "signed-constant":
        signs = torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
        return signs * std
    if init == "kaiming-normal":
        return torch.randn(shape, generator=generator) * std
    if init == "uniform":  # the paper summary's U[-1, 1]
        return torch.rand(shape, generator=generator) * 2 - 1
    raise ValueError(f"unknown DSLTH weight init {init!r}; choose one of {WEIGHT_INITS}")


class MaskedLayer(nn.Module):
    """Shared machinery of masked convolutions and dense layers."""

    kind: str  # "conv" or "fc": which keep ratio applies

    def __init__(
        self,
        shape: tuple[int, ...],
        keep_ratio: float,
        init: str,
        weight_generator: torch.Generator,
        score_generator: torch.Generator,
        mask_generator: torch.Generator,
        bias: bool = False,
        rescale: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep ratio must lie in (0, 1], got {keep_ratio}")
        fan_in = math.prod(shape[1:])
        self.keep_ratio = float(keep_ratio)
        self.rescale = rescale
        self.register_buffer(
            "weight", fixed_tensor(shape, fan_in, init, weight_generator), persistent=False
        )
        fixed_bias = fixed_tensor((shape[0],), fan_in, "kaiming-uniform", weight_generator)
        self.register_buffer("bias", fixed_bias if bias else None, persistent=False)
        bound = 1.0 / math.sqrt(fan_in)  # Kaiming-uniform with a = sqrt 5, as released
        self.scores = nn.Parameter((torch.rand(shape, generator=score_generator) * 2 - 1) * bound)
        # Mean of the neighbours' latest binary masks; before any arrives, Bernoulli(r)
        # samples shared by every node (the shared mask generator), as the release
        # initialises it. Persistent, never trained.
        initial = (torch.rand(shape, generator=mask_generator) < keep_ratio).float()
        self.register_buffer("neighbour_mean", initial)
        # DSLTH's per-round bookkeeping, private and persistent: the last training step's
        # score gradient (for the fine-tuning step) and the mask sent last (to count
        # flipped bits).
        self.register_buffer("last_grad", torch.zeros(shape))
        self.register_buffer("last_sent", torch.zeros(shape, dtype=torch.bool))

    @property
    def num_entries(self) -> int:
        return self.weight.numel()

    @property
    def num_kept(self) -> int:
        return kept_entries(self.num_entries, self.keep_ratio)

    def fused_scores(self) -> torch.Tensor:
        """y = z + sg(mean|z|) * sg(sign z) * m_bar (differentiable in z, slope 1)."""
        z = self.scores
        amplitude = z.detach().abs().mean()
        return z + amplitude * z.detach().sign() * self.neighbour_mean

    def mask(self) -> torch.Tensor:
        """The float 0/1 mask, differentiable (straight-through) with respect to the scores."""
        return TopRMask.apply(self.fused_scores().abs(), self.num_kept)

    @torch.no_grad()
    def binary_mask(self) -> torch.Tensor:
        return self.mask().bool()

    def effective_weight(self) -> torch.Tensor:
        weight = self.weight * self.mask()
        return weight / math.sqrt(self.keep_ratio) if self.rescale else weight

    def group_norms(self) -> torch.Tensor:
        """||y_g||_2 of the fused scores per output filter (conv) or unit (dense)."""
        return self.fused_scores().flatten(1).norm(dim=1)


class MaskedConv2d(MaskedLayer):
    kind = "conv"

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
        mask_generator: torch.Generator,
        rescale: bool = False,
    ) -> None:
        super().__init__(
            (out_channels, in_channels, kernel_size, kernel_size),
            keep_ratio,
            init,
            weight_generator,
            score_generator,
            mask_generator,
            bias=False,
            rescale=rescale,
        )
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), padding=self.padding)


class MaskedLinear(MaskedLayer):
    kind = "fc"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        keep_ratio: float,
        init: str,
        weight_generator: torch.Generator,
        score_generator: torch.Generator,
        mask_generator: torch.Generator,
        bias: bool = False,
        rescale: bool = False,
    ) -> None:
        super().__init__(
            (out_features, in_features),
            keep_ratio,
            init,
            weight_generator,
            score_generator,
            mask_generator,
            bias=bias,
            rescale=rescale,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


class MaskedNet(nn.Module):
    """A network of masked layers (``features`` then ``head``) plus DSLTH bookkeeping."""

    features: nn.Sequential
    head: nn.Sequential

    def _finish(self) -> None:
        """Call at the end of a subclass's ``__init__``: records the weights' checksum."""
        self.register_buffer("weight_checksum", self.compute_checksum())
        # Whether a training step, a sent mask and a received mask exist yet (persistent).
        for flag in ("has_grad", "has_sent", "has_received"):
            self.register_buffer(flag, torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def masked_layers(self) -> dict[str, MaskedLayer]:
        """Masked layers by module name, in forward order (the payload's key order)."""
        return {n: m for n, m in self.named_modules() if isinstance(m, MaskedLayer)}

    @torch.no_grad()
    def set_neighbour_masks(self, means: dict[str, torch.Tensor]) -> None:
        """Store m_bar per layer (the mean of the received binary masks); scores untouched."""
        for name, layer in self.masked_layers().items():
            layer.neighbour_mean.copy_(means[name].to(layer.neighbour_mean))

    @torch.no_grad()
    def compute_checksum(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        i = 0
        for layer in self.masked_layers().values():
            for fixed in (layer.weight, layer.bias):
                if fixed is None:
                    continue
                i += 1
                w = fixed.detach().double().cpu().flatten()
                position = torch.arange(1, w.numel() + 1, dtype=torch.float64)
                total += i * (w * position.remainder(997)).sum()
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
        """sum over layers and filters of ||y_filter||_2 (paper's R(z) without lambda)."""
        return sum(layer.group_norms().sum() for layer in self.masked_layers().values())


def _generators(
    weight_seed: int, score_seed: int, mask_seed: int
) -> tuple[torch.Generator, torch.Generator, torch.Generator]:
    """Generators of the shared fixed weights, the private scores and the shared initial
    neighbour mask."""
    return tuple(
        torch.Generator().manual_seed(int(s)) for s in (weight_seed, score_seed, mask_seed)
    )


class MaskedAlexNet(MaskedNet):
    """The released MCE-PL network (``models/alex_cifar_att2.py``): three bias-free 5x5
    convolutions 3 -> 64 -> 128 -> 256 with padding 1, each followed by ELU,
    LocalResponseNorm(4) and 3x3/2 max-pooling (the third padded by 1), then dense
    1024 -> 192 -> K with fixed biases, ELU after both (the output too). For 32x32 inputs
    and K = 10 the mask has 1,227,328 entries. No 1/sqrt(r) rescaling (off in the release).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        keep_ratios: tuple[float, float],
        weight_seed: int,
        score_seed: int,
        mask_seed: int,
        init: str = "kaiming-uniform",
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        conv_r, fc_r = keep_ratios
        gw, gs, gm = _generators(weight_seed, score_seed, mask_seed)
        conv = (conv_r, init, gw, gs, gm)
        self.features = nn.Sequential(
            MaskedConv2d(c, 64, 5, 1, *conv),
            nn.ELU(),
            nn.LocalResponseNorm(4, alpha=2e-5, beta=0.75),
            nn.MaxPool2d(3, stride=2),
            MaskedConv2d(64, 128, 5, 1, *conv),
            nn.ELU(),
            nn.LocalResponseNorm(4, alpha=1e-4, beta=0.75),
            nn.MaxPool2d(3, stride=2),
            MaskedConv2d(128, 256, 5, 1, *conv),
            nn.ELU(),
            nn.LocalResponseNorm(4, alpha=1e-4, beta=0.75),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Flatten(),
        )
        flat = _flat_features(self.features, input_shape, "alexnet-dslth")
        fc = (fc_r, init, gw, gs, gm, True)
        self.head = nn.Sequential(
            MaskedLinear(flat, 192, *fc),
            nn.ELU(),
            MaskedLinear(192, num_classes, *fc),
            nn.ELU(),
        )
        self._finish()


class MaskedSmallCNN(MaskedNet):
    """:class:`drdfl_flwr.models.classifiers.SmallCNN`'s layer sizes, masked and bias-free,
    with 1/sqrt(r) rescaling (ReLU, no normalisation layers to absorb the lost variance)."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        keep_ratios: tuple[float, float],
        weight_seed: int,
        score_seed: int,
        mask_seed: int,
        init: str = "kaiming-uniform",
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        if h % 4 or w % 4:
            raise ValueError(f"small-cnn needs height and width divisible by 4, got {h}x{w}")
        conv_r, fc_r = keep_ratios
        gw, gs, gm = _generators(weight_seed, score_seed, mask_seed)
        conv = (conv_r, init, gw, gs, gm, True)
        fc = (fc_r, init, gw, gs, gm, False, True)
        self.features = nn.Sequential(
            MaskedConv2d(c, 32, 3, 1, *conv),
            nn.ReLU(),
            nn.MaxPool2d(2),
            MaskedConv2d(32, 64, 3, 1, *conv),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            MaskedLinear(64 * (h // 4) * (w // 4), 128, *fc),
            nn.ReLU(),
            MaskedLinear(128, num_classes, *fc),
        )
        self._finish()


def _flat_features(features: nn.Module, input_shape: tuple[int, int, int], name: str) -> int:
    """Width of ``features``' flattened output for one input; a clear error if it vanishes."""
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, *input_shape))
    except RuntimeError as err:
        raise ValueError(f"{name} cannot take {input_shape} inputs: {err}") from None
    return out.shape[1]


MASKED_CLASSIFIERS: dict[str, type[MaskedNet]] = {
    "small-cnn": MaskedSmallCNN,
    "alexnet-dslth": MaskedAlexNet,
}


def build_masked_classifier(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    keep_ratios: tuple[float, float],
    weight_seed: int,
    score_seed: int,
    mask_seed: int,
    init: str = "kaiming-uniform",
) -> MaskedNet:
    """A masked network by ``classifier`` name; ``keep_ratios`` = (conv, fc).
    Fixed weights depend on ``weight_seed`` only, the initial neighbour mask on
    ``mask_seed`` (and the keep ratios) only, the scores on ``score_seed``."""
    if init not in WEIGHT_INITS:
        raise ValueError(f"unknown DSLTH weight init {init!r}; choose one of {WEIGHT_INITS}")
    if not all(0.0 < r <= 1.0 for r in keep_ratios):
        raise ValueError(f"keep ratios must lie in (0, 1], got {keep_ratios}")
    try:
        cls = MASKED_CLASSIFIERS[name]
    except KeyError:
        raise ValueError(
            f"classifier {name!r} has no masked version; DSLTH supports "
            f"{', '.join(MASKED_CLASSIFIERS)}"
        ) from None
    return cls(input_shape, num_classes, keep_ratios, weight_seed, score_seed, mask_seed, init)
