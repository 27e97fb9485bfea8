"""FedFed (Yang et al. 2023, arXiv 2310.05077; code visitworld123/FedFed): federated
feature distillation as a plug-in to FedAvg.

A generator (a small VAE) splits every image x into a "performance-robust" part, its
reconstruction x_hat, and a "performance-sensitive" part x_s = x - x_hat. The nodes
share x_s with Gaussian noise (x_s + eps, eps ~ N(0, sigma^2 I)) instead of raw data,
and every node then trains its classifier on its own data mixed with the pooled noisy
features of all nodes, which softens the label skew of non-IID partitions.

Phases, by ``rounds_trained`` (D = ``[fedfed] distill-rounds``):

- rounds 0..D-1, distillation: for ``distill-epochs`` local epochs (default 5; 0: the
  run's ``local-epochs``) the generator and the classifier train together with the
  release's loss, per batch of size B,
  w_re MSE(x_hat, x) + w_ce CE(f(x_s + eps), y) + w_kl KL(q(z|x) || N(0, I)) / (B latent)
  + w_xce CE(f(x), y) (weights 50, 2, 0.005, 0.4: the release's, w_re at its effective
  value under the release's x10 curriculum, see below); the payload is the
  generator and the classifier (``generator.*``, ``classifier.*``), averaged by the hub.
- round D, sharing: with the averaged generator in evaluation mode (latent mean, no
  sampling), the node computes x_s + eps for ``share-fraction`` of its training samples
  and sends them as ``share.x`` (float16, half the bytes) and ``share.y`` (the labels as
  float32: the hub refuses integer arrays, which are never averaged) beside its
  classifier, which it trains on its own data this round as in FedAvg. The hub's
  ``fedfed`` reducer averages the classifiers and concatenates the ``share.*`` rows of
  all nodes, in partition order, into the pool.
- from round D + 1: the node keeps the received pool in its private state
  (:class:`FeaturePool`, buffers that round-trip through ``context.state``) and in each
  local epoch trains its classifier with cross-entropy on batches that concatenate its
  own samples with as many pooled samples, drawn class-balanced from the pool
  (:func:`balanced_indices`); it sends the classifier (FedAvg).

Prediction: the classifier on x.

Choices and deviations:

- Generator: the project's VAE parts (``models/vae.py``: the Learngene encoder as
  q(z|x), the decoder with a tanh output, since the data lie in [-1, 1]) with latent
  ``latent-dim = 16`` instead of the release's residual VAE (32 channels, latent 2048,
  BN + sigmoid output for [0, 1] data): the CPU default runs on 8x8 digits.
- Noise: one noisy copy with std ``sigma`` (default 0.15, the release's sigma_1) in the
  data's units. The data here lie in [-1, 1], twice the release's [0, 1] range, so 0.15
  here is relatively half the release's noise; set ``sigma = 0.3`` to match it. The
  release shares two copies (sigma_1 = 0.15, sigma_2 = 0.25) and its CE term uses both.
- Left out from the release's distillation: the curriculum on w_re (x10 / x5 in early
  epochs), the per-client re-weighting, the mixup and mosaic passes, and the data
  augmentation of the training phase (crop, flip, RandAugment). The curriculum counts
  local epochs within a round, so with one epoch per round its x10 holds throughout:
  ``weight-rec`` defaults to 50 for that. With the release's 5 and one epoch per distill
  round the generator stayed idle on the CIFAR-10 comparison (relative error 1.01-1.06,
  shares 22.1 dB from their images, both alarms on every node); 5 epochs at 50 gave
  0.41-0.46 and 14.4-14.9 dB, so those are the defaults (``docs/health.md``).
- The generator trains for ``distill-rounds`` rounds of the run itself (the release runs
  15 separate rounds before FL starts): the classifier trains in them too (w_xce), so
  these rounds also count as FedAvg rounds of the classifier.
- The pool is drawn class-balanced with replacement when a class has fewer rows than
  draws, as large as the node's own dataset per epoch (the release draws from each of its
  two pooled sets).
- Optimizer: one Adam at ``learning-rate`` over the generator and the classifier (the
  project's common choice; the release uses SGD lr 0.01, momentum 0.9, wd 1e-4); after
  distillation only the classifier receives gradients.
- If the pool never arrives (the hub's reduction or this node's check failed), the node
  trains on its own data only, as FedAvg; ``health_pool_size`` then reads 0.

Health, by phase: ``health_rec_mse`` (the generator's training reconstruction loss)
while distilling; ``health_share_rows`` and ``health_share_min_gap`` (the smallest
max-abs distance between a shared row and the image it came from: > 0 means no raw image
left the node) in the share round; ``health_pool_size``, ``health_pool_classes`` and
``health_pool_balance`` (least over most drawn class among the pooled rows trained on:
1 is perfectly balanced) afterwards. In every round, does the generator split anything
off (the mechanism), or are the shares nearly the raw images:

- ``health_gen_rel_err``: MSE(x, x_hat) / Var(x), the generator's reconstruction error
  (evaluation mode, latent mean) over the per-pixel variance of the images across
  samples. 1 means x_hat explains nothing beyond the mean image, so x_s = x - x_hat is
  the image minus a constant. 0 means x_hat = x.
- ``health_share_psnr_db``: mean over rows of the PSNR of x_s + eps (clipped to the
  pixel range [-1, 1], which only brings it closer to the image) against its source
  image, peak-to-peak ``DATA_RANGE`` = 2, capped at ``PSNR_CAP_DB``. With sigma = 0.15,
  a generator that outputs the mean image gives about 21 dB on CIFAR-10 (noise alone:
  22.5 dB).

While distilling they are measured on the first ``PROBE_SIZE`` training images with
noise seeded by ``seed`` (what would be shared now); in the share round, on the rows
shared; afterwards the node repeats its share-round values (kept in its private state,
:class:`ShareHealth`), since its shares in the pool stay what they were. From the share
round on, the node raises ``alarm_fedfed_generator_idle`` when the relative error is
above ``MAX_REL_ERR`` = 0.5 and ``alarm_fedfed_share_near_raw`` when the PSNR is above
``MAX_SHARE_PSNR_DB`` = 20 dB, and logs a warning naming both values in the share round.
Thresholds: on this project's CIFAR-10 (5,000 images), a linear projection on the top 4
principal components already reaches relative error 0.49 (16 components: 0.28, the
generator's latent size), so above 0.5 the generator does worse than 4-component PCA.
20 dB is an RMS error of 10 % of the pixel range (25 of 255 grey levels), at which a
picture is plainly recognizable, and it lies below the ~21 dB an idle generator yields.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from logging import WARNING
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from drdfl_flwr.config import ConfigError, MethodOptions, RunConfig
from drdfl_flwr.data import PIXEL_RANGE, ClientData
from drdfl_flwr.learner import Learner, LossMeans
from drdfl_flwr.logs import log
from drdfl_flwr.models.vae import Decoder, Learngene
from drdfl_flwr.payload import Incoming, PayloadError, Tensors, check_payload
from drdfl_flwr.spec import MethodSpec
from strategies.reducers import (
    Arrays,
    Contribution,
    ReductionError,
    check_float_keys,
    majority,
    weighted_mean,
)

POOL_PREFIX = "share."  # keys the hub pools (concatenates rows), never averages
SHARE_X, SHARE_Y = POOL_PREFIX + "x", POOL_PREFIX + "y"
CHUNK = 512  # rows per forward pass when computing the shared features
PROBE_SIZE = 256  # training images the generator's health is measured on while distilling
DATA_RANGE = PIXEL_RANGE[1] - PIXEL_RANGE[0]  # 2: the PSNR's peak
PSNR_CAP_DB = 100.0  # a shared row equal to its image would otherwise be infinite
MAX_REL_ERR = 0.5  # above: the generator is worse than a 4-component PCA (module docstring)
MAX_SHARE_PSNR_DB = 20.0  # above: the shared rows are recognizable copies of the images


@dataclass(frozen=True)
class FedFedOptions(MethodOptions):
    """Section ``[fedfed]``: distillation schedule, noise, share size and loss weights."""

    SECTION: ClassVar[str] = "fedfed"
    distill_rounds: int = 3
    # Trained enough to share more than near-raw images at CPU scale (health.md): the
    # release's schedule left both alarms on every node of the CIFAR-10 comparison.
    distill_epochs: int = 5
    sigma: float = 0.15
    share_fraction: float = 1.0
    latent_dim: int = 16
    weight_rec: float = 50.0
    weight_ce: float = 2.0
    weight_kl: float = 0.005
    weight_xce: float = 0.4

    def __post_init__(self) -> None:
        self.check_positive("distill-rounds", "sigma", "latent-dim")
        self.check_unit("share-fraction", open_low=True)
        self.check_non_negative(
            "distill-epochs", "weight-rec", "weight-ce", "weight-kl", "weight-xce"
        )


def check_rounds(cfg: RunConfig) -> None:
    """The pool is shared in round D + 1 and first used in round D + 2."""
    distill = cfg.options(FedFedOptions).distill_rounds
    if cfg.num_server_rounds < distill + 2:
        raise ConfigError(
            "num-server-rounds",
            cfg.num_server_rounds,
            f"fedfed needs at least fedfed.distill-rounds + 2 = {distill + 2} rounds "
            "(distill, share, then train on the pool)",
        )


class Generator(nn.Module):
    """q(z|x) and x_hat = decoder(z): the performance-robust part of x."""

    def __init__(self, input_shape: tuple[int, int, int], latent_dim: int) -> None:
        super().__init__()
        self.encoder = Learngene(input_shape, latent_dim)
        self.decoder = Decoder(input_shape, latent_dim)

    def forward(
        self, x: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_hat, mu, log_var); z = mu + std * noise, or mu when ``noise`` is None."""
        mu, log_var = self.encoder(x)
        z = mu if noise is None else mu + (0.5 * log_var).exp() * noise
        return self.decoder(z), mu, log_var


