"""DFML (paper 002, Khalil et al. 2024): decentralized federated mutual learning.

Every node owns one classifier whose architecture may differ from its neighbours'
(``architectures`` in the run config, cycled over partition ids). Each round a node

1. *absorbs* the models its in-neighbours sent (validated first; each payload names its
   architecture by ``arch_id``, so a ResNet-8 node can host a ResNet-18 peer),
2. runs *mutual learning* on its own training data between its own model and every
   received model: model i minimizes

       L_i = (1 - a) * L_WSM(f_i(x), y) + a * mean_{j != i} KL(p_j || p_i),

   with p_j = softmax(f_j(x)) detached (deep mutual learning: each model is a student of
   the others' current predictions). Knowledge crosses architectures through logits
   only, never through weights. With no peer, the loss is L_WSM alone.
3. *sends its own model* to its out-neighbours (``dfml-share = "own"``, the default).

L_WSM is the re-weighted softmax cross-entropy of Legate et al. (2023) that DFML adopts:
the softmax is weighted by the local class proportions beta_k = n_k / n,
``p(y | x) = beta_y exp(z_y) / sum_k beta_k exp(z_k)``, i.e. ``log beta`` is added to the
logits, so a class absent from the local data (beta_k = 0) is masked out of the
normalizer and its logit gets no gradient from the supervised term: local labels can
no longer push down the classes this node never sees, which is the forgetting DFML
wants to avoid. The KL term uses the plain softmax, so absent classes still learn from
the peers.

``a`` follows a cyclic schedule over rounds (:func:`cyclic_alpha`): within each period
of ``dfml-period`` rounds it rises along a half cosine from ``dfml-alpha-min`` (mostly
supervision) to ``dfml-alpha-max`` (mostly distillation) and then restarts. As in the
paper, a *peak model* is kept per node: a snapshot of the node's own model taken at the
end of every round in which ``a`` reached ``dfml-alpha-max`` (the last round of each
period), where DFML's global accuracy peaks. The selection is by the schedule alone, not
by any accuracy, so no test or held-out data is looked at. :meth:`predict` uses the
current model (``dfml.predict = "current"``, default: every method of a table is scored
on the model its last local round produced) or the latest peak model
(``dfml.predict = "peak"``, the paper's reading; the current model before the first
peak). Whichever predicts, the peak model's Local-T and Global-T are reported too, as
``peak_local_t_acc`` / ``peak_global_t_acc``: a second, named metric, never the table's.

Mapping the paper onto a relay topology. In the paper a random aggregator receives the
anchors' models, runs mutual learning on its data and returns each updated model to its
owner. On a ring a node cannot answer its predecessor, so each node acts as the
aggregator of the models it receives and sends its own (updated) model on. The received
models are kept in :attr:`peers` (an ``nn.ModuleDict``, part of the private state)
until the next payload replaces them: a round with no payload mutual-learns with the
peers kept from before. With ``dfml-share = "own"`` (default) the received models are
teachers only: a node cannot return them to their owner, so training them would be work
thrown away. With ``dfml-share = "received"`` the node passes on the model it received
from its first in-neighbour (lowest ring position) after training it as a second
student, so models travel along the ring and are trained on every node's data in turn,
closer to the paper's "model goes out, comes back improved"; other received models
teach only.

Payload: ``arch_id`` (int64, shape (1,), an index into :data:`ARCHITECTURES`) and the
model's full ``state_dict`` under ``model.<key>`` (BatchNorm statistics included).
Optimizers of received models are not transmitted; a fresh one is made each round.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from drdfl_flwr.config import DENSE_CLASSIFIERS, MethodOptions, RunConfig
from drdfl_flwr.data import ClientData
from drdfl_flwr.learner import Learner, LossMeans
from drdfl_flwr.models import build_classifier
from drdfl_flwr.payload import Incoming, PayloadError, Tensors, check_payload
from drdfl_flwr.scoring import class_proportions
from drdfl_flwr.spec import MethodSpec

SHARES = ("own", "received")
PREDICTS = ("peak", "current")


@dataclass(frozen=True)
class DFMLOptions(MethodOptions):
    """Section ``[dfml]``: the cyclic distillation schedule, what travels, what predicts,
    and the per-node architectures (comma-separated, cycled over partition ids)."""

    SECTION: ClassVar[str] = "dfml"
    architectures: str = ""
    period: int = 4
    alpha_min: float = 0.0
    alpha_max: float = 0.8
    share: str = "own"
    predict: str = "current"

    def __post_init__(self) -> None:
        self.check_positive("period")
        self.check_unit("alpha-min", "alpha-max")
        if self.alpha_min > self.alpha_max:
            self.fail("alpha-min", f"must not exceed dfml.alpha-max ({self.alpha_max})")
        self.check_choice("share", SHARES)
        self.check_choice("predict", PREDICTS)
        for name in self.architecture_list():
            if name not in DENSE_CLASSIFIERS:
                self.fail("architectures", f"{name!r} is not one of {', '.join(DENSE_CLASSIFIERS)}")

    def architecture_list(self) -> list[str]:
        """``architectures`` split on commas (empty: every node uses ``classifier``)."""
        return [a.strip() for a in self.architectures.split(",") if a.strip()]


# arch_id -> name. The order is part of the wire format: append, never reorder.
ARCHITECTURES: tuple[str, ...] = ("small-cnn", "resnet8", "resnet18")
assert set(ARCHITECTURES) == set(DENSE_CLASSIFIERS), "every dense classifier needs an arch_id"

# (arch, input_shape, num_classes) -> expected payload (meta tensors: shapes and dtypes only)
_TEMPLATES: dict[tuple[str, tuple[int, int, int], int], Tensors] = {}


def cyclic_alpha(round: int, period: int, a_min: float, a_max: float) -> float:
    """Distillation weight of round ``round`` (0-based).

    Within each period it rises along a half cosine from ``a_min`` (first round of the
    period) to exactly ``a_max`` (last round), then restarts at ``a_min``. A period of 1
    gives ``a_max`` every round.
    """
    if period < 1:
        raise ValueError(f"period must be >= 1, got {period}")
    if not 0.0 <= a_min <= a_max <= 1.0:
        raise ValueError(f"need 0 <= a_min <= a_max <= 1, got a_min={a_min}, a_max={a_max}")
    if round < 0:
        raise ValueError(f"round must be >= 0, got {round}")
    if period == 1:
        return float(a_max)
    phase = (round % period) / (period - 1)
    return float(a_min + (a_max - a_min) * 0.5 * (1.0 - math.cos(math.pi * phase)))


def is_peak_round(round: int, period: int) -> bool:
    """True for the last round of each period, where :func:`cyclic_alpha` is ``a_max``."""
    return round % period == period - 1


def wsm_cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, proportions: torch.Tensor
) -> torch.Tensor:
    """Re-weighted softmax cross-entropy: CE of ``logits + log beta``.

    Classes with beta_k = 0 are masked (-inf) so they leave the normalizer and get no
    gradient; every label in ``y`` must have beta_y > 0 (it does when beta comes from the
    same local data).
    """
    log_beta = torch.log(proportions.to(logits.device, logits.dtype))  # -inf where absent
    return F.cross_entropy(logits + log_beta, y)


def kl_to_peers(logits: torch.Tensor, peer_log_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean_j KL(p_j || p) with p = softmax(logits); the peers' ``log p_j`` are targets."""
    log_p = F.log_softmax(logits, dim=1)
    terms = [
        F.kl_div(log_p, target.detach(), log_target=True, reduction="batchmean")
        for target in peer_log_probs
    ]
    return torch.stack(terms).mean()


