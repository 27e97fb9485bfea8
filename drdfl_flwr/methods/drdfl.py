"""DRDFL (paper 001, section 4, Algorithm 1): Learngene + PersonaNet + noisy reconstruction.

Per mini-batch, two explicit steps make the adversarial min-max visible:

1. *max step* (adversarial head only): the head learns to read y from a detached z_l,
   minimizing L_adv = CE(head(z_l), y).
2. *min step* (everything else): the Learngene minimizes L_kl + L_adv^u, the cross-entropy
   of the head's output against the uniform distribution (the head's own weights are
   not stepped here); PersonaNet and the class statistics minimize
   L_PR = L_cls + L_log; the decoder, with both encoders, minimizes L_rec; the classifier
   minimizes L_ce on the real batch and on the detached noisy reconstruction x' + n.

Deviation from the paper's text, on purpose: the paper lists L_GL = L_kl + L_adv + L_adv^u
as the Learngene's loss. Minimizing L_adv with respect to the Learngene would help the
head read labels, the opposite of the stated aim (class-invariant z_l), so L_adv trains
only the head and the Learngene sees only the uniform term. See README "Deviations".

Shared each round: the Learngene's parameters and the class statistics (mu_k, diag
Sigma_k). On receipt the Learngene is averaged with (paper text) or replaced by
(Algorithm 1, line 8) the received one, and the statistics move toward the received
ones by EMA with weight ``ema-alpha`` on the local value (lines 5-7).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from drdfl_flwr.data import ClientData
from drdfl_flwr.learner import Learner
from drdfl_flwr.models import build_classifier
from drdfl_flwr.models.vae import AdversarialHead, Decoder, Learngene, PersonaNet
from drdfl_flwr.payload import Tensors, check_payload

LOG_VAR_RANGE = (-6.0, 6.0)


class ClassStatistics(nn.Module):
    """Per-class Gaussians N(mu_k, diag exp(log_var_k)) of the PersonaNet code z_p.

    Trained by gradient (Algorithm 1, line 11) and pulled toward received statistics by
    EMA. Variances are stored as log-variances so gradient steps keep them positive.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.randn(num_classes, dim))
        self.log_var = nn.Parameter(torch.zeros(num_classes, dim))

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
    def ema_toward(self, mu: torch.Tensor, variance: torch.Tensor, alpha: float) -> None:
        """mu <- alpha mu + (1 - alpha) mu~ ; Sigma <- alpha Sigma + (1 - alpha) Sigma~."""
        self.mu.mul_(alpha).add_((1 - alpha) * mu)
        new_var = alpha * self.variance() + (1 - alpha) * variance
        self.log_var.copy_(new_var.clamp_min(1e-8).log())


