"""DRDFL-VF: our extension of DRDFL (in no paper) in which the ring teaches each node the
classes it lacks, with class-conditional virtual features (as CCVR and FedFA calibrate a
classifier, made ring-decentralized).

Why. In the paper's DRDFL nothing a node receives can reach its classifier: the classifier
trains on the node's own images and noisy reconstructions of them, and the one encoder
that travels is trained to be blind to labels (measured: DRDFL equals its isolated twin).
Our first extension, DRDFL-Gen, generated images from received statistics, but its
generator rebuilt an image from a code independent of the image, so its optimum was the
class-mean blob (it left the registry when this method superseded it). Here what
travels is a feature space and per-class moments in it.

What changes, everything else being DRDFL's (``[drdfl]``):

* **A shared class-aware trunk** E_s (three conv blocks with GroupNorm and global pooling
  to ``trunk-dim`` features; no running statistics to mix across label-skewed nodes),
  drawn from the run's common stream, so every node starts from the same one. The node's
  personal model is a private linear head over it. Trunk and head train with DRDFL's
  classifier loss: cross-entropy on the real images and on the noisy reconstructions.
  The trunk travels and is averaged with the received one on receipt (never replaced).
* **Class statistics in the trunk's space.** After local training the node computes, per
  class it holds, the count, mean and diagonal variance of E_s(x) over its training
  images, and merges them into the ring's estimate it received: the received counts are
  multiplied by ``decay`` (stale moments fade as the trunk moves), then each class's
  moments are pooled by counts. It sends the merged estimate on, so each class carries the
  pooled moments of the nodes that hold it.
* **Calibration.** The head is then retrained on the trunk's features, trunk frozen:
  ``calibration-steps`` full-batch Adam steps, each on ``virtual-per-class`` fresh draws
  from N(mean_k, diag var_k) for every class with ring statistics (class-balanced), plus
  the node's real features (weight ``real-weight``).
* **One feature space.** Moments only mean something in the trunk that made them. A trunk
  trained at the run's full rate drifts from its neighbours' faster than averaging with
  one neighbour a round pulls it back: on a two-node toy (disjoint classes, 6 rounds) the
  received class means lay 3.1-3.3 feature units from where the node's own trunk put those
  classes (spread 0.02-0.04), and absent-class accuracy stayed 0; with the trunk's rate
  at 0.1 x (``trunk-lr-scale``, the default) they lay 1.7 units away and it reached
  0.45-0.48; with a frozen common trunk, 0.1 units and 1.0. Five calibration steps were
  too few to move the head at all (0 with the frozen trunk); 200 are the default.
  On CIFAR-10 (``benchmarks/vf_alignment.py``: 4 nodes, 5 shard classes each, 3 rounds)
  the slower trunk was not enough: the received means of absent classes lay 1.51 feature
  units (at most 1.65) from where the node's trunk put their real test images (the
  within-class spread: 0.09 per feature), and absent-class accuracy was 0.002. So the
  received moments are **aligned** (``align``, on by default): the sender's trunk
  travels in the payload anyway, and the node sees its own training images through both
  trunks, fits an affine map from the sender's features to its own by ridge least
  squares (R^2 0.978), and maps the received means exactly and the diagonal variances as
  diag(A diag(var) A^T). The same run then put the absent means 0.14 units (at most
  0.32) from the real ones, and absent-class accuracy rose to 0.090 (an oracle head on
  real features of every class: 0.364). The map is fitted on the node's own classes
  only: it carries the others as far as a linear change of trunk does
  (``health_vf_align_r2``).
* **Scoring.** The calibrated head is class-balanced: Global-T reads its logits as they
  are; Local-T (the node's own, skewed test data) adds the node's class prior, as DFML's
  logit adjustment does.

Payload: DRDFL's (Learngene, class statistics of z_p) + the trunk + K x (2d + 1) floats.

Health: ``health_vf_classes_known`` (classes with ring statistics), ``health_vf_absent_known``
(of the classes the node lacks, the fraction the ring told it about),
``health_vf_staleness`` (for the node's own classes, the distance between the ring's
class mean and the current trunk's, over the features' scale: how stale the moments are),
``health_vf_align_r2`` (the fit of the map between the sender's trunk and the node's),
``health_vf_trunk_spread`` (||received trunk - own|| / ||own|| before averaging: the
trunks' disagreement, as DFedPGP's body spread), and, in each scored round,
``health_vf_head_absent_acc`` against ``health_vf_oracle_absent_acc``: the calibrated
head and an oracle linear head (fitted on real trunk features of every class from half
the common test set) read the other half's images of the classes the node lacks. The gap
is what the virtual features lose against real ones in the same feature space; the
oracle's own level is what the trunk's features allow at all.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from drdfl_flwr.config import MethodOptions
from drdfl_flwr.data import ClientData
from drdfl_flwr.methods.drdfl import DRDFLLearner, DRDFLOptions
from drdfl_flwr.payload import Incoming, PayloadError, Tensors
from drdfl_flwr.scoring import class_proportions
from drdfl_flwr.spec import MethodSpec

VF_PREFIX = "vf."
VAR_FLOOR = 1e-6


@dataclass(frozen=True)
class DRDFLVFOptions(MethodOptions):
    """Section ``[drdfl-vf]``: the trunk, the statistics' decay and the calibration."""

    SECTION: ClassVar[str] = "drdfl-vf"
    trunk_dim: int = 64
    trunk_lr_scale: float = 0.1
    decay: float = 0.5
    virtual_per_class: int = 64
    real_weight: float = 1.0
    calibration_steps: int = 200
    calibration_lr: float = 1e-2
    align: bool = True

    def __post_init__(self) -> None:
        self.check_positive("trunk-dim", "virtual-per-class", "calibration-lr")
        self.check_unit("decay", "trunk-lr-scale")
        self.check_non_negative("real-weight", "calibration-steps")