def node_architecture(cfg: RunConfig, partition_id: int) -> str:
    """The node's architecture: ``architectures`` cycled over partition ids, or ``classifier``."""
    names = cfg.options(DFMLOptions).architecture_list() or [cfg.classifier]
    return names[partition_id % len(names)]


def payload_template(arch: str, input_shape: tuple[int, int, int], num_classes: int) -> Tensors:
    """Keys, shapes and dtypes of an ``arch`` payload (meta tensors, cached)."""
    key = (arch, tuple(input_shape), num_classes)
    if key not in _TEMPLATES:
        with torch.random.fork_rng():  # building must not move the training RNG
            state = build_classifier(arch, input_shape, num_classes).state_dict()
        template = {
            f"model.{k}": torch.empty(v.shape, dtype=v.dtype, device="meta")
            for k, v in state.items()
        }
        template["arch_id"] = torch.empty(1, dtype=torch.int64, device="meta")
        _TEMPLATES[key] = template
    return _TEMPLATES[key]


class DFMLLearner(Learner):
    OPTIONS = DFMLOptions
    PRIVATE = ("peers",)  # the received models teach here and are never passed back

    def setup(self) -> None:
        cfg, input_shape, num_classes = self.cfg, self.input_shape, self.num_classes
        partition_id = self.partition_id
        self.period = self.opts.period
        self.alpha_min = self.opts.alpha_min
        self.alpha_max = self.opts.alpha_max
        self.share = self.opts.share
        self.predict_with = self.opts.predict
        self.arch = node_architecture(cfg, partition_id)
        with self.common_init(self.arch):  # nodes of one architecture start alike
            self.model = build_classifier(self.arch, input_shape, num_classes).to(self.device)
        self.peak = copy.deepcopy(self.model)
        self.peak_round = -1  # round whose end the peak snapshot was taken at; -1 = none yet
        self.peers = nn.ModuleDict()
        self.peer_archs: list[str] = []
        self.optimizer = self.new_optimizer(self.model.parameters())

    # -- schedule ---------------------------------------------------------------------
    def alpha(self, round: int | None = None) -> float:
        """The distillation weight for ``round`` (default: the round about to be trained)."""
        r = self.rounds_trained if round is None else round
        return cyclic_alpha(r, self.period, self.alpha_min, self.alpha_max)

    # -- communication ------------------------------------------------------------------
    def shared_payload(self) -> Tensors:
        if self.share == "received" and len(self.peers):
            return self._payload_of(self.peers["0"], self.peer_archs[0])
        return self._payload_of(self.model, self.arch)

    @staticmethod
    def _payload_of(model: nn.Module, arch: str) -> Tensors:
        payload = {f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
        payload["arch_id"] = torch.tensor([ARCHITECTURES.index(arch)], dtype=torch.int64)
        return payload

    def parse_payload(self, payload: Mapping[str, torch.Tensor]) -> tuple[str, Tensors]:
        """Validate one payload; return its architecture and model state. Changes nothing."""
        if not isinstance(payload, Mapping):
            raise PayloadError(f"DFML payload must be a mapping, got {type(payload).__name__}")
        arch_id = payload.get("arch_id")
        if not isinstance(arch_id, torch.Tensor):
            raise PayloadError("DFML payload has no 'arch_id' tensor")
        if arch_id.numel() != 1 or arch_id.is_floating_point() or arch_id.is_complex():
            raise PayloadError(
                f"payload 'arch_id' must be one integer, got dtype {arch_id.dtype} "
                f"shape {tuple(arch_id.shape)}"
            )
        index = int(arch_id.item())
        if not 0 <= index < len(ARCHITECTURES):
            raise PayloadError(
                f"payload 'arch_id' = {index} names no known architecture "
                f"(0..{len(ARCHITECTURES) - 1}: {', '.join(ARCHITECTURES)})"
            )
        arch = ARCHITECTURES[index]
        try:
            expected = payload_template(arch, self.input_shape, self.num_classes)
        except ValueError as err:
            raise PayloadError(f"payload architecture {arch!r} cannot run here: {err}") from None
        check_payload(payload, expected)
        state = {k.removeprefix("model."): v for k, v in payload.items() if k.startswith("model.")}
        return arch, state

    def absorb(self, incoming: Sequence[Incoming]) -> None:
        if not incoming:
            return
        parsed = [
            self.parse_payload(i.tensors) for i in incoming
        ]  # all validated before any change
        self._set_peers([arch for arch, _ in parsed])
        for (_, state), peer in zip(parsed, self.peers.values(), strict=True):
            peer.load_state_dict({k: v.to(self.device) for k, v in state.items()})

    def _set_peers(self, archs: Sequence[str]) -> None:
        """Replace :attr:`peers` by freshly built (not yet loaded) models of ``archs``."""
        with torch.random.fork_rng():  # their random init is overwritten; keep the RNG
            peers = {
                str(i): build_classifier(a, self.input_shape, self.num_classes)
                for i, a in enumerate(archs)
            }
        self.peers = nn.ModuleDict(peers).to(self.device)
        self.peer_archs = list(archs)

    # -- training -------------------------------------------------------------------------
    def students(self) -> list[nn.Module]:
        """The models this node trains: its own, plus the model it passes on
        (``dfml-share = "received"``: the first in-neighbour's). Every other received
        model only teaches: training it would be thrown away when the next payload
        replaces it."""
        if self.share == "received" and len(self.peers):
            return [self.model, self.peers["0"]]
        return [self.model]

    def mutual_losses(
        self, x: torch.Tensor, y: torch.Tensor, alpha: float, proportions: torch.Tensor
    ) -> list[dict[str, torch.Tensor]]:
        """Per student (own first): ``l_wsm``, ``l_kl`` to every other model, ``total``."""
        students = self.students()
        teachers = [p for p in self.peers.values() if all(p is not s for s in students)]
        logits = [m(x) for m in students]
        with torch.no_grad():
            teacher_log_probs = [F.log_softmax(t(x), dim=1) for t in teachers]
        log_probs = [F.log_softmax(z, dim=1).detach() for z in logits] + teacher_log_probs
        out = []
        for i, z in enumerate(logits):
            l_wsm = wsm_cross_entropy(z, y, proportions)
            if len(log_probs) == 1:
                out.append({"l_wsm": l_wsm, "l_kl": z.new_zeros(()), "total": l_wsm})
                continue
            l_kl = kl_to_peers(z, [lp for j, lp in enumerate(log_probs) if j != i])
            out.append({"l_wsm": l_wsm, "l_kl": l_kl, "total": (1 - alpha) * l_wsm + alpha * l_kl})
        return out

    def train_round(self, data: ClientData) -> dict[str, float]:
        round_index = self.rounds_trained
        alpha = self.alpha(round_index)
        proportions = class_proportions(data.y_train, self.num_classes).to(self.device)
        students = self.students()
        self.peers.eval()  # teachers predict in eval mode
        for model in students:
            model.train()
        peer_opt = self.new_optimizer(students[1].parameters()) if len(students) > 1 else None
        losses = LossMeans()
        for x, y in self.batches(data, self.round_generator()):
            parts = self.mutual_losses(x, y, alpha, proportions)
            total = torch.stack([p["total"] for p in parts]).sum()
            self.optimizer.zero_grad(set_to_none=True)
            if peer_opt is not None:
                peer_opt.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            if peer_opt is not None:
                peer_opt.step()
            losses.add({"l_wsm": parts[0]["l_wsm"].item(), "l_kl": parts[0]["l_kl"].item()})
        if is_peak_round(round_index, self.period):
            self.peak.load_state_dict(self.model.state_dict())
            self.peak_round = round_index
        metrics = losses.means()
        metrics["alpha"] = alpha
        metrics["num_peers"] = float(len(self.peers))
        return metrics

    @torch.no_grad()
    def health(self, data: ClientData) -> dict[str, float]:
        """The distillation weight, and how far the own model's predictions are from the
        received models' (KL(p_received || p_own) on up to 512 training samples, after
        training): mutual learning should pull it down over a period."""
        metrics = {"health_alpha": self.alpha(self.rounds_trained - 1)}
        if not len(self.peers):
            return metrics
        x = data.x_train[:512].to(self.device)
        self.model.eval()
        self.peers.eval()
        own = self.model(x)
        metrics["health_kl_to_received"] = kl_to_peers(
            own, [F.log_softmax(p(x), dim=1) for p in self.peers.values()]
        ).item()
        return metrics

    def local_log_prior(self, data: ClientData) -> torch.Tensor:
        """L_WSM fits ``logits + log beta``, so the raw logits are a class-balanced
        classifier: Global-T (a balanced test set) reads them as they are, and Local-T
        (the node's own, skewed test set) adds the node's class prior back,
        ``argmax_k z_k + log beta_k`` (logit adjustment; classes absent from the node's
        training data are never predicted there). Read raw on Local-T they scored 39.6 %
        against 75.2 % with the prior, on isolated DFML at CIFAR-10 Dirichlet 0.1."""
        return torch.log(class_proportions(data.own_labels, self.num_classes))

    def evaluate(self, data: ClientData) -> dict[str, float]:
        """The scores of the model that predicts (:meth:`predict`), and the peak model's
        Local-T and Global-T as ``peak_*`` once a peak exists."""
        metrics = super().evaluate(data)
        if self.peak_round >= 0:
            predict_with = self.predict_with
            self.predict_with = "peak"
            try:
                peak = super().evaluate(data)
            finally:
                self.predict_with = predict_with
            for key in ("local_t_acc", "global_t_acc"):  # no Global-T on own data alone
                if key in peak:
                    metrics[f"peak_{key}"] = peak[key]
        return metrics

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        model = self.peak if self.predict_with == "peak" and self.peak_round >= 0 else self.model
        model.eval()
        return model(x)

    # -- private state ------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Base state plus what rebuilds the dynamic parts: peers' architectures, peak round."""
        state = super().state_dict()
        state["arch"] = self.arch
        state["peer_archs"] = list(self.peer_archs)
        state["peak_round"] = self.peak_round
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        arch = state.pop("arch", self.arch)
        if arch != self.arch:
            raise ValueError(
                f"saved state is for architecture {arch!r}, this node runs {self.arch!r}"
            )
        self._set_peers(state.pop("peer_archs", []))
        self.peak_round = int(state.pop("peak_round", -1))
        super().load_state_dict(state)


SPEC = MethodSpec(
    name="dfml",
    title="DFML",
    sends="its whole model (state dict, BatchNorm statistics included) + architecture id",
    keeps=(
        "the received models: teachers in mutual learning (KL on their logits), never returned; "
        "the peak-round snapshot it predicts with"
    ),
    personalized="full model (own architecture)",
    learner=DFMLLearner,
)
