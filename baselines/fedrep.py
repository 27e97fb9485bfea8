"""FedRep (Collins et al. 2021, arXiv 2102.07078; code lgcollins/FedRep): a shared
representation (the body) and a personal head that never leaves the node.

Every round a node first trains its head with the body frozen, then its body with the
head frozen (``models/Update.py``: of ``local_ep`` epochs the first ``local_ep -
local_rep_ep`` train the head, the rest the body), and sends only the body. The hub
averages the bodies weighted by training examples (``main_fedrep.py``; here the hub's
``weighted-mean``) and every node loads the average while keeping its own head.

The head is the classifier's last linear layer (:func:`baselines.common.head_names`), as
in the released CIFAR models (``w_glob_keys`` = all but the final FC layer). The body is
everything else, BatchNorm layers (and their running statistics) included when the
classifier has them: they are part of the representation.

Choices and deviations:

- Epochs come from ``[fedrep]``: ``head-epochs = 1`` and ``body-epochs = 4`` per round,
  the DRDFL paper's setting (App. B.1.3: 1 personal and 4 shared epochs). The generic
  ``local-epochs`` is not used by this method.
- Optimizer: Adam at ``learning-rate`` (the project's common choice on the small CNN)
  instead of the released SGD (lr 0.01, momentum 0.5, weight decay 1e-4), so every
  baseline trains its classifier the same way. There are two Adam optimizers, one over
  the head's parameters and one over the body's, each stepping only in its own phase;
  both keep their state between rounds (in ``context.state``), as FedAvg's single Adam
  does here. The released code builds a fresh SGD optimizer every round.
- The frozen part is frozen by ``requires_grad = False`` for the phase (no gradient is
  even computed for it) and by the phase's optimizer not holding it. BatchNorm running
  statistics are not parameters: in the head phase they keep tracking the data as in the
  released code (``net.train()`` throughout the local update). With the default small
  CNN (no BatchNorm) the body is bit-identical across the head phase.
- Both phases draw their batches from one per-round generator, so a round repeats
  exactly given (seed, node, round).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from baselines.common import HeadBodyLearner
from drdfl_flwr.config import MethodOptions
from drdfl_flwr.data import ClientData
from drdfl_flwr.spec import MethodSpec
from strategies.reducers import weighted_mean


@dataclass(frozen=True)
class FedRepOptions(MethodOptions):
    """Section ``[fedrep]``: local epochs per round of each phase, head first."""

    SECTION: ClassVar[str] = "fedrep"
    head_epochs: int = 1
    body_epochs: int = 4

    def __post_init__(self) -> None:
        self.check_positive("head-epochs", "body-epochs")


class FedRepLearner(HeadBodyLearner):
    """Head (last linear layer) personal, trained first; body shared, trained second."""

    OPTIONS = FedRepOptions

    def train_head(
        self, data: ClientData, generator: torch.Generator, after_step: Callable | None = None
    ) -> tuple[float, int]:
        """Phase 1: ``head-epochs`` epochs on the head, body frozen."""
        return self.train_only(
            self.head_params,
            self.head_optimizer,
            data,
            generator,
            self.opts.head_epochs,
            after_step=after_step,
        )

    def train_body(
        self, data: ClientData, generator: torch.Generator, after_step: Callable | None = None
    ) -> tuple[float, int]:
        """Phase 2: ``body-epochs`` epochs on the body, head frozen."""
        return self.train_only(
            self.body_params,
            self.body_optimizer,
            data,
            generator,
            self.opts.body_epochs,
            after_step=after_step,
        )

    def train_round(self, data: ClientData) -> dict[str, float]:
        gen = self.round_generator()
        head = self.head_parameter_names()
        start = _snapshot(self.classifier)
        head_loss, head_steps = self.train_head(data, gen)
        middle = _snapshot(self.classifier)
        body_loss, body_steps = self.train_body(data, gen)
        end = _snapshot(self.classifier)
        steps = head_steps + body_steps
        return {
            "l_ce": (head_loss * head_steps + body_loss * body_steps) / max(steps, 1),
            "l_ce_head": head_loss,
            "l_ce_body": body_loss,
            "local_steps": float(steps),
            # each phase moves its own part (relative L2 change); the other stays put
            "health_head_update": _relative_change(start, middle, head, inside=True),
            "health_body_update": _relative_change(middle, end, head, inside=False),
        }


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _relative_change(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], head: set[str], inside: bool
) -> float:
    """||after - before|| / ||before|| over the head's (``inside``) or body's parameters."""
    names = [n for n in before if (n in head) == inside]
    diff = sum(float((after[n] - before[n]).pow(2).sum()) for n in names)
    norm = sum(float(before[n].pow(2).sum()) for n in names)
    return (diff / norm) ** 0.5 if norm > 0 else 0.0


SPEC = MethodSpec(
    name="fedrep",
    title="FedRep",
    sends="the body (hub: weighted mean)",
    keeps="the head (last linear layer)",
    personalized="output layer (head)",
    learner=FedRepLearner,
    reducer=weighted_mean,
)