class FeaturePool(nn.Module):
    """Rows of noisy features (float16) and their labels, as buffers whose size changes
    when a state with another number of rows is loaded."""

    def __init__(self, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.register_buffer("x", torch.zeros((0, *input_shape), dtype=torch.float16))
        self.register_buffer("y", torch.zeros(0, dtype=torch.long))

    def set(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x = x.detach().to(self.x.device, torch.float16).clone()
        self.y = y.detach().to(self.y.device, torch.long).clone()

    def clear(self) -> None:
        self.set(self.x[:0], self.y[:0])

    def __len__(self) -> int:
        return len(self.y)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        for name in ("x", "y"):
            key = prefix + name
            if key in state_dict:
                ref = getattr(self, name)
                setattr(self, name, state_dict[key].to(ref.device, ref.dtype).clone())
            elif strict:
                missing_keys.append(key)


class ShareHealth(nn.Module):
    """The share round's ``health_gen_rel_err`` and ``health_share_psnr_db`` (NaN until
    this node shares), as buffers, so the pooled rounds keep reporting them."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("rel_err", torch.tensor(float("nan")))
        self.register_buffer("psnr_db", torch.tensor(float("nan")))

    @property
    def measured(self) -> bool:
        return not (self.rel_err.isnan() or self.psnr_db.isnan())


def relative_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """MSE(x, x_hat) over the per-pixel variance of ``x`` across its rows (the error of
    predicting the mean image); NaN for fewer than two rows or constant images."""
    x, x_hat = x.float(), x_hat.float()
    variance = (x - x.mean(0)).pow(2).mean().item()
    if len(x) < 2 or variance <= 0:
        return float("nan")
    return F.mse_loss(x_hat, x).item() / variance


def psnr_db(shared: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of each row of ``shared`` against the same row of ``x``, as
    :func:`drdfl_flwr.privacy.psnr` measures it (``shared`` clipped to the pixel range, as
    a viewer would; peak-to-peak ``DATA_RANGE``), per row, capped at ``PSNR_CAP_DB``."""
    low, high = PIXEL_RANGE
    mse = (shared.float().clamp(low, high) - x.float()).pow(2).flatten(1).mean(1)
    psnr = 10 * torch.log10(DATA_RANGE**2 / mse)
    return psnr.clamp(max=PSNR_CAP_DB)


def share_health(x: torch.Tensor, x_hat: torch.Tensor, shared: torch.Tensor) -> dict[str, float]:
    """``health_gen_rel_err`` and ``health_share_psnr_db`` of images ``x``, their
    reconstructions ``x_hat`` and the shared features ``shared`` (x - x_hat + eps)."""
    return {
        "health_gen_rel_err": relative_error(x, x_hat),
        "health_share_psnr_db": psnr_db(shared, x).mean().item(),
    }


def share_alarms(rel_err: float, psnr: float) -> dict[str, float]:
    return {
        "alarm_fedfed_generator_idle": float(rel_err > MAX_REL_ERR),
        "alarm_fedfed_share_near_raw": float(psnr > MAX_SHARE_PSNR_DB),
    }


def balanced_indices(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` shuffled row indices into ``labels``, every present class drawn as often as
    every other (counts differ by at most one), rows without replacement within a class
    until it is exhausted."""
    classes = labels.unique()
    if n <= 0 or len(classes) == 0:
        return torch.zeros(0, dtype=torch.long)
    k = len(classes)
    counts = torch.full((k,), n // k, dtype=torch.long)
    counts[torch.randperm(k, generator=generator)[: n % k]] += 1
    drawn = []
    for c, m in zip(classes.tolist(), counts.tolist(), strict=True):
        members = (labels == c).nonzero().flatten()
        rounds = -(-m // len(members))
        order = torch.cat(
            [torch.randperm(len(members), generator=generator) for _ in range(rounds)]
        )
        drawn.append(members[order[:m]])
    out = torch.cat(drawn)
    return out[torch.randperm(len(out), generator=generator)]


class FedFedLearner(Learner):
    """``generator`` + ``classifier`` (one Adam); ``pool`` (received), ``outbox`` (the
    shares this node sends in round D) and ``share_health`` are private buffers."""

    OPTIONS = FedFedOptions

    def setup(self) -> None:
        with self.common_init():
            self.classifier = self.new_classifier()
        with self.common_init("generator"):
            self.generator = Generator(self.input_shape, self.opts.latent_dim).to(self.device)
        params = [*self.generator.parameters(), *self.classifier.parameters()]
        self.optimizer = self.new_optimizer(params)
        self.pool = FeaturePool(self.input_shape)
        self.outbox = FeaturePool(self.input_shape)
        self.share_health = ShareHealth()

    # -- phases and payloads ---------------------------------------------------------------
    def phase(self, rounds: int | None = None) -> str:
        """``distill`` (rounds < D), ``share`` (= D) or ``pooled`` (> D)."""
        r = self.rounds_trained if rounds is None else rounds
        d = self.opts.distill_rounds
        return "distill" if r < d else "share" if r == d else "pooled"

    def model_entries(self, with_generator: bool) -> Tensors:
        modules = {"classifier": self.classifier}
        if with_generator:
            modules["generator"] = self.generator
        return {
            f"{name}.{k}": v
            for name, module in modules.items()
            for k, v in module.state_dict().items()
            if v.is_floating_point()
        }

    def shared_payload(self) -> Tensors:
        """After ``fit``: generator + classifier while distilling, classifier + shares
        after the share round, the classifier alone afterwards."""
        sent = self.rounds_trained - 1  # the round whose result goes out
        with_generator = sent < self.opts.distill_rounds
        out = {k: v.detach().cpu().clone() for k, v in self.model_entries(with_generator).items()}
        if sent == self.opts.distill_rounds:
            out[SHARE_X] = self.outbox.x.detach().cpu().clone()
            out[SHARE_Y] = self.outbox.y.detach().cpu().float()
        return out

    # -- receiving -------------------------------------------------------------------------
    def check_pool(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled rows as (float16 features, long labels), or a PayloadError."""
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            raise PayloadError("the pool's share.x and share.y must be tensors")
        if not (x.is_floating_point() and y.is_floating_point()):
            raise PayloadError(f"pool dtypes {x.dtype}, {y.dtype}: both must be floating point")
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(self.input_shape):
            raise PayloadError(
                f"pool '{SHARE_X}' has shape {tuple(x.shape)}, expected (N, {self.input_shape})"
            )
        if y.dim() != 1 or len(y) != len(x) or len(y) == 0:
            raise PayloadError(
                f"pool '{SHARE_Y}' has shape {tuple(y.shape)}, expected ({len(x)},), N > 0"
            )
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise PayloadError("the pool holds NaN or infinite values")
        if (y != y.round()).any() or (y < 0).any() or (y >= self.num_classes).any():
            raise PayloadError(f"pool labels must be integers in [0, {self.num_classes})")
        return x.to(torch.float16), y.long()

    def absorb(self, incoming: Sequence[Incoming]) -> None:
        """Load the hub's averaged model; right after the share round, keep the pool too.
        Everything is checked before anything changes."""
        if not incoming:
            return
        expected = self.model_entries(self.rounds_trained <= self.opts.distill_rounds)
        expects_pool = self.rounds_trained == self.opts.distill_rounds + 1
        pool = None
        for item in incoming:
            model = dict(item.tensors)
            if expects_pool:
                missing = [k for k in (SHARE_X, SHARE_Y) if k not in model]
                if missing:
                    raise PayloadError(f"the aggregate after the share round lacks {missing}")
                pool = self.check_pool(model.pop(SHARE_X), model.pop(SHARE_Y))
            check_payload(model, expected)
        aggregate = incoming[-1].tensors
        with torch.no_grad():
            for key, ref in expected.items():
                ref.copy_(aggregate[key].to(ref.device, ref.dtype))
        if pool is not None:
            self.pool.set(*pool)

    # -- training --------------------------------------------------------------------------
    def noise(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(self.device)

    @torch.no_grad()
    def split(
        self, x: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat, x_s + eps) for the rows of ``x``: the generator in evaluation mode
        (latent mean), eps ~ N(0, sigma^2 I) drawn from ``generator``."""
        self.generator.eval()
        x_hats, out = [], []
        for xb in x.split(CHUNK):
            xb = xb.to(self.device)
            x_hat, _, _ = self.generator(xb)
            x_hats.append(x_hat)
            out.append(xb - x_hat + self.opts.sigma * self.noise(xb.shape, generator))
        return torch.cat(x_hats).cpu(), torch.cat(out).cpu()

    def distilled_features(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x_s + eps for the rows of ``x`` (see :meth:`split`)."""
        return self.split(x, generator)[1]

    def probe_health(self, data: ClientData) -> dict[str, float]:
        """The generator's health now, on the first ``PROBE_SIZE`` training images with
        noise seeded by ``seed`` (the round's generator is left alone)."""
        x = data.x_train[:PROBE_SIZE]
        if len(x) == 0:
            return {}
        x_hat, shared = self.split(x, torch.Generator().manual_seed(self.cfg.seed))
        return share_health(x, x_hat, shared)

    def shared_health(
        self, x: torch.Tensor, x_hat: torch.Tensor, shared: torch.Tensor
    ) -> dict[str, float]:
        """The share round's health of the rows it shares, kept for the later rounds, with
        its alarms; a warning naming the values when one is raised."""
        health = share_health(x, x_hat, shared)
        rel_err, psnr = health["health_gen_rel_err"], health["health_share_psnr_db"]
        self.share_health.rel_err.fill_(rel_err)
        self.share_health.psnr_db.fill_(psnr)
        alarms = share_alarms(rel_err, psnr)
        raised = [key.removeprefix("alarm_") for key, on in alarms.items() if on]
        if raised:
            log(
                WARNING,
                "partition %d: FedFed's generator reconstruction error is %.2f of the pixel "
                "variance (alarm above %.2f) and its shared features' PSNR against their "
                "images is %.1f dB (alarm above %.0f dB): %s",
                self.partition_id,
                rel_err,
                MAX_REL_ERR,
                psnr,
                MAX_SHARE_PSNR_DB,
                ", ".join(raised),
            )
        return {**health, **alarms}

    def kept_health(self) -> dict[str, float]:
        """The share round's health and alarms, repeated in the rounds after it."""
        if not self.share_health.measured:
            return {}
        rel_err, psnr = self.share_health.rel_err.item(), self.share_health.psnr_db.item()
        return {
            "health_gen_rel_err": rel_err,
            "health_share_psnr_db": psnr,
            **share_alarms(rel_err, psnr),
        }

    def distill_epochs(self, data: ClientData, gen: torch.Generator) -> dict[str, float]:
        o = self.opts
        self.generator.train()
        self.classifier.train()
        losses = LossMeans()
        for x, y in self.batches(data, gen, epochs=o.distill_epochs or None):
            x_hat, mu, log_var = self.generator(x, self.noise(mu_shape(x, o.latent_dim), gen))
            x_s = x - x_hat
            l_rec = F.mse_loss(x_hat, x)
            l_ce_s = F.cross_entropy(self.classifier(x_s + o.sigma * self.noise(x.shape, gen)), y)
            kl = -0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum() / (len(x) * o.latent_dim)
            l_ce = F.cross_entropy(self.classifier(x), y)
            loss = (
                o.weight_rec * l_rec + o.weight_ce * l_ce_s + o.weight_kl * kl + o.weight_xce * l_ce
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            parts = {"l_rec": l_rec, "l_ce_s": l_ce_s, "l_kl": kl, "l_ce": l_ce, "loss": loss}
            losses.add({k: v.item() for k, v in parts.items()})
        metrics = losses.means()
        metrics["local_steps"] = float(losses.steps)
        metrics["health_rec_mse"] = metrics["l_rec"]
        return metrics

    def pooled_epochs(self, data: ClientData, gen: torch.Generator) -> dict[str, float]:
        """Own batches concatenated with as many class-balanced pooled rows."""
        self.classifier.train()
        n = len(data.y_train)
        total, steps, drawn_classes = 0.0, 0, torch.zeros(self.num_classes)
        for _ in range(self.cfg.local_epochs):
            order = torch.randperm(n, generator=gen)
            drawn = balanced_indices(self.pool.y.cpu(), n, gen)
            for own, shared in zip(
                order.split(self.cfg.batch_size), drawn.split(self.cfg.batch_size), strict=True
            ):
                x = torch.cat([data.x_train[own].to(self.device), self.pool.x[shared].float()])
                y = torch.cat([data.y_train[own].to(self.device), self.pool.y[shared]])
                loss = F.cross_entropy(self.classifier(x), y)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                total += loss.item()
                steps += 1
                drawn_classes += torch.bincount(
                    self.pool.y[shared].cpu(), minlength=self.num_classes
                )
        present = drawn_classes[drawn_classes > 0]
        return {
            "l_ce": total / max(steps, 1),
            "local_steps": float(steps),
            "health_pool_size": float(len(self.pool)),
            "health_pool_classes": float(len(self.pool.y.unique())),
            "health_pool_balance": float(present.min() / present.max()) if len(present) else 0.0,
        }

    def train_round(self, data: ClientData) -> dict[str, float]:
        gen = self.round_generator()
        phase = self.phase()
        if phase == "distill":
            metrics = self.distill_epochs(data, gen)
            metrics.update(self.probe_health(data))
        elif phase == "share":
            n = len(data.y_train)
            count = max(1, round(self.opts.share_fraction * n))
            idx = torch.randperm(n, generator=gen)[:count].sort().values
            x_hat, shared = self.split(data.x_train[idx], gen)
            self.outbox.set(shared, data.y_train[idx])
            gap = (shared - data.x_train[idx]).abs().flatten(1).amax(1)
            loss, steps = self.supervised_epochs(self.classifier, self.optimizer, data, gen)
            metrics = {
                "l_ce": loss,
                "local_steps": float(steps),
                "health_share_rows": float(count),
                "health_share_min_gap": float(gap.min()),
                **self.shared_health(data.x_train[idx], x_hat, shared),
            }
        else:
            self.outbox.clear()
            if len(self.pool):
                metrics = self.pooled_epochs(data, gen)
            else:
                loss, steps = self.supervised_epochs(self.classifier, self.optimizer, data, gen)
                metrics = {"l_ce": loss, "local_steps": float(steps), "health_pool_size": 0.0}
            metrics.update(self.kept_health())
        return metrics


def mu_shape(x: torch.Tensor, latent_dim: int) -> torch.Size:
    return torch.Size((len(x), latent_dim))


def fedfed_reduce(contributions: Sequence[Contribution], previous: Arrays | None) -> Arrays:
    """FedFed's server: FedAvg for the model, pooling (row concatenation, in partition
    order) for the shared ``share.*`` feature sets, which every node then receives.

    Every contribution must hold the same ``share.*`` keys, as floating-point arrays with
    one row per sample: all of one node's pooled arrays have the same number of rows (a
    feature row and its label stay paired), and each key's rows have the same shape
    across nodes."""
    if not contributions:
        raise ReductionError("no replies to reduce")
    # pooled rows: one node shares as many as it has, so their first dimension differs
    pooled = sorted(
        check_float_keys(contributions, lambda k: k.startswith(POOL_PREFIX), same_shape=False)
    )
    averaged_keys = check_float_keys(contributions, lambda k: not k.startswith(POOL_PREFIX))
    models = [
        Contribution(c.partition_id, {k: c.arrays[k] for k in averaged_keys}, c.metrics)
        for c in contributions
    ]
    out = weighted_mean(models) if averaged_keys else {}
    ordered = sorted(contributions, key=lambda c: c.partition_id)
    for c in ordered:
        shapes = {k: c.arrays[k].shape for k in pooled}
        if any(len(s) == 0 for s in shapes.values()):
            raise ReductionError(
                f"partition {c.partition_id} sent a pooled scalar: {shapes}", c.partition_id
            )
        if len({s[0] for s in shapes.values()}) > 1:
            raise ReductionError(
                f"partition {c.partition_id} sent pooled arrays with different row counts "
                f"{shapes}: rows would lose their pairing",
                c.partition_id,
            )
    for key in pooled:
        rows = majority([(c.partition_id, c.arrays[key].shape[1:]) for c in ordered])
        for c in ordered:
            if c.arrays[key].shape[1:] != rows:
                raise ReductionError(
                    f"'{key}' rows from partition {c.partition_id} have shape "
                    f"{c.arrays[key].shape[1:]}, the others' {rows}",
                    c.partition_id,
                )
        out[key] = np.concatenate([c.arrays[key] for c in ordered], axis=0)
    return out


SPEC = MethodSpec(
    name="fedfed",
    title="FedFed",
    sends="generator + classifier; once, noisy performance-sensitive features (hub: pool)",
    keeps="nothing: one global model (it trains on the received pool)",
    personalized="none (one global model)",
    learner=FedFedLearner,
    reducer=fedfed_reduce,
    check=check_rounds,
    exempt={"private": "one global model: nothing stays on the node"},
)
