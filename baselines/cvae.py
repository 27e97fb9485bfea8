"""Fedcvae: the DRDFL authors' CVAE baseline for decentralized learning on the ring (paper
001, App. B.1.3, B.1.1, Table 1; SPEC-ADDENDUM section 9).

What the paper states: each client trains, on its private data, "a pretrained model
g_phi used to obtain the prior distribution", a conditional VAE f_w (Sohn et al. 2015)
with encoder E_phi and decoder D_theta (w = [phi, theta]) and a classifier C_w;
collaboration is "using the pretrained model as the shared interaction information";
the DFL baselines run on a directed ring. Everything else is open; our choices:

* **Modules.** Encoder E_phi(x, y) -> q(z | x, y) = N(mu, diag exp(log_var)): DRDFL's
  Learngene trunk (:func:`drdfl_flwr.models.vae._trunk`) whose features are concatenated
  with the one-hot label before the linear layer that gives (mu, log_var). Decoder
  D_theta(z, y) -> x: DRDFL's :class:`~drdfl_flwr.models.vae.Decoder` fed [z, one-hot y].
  Classifier C: the run's classifier (``self.new_classifier()``), used for prediction.
* **g_phi = the CVAE encoder.** The paper writes phi for both g and the encoder; we read
  them as one module. The encoder defines the latent space whose prior N(0, I) every
  client's decoder is trained against (KL(q(z|x,y) || N(0, I))), so it is the part that
  "obtains the prior" and the one worth sharing. Only its parameters leave the node
  (``encoder.*`` entries); the decoder and the classifier are private (Table 1's
  "personalised part: full model" fits: each node keeps a full model of its own).
  Every node starts from the same encoder (drawn from the run seed), so that averaging
  combines like with like from the first round.
* **Merge on receipt** (``cvae.merge``): ``average`` (default) sets the encoder to the
  uniform mean of the node's own encoder and every received one (on the ring: one
  received, so (own + received) / 2); ``replace`` loads the received encoder (the mean of
  the received ones if several arrive). A hub aggregate is refused: this baseline is
  decentralized (``reducer=None``).
* **How C uses the CVAE: generated samples.** Per batch the classifier descends
  CE(C(x), y) + ``generated-weight`` * CE(C(D(z, y_g)), y_g) with z ~ N(0, I) and y_g
  drawn from the node's own training-label distribution (as many as the real batch):
  the decoder is private and has only learnt the node's own classes. The generated
  images are produced without gradient, so the classifier loss never trains the decoder.
* **CVAE loss**: the negative ELBO, L_rec + L_kl, with L_rec = ||x - x'||^2 summed over the
  pixels of each sample (averaged over the batch) as in DRDFL (a mean over pixels would
  weigh the reconstruction thousands of times less than the KL and collapse the encoder).
* **Training**: "until convergence" in the paper; here ``local-epochs`` epochs per round
  like every method. One Adam at ``learning-rate`` over encoder, decoder and classifier
  (the CVAE loss reaches only encoder and decoder, the classifier loss only the
  classifier, so this equals one Adam per block).
  All sampling (reparameterization noise, z, y_g) uses a generator seeded per
  (seed, node, round), so a run repeats exactly and a restored state continues identically.
* **Paper setting vs here**: ResNet-18 classifier and 63.44 M communicated parameters in
  the paper (Table 1) cannot be matched without knowing its g_phi; here the payload is the
  small encoder (0.20 M parameters at 32x32x3 with ``latent-dim = 16``, 0.08 M on 8x8 digits).

Health, every round, on up to 512 training samples with z = mu: ``health_rec_loss``
(the summed reconstruction error; should fall over rounds) and ``health_kl_per_dim``
(KL(q(z|x,y) || N(0, I)) per latent dimension; ~0 means the encoder carries nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from drdfl_flwr.config import MethodOptions
from drdfl_flwr.data import ClientData
from drdfl_flwr.learner import Learner, LossMeans
from drdfl_flwr.methods.drdfl import kl_to_standard_normal, reconstruction_loss
from drdfl_flwr.models.norm import running_stats_frozen
from drdfl_flwr.models.vae import Decoder, _trunk
from drdfl_flwr.payload import Incoming, Tensors, check_payload
from drdfl_flwr.spec import MethodSpec

MERGES = ("average", "replace")
PREFIX = "encoder."  # payload keys: the encoder's state entries under this prefix
PROBE_SIZE = 512  # training samples the health metrics are measured on


@dataclass(frozen=True)
class CVAEOptions(MethodOptions):
    """Section ``[cvae]``: latent size, how a received encoder is merged, and the weight
    of the classifier's loss on generated samples."""

    SECTION: ClassVar[str] = "cvae"
    latent_dim: int = 16
    merge: str = "average"
    generated_weight: float = 1.0

    def __post_init__(self) -> None:
        self.check_positive("latent-dim")
        self.check_choice("merge", MERGES)
        self.check_non_negative("generated-weight")


