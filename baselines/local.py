"""Local: each client trains its own classifier and talks to nobody (paper 001, B.1.3).

The floor every collaborative method must beat; one round = ``local-epochs`` epochs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from drdfl_flwr.data import ClientData
from drdfl_flwr.learner import Learner
from drdfl_flwr.models import build_classifier
from drdfl_flwr.payload import PayloadError, Tensors


class LocalLearner(Learner):
    def setup(self) -> None:
        cfg, input_shape, num_classes = self.cfg, self.input_shape, self.num_classes
        self.classifier = build_classifier(cfg.classifier, input_shape, num_classes).to(self.device)
        self.optimizer = torch.optim.Adam(self.classifier.parameters(), lr=cfg.learning_rate)

    def absorb(self, payloads: Sequence[Tensors]) -> None:
        if any(payloads):
            raise PayloadError("the local baseline expects no payloads, got a non-empty one")

    def shared_payload(self) -> Tensors:
        return {}

    def fit(self, data: ClientData) -> dict[str, float]:
        self.classifier.train()
        total, steps = 0.0, 0
        for x, y in self.batches(data, self.round_generator()):
            loss = F.cross_entropy(self.classifier(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.item()
            steps += 1
        self.rounds_trained += 1
        return {"l_ce": total / max(steps, 1)}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.classifier.eval()
        return self.classifier(x)