def gaussian_mixture_losses(
    stats: ClassStatistics, z_p: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_cls (CE of the mixture posterior p(y|z_p), uniform p(k)) and L_log (-log N(z_p; y))."""
    log_density = stats.log_density(z_p)
    l_cls = F.cross_entropy(log_density, y)  # uniform p(k) cancels in the posterior
    l_log = -log_density.gather(1, y[:, None]).mean() / z_p.shape[1]
    return l_cls, l_log


def kl_to_standard_normal(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(log_var)) || N(0, I)), averaged over the batch."""
    return 0.5 * (mu.pow(2) + log_var.exp() - 1.0 - log_var).sum(1).mean()


def uniform_adversarial_loss(head_logits: torch.Tensor) -> torch.Tensor:
    """L_adv^u = -(1/K) sum_k log q(k | z_l): CE of the head's output against uniform."""
    return -F.log_softmax(head_logits, dim=1).mean(1).mean()


class DRDFLLearner(Learner):
    def setup(self) -> None:
        cfg, input_shape, num_classes = self.cfg, self.input_shape, self.num_classes
        with torch.random.fork_rng():
            # Every node starts from the same Learngene, so that averaging received
            # Learngenes is meaningful from round one (private modules differ per node).
            torch.manual_seed(cfg.seed)
            self.learngene = Learngene(input_shape, cfg.learngene_dim)
        self.persona = PersonaNet(input_shape, cfg.persona_dim)
        self.stats = ClassStatistics(num_classes, cfg.persona_dim)
        self.decoder = Decoder(input_shape, cfg.persona_dim + cfg.learngene_dim)
        self.classifier = build_classifier(cfg.classifier, input_shape, num_classes)
        self.adversary = AdversarialHead(cfg.learngene_dim, num_classes)
        for module in (
            self.learngene,
            self.persona,
            self.stats,
            self.decoder,
            self.classifier,
            self.adversary,
        ):
            module.to(self.device)
        self.main_opt = torch.optim.Adam(self.main_parameters(), lr=cfg.learning_rate)
        self.adversary_opt = torch.optim.Adam(self.adversary.parameters(), lr=cfg.learning_rate)

    def main_parameters(self) -> list[nn.Parameter]:
        """Everything the min step updates: all modules but the adversarial head."""
        modules = (self.learngene, self.persona, self.stats, self.decoder, self.classifier)
        return [p for m in modules for p in m.parameters()]

    # -- communication -------------------------------------------------------------
    def shared_payload(self) -> Tensors:
        payload = {f"learngene.{k}": v for k, v in self.learngene.state_dict().items()}
        payload["stats.mu"] = self.stats.mu.detach()
        payload["stats.var"] = self.stats.variance().detach()
        return {k: v.detach().cpu().clone() for k, v in payload.items()}

    def absorb(self, payloads: Sequence[Tensors]) -> None:
        if not payloads:
            return
        expected = self.shared_payload()
        for payload in payloads:
            check_payload(payload, expected)
        # Several in-neighbours (other topologies): use their mean, as the paper's
        # fully-connected and dynamic variants average what they receive.
        received = {k: torch.stack([p[k].float() for p in payloads]).mean(0) for k in expected}
        learngene = {
            k.removeprefix("learngene."): v.to(self.device)
            for k, v in received.items()
            if k.startswith("learngene.")
        }
        if self.cfg.learngene_merge == "average":
            own = self.learngene.state_dict()
            learngene = {k: 0.5 * (own[k] + v) for k, v in learngene.items()}
        self.learngene.load_state_dict(learngene)
        self.stats.ema_toward(
            received["stats.mu"].to(self.device),
            received["stats.var"].to(self.device),
            self.cfg.ema_alpha,
        )

    # -- training --------------------------------------------------------------------
    def adversary_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Max step: the head learns to predict y from a z_l it cannot change."""
        with torch.no_grad():
            mu, log_var = self.learngene(x)
            z_l = mu + torch.randn_like(mu) * (0.5 * log_var).exp()
        loss = F.cross_entropy(self.adversary(z_l), y)
        self.adversary_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.adversary_opt.step()
        return loss.item()

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """All min-step losses for one batch (each is differentiable)."""
        z_p = self.persona(x)
        l_cls, l_log = gaussian_mixture_losses(self.stats, z_p, y)
        mu, log_var = self.learngene(x)
        z_l = mu + torch.randn_like(mu) * (0.5 * log_var).exp()
        l_kl = kl_to_standard_normal(mu, log_var)
        l_adv_u = uniform_adversarial_loss(self.adversary(z_l))
        x_rec = self.decoder(torch.cat([z_p, z_l], dim=1))
        l_rec = F.mse_loss(x_rec, x)
        noise = torch.randn_like(x_rec) * math.sqrt(self.cfg.noise_variance)
        x_noisy = x_rec.detach() + noise
        l_ce = F.cross_entropy(self.classifier(x), y) + F.cross_entropy(self.classifier(x_noisy), y)
        return {
            "l_cls": l_cls,
            "l_log": l_log,
            "l_kl": l_kl,
            "l_adv_u": l_adv_u,
            "l_rec": l_rec,
            "l_ce": l_ce,
        }

    def main_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Min step: every module but the head descends its losses."""
        parts = self.losses(x, y)
        total = sum(parts.values())
        self.main_opt.zero_grad(set_to_none=True)
        total.backward()
        self.main_opt.step()
        self.adversary.zero_grad(set_to_none=True)  # the head's grads from L_adv^u are unused
        return {k: v.item() for k, v in parts.items()}

    def fit(self, data: ClientData) -> dict[str, float]:
        for module in self.modules().values():
            if isinstance(module, nn.Module):
                module.train()
        sums: dict[str, float] = {}
        steps = 0
        for x, y in self.batches(data, self.round_generator()):
            sums["l_adv"] = sums.get("l_adv", 0.0) + self.adversary_step(x, y)
            for k, v in self.main_step(x, y).items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
        self.rounds_trained += 1
        return {k: v / max(steps, 1) for k, v in sums.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.classifier.eval()
        return self.classifier(x)
