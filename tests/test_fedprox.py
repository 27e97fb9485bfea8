"""FedProx: the proximal term keeps the local update near the hub's model."""

from __future__ import annotations

import torch

from drdfl_flwr.registry import build_learner
from tests.conftest import make_config, random_client_data


def distance_moved(mu: float) -> float:
    cfg = make_config(method="fedprox", device="cpu", local_epochs=3, fedprox_mu=mu)
    node = build_learner(cfg, (1, 8, 8), 10)
    start = [p.detach().clone() for p in node.classifier.parameters()]
    node.fit(random_client_data(n=128))
    return sum(
        ((p - s) ** 2).sum().item()
        for p, s in zip(node.classifier.parameters(), start, strict=True)
    )


def test_proximal_term_pulls_toward_the_received_model():
    free, anchored = distance_moved(0.0), distance_moved(100.0)
    assert anchored < 0.5 * free, (anchored, free)


def test_mu_zero_is_fedavg():
    fedavg = build_learner(make_config(method="fedavg", device="cpu"), (1, 8, 8), 10)
    prox = build_learner(make_config(method="fedprox", device="cpu", fedprox_mu=0.0), (1, 8, 8), 10)
    data = random_client_data(n=64)
    fedavg.fit(data)
    prox.fit(data)
    for a, b in zip(fedavg.classifier.parameters(), prox.classifier.parameters(), strict=True):
        torch.testing.assert_close(a, b)
