"""DRDFL (paper 001, section 4, Algorithm 1): Learngene + PersonaNet + noisy reconstruction.

Each block is trained on its own losses, as Algorithm 1 lines 10-19 write it
(``drdfl-training = "per-block"``, the default):

* PersonaNet psi and the class statistics (mu_k, Sigma_k): L_PR = L_cls + L_log (line 10-11);
* Learngene phi: L_kl + L_adv^u and the reconstruction, which reaches it through z_l
  (line 14 with Eq. 2's ELBO: the reconstruction term is the Learngene's only reason to
  carry information about x);
* decoder theta: L_rec (line 18); classifier omega: L_ce (line 19).

The reconstruction gradient does *not* reach PersonaNet: z_p enters the decoder
detached. If it did, PersonaNet's deterministic code would be a free channel around the
Learngene and the decoder would learn to ignore z_l (measured: KL(z_l) fell to 0.001 nats
per dimension). ``drdfl-training = "joint"`` is the alternative, one ELBO for
[psi, phi, theta] as Eq. 2 reads on its own.

Losses are the paper's, unscaled: L_rec = ||x - x'||^2 summed over pixels per sample (a
mean over pixels would weigh it thousands of times less than the KL and the Learngene
collapses); L_log = -log N(z_p; mu_y, Sigma_y) in full, not divided by the latent size.

The adversarial min-max is explicit, in two steps per batch: the head alone learns to
read y from a detached z_l (L_adv); then the Learngene descends L_adv^u, the
cross-entropy of the head's output against the uniform distribution, while the head is
not stepped. Deviation from the paper's text, on purpose: the paper lists
L_GL = L_kl + L_adv + L_adv^u for the Learngene. Minimizing L_adv through the Learngene
would help the head read labels, the opposite of the stated aim, so L_adv trains only
the head. See docs/deviations.md.

The class statistics start from a prior drawn from the run seed, identical on every
node, so that the EMA toward received statistics averages like with like (line 6-7).

Shared each round: the Learngene's parameters and the class statistics. On receipt the
Learngene is replaced by the received one (Algorithm 1 line 8, ``learngene-merge =
"replace"``, the default), averaged with it (``average``) or moved toward it by EMA with
``learngene-ema-alpha`` on the own value (``ema``); the statistics always move by EMA
with ``ema-alpha`` on the local value (lines 5-7).

A node that joins a running ring (Appendix B.2.6, Algorithm 2; ``late-join =
"algorithm-2"``, the default) starts from the received Learngene (replaced, whatever the
merge rule), sets its class statistics to the received ones, keeps its fresh random
PersonaNet, decoder and classifier, and trains with those priors fixed (no gradient, no
EMA) for its first ``join-frozen-rounds`` (T_init = 5) rounds; ``late-join = "absorb"``
lets it take its first payload like any other (the control). The metric
``priors_frozen`` is 1 in the rounds a node trained with fixed priors.

Ablations of the paper's Table 5: ``drdfl-ablation = "no-pr"`` drops L_PR,
``"no-gl"`` drops L_kl and L_adv^u (the Learngene then learns from the reconstruction only).

Health, every round (:meth:`DRDFLLearner.health`): KL(q(z_l|x) || N(0, I)) per dimension,
the relative reconstruction gap when z_l is replaced by prior samples, and the
adversarial head's accuracy beside the node's majority-class rate; ``alarm_zl_unused``
when, after three rounds, replacing z_l by prior noise changes the reconstruction by
less than 1 %: the Learngene's code then carries nothing the decoder uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from drdfl_flwr.config import MethodOptions
from drdfl_flwr.data import ClientData
from drdfl_flwr.learner import Learner, LossMeans
from drdfl_flwr.logs import log
from drdfl_flwr.models.norm import running_stats_frozen
from drdfl_flwr.models.vae import AdversarialHead, Decoder, Learngene, PersonaNet
from drdfl_flwr.payload import Incoming, PayloadError, Tensors, check_payload
from drdfl_flwr.spec import MethodSpec

LEARNGENE_MERGES = ("replace", "average", "ema")
LATE_JOINS = ("algorithm-2", "absorb")
TRAININGS = ("per-block", "joint")
ABLATIONS = ("none", "no-pr", "no-gl")


@dataclass(frozen=True)
class DRDFLOptions(MethodOptions):
    """Section ``[drdfl]`` (read by drdfl and drdfl-cfl). Paper defaults: alpha 0.99,
    sigma^2 0.15; the latent sizes are the CPU default (conf/drdfl-paper.toml has the
    paper's payload budget)."""

    SECTION: ClassVar[str] = "drdfl"
    persona_dim: int = 16
    learngene_dim: int = 16
    ema_alpha: float = 0.99
    noise_variance: float = 0.15
    learngene_merge: str = "replace"
    learngene_ema_alpha: float = 0.5
    training: str = "per-block"
    ablation: str = "none"
    late_join: str = "algorithm-2"
    join_frozen_rounds: int = 5

    def __post_init__(self) -> None:
        self.check_positive("persona-dim", "learngene-dim")
        self.check_non_negative("join-frozen-rounds")
        self.check_choice("late-join", LATE_JOINS)
        self.check_unit("ema-alpha", "learngene-ema-alpha")
        self.check_non_negative("noise-variance")
        self.check_choice("learngene-merge", LEARNGENE_MERGES)
        self.check_choice("training", TRAININGS)
        self.check_choice("ablation", ABLATIONS)


LOG_VAR_RANGE = (-6.0, 6.0)
PROBE_SIZE = 512  # training samples the health metrics are measured on
# z_l is considered unused when swapping it for prior noise raises the reconstruction
# error by less than this (relative), once the first rounds of warm-up are over.
ZL_MIN_REC_GAP = 0.01
ZL_WARMUP_ROUNDS = 3


class ClassStatistics(nn.Module):
    """Per-class Gaussians N(mu_k, diag exp(log_var_k)) of the PersonaNet code z_p.

    Trained by gradient (Algorithm 1, line 11) and pulled toward received statistics by
    EMA. Variances are stored as log-variances so gradient steps keep them positive.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.randn(num_classes, dim))
        self.log_var = nn.Parameter(torch.zeros(num_classes, dim))
        # rounds left with fixed priors (Algorithm 2); a buffer, so that it is saved
        # with the node's private state and never travels
        self.register_buffer("frozen_rounds", torch.zeros((), dtype=torch.long))

    @property
    def frozen(self) -> bool:
        return bool(self.frozen_rounds > 0)

    def variance(self) -> torch.Tensor:
        return self.log_var.clamp(*LOG_VAR_RANGE).exp()

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; mu_k, Sigma_k) for every sample and class: shape (N, K)."""
        log_var = self.log_var.clamp(*LOG_VAR_RANGE)
        diff = z[:, None, :] - self.mu[None]
        return -0.5 * (
            (diff.pow(2) / log_var.exp()[None]).sum(-1)
            + log_var.sum(-1)[None]
            + z.shape[1] * math.log(2 * math.pi)
        )

    @torch.no_grad()
    def set_to(self, mu: torch.Tensor, variance: torch.Tensor) -> None:
        self.mu.copy_(mu)
        self.log_var.copy_(variance.clamp_min(1e-8).log())

    @torch.no_grad()
    def ema_toward(self, mu: torch.Tensor, variance: torch.Tensor, alpha: float) -> None:
        """mu <- alpha mu + (1 - alpha) mu~ ; Sigma <- alpha Sigma + (1 - alpha) Sigma~."""
        self.mu.mul_(alpha).add_((1 - alpha) * mu)
        new_var = alpha * self.variance() + (1 - alpha) * variance
        self.log_var.copy_(new_var.clamp_min(1e-8).log())


def gaussian_mixture_losses(
    stats: ClassStatistics, z_p: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_cls (Eq. 5: CE of the mixture posterior p(y|z_p), uniform p(k)) and
    L_log (Eq. 6: -log N(z_p; mu_y, Sigma_y), in full), both averaged over the batch."""
    log_density = stats.log_density(z_p)
    l_cls = F.cross_entropy(log_density, y)  # uniform p(k) cancels in the posterior
    l_log = -log_density.gather(1, y[:, None]).mean()
    return l_cls, l_log


def reconstruction_loss(x_rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L_rec = ||x - x'||^2: summed over every pixel of a sample, averaged over the batch."""
    return (x_rec - x).pow(2).flatten(1).sum(1).mean()


def kl_to_standard_normal(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(log_var)) || N(0, I)), summed over dimensions, averaged over the batch."""
    return 0.5 * (mu.pow(2) + log_var.exp() - 1.0 - log_var).sum(1).mean()


def uniform_adversarial_loss(head_logits: torch.Tensor) -> torch.Tensor:
    """L_adv^u = -(1/K) sum_k log q(k | z_l): CE of the head's output against uniform."""
    return -F.log_softmax(head_logits, dim=1).mean(1).mean()


def sample_latent(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps (the reparameterization trick)."""
    return mu + torch.randn_like(mu) * (0.5 * log_var).exp()


class DRDFLLearner(Learner):
    OPTIONS = DRDFLOptions
    PRIVATE = ("persona", "decoder", "classifier", "adversary")

    def setup(self) -> None:
        opts, input_shape, num_classes = (
            self.opts,
            self.input_shape,
            self.num_classes,
        )
        with self.common_init("learngene"):
            # Every node starts from the same Learngene and the same class prior, so that
            # merging received ones combines like with like from round one (the private
            # modules differ per node, and from the Learngene: another stream).
            self.learngene = Learngene(input_shape, opts.learngene_dim)
            self.stats = ClassStatistics(num_classes, opts.persona_dim)
        self.persona = PersonaNet(input_shape, opts.persona_dim)
        self.decoder = Decoder(input_shape, opts.persona_dim + opts.learngene_dim)
        self.classifier = self.new_classifier()
        self.adversary = AdversarialHead(opts.learngene_dim, num_classes)
        for module in (
            self.learngene,
            self.persona,
            self.stats,
            self.decoder,
            self.classifier,
            self.adversary,
        ):
            module.to(self.device)
        self.main_opt = self.new_optimizer(self.main_parameters())
        self.adversary_opt = self.new_optimizer(self.adversary.parameters())

    def main_parameters(self) -> list[nn.Parameter]:
        """Everything the min step updates: all modules but the adversarial head.

        One Adam over all of them is the same as one Adam per block, because each
        loss term below reaches only its own block's parameters (per-block mode)."""
        modules = (self.learngene, self.persona, self.stats, self.decoder, self.classifier)
        return [p for m in modules for p in m.parameters()]

    # -- communication -------------------------------------------------------------
    def shared_modules(self) -> dict[str, nn.Module]:
        """The modules that travel, by payload prefix, all merged by ``learngene-merge``
        (an extension may share more than the Learngene: see drdfl_vf)."""
        return {"learngene": self.learngene}

    def shared_payload(self) -> Tensors:
        payload = {
            f"{prefix}.{k}": v
            for prefix, module in self.shared_modules().items()
            for k, v in module.state_dict().items()
        }
        payload["stats.mu"] = self.stats.mu.detach()
        payload["stats.var"] = self.stats.variance().detach()
        return {k: v.detach().cpu().clone() for k, v in payload.items()}

    def received_mean(self, incoming: Sequence[Incoming]) -> dict[str, torch.Tensor]:
        """Every payload checked (keys, shapes, finite, bounded, positive variances), then
        their mean: several in-neighbours (other topologies) are averaged, as the paper's
        fully-connected and dynamic variants average what they receive."""
        expected = self.shared_payload()
        for item in incoming:
            check_payload(item.tensors, expected)
            if (item.tensors["stats.var"] <= 0).any():
                # the EMA would pull every class variance to the clamp floor
                raise PayloadError("payload 'stats.var' holds non-positive variances")
        return {
            k: torch.stack([i.tensors[k].float() for i in incoming]).mean(0).to(self.device)
            for k in expected
        }

    def load_shared(self, received: dict[str, torch.Tensor], own_weight: float) -> None:
        """Each shared module merged with its received state (:meth:`merge_module`)."""
        for prefix, module in self.shared_modules().items():
            state = {
                k.removeprefix(f"{prefix}."): v
                for k, v in received.items()
                if k.startswith(f"{prefix}.")
            }
            self.merge_module(prefix, module, state, own_weight)

    def merge_module(
        self, prefix: str, module: nn.Module, state: dict[str, torch.Tensor], own_weight: float
    ) -> None:
        """module <- own_weight * own + (1 - own_weight) * received (an extension may merge
        one of its modules by another rule)."""
        if own_weight:
            own = module.state_dict()
            state = {k: own_weight * own[k] + (1 - own_weight) * v for k, v in state.items()}
        module.load_state_dict(state)

    def absorb(self, incoming: Sequence[Incoming]) -> None:
        """Algorithm 1 line 8 (peers): merge the Learngene, pull the class statistics
        toward the received ones by EMA. Algorithm 3 line 4 (the hub's |D_m|-weighted
        mean): phi_m <- phi~, (mu_k, Sigma_k) <- (mu~_k, Sigma~_k), set, not pulled. Priors
        fixed after joining late stay as they are either way."""
        if not incoming:
            return
        received = self.received_mean(incoming)
        from_hub = incoming[0].from_hub
        merge = "replace" if from_hub else self.opts.learngene_merge
        own_weight = {"replace": 0.0, "average": 0.5, "ema": self.opts.learngene_ema_alpha}[merge]
        self.load_shared(received, own_weight)
        if self.stats.frozen:
            return
        if from_hub:
            self.stats.set_to(received["stats.mu"], received["stats.var"])
        else:
            self.stats.ema_toward(received["stats.mu"], received["stats.var"], self.opts.ema_alpha)

    def join(self, incoming: Sequence[Incoming]) -> None:
        """Algorithm 2: phi <- received phi, (mu_k, Sigma_k) <- received, the private
        modules stay as initialized (random), priors fixed for ``join-frozen-rounds``."""
        if self.opts.late_join == "absorb" or not incoming:
            self.absorb(incoming)
            return
        received = self.received_mean(incoming)
        self.load_shared(received, own_weight=0.0)
        self.stats.set_to(received["stats.mu"], received["stats.var"])
        self.stats.frozen_rounds.fill_(self.opts.join_frozen_rounds)
        log(
            INFO,
            "partition %d joins a running ring (Algorithm 2): received Learngene and class "
            "statistics, priors fixed for %d rounds",
            self.partition_id,
            self.opts.join_frozen_rounds,
        )

    # -- training --------------------------------------------------------------------
    def adversary_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Max step: the head learns to predict y from a z_l it cannot change."""
        with torch.no_grad():
            z_l = sample_latent(*self.learngene(x))
        loss = F.cross_entropy(self.adversary(z_l), y)
        self.adversary_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.adversary_opt.step()
        return loss.item()

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """All min-step losses for one batch, each reaching only the blocks it trains."""
        ablation = self.opts.ablation
        z_p = self.persona(x)
        mu, log_var = self.learngene(x)
        z_l = sample_latent(mu, log_var)
        parts: dict[str, torch.Tensor] = {}
        if ablation != "no-pr":
            parts["l_cls"], parts["l_log"] = gaussian_mixture_losses(self.stats, z_p, y)
        if ablation != "no-gl":
            parts["l_kl"] = kl_to_standard_normal(mu, log_var)
            parts["l_adv_u"] = uniform_adversarial_loss(self.adversary(z_l))
        decoder_z_p = z_p.detach() if self.opts.training == "per-block" else z_p
        x_rec = self.decoder(torch.cat([decoder_z_p, z_l], dim=1))
        parts["l_rec"] = reconstruction_loss(x_rec, x)
        parts.update(self.extra_losses(x, y, z_l))
        noise = torch.randn_like(x_rec) * math.sqrt(self.opts.noise_variance)
        x_noisy = x_rec.detach() + noise
        with running_stats_frozen(self.classifier):  # real images set the statistics
            l_noisy = F.cross_entropy(self.classifier(x_noisy), y)
        parts["l_ce"] = F.cross_entropy(self.classifier(x), y) + l_noisy
        return parts

    def extra_losses(
        self, x: torch.Tensor, y: torch.Tensor, z_l: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss terms an extension adds to the min step, given the batch's z_l sample
        (none in the paper's method)."""
        return {}

    def main_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Min step: every module but the head descends its losses."""
        parts = self.losses(x, y)
        total = sum(parts.values())
        self.main_opt.zero_grad(set_to_none=True)
        total.backward()
        if self.stats.frozen:  # Algorithm 2: fixed priors (Adam skips a None gradient)
            for parameter in self.stats.parameters():
                parameter.grad = None
        self.main_opt.step()
        self.adversary.zero_grad(set_to_none=True)  # the head's grads from L_adv^u are unused
        return {k: v.item() for k, v in parts.items()}

    def set_training(self, training: bool) -> None:
        for module in self.modules().values():
            if isinstance(module, nn.Module):
                module.train(training)

    def train_round(self, data: ClientData) -> dict[str, float]:
        self.set_training(True)
        losses = LossMeans()
        for x, y in self.batches(data, self.round_generator()):
            losses.add({"l_adv": self.adversary_step(x, y), **self.main_step(x, y)})
        metrics = losses.means()
        metrics["priors_frozen"] = float(self.stats.frozen)
        if self.stats.frozen:
            self.stats.frozen_rounds -= 1
        return metrics

    # -- health ------------------------------------------------------------------------
    @torch.no_grad()
    def health(self, data: ClientData) -> dict[str, float]:
        """Does the shared Learngene carry information, and is it class-invariant?

        Measured on the first ``PROBE_SIZE`` training samples with fixed noise:
        ``health_zl_kl_per_dim`` (KL(q(z_l|x) || N(0, I)) per dimension; ~0 means q
        ignores x), ``health_rec_gap_zl`` (relative increase of the reconstruction error
        when z_l is replaced by prior samples; ~0 means the decoder ignores z_l),
        ``health_adv_acc`` beside ``health_majority_rate`` (the head reading labels from
        z_l no better than always guessing the node's most common class is the aim).
        """
        x = data.x_train[:PROBE_SIZE].to(self.device)
        y = data.y_train[:PROBE_SIZE].to(self.device)
        if len(y) == 0:
            return {}
        self.set_training(False)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        mu, log_var = self.learngene(x)
        z_p = self.persona(x)
        prior = torch.randn(mu.shape, generator=gen, device=self.device)
        err_real = reconstruction_loss(self.decoder(torch.cat([z_p, mu], 1)), x).item()
        err_prior = reconstruction_loss(self.decoder(torch.cat([z_p, prior], 1)), x).item()
        z_l = mu + torch.randn(mu.shape, generator=gen, device=self.device) * (0.5 * log_var).exp()
        adv_acc = (self.adversary(z_l).argmax(1) == y).float().mean().item()
        majority = torch.bincount(y, minlength=self.num_classes).max().item() / len(y)
        kl_per_dim = kl_to_standard_normal(mu, log_var).item() / mu.shape[1]
        rec_gap = (err_prior - err_real) / max(err_real, 1e-12)
        self.set_training(True)
        # KL ~ 0 implies a gap ~ 0 (q(z_l|x) is then the prior), so the gap decides.
        unused = rec_gap < ZL_MIN_REC_GAP and self.rounds_trained >= ZL_WARMUP_ROUNDS
        if unused:
            log(
                WARNING,
                "partition %d: DRDFL z_l looks unused (KL %.4f nats/dim, reconstruction "
                "gap %.2f%%); the shared Learngene carries no information",
                self.partition_id,
                kl_per_dim,
                100 * rec_gap,
            )
        return {
            "health_zl_kl_per_dim": kl_per_dim,
            "health_rec_gap_zl": rec_gap,
            "health_rec_err": err_real,
            "health_adv_acc": adv_acc,
            "health_majority_rate": majority,
            "alarm_zl_unused": float(unused),
        }


SPEC = MethodSpec(
    name="drdfl",
    title="DRDFL",
    sends="Learngene encoder + per-class Gaussian statistics (mean, variance)",
    keeps="PersonaNet, decoder, classifier (and the adversarial head)",
    personalized="PersonaNet + decoder + classifier",
    learner=DRDFLLearner,
)
