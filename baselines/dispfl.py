"""DisPFL (arXiv 2206.00187; code rong-dai/DisPFL): decentralized sparse training with
personalized masks.

Every node starts from ONE common random initialisation (drawn from the run seed) and
its own binary mask over every trainable parameter tensor; its model is the common
weight times its mask. Per-tensor densities follow ERK (``my_model_trainer.py``,
``calculate_sparsities``): density_l = eps * (sum of the tensor's dims / product of its
dims)^p, eps solved so the overall density is ``dispfl.density``; a tensor that would
exceed 1 is made dense and eps re-solved. The mask keeps exactly floor(density_l * numel)
entries of each tensor (at least one), drawn at random (``different-initial = true``:
per node, as the released CIFAR-10 script; false: one mask for all).

One round for node i (``dispfl_api.py``, ``client.py``):

1. ``absorb``: for every entry, the average of the previous-round models of those senders
   (i itself included) whose previous-round masks contain the entry; entries covered by
   nobody become 0; the result is multiplied by i's current mask.
2. ``fit``: ``local-epochs`` epochs with the mask re-applied to the weights after every
   optimizer step; then prune and regrow: rate_t = anneal / 2 * (1 + cos(pi t / T)) with
   t the rounds trained so far and T = ``num-server-rounds`` (t is capped at T); per
   tensor drop ceil(rate_t * nnz) active entries with the smallest |w|, and re-activate
   as many inactive ones (those just dropped included, as released) by the largest
   |gradient| of one mini-batch (dense gradient, ``regrow = "gradient"``) or uniformly at
   random (``"random"``, the released CIFAR-10 script's ``--dis_gradient_check``).
   nnz per tensor stays constant.

As in the release, a node keeps two masks: ``sent`` (the mask its weights were trained
under, which travels with them) and ``current`` (after prune/regrow, used from the next
aggregation on). The trained weights are sent under the mask they were trained with, so
a re-activated entry holds no value of the node itself: at the next aggregation it takes
the average of the neighbours whose masks contain it (0 if none), and a pruned entry
still contributes its trained value to the neighbours that keep it. Both masks are
buffers of ``self.masks`` and round-trip through the node's state.

Payload, per trainable tensor ``p``: ``mask.<p>`` the sent mask bit-packed (1 bit per
entry, :mod:`drdfl_flwr.bitpack`) and ``values.<p>`` only the kept entries, a flat float
tensor in mask (row-major) order; the relay's ``params_sent`` thus counts nnz plus
numel / 8 mask bytes, not the dense model.

Where we deviate from the release, and why:

- Optimizer: Adam at ``learning-rate`` (the project's common choice on the small CNN);
  the release uses SGD lr 0.1 * 0.998^t, momentum 0, weight decay 5e-4, gradient-norm
  clipping at 10, batch 128, 5 epochs.
- BatchNorm running statistics (``classifier-norm = "batch"``) are not parameters: they
  are neither masked nor sent and stay on the node. The release's ResNet-18 uses
  GroupNorm (``classifier-norm = "group"``), whose scale and shift are masked like any
  other trainable tensor.
- ``erk-power = 0`` gives the release's ``--uniform`` (the same density everywhere).
- The gradient screen uses one shuffled mini-batch of the round's generator, in eval
  mode as released.

Health, every round: ``health_density`` (the actual overall density of the current
mask) and ``health_mask_changed`` (fraction of mask entries that prune/regrow changed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from drdfl_flwr.bitpack import pack_bits, unpack_bits
from drdfl_flwr.config import MethodOptions
from drdfl_flwr.data import ClientData
from drdfl_flwr.learner import Learner
from drdfl_flwr.payload import Incoming, PayloadError, Tensors
from drdfl_flwr.spec import MethodSpec

MASK_PREFIX = "mask."
VALUES_PREFIX = "values."
REGROW = ("gradient", "random")


@dataclass(frozen=True)
class DisPFLOptions(MethodOptions):
    """Section ``[dispfl]``: defaults are the release's (``cifar10.sh``, ``main_dispfl.py``)."""

    SECTION: ClassVar[str] = "dispfl"
    density: float = 0.5
    anneal: float = 0.5
    erk_power: float = 1.0
    regrow: str = "gradient"
    different_initial: bool = True

    def __post_init__(self) -> None:
        self.check_unit("density", open_low=True)
        self.check_unit("anneal")
        self.check_non_negative("erk-power")
        self.check_choice("regrow", REGROW)