class ConditionalEncoder(nn.Module):
    """E_phi(x, y) -> (mu, log_var) of q(z | x, y): the shared g_phi."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, latent_dim: int):
        super().__init__()
        c, h, w = input_shape
        self.trunk = _trunk(c)
        self.moments = nn.Linear(64 * (h // 4) * (w // 4) + num_classes, 2 * latent_dim)

    def forward(self, x: torch.Tensor, y_onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_var = self.moments(torch.cat([self.trunk(x), y_onehot], dim=1)).chunk(2, dim=1)
        return mu, log_var.clamp(-10.0, 10.0)


class CVAELearner(Learner):
    OPTIONS = CVAEOptions
    PRIVATE = ("decoder", "classifier")

    def setup(self) -> None:
        opts = self.opts
        with self.common_init("encoder"):
            # The shared encoder starts identical on every node (private modules differ).
            self.encoder = ConditionalEncoder(self.input_shape, self.num_classes, opts.latent_dim)
        self.decoder = Decoder(self.input_shape, opts.latent_dim + self.num_classes)
        self.classifier = self.new_classifier()
        self.encoder.to(self.device)
        self.decoder.to(self.device)
        parameters = [
            p for m in (self.encoder, self.decoder, self.classifier) for p in m.parameters()
        ]
        self.optimizer = self.new_optimizer(parameters)

    # -- communication -------------------------------------------------------------------
    def shared_payload(self) -> Tensors:
        return {PREFIX + k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()}

    def absorb(self, incoming: Sequence[Incoming]) -> None:
        """Merge the received encoder(s) into the own one (``cvae.merge``); everything is
        validated first, so a bad payload changes nothing."""
        if not incoming:
            return
        expected = self.shared_payload()
        for item in incoming:
            check_payload(item.tensors, expected)
        own = self.encoder.state_dict()
        merged = {}
        for key, value in own.items():
            received = [
                item.tensors[PREFIX + key].to(value.device, value.dtype) for item in incoming
            ]
            stack = received if self.opts.merge == "replace" else [value, *received]
            merged[key] = torch.stack(stack).mean(0)
        self.encoder.load_state_dict(merged)

    # -- the CVAE and its use by the classifier -------------------------------------------
    def one_hot(self, y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, self.num_classes).float()

    def cvae_losses(
        self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_rec, L_kl) of one batch: the negative ELBO's two terms."""
        onehot = self.one_hot(y)
        mu, log_var = self.encoder(x, onehot)
        eps = torch.randn(mu.shape, generator=gen, device=mu.device)
        z = mu + eps * (0.5 * log_var).exp()
        x_rec = self.decoder(torch.cat([z, onehot], dim=1))
        return reconstruction_loss(x_rec, x), kl_to_standard_normal(mu, log_var)

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """D_theta(z, y) for z ~ N(0, I): one image per requested label, without gradient."""
        z = torch.randn((len(labels), self.opts.latent_dim), generator=gen, device=self.device)
        return self.decoder(torch.cat([z, self.one_hot(labels.to(self.device))], dim=1))

    def sample_labels(self, counts: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
        """n labels drawn from the node's own label distribution (``counts`` per class)."""
        return torch.multinomial(counts, n, replacement=True, generator=gen)

    def classifier_losses(
        self, x: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE on the real batch, CE on as many generated samples); the generated images
        carry no gradient, so these losses train the classifier only."""
        l_ce = F.cross_entropy(self.classifier(x), y)
        if self.opts.generated_weight == 0:
            return l_ce, torch.zeros((), device=x.device)
        y_gen = self.sample_labels(counts, len(y), gen)
        x_gen = self.generate(y_gen, gen)
        with running_stats_frozen(self.classifier):  # real images set the statistics
            return l_ce, F.cross_entropy(self.classifier(x_gen), y_gen)

    def set_training(self, training: bool) -> None:
        for module in (self.encoder, self.decoder, self.classifier):
            module.train(training)

    def noise_generator(self) -> torch.Generator:
        """The round's generator for every random draw but the batch order."""
        seed = int(torch.randint(2**62, (1,), generator=self.round_generator()))
        return torch.Generator(device=self.device).manual_seed(seed + 1)

    def train_round(self, data: ClientData) -> dict[str, float]:
        self.set_training(True)
        gen = self.noise_generator()
        counts = torch.bincount(data.y_train, minlength=self.num_classes).float().to(self.device)
        losses = LossMeans()
        for x, y in self.batches(data, self.round_generator()):
            l_rec, l_kl = self.cvae_losses(x, y, gen)
            l_ce, l_ce_gen = self.classifier_losses(x, y, counts, gen)
            loss = l_rec + l_kl + l_ce + self.opts.generated_weight * l_ce_gen
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            parts = {"l_rec": l_rec, "l_kl": l_kl, "l_ce": l_ce, "l_ce_gen": l_ce_gen}
            losses.add({k: v.item() for k, v in parts.items()})
        metrics = losses.means()
        metrics["local_steps"] = float(losses.steps)
        return metrics

    @torch.no_grad()
    def health(self, data: ClientData) -> dict[str, float]:
        """``health_rec_loss``: summed reconstruction error with z = mu (falls as the CVAE
        learns); ``health_kl_per_dim``: KL(q(z|x,y) || N(0, I)) per latent dimension (~0:
        the shared encoder carries nothing about x)."""
        x = data.x_train[:PROBE_SIZE].to(self.device)
        y = data.y_train[:PROBE_SIZE].to(self.device)
        if len(y) == 0:
            return {}
        self.set_training(False)
        onehot = self.one_hot(y)
        mu, log_var = self.encoder(x, onehot)
        rec = reconstruction_loss(self.decoder(torch.cat([mu, onehot], dim=1)), x).item()
        kl_per_dim = kl_to_standard_normal(mu, log_var).item() / mu.shape[1]
        self.set_training(True)
        return {"health_rec_loss": rec, "health_kl_per_dim": kl_per_dim}


SPEC = MethodSpec(
    name="cvae",
    title="CVAE",
    sends="the CVAE encoder",
    keeps="CVAE decoder, classifier",
    personalized="decoder + classifier (encoder shared)",
    learner=CVAELearner,
)