class Trunk(nn.Module):
    """Three conv blocks (GroupNorm, ReLU), global average pooling to ``dim`` features."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.GroupNorm(math.gcd(8, c_out), c_out),
                nn.ReLU(),
            ]

        self.body = nn.Sequential(
            *block(in_channels, 32),
            nn.MaxPool2d(2),
            *block(32, 64),
            nn.MaxPool2d(2),
            *block(64, dim),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TrunkHead(nn.Module):
    """The personal model: the shared trunk, the private linear head."""

    def __init__(self, trunk: Trunk, dim: int, num_classes: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class FeatureMoments(nn.Module):
    """Per-class count, mean and diagonal variance of trunk features (buffers: the
    node's private state, sent as the payload's ``vf.*``)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(num_classes))
        self.register_buffer("mean", torch.zeros(num_classes, dim))
        self.register_buffer("var", torch.ones(num_classes, dim))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    @torch.no_grad()
    def set(self, count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.count.copy_(count)
        self.mean.copy_(mean)
        self.var.copy_(var.clamp_min(VAR_FLOOR))

    def known(self) -> torch.Tensor:
        """The classes with statistics (from the node or the ring)."""
        return torch.nonzero(self.count > 0).flatten()

    def draw(
        self, classes: torch.Tensor, per_class: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Virtual features, ``per_class`` of each of ``classes`` from N(mean, diag var),
        and their labels: what the head is calibrated on."""
        labels = classes.repeat_interleave(per_class)
        noise = torch.randn(
            len(labels), self.mean.shape[1], generator=generator, device=self.mean.device
        )
        return self.mean[labels] + noise * self.var[labels].sqrt(), labels


def moments_of(features: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple:
    """(count, mean, var) per class of ``features``; zero count and unit variance for a
    class with no sample, the population variance (floored) otherwise."""
    dim = features.shape[1]
    count = torch.bincount(y, minlength=num_classes).float()
    total = torch.zeros(num_classes, dim).index_add_(0, y, features)
    squares = torch.zeros(num_classes, dim).index_add_(0, y, features.pow(2))
    safe = count.clamp_min(1.0)[:, None]
    mean = total / safe
    var = (squares / safe - mean.pow(2)).clamp_min(VAR_FLOOR)
    var = torch.where(count[:, None] > 0, var, torch.ones_like(var))
    return count, mean, var


def pool_moments(parts: Sequence[tuple]) -> tuple:
    """Moments of the union of several sample sets, from each set's (count, mean, var):
    means pooled by counts, variances by the law of total variance."""
    count = sum(p[0] for p in parts)
    safe = count.clamp_min(1e-12)[:, None]
    mean = sum(p[0][:, None] * p[1] for p in parts) / safe
    second = sum(p[0][:, None] * (p[2] + p[1].pow(2)) for p in parts) / safe
    var = (second - mean.pow(2)).clamp_min(VAR_FLOOR)
    known = count[:, None] > 0
    return (
        count,
        torch.where(known, mean, torch.zeros_like(mean)),
        torch.where(known, var, torch.ones_like(var)),
    )


def relative_distance(own: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    """||other - own|| / ||own|| over the floating-point tensors of two state dicts."""
    keys = [k for k, v in own.items() if v.is_floating_point()]
    gap = sum(float((other[k].to(own[k]) - own[k]).pow(2).sum()) for k in keys)
    norm = sum(float(own[k].pow(2).sum()) for k in keys)
    return math.sqrt(gap) / max(math.sqrt(norm), 1e-12)


@dataclass(frozen=True)
class FeatureMap:
    """An affine map between two trunks' feature spaces, ``[f, 1] @ weight``."""

    weight: torch.Tensor  # (d + 1, d)
    r2: float  # of the fit, on the images it was fitted on

    def apply(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class means mapped exactly; diagonal variances as the diagonal of
        A diag(var) A^T (the cross-covariances a diagonal estimate does not keep)."""
        linear = self.weight[:-1]
        mapped = mean @ linear + self.weight[-1]
        return mapped, (var @ linear.pow(2)).clamp_min(VAR_FLOOR)


def fit_feature_map(source: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3) -> FeatureMap:
    """Least squares (ridge ``ridge`` x n) from ``source`` to ``target`` features of the
    same images: the node's own images seen through the sender's trunk and its own."""
    n, d = source.shape
    x = torch.cat([source, torch.ones(n, 1, device=source.device)], dim=1).double()
    gram = x.T @ x + ridge * n * torch.eye(d + 1, dtype=x.dtype, device=x.device)
    weight = torch.linalg.solve(gram, x.T @ target.double())
    residual = (x @ weight - target.double()).pow(2).sum()
    total = (target.double() - target.double().mean(0)).pow(2).sum().clamp_min(1e-12)
    return FeatureMap(weight.to(target.dtype), float(1 - residual / total))


class DRDFLVFLearner(DRDFLLearner):
    OPTIONS = DRDFLVFOptions
    PRIVATE = ("persona", "decoder", "adversary")  # and the classifier's head, not its trunk

    def setup(self) -> None:
        # Learner.__init__ put this method's own section ([drdfl-vf]) in self.opts; the
        # DRDFL code it runs reads [drdfl] there, so the two are kept apart
        self.extension: DRDFLVFOptions = self.opts
        self.opts = self.cfg.options(DRDFLOptions)
        super().setup()  # DRDFL's parts; its small-CNN classifier is replaced below
        vf = self.vf_opts
        with self.common_init("trunk"):  # one trunk for every node: averaging starts alike
            trunk = Trunk(self.input_shape[0], vf.trunk_dim)
        self.classifier = TrunkHead(trunk, vf.trunk_dim, self.num_classes).to(self.device)
        self.ring = FeatureMoments(self.num_classes, vf.trunk_dim).to(self.device)
        # the ring's moments received this round, merged after training (train_round)
        self.received_moments: tuple[torch.Tensor, ...] | None = None
        self.trunk_spread = 0.0  # ||received trunk - own|| / ||own|| at the last merge
        # the sender's trunk, in whose feature space the received moments are (align)
        self.sender_trunk: Trunk | None = None
        trunk = set(map(id, self.classifier.trunk.parameters()))
        self.main_opt = self.new_optimizer(
            [
                {"params": [p for p in self.main_parameters() if id(p) not in trunk]},
                {
                    "params": list(self.classifier.trunk.parameters()),
                    "lr": self.cfg.learning_rate * vf.trunk_lr_scale,
                },
            ]
        )

    @property
    def vf_opts(self) -> DRDFLVFOptions:
        return self.extension

    # -- communication -------------------------------------------------------------
    def private_state(self) -> Tensors:
        head = self.classifier.head.state_dict()
        return {**super().private_state(), **{f"classifier.head.{k}": v for k, v in head.items()}}

    def shared_modules(self) -> dict[str, nn.Module]:
        """DRDFL's Learngene and the trunk (merged by :meth:`load_shared`)."""
        return {**super().shared_modules(), "trunk": self.classifier.trunk}

    def shared_payload(self) -> Tensors:
        payload = super().shared_payload()
        for key, value in self.ring.tensors().items():
            payload[VF_PREFIX + key] = value.detach().cpu().clone()
        return payload

    def received_mean(self, incoming: Sequence[Incoming]) -> dict[str, torch.Tensor]:
        for item in incoming:  # what DRDFL's checks cannot know: counts are counts
            count = item.tensors.get(VF_PREFIX + "count")
            if count is not None and (count < 0).any():
                raise PayloadError("payload 'vf.count' holds negative counts")
            var = item.tensors.get(VF_PREFIX + "var")
            if var is not None and (var <= 0).any():
                raise PayloadError("payload 'vf.var' holds non-positive variances")
        return super().received_mean(incoming)

    def merge_module(
        self, prefix: str, module: nn.Module, state: dict[str, torch.Tensor], own_weight: float
    ) -> None:
        """The Learngene by DRDFL's rule; the trunk averaged with the received one (never
        replaced: the node's head was fitted to its own), except by a node that has never
        trained (a late joiner), which takes it."""
        if prefix == "trunk":
            own_weight = 0.5 if self.rounds_trained else 0.0
            self.trunk_spread = relative_distance(module.state_dict(), state)
            self.sender_trunk = copy.deepcopy(module)
            self.sender_trunk.load_state_dict(state)
        super().merge_module(prefix, module, state, own_weight)

    def load_shared(self, received: dict[str, torch.Tensor], own_weight: float) -> None:
        """DRDFL's merge, and the ring's feature moments kept for after training
        (:meth:`train_round`), on the trunk they will then describe."""
        super().load_shared(received, own_weight)
        self.received_moments = tuple(
            received[VF_PREFIX + k].to(self.device) for k in ("count", "mean", "var")
        )

    def absorb(self, incoming: Sequence[Incoming]) -> None:
        self.received_moments, self.sender_trunk = None, None
        super().absorb(incoming)

    # -- training --------------------------------------------------------------------
    def train_round(self, data: ClientData) -> dict[str, float]:
        metrics = super().train_round(data)  # DRDFL's round: the trunk and head train too
        features = self.features(data.x_train)
        own = moments_of(features, data.y_train.to(self.device), self.num_classes)
        received = self.received_moments
        if received is None:
            self.ring.set(*own)
        else:
            count, mean, var = received
            if self.vf_opts.align and self.sender_trunk is not None:
                mapping = fit_feature_map(self.features(data.x_train, self.sender_trunk), features)
                mean, var = mapping.apply(mean, var)
                metrics["health_vf_align_r2"] = mapping.r2
            self.ring.set(*pool_moments([own, (self.vf_opts.decay * count, mean, var)]))
        self.received_moments, self.sender_trunk = None, None
        metrics.update(self.calibrate(features, data.y_train.to(self.device)))
        metrics["health_vf_trunk_spread"] = self.trunk_spread
        self.trunk_spread = 0.0
        return metrics

    @torch.no_grad()
    def features(
        self, x: torch.Tensor, trunk: nn.Module | None = None, batch_size: int = 256
    ) -> torch.Tensor:
        trunk = self.classifier.trunk if trunk is None else trunk
        trunk.eval()
        out = torch.cat([trunk(xb.to(self.device)) for xb in x.split(batch_size)])
        trunk.train()
        return out

    def calibrate(self, features: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """The head retrained on virtual features of every class the ring knows
        (class-balanced) and the node's real features, with the trunk frozen."""
        vf = self.vf_opts
        known = self.ring.known()
        if not len(known) or vf.calibration_steps == 0:
            return {}
        gen = torch.Generator(device=self.device).manual_seed(self.round_seed)
        head = self.classifier.head
        optimizer = torch.optim.Adam(head.parameters(), lr=vf.calibration_lr)
        total = 0.0
        for _ in range(vf.calibration_steps):
            virtual, labels = self.ring.draw(known, vf.virtual_per_class, gen)
            loss = F.cross_entropy(head(virtual), labels)
            if vf.real_weight > 0 and len(y):
                loss = loss + vf.real_weight * F.cross_entropy(head(features), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        return {"l_calibration": total / vf.calibration_steps}

    def local_log_prior(self, data: ClientData) -> torch.Tensor:
        """The calibrated head is class-balanced: Local-T adds the node's class prior
        (logit adjustment, as DFML's)."""
        return torch.log(class_proportions(data.own_labels, self.num_classes))

    def evaluate(self, data: ClientData) -> dict[str, float]:
        """The scores, and the calibration's health against its ceiling on the common
        test set: the node's head and an oracle head (fitted on real trunk features of
        every class, half the test set) read the other half's absent classes."""
        metrics = super().evaluate(data)
        absent = class_proportions(data.own_labels, self.num_classes) == 0
        if absent.any() and len(data.y_global_test):
            metrics.update(self.head_against_oracle(data, absent))
        return metrics

    def head_against_oracle(self, data: ClientData, absent: torch.Tensor) -> dict[str, float]:
        features = self.features(data.x_global_test)
        y = data.y_global_test.to(self.device)
        fit, read = torch.arange(0, len(y), 2), torch.arange(1, len(y), 2)
        read = read[absent.to(self.device)[y[read]]]
        if not len(read):
            return {}
        oracle = nn.Linear(features.shape[1], self.num_classes).to(self.device)
        torch.manual_seed(self.round_seed)
        optimizer = torch.optim.Adam(oracle.parameters(), lr=self.vf_opts.calibration_lr)
        with torch.enable_grad():
            for _ in range(max(self.vf_opts.calibration_steps, 1)):
                loss = F.cross_entropy(oracle(features[fit]), y[fit])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            head = self.classifier.head(features[read]).argmax(1)
            best = oracle(features[read]).argmax(1)
        return {
            "health_vf_head_absent_acc": (head == y[read]).float().mean().item(),
            "health_vf_oracle_absent_acc": (best == y[read]).float().mean().item(),
        }

    # -- health ------------------------------------------------------------------------
    @torch.no_grad()
    def health(self, data: ClientData) -> dict[str, float]:
        metrics = super().health(data)
        held = class_proportions(data.own_labels, self.num_classes) > 0
        known = (self.ring.count > 0).cpu()
        metrics["health_vf_classes_known"] = float(known.sum())
        absent = ~held
        if absent.any():
            metrics["health_vf_absent_known"] = float((known & absent).sum() / absent.sum())
        probe = data.x_train[:512]
        if len(probe):
            y = data.y_train[: len(probe)].to(self.device)
            count, mean, _ = moments_of(self.features(probe), y, self.num_classes)
            own = count > 0
            scale = mean[own].norm(dim=1).mean().clamp_min(1e-12)
            gap = (mean[own] - self.ring.mean[own]).norm(dim=1).mean() / scale
            metrics["health_vf_staleness"] = gap.item()
        return metrics


SPEC = MethodSpec(
    name="drdfl-vf",
    title="DRDFL-VF",
    sends=(
        "Learngene + class statistics + the shared trunk + per-class feature moments (count, "
        "mean, variance; our extension)"
    ),
    keeps="PersonaNet, decoder, the linear head over the trunk",
    personalized="PersonaNet + decoder + linear head (over the shared trunk)",
    learner=DRDFLVFLearner,
    reads=("drdfl",),
)
