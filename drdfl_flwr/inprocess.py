"""A ring of learners in one Python process, for looking inside the models.

:func:`drdfl_flwr.simulation.simulate` runs the real thing (ServerApp, ClientApps, Ray,
byte accounting) but the trained modules stay in the simulated nodes. A notebook that
wants to project a node's codes or draw its reconstructions needs the learner objects;
:func:`run_ring` trains them here, each round in the same order a ClientApp does (absorb
the predecessor's last payload, seed with the round seed, fit), passing each payload to
the ring successor only. It is for inspection: no Flower messages, no timeouts, no bytes
counted, and only the ring topology.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from drdfl_flwr.config import RunConfig
from drdfl_flwr.data import ClientData, load_client_data
from drdfl_flwr.learner import Learner, build_learner
from drdfl_flwr.payload import peers


@dataclass
class InProcessRing:
    learners: list[Learner]
    data: list[ClientData]
    # one record per round: {"round", "mean": {metric: mean over nodes}, "nodes": [...]}
    history: list[dict[str, Any]] = field(default_factory=list)


def run_ring(
    cfg: RunConfig,
    num_clients: int,
    rounds: int,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> InProcessRing:
    """Train ``cfg`` for ``rounds`` rounds on a ring of ``num_clients`` nodes, in process.

    Node ``k`` receives only node ``k-1``'s payload of the previous round;
    ``cfg.isolated`` cuts every link. Every round records the nodes' training metrics
    and their Local-T / Global-T evaluation."""
    if num_clients < 2:
        raise ValueError(f"num_clients={num_clients}: a ring needs at least 2 nodes")
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: run at least one round")
    data = [load_client_data(cfg, k, num_clients) for k in range(num_clients)]
    learners = [
        build_learner(cfg, d.input_shape, d.num_classes, partition_id=k) for k, d in enumerate(data)
    ]
    ring = InProcessRing(learners, data)
    outbox: list[dict[str, torch.Tensor] | None] = [None] * num_clients
    for round_number in range(1, rounds + 1):
        sent: list[dict[str, torch.Tensor] | None] = []
        nodes = []
        for k, (learner, node_data) in enumerate(zip(learners, data, strict=True)):
            received = outbox[(k - 1) % num_clients]
            if received is not None and not cfg.isolated:
                learner.absorb(peers(received))
            torch.manual_seed(learner.round_seed)
            metrics = learner.fit(node_data)
            metrics.update(learner.evaluate(node_data))
            nodes.append(metrics)
            sent.append(None if cfg.isolated else learner.shared_payload())
        outbox = sent
        keys = sorted(set().union(*nodes))
        mean = {k: sum(n.get(k, 0.0) for n in nodes) / len(nodes) for k in keys}
        record = {"round": round_number, "mean": mean, "nodes": nodes}
        ring.history.append(record)
        if on_round is not None:
            on_round(record)
    return ring
