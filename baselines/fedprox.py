"""FedProx (Li et al. 2020): FedAvg whose local objective adds the proximal term
(mu / 2) * ||w - w_global||^2, keeping each node's update near the model the hub sent.
FedFed (SPEC-ADDENDUM section 8) plugs into it; it is also docs/architecture.md's worked example
of adding a method: this file, one line in ``drdfl_flwr/registry.py``, one word in
``conf/cpu-smoke.toml`` and its defaults in ``pyproject.toml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from baselines.common import ClassifierLearner
from drdfl_flwr.config import MethodOptions
from drdfl_flwr.data import ClientData
from drdfl_flwr.spec import MethodSpec
from strategies.reducers import weighted_mean


@dataclass(frozen=True)
class FedProxOptions(MethodOptions):
    SECTION: ClassVar[str] = "fedprox"
    mu: float = 0.01

    def __post_init__(self) -> None:
        self.check_non_negative("mu")


class FedProxLearner(ClassifierLearner):
    OPTIONS = FedProxOptions

    def train_round(self, data: ClientData) -> dict[str, float]:
        # train_round() runs right after absorb(): the weights now are the hub's model w_global.
        anchor = [p.detach().clone() for p in self.classifier.parameters()]

        def proximal() -> torch.Tensor:
            params = self.classifier.parameters()
            distance = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
            return 0.5 * self.opts.mu * distance

        loss, steps = self.supervised_epochs(
            self.classifier, self.optimizer, data, self.round_generator(), penalty=proximal
        )
        return {"l_total": loss, "local_steps": float(steps)}


SPEC = MethodSpec(
    name="fedprox",
    title="FedProx",
    sends="the whole classifier (hub: weighted mean; proximal term in local training)",
    keeps="nothing: one global model",
    personalized="none (one global model)",
    learner=FedProxLearner,
    reducer=weighted_mean,
    exempt={"private": "one global model: nothing stays on the node"},
)
