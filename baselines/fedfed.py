"""FedFed (Yang et al. 2023, arXiv 2310.05077; code visitworld123/FedFed): federated
feature distillation as a plug-in to FedAvg.

A generator (a small VAE) splits every image x into a "performance-robust" part, its
reconstruction x_hat, and a "performance-sensitive" part x_s = x - x_hat. The nodes
share x_s with Gaussian noise (x_s + eps, eps ~ N(0, sigma^2 I)) instead of raw data,
and every node then trains its classifier on its own data mixed with the pooled noisy
features of all nodes, which softens the label skew of non-IID partitions.

Phases, by ``rounds_trained`` (D = ``[fedfed] distill-rounds``):

- rounds 0..D-1, distillation: the generator and the classifier train together with the
  release's loss, per batch of size B,
  w_re MSE(x_hat, x) + w_ce CE(f(x_s + eps), y) + w_kl KL(q(z|x) || N(0, I)) / (B latent)
  + w_xce CE(f(x), y) (weights 5, 2, 0.005, 0.4 as released); the payload is the
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
  augmentation of the training phase (crop, flip, RandAugment).
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

Health, by phase: ``health_rec_mse`` (the generator's reconstruction error) while
distilling; ``health_share_rows`` and ``health_share_min_gap`` (the smallest max-abs
distance between a shared row and the image it came from: > 0 means no raw image left
the node) in the share round; ``health_pool_size``, ``health_pool_classes`` and
``health_pool_balance`` (least over most drawn class among the pooled rows trained on:
1 is perfectly balanced) afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from drdfl_flwr.config import ConfigError, MethodOptions, RunConfig
from drdfl_flwr.data import ClientData
from drdfl_flwr.learner import Learner
from drdfl_flwr.models.vae import Decoder, Learngene
from drdfl_flwr.payload import Incoming, PayloadError, Tensors, check_payload
from drdfl_flwr.registry import MethodSpec

SHARE_X, SHARE_Y = "share.x", "share.y"  # strategies.reducers.POOL_PREFIX = "share."
CHUNK = 512  # rows per forward pass when computing the shared features


@dataclass(frozen=True)
class FedFedOptions(MethodOptions):
    """Section ``[fedfed]``: distillation schedule, noise, share size and loss weights."""

    SECTION: ClassVar[str] = "fedfed"
    distill_rounds: int = 3
    sigma: float = 0.15
    share_fraction: float = 1.0
    latent_dim: int = 16
    weight_rec: float = 5.0
    weight_ce: float = 2.0
    weight_kl: float = 0.005
    weight_xce: float = 0.4

    def __post_init__(self) -> None:
        self.check_positive("distill-rounds", "sigma", "latent-dim")
        self.check_unit("share-fraction", open_low=True)
        self.check_non_negative("weight-rec", "weight-ce", "weight-kl", "weight-xce")


def check_rounds(cfg: RunConfig) -> None:
    """The pool is shared in round D + 1 and first used in round D + 2."""
    distill = cfg.options(FedFedOptions.SECTION).distill_rounds
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
    """``generator`` + ``classifier`` (one Adam); ``pool`` (received) and ``outbox``
    (the shares this node sends in round D) are private buffers."""

    def setup(self) -> None:
        self.classifier = self.new_classifier()
        self.generator = Generator(self.input_shape, self.opts.latent_dim).to(self.device)
        params = [*self.generator.parameters(), *self.classifier.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=self.cfg.learning_rate)
        self.pool = FeaturePool(self.input_shape)
        self.outbox = FeaturePool(self.input_shape)

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
        self.check_origin(incoming)
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
    def distilled_features(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x_s + eps for the rows of ``x``: the generator in evaluation mode (latent mean),
        eps ~ N(0, sigma^2 I) drawn from ``generator``."""
        self.generator.eval()
        out = []
        for xb in x.split(CHUNK):
            xb = xb.to(self.device)
            x_hat, _, _ = self.generator(xb)
            out.append(xb - x_hat + self.opts.sigma * self.noise(xb.shape, generator))
        return torch.cat(out).cpu()

    def distill_epochs(self, data: ClientData, gen: torch.Generator) -> dict[str, float]:
        o = self.opts
        self.generator.train()
        self.classifier.train()
        sums = {"l_rec": 0.0, "l_ce_s": 0.0, "l_kl": 0.0, "l_ce": 0.0, "loss": 0.0}
        steps = 0
        for x, y in self.batches(data, gen):
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
            for key, value in zip(sums, (l_rec, l_ce_s, kl, l_ce, loss), strict=True):
                sums[key] += value.item()
            steps += 1
        metrics = {k: v / max(steps, 1) for k, v in sums.items()}
        metrics["local_steps"] = float(steps)
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

    def fit(self, data: ClientData) -> dict[str, float]:
        gen = self.round_generator()
        phase = self.phase()
        if phase == "distill":
            metrics = self.distill_epochs(data, gen)
        elif phase == "share":
            n = len(data.y_train)
            count = max(1, round(self.opts.share_fraction * n))
            idx = torch.randperm(n, generator=gen)[:count].sort().values
            shared = self.distilled_features(data.x_train[idx], gen)
            self.outbox.set(shared, data.y_train[idx])
            gap = (shared - data.x_train[idx]).abs().flatten(1).amax(1)
            loss, steps = self.supervised_epochs(self.classifier, self.optimizer, data, gen)
            metrics = {
                "l_ce": loss,
                "local_steps": float(steps),
                "health_share_rows": float(count),
                "health_share_min_gap": float(gap.min()),
            }
        else:
            self.outbox.clear()
            if len(self.pool):
                metrics = self.pooled_epochs(data, gen)
            else:
                loss, steps = self.supervised_epochs(self.classifier, self.optimizer, data, gen)
                metrics = {"l_ce": loss, "local_steps": float(steps), "health_pool_size": 0.0}
        self.rounds_trained += 1
        return metrics

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.classifier.eval()
        return self.classifier(x)


def mu_shape(x: torch.Tensor, latent_dim: int) -> torch.Size:
    return torch.Size((len(x), latent_dim))


SPEC = MethodSpec(
    name="fedfed",
    personalized="none (one global model)",
    learner=FedFedLearner,
    options=FedFedOptions,
    reducer="fedfed",
    check=check_rounds,
)