# -- ERK densities and masks ---------------------------------------------------------------
def erk_densities(
    shapes: Mapping[str, Sequence[int]], density: float, power: float = 1.0
) -> dict[str, float]:
    """Per-tensor density: eps * (sum(dims) / prod(dims))^power, eps chosen so that
    sum_l density_l * numel_l = density * sum_l numel_l; a tensor whose density would
    exceed 1 is made dense (the one with the largest raw probability first, as released)
    and eps re-solved over the rest."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density}")
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: (sum(s) / math.prod(s)) ** power for n, s in shapes.items()}
    dense: set[str] = set()
    eps = 0.0
    while len(dense) < len(shapes):
        sparse = [n for n in shapes if n not in dense]
        rhs = sum(density * numel[n] for n in sparse) - sum(
            (1.0 - density) * numel[n] for n in dense
        )
        eps = rhs / sum(raw[n] * numel[n] for n in sparse)
        top = max(raw[n] for n in sparse)
        if top * eps <= 1.0:
            break
        dense.update(n for n in sparse if raw[n] == top)
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def kept_count(density: float, numel: int) -> int:
    """floor(density * numel), at least one entry (a tiny tolerance absorbs rounding
    error in eps * raw * numel)."""
    return min(numel, max(1, math.floor(density * numel + 1e-9)))


def random_mask(shape: Sequence[int], keep: int, gen: torch.Generator) -> torch.Tensor:
    """A bool mask of ``shape`` with exactly ``keep`` entries chosen uniformly."""
    numel = math.prod(shape)
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=gen)[:keep]] = True
    return flat.view(*shape)


def prune_and_regrow(
    mask: torch.Tensor, weight: torch.Tensor, rate: float, regrow_score: torch.Tensor
) -> torch.Tensor:
    """Drop ceil(rate * nnz) active entries with the smallest |weight|, then activate as
    many of the inactive ones (just-dropped included) with the largest ``regrow_score``
    (|gradient|, or uniform noise for random regrowth). nnz is unchanged."""
    flat = mask.detach().flatten().cpu().clone()
    nnz = int(flat.sum())
    k = math.ceil(rate * nnz)
    if k == 0:
        return flat.view_as(mask).to(mask.device)
    magnitude = weight.detach().flatten().abs().double().cpu()
    magnitude = magnitude.masked_fill(~flat, math.inf)
    flat[torch.argsort(magnitude, stable=True)[:k]] = False
    score = regrow_score.detach().flatten().double().cpu().masked_fill(flat, -math.inf)
    flat[torch.argsort(score, descending=True, stable=True)[:k]] = True
    return flat.view_as(mask).to(mask.device)


def encode_payload(
    masks: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]
) -> Tensors:
    """Per tensor: the packed mask and the kept values, flat, in mask order."""
    payload: Tensors = {}
    for name, mask in masks.items():
        payload[MASK_PREFIX + name] = pack_bits(mask)
        payload[VALUES_PREFIX + name] = weights[name].detach()[mask].float().cpu().clone()
    return payload


def decode_payload(
    tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (bool mask, flat kept values); :class:`PayloadError` on anything malformed
    (missing or extra key, packed length or padding, value count != mask's nnz, NaN)."""
    expected = {MASK_PREFIX + n for n in shapes} | {VALUES_PREFIX + n for n in shapes}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise PayloadError(f"payload keys differ: missing {missing[:5]}, unexpected {extra[:5]}")
    decoded = {}
    for name, shape in shapes.items():
        mask = unpack_bits(tensors[MASK_PREFIX + name], shape, MASK_PREFIX + name)
        key = VALUES_PREFIX + name
        values = tensors[key]
        if not isinstance(values, torch.Tensor) or not values.is_floating_point():
            raise PayloadError(f"payload '{key}' must be a floating-point tensor")
        if values.dim() != 1:
            raise PayloadError(f"payload '{key}' has shape {tuple(values.shape)}, expected flat")
        if values.numel() != int(mask.sum()):
            raise PayloadError(
                f"payload '{key}' holds {values.numel()} values, its mask keeps {int(mask.sum())}"
            )
        if not torch.isfinite(values).all():
            raise PayloadError(f"payload '{key}' holds NaN or infinite values")
        decoded[name] = (mask, values)
    return decoded


class MaskBank(nn.Module):
    """The node's masks as bool buffers (``current.<i>``, ``sent.<i>``, one per trainable
    tensor in ``named_parameters`` order), so they round-trip through ``state_dict``."""

    def __init__(self, names: Sequence[str], masks: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.names = list(names)
        for i, name in enumerate(self.names):
            self.register_buffer(f"current_{i}", masks[name].clone())
            self.register_buffer(f"sent_{i}", masks[name].clone())

    def current(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, f"current_{i}") for i, n in enumerate(self.names)}

    def sent(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, f"sent_{i}") for i, n in enumerate(self.names)}


