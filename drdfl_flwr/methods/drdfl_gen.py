"""DRDFL-Gen: our extension of DRDFL (not in paper 001) in which what a node receives can
reach its classifier.

Why. In the paper's DRDFL the private classifier trains on local images and on noisy
reconstructions of those same local images, with local labels. The received Learngene
and class statistics can change only how the node's own images are reconstructed, so
nothing about a class the node does not hold can reach its classifier (measured: the
paper's DRDFL and its isolated twin end within a point of each other; see
benchmarks/RESULTS.md).

What changes, with the paper's own parts:

* **The decoder is shared** like the Learngene: it travels in the payload (``decoder.*``),
  starts identical on every node (drawn from the run seed) and is merged on receipt by
  the same rule (``drdfl.learngene-merge``). On the ring it is trained in turn on every
  node's data, so it can learn every class somebody holds.
* **The decoder is trained as a class-conditional generator** (``decoder-input =
  "anchored"``, the default): besides the paper's L_rec on [z_p, z_l], it rebuilds x from
  [a draw of N(mu_y, Sigma_y), a draw of the prior N(0, I)] (``l_rec_anchor``; statistics
  detached, so this trains only the decoder). Why, measured: after 6 rounds on a CIFAR-10
  node (200 images, Dirichlet 0.1) the PersonaNet codes of a class sat 1.8 to 4.7 away
  from their class mean while spreading only 0.2 around their own centre, and the class
  variances had stayed near 1: sampling N(mu_k, Sigma_k) gave codes the decoder had never
  seen. The class means start identical on every node (the shared prior) and move slowly
  (EMA 0.99), so they are the one code space all nodes agree on. ``"persona"`` keeps only
  the paper's term (generation then relies on z_p having reached the means).
* **The classifier trains on generated samples** besides the paper's two terms:
  ``generated-weight`` x CE(C(x_gen + noise), k) with x_gen = decoder(z_p ~ N(mu_k,
  Sigma_k), z_l ~ N(0, I)), as many generated samples per batch as ``generated-ratio`` x
  the batch size, labels k drawn from ``class-mix`` (``uniform`` over all classes,
  ``absent``: only classes the node holds no example of, ``local``: the node's own label
  distribution, i.e. augmentation only), and the paper's reconstruction noise
  N(0, sigma^2) added as for the noisy reconstructions. The statistics are the ones
  received with the decoder this round (the pair was trained together); a node that
  received nothing (isolated, or its predecessor is down) uses its own decoder and
  statistics. Generated images carry no gradient back: the loss trains the classifier
  only. Generation starts at round ``start-round`` (the decoder first has to learn).

Everything else (losses, adversarial min-max, health, isolation) is DRDFL's, read from the
``[drdfl]`` section; ``[drdfl-gen]`` holds only the extension's own keys.

Health, besides DRDFL's: ``health_gen_absent_acc`` (the classifier's accuracy on generated
samples of the classes the node holds no example of) beside ``health_gen_present_acc``
(the same for its own classes), both on a fixed draw; and, on the last round, an image grid
of generated samples per class (``artifacts/generated_partition<k>.png`` in the run's
results folder).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from drdfl_flwr.config import MethodOptions
from drdfl_flwr.data import ClientData
from drdfl_flwr.methods.drdfl import (
    DRDFLLearner,
    DRDFLOptions,
    reconstruction_loss,
)
from drdfl_flwr.models.norm import running_stats_frozen
from drdfl_flwr.models.vae import Decoder
from drdfl_flwr.spec import MethodSpec

CLASS_MIXES = ("uniform", "absent", "local")
DECODER_INPUTS = ("anchored", "persona")
# Generated samples the health accuracies are measured on, per group (absent / present
# classes): 32 per class, at most 512 in all (CIFAR-100's ~90 absent classes at 32 each
# made the health check cost more than the round's training).
HEALTH_SAMPLES_PER_CLASS = 32
HEALTH_SAMPLES = 512
GRID_IMAGES = 80  # images in the last round's sample grid (at least one per class)


@dataclass(frozen=True)
class DRDFLGenOptions(MethodOptions):
    """Section ``[drdfl-gen]``: how much the classifier learns from generated samples, and
    of which classes. The rest of the method is configured in ``[drdfl]``."""

    SECTION: ClassVar[str] = "drdfl-gen"
    generated_weight: float = 1.0
    generated_ratio: float = 1.0
    class_mix: str = "uniform"
    start_round: int = 2
    decoder_input: str = "anchored"

    def __post_init__(self) -> None:
        self.check_non_negative("generated-weight", "generated-ratio")
        self.check_choice("class-mix", CLASS_MIXES)
        self.check_choice("decoder-input", DECODER_INPUTS)
        self.check_positive("start-round")


def class_mix_probabilities(mix: str, label_counts: torch.Tensor) -> torch.Tensor:
    """The distribution generated labels are drawn from, over all classes.

    ``absent`` falls back to ``uniform`` on a node that holds every class (there is
    nothing absent to fill in)."""
    counts = label_counts.float()
    num_classes = len(counts)
    if mix == "uniform":
        return torch.full((num_classes,), 1.0 / num_classes)
    if mix == "local":
        return counts / counts.sum()
    if mix == "absent":
        absent = (counts == 0).float()
        if absent.sum() == 0:
            return torch.full((num_classes,), 1.0 / num_classes)
        return absent / absent.sum()
    raise ValueError(f"class mix must be one of {CLASS_MIXES}, got {mix!r}")


class DRDFLGenLearner(DRDFLLearner):
    OPTIONS = DRDFLGenOptions
    PRIVATE = ("persona", "classifier", "adversary")  # the decoder travels

    def setup(self) -> None:
        # Learner.__init__ put this method's own section ([drdfl-gen]) in self.opts; the
        # DRDFL machinery underneath reads [drdfl] there.
        self.extension: DRDFLGenOptions = self.opts
        self.opts = self.cfg.options(DRDFLOptions)
        super().setup()
        with self.common_init("decoder"):
            # Shared now, so it starts identical on every node like the Learngene: merges
            # then combine like with like from round one.
            self.decoder.load_state_dict(
                Decoder(self.input_shape, self.opts.persona_dim + self.opts.learngene_dim)
                .to(self.device)
                .state_dict()
            )
        # The statistics that came with this round's decoder; not private state (they
        # are a neighbour's), so kept outside modules() and never saved or sent.
        self.received_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self.label_counts = torch.ones(self.num_classes, dtype=torch.long)  # set by fit()

    def shared_modules(self) -> dict[str, nn.Module]:
        return {"learngene": self.learngene, "decoder": self.decoder}

    def load_shared(self, received: dict[str, torch.Tensor], own_weight: float) -> None:
        """Also keep the statistics the received decoder was trained with, for generation
        (absorb and join both come here once everything received is validated)."""
        super().load_shared(received, own_weight)
        self.received_stats = (received["stats.mu"], received["stats.var"])

    # -- generation ----------------------------------------------------------------------
    def generation_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, variance) per class that codes are drawn from: the received statistics
        (trained with the decoder that came with them), else the node's own."""
        if self.received_stats is not None:
            return self.received_stats
        return self.stats.mu.detach(), self.stats.variance().detach()

    @torch.no_grad()
    def generate(
        self, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """decoder(z_p ~ N(mu_k, Sigma_k), z_l ~ N(0, I)) for every label k, without gradient."""
        mu, var = self.generation_stats()
        labels = labels.to(self.device)
        shape_p = (len(labels), mu.shape[1])
        shape_l = (len(labels), self.opts.learngene_dim)
        eps_p = torch.randn(shape_p, generator=generator).to(self.device)
        z_l = torch.randn(shape_l, generator=generator).to(self.device)
        z_p = mu[labels] + eps_p * var[labels].sqrt()
        was_training = self.decoder.training
        self.decoder.eval()
        images = self.decoder(torch.cat([z_p, z_l], dim=1))
        self.decoder.train(was_training)
        return images

    def draw_labels(self, n: int, label_counts: torch.Tensor, generator=None) -> torch.Tensor:
        probs = class_mix_probabilities(self.extension.class_mix, label_counts)
        return torch.multinomial(probs, n, replacement=True, generator=generator)

    def generating(self) -> bool:
        ext = self.extension
        return (
            ext.generated_weight > 0
            and ext.generated_ratio > 0
            and self.rounds_trained + 1 >= ext.start_round
        )

    # -- training ------------------------------------------------------------------------
    def train_round(self, data: ClientData) -> dict[str, float]:
        self.label_counts = torch.bincount(data.y_train, minlength=self.num_classes)
        try:
            return super().train_round(data)
        finally:
            self.received_stats = None  # this round's neighbour statistics are used up

    def extra_losses(
        self, x: torch.Tensor, y: torch.Tensor, z_l: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        parts: dict[str, torch.Tensor] = {}
        if self.extension.decoder_input == "anchored":
            # The decoder also learns to rebuild x from its class's shared code (a draw of
            # N(mu_y, Sigma_y), statistics detached) beside the batch's z_l: that trains it
            # as the class-conditional generator it is used as below.
            mu, var = self.stats.mu.detach(), self.stats.variance().detach()
            z_anchor = mu[y] + torch.randn_like(mu[y]) * var[y].sqrt()
            z_prior = torch.randn_like(z_l)
            x_anchor = self.decoder(torch.cat([z_anchor, z_prior], dim=1))
            parts["l_rec_anchor"] = reconstruction_loss(x_anchor, x)
        if self.generating():
            n = max(1, round(self.extension.generated_ratio * len(y)))
            labels = self.draw_labels(n, self.label_counts).to(self.device)
            x_gen = self.generate(labels)
            x_gen = x_gen + torch.randn_like(x_gen) * math.sqrt(self.opts.noise_variance)
            with running_stats_frozen(self.classifier):  # real images set the statistics
                l_gen = F.cross_entropy(self.classifier(x_gen), labels)
            parts["l_gen"] = self.extension.generated_weight * l_gen
        return parts

    # -- health --------------------------------------------------------------------------
    @torch.no_grad()
    def health(self, data: ClientData) -> dict[str, float]:
        metrics = super().health(data)
        counts = torch.bincount(data.y_train, minlength=self.num_classes)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        for name, classes in (
            ("absent", (counts == 0).nonzero().flatten()),
            ("present", (counts > 0).nonzero().flatten()),
        ):
            if len(classes) == 0:
                continue
            per_class = max(1, min(HEALTH_SAMPLES_PER_CLASS, HEALTH_SAMPLES // len(classes)))
            labels = classes.repeat_interleave(per_class)
            self.classifier.eval()
            predicted = self.classifier(self.generate(labels, gen)).argmax(1).cpu()
            self.classifier.train()
            metrics[f"health_gen_{name}_acc"] = (predicted == labels).float().mean().item()
        return metrics

    @torch.no_grad()
    def artifacts(self) -> dict[str, torch.Tensor]:
        """A grid of generated samples, one row per class (10 classes: 8 per row; more
        classes: one per class, 10 per row), as uint8 (H, W, C)."""
        per_class = max(1, GRID_IMAGES // self.num_classes)
        labels = torch.arange(self.num_classes).repeat_interleave(per_class)
        images = self.generate(labels, torch.Generator().manual_seed(self.cfg.seed)).cpu()
        columns = per_class if per_class > 1 else 10
        return {"generated": image_grid(images, columns)}


def image_grid(images: torch.Tensor, columns: int) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] -> one uint8 (rows*H, columns*W, C) image, row-major,
    with a 1-pixel border between tiles."""
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = torch.ones(c, rows * (h + 1) + 1, columns * (w + 1) + 1)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = 1 + r * (h + 1), 1 + col * (w + 1)
        grid[:, top : top + h, left : left + w] = image
    grid = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return grid.permute(1, 2, 0).contiguous()


SPEC = MethodSpec(
    name="drdfl-gen",
    title="DRDFL-Gen",
    sends="Learngene + decoder + class statistics (our extension)",
    keeps="PersonaNet, classifier",
    personalized="PersonaNet + classifier (decoder shared: our extension)",
    learner=DRDFLGenLearner,
    reads=(DRDFLOptions.SECTION,),
)