class DisPFLLearner(Learner):
    OPTIONS = DisPFLOptions

    # each node draws its own initial mask (``different-initial``), so which values it
    # sends differs too; the dense initialisation under the masks is common
    # (tests/test_dispfl.py checks the entries both masks keep)
    NODE_SPECIFIC = (MASK_PREFIX, VALUES_PREFIX)

    def setup(self) -> None:
        cfg, opts = self.cfg, self.opts
        with self.common_init():  # the common initialisation, identical on every node
            self.classifier = self.new_classifier()
        params = dict(self.classifier.named_parameters())
        self.shapes = {n: tuple(p.shape) for n, p in params.items()}
        self.densities = erk_densities(self.shapes, opts.density, opts.erk_power)
        gen = torch.Generator().manual_seed(
            cfg.seed * 1_000_003 + 7_919 * (self.partition_id + 1 if opts.different_initial else 0)
        )
        masks = {
            n: random_mask(s, kept_count(self.densities[n], math.prod(s)), gen)
            for n, s in self.shapes.items()
        }
        self.masks = MaskBank(list(self.shapes), masks).to(self.device)
        self.apply_mask(self.masks.current())
        self.optimizer = self.new_optimizer(self.classifier.parameters())

    @torch.no_grad()
    def apply_mask(self, masks: Mapping[str, torch.Tensor]) -> None:
        for name, param in self.classifier.named_parameters():
            param.masked_fill_(~masks[name], 0.0)

    def density(self) -> float:
        current = self.masks.current().values()
        return sum(int(m.sum()) for m in current) / sum(m.numel() for m in current)

    def drop_rate(self) -> float:
        """rate_t = anneal / 2 * (1 + cos(pi t / T)), t = rounds trained, capped at T."""
        T = self.cfg.num_server_rounds
        t = min(self.rounds_trained, T)
        return self.opts.anneal / 2 * (1 + math.cos(math.pi * t / T))

    # -- communication -----------------------------------------------------------------
    def shared_payload(self) -> Tensors:
        return encode_payload(self.masks.sent(), dict(self.classifier.named_parameters()))

    @torch.no_grad()
    def absorb(self, incoming: Sequence[Incoming]) -> None:
        """Masked average over {self} U senders of the entries each one's mask holds; 0
        where nobody holds it; then times the own current mask."""
        decoded = [decode_payload(item.tensors, self.shapes) for item in incoming]
        sent, current = self.masks.sent(), self.masks.current()
        for name, param in self.classifier.named_parameters():
            total = torch.where(sent[name], param, torch.zeros_like(param))
            count = sent[name].to(torch.int32)
            for peer in decoded:
                mask, values = peer[name]
                mask = mask.to(self.device)
                total[mask] += values.to(self.device, param.dtype)
                count += mask
            average = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
            param.copy_(average.masked_fill(~current[name], 0.0))
        for name, mask in sent.items():
            mask.copy_(current[name])  # the weights now live under the current mask

    # -- training ------------------------------------------------------------------------
    def regrow_scores(self, data: ClientData, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """|dense gradient| of one mini-batch (eval mode, as released), or uniform noise."""
        if self.opts.regrow == "random":
            return {n: torch.rand(s, generator=gen) for n, s in self.shapes.items()}
        x, y = next(self.batches(data, gen, epochs=1))
        self.classifier.eval()
        params = dict(self.classifier.named_parameters())
        loss = F.cross_entropy(self.classifier(x), y)
        grads = torch.autograd.grad(loss, list(params.values()))
        return {n: g.abs() for n, g in zip(params, grads, strict=True)}

    def train_round(self, data: ClientData) -> dict[str, float]:
        gen = self.round_generator()
        current = self.masks.current()
        self.apply_mask(current)  # no-op after absorb; drops last round's pruned values else
        loss, steps = self.supervised_epochs(
            self.classifier,
            self.optimizer,
            data,
            gen,
            after_step=lambda: self.apply_mask(current),
        )
        rate = self.drop_rate()
        scores = self.regrow_scores(data, gen)
        params = dict(self.classifier.named_parameters())
        changed = total = 0
        with torch.no_grad():
            for name, sent in self.masks.sent().items():
                new = prune_and_regrow(current[name], params[name], rate, scores[name])
                changed += int((new != current[name]).sum())
                total += new.numel()
                sent.copy_(current[name])  # the trained weights travel under this mask
                current[name].copy_(new)
        return {
            "l_ce": loss,
            "local_steps": float(steps),
            "health_density": self.density(),
            "health_mask_changed": changed / total,
            "health_drop_rate": rate,
        }


SPEC = MethodSpec(
    name="dispfl",
    title="DisPFL",
    sends="its masked weights + the mask (bit-packed)",
    keeps="its own sparse mask: received weights are averaged only where that mask is on",
    personalized="sparse mask and its weights",
    learner=DisPFLLearner,
    exempt={"private": "its own mask and the weights under it are what it sends"},
)
