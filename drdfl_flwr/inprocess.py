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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from drdfl_flwr.config import RunConfig
from drdfl_flwr.data import ClientData, load_client_data
from drdfl_flwr.learner import Learner
from drdfl_flwr.node import node_round
from drdfl_flwr.payload import PayloadError, peers
from drdfl_flwr.registry import build_learner, check_run_config
from strategies.topology import Ring

RING = Ring()


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
    joins: Mapping[int, int] | None = None,
) -> InProcessRing:
    """Train ``cfg`` for ``rounds`` rounds on a ring of ``num_clients`` nodes, in process.

    Node ``k`` receives only the payload its nearest present predecessor sent the
    previous round; ``cfg.isolated`` cuts every link. ``joins`` maps a node to the round
    it appears in (absent before, bypassed by the ring; it then joins as a node that
    appears late on SuperNodes does, through ``Learner.receive``). Every round records
    the nodes' training metrics and their Local-T / Global-T evaluation (``None`` for a
    node not there yet)."""
    if num_clients < 2:
        raise ValueError(f"num_clients={num_clients}: a ring needs at least 2 nodes")
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: run at least one round")
    joins = dict(joins or {})
    for k, first in joins.items():
        if not 0 <= k < num_clients or not 1 <= first <= rounds:
            raise ValueError(
                f"joins={{{k}: {first}}}: a node 0..{num_clients - 1} joining in round 1..{rounds}"
            )
    check_run_config(cfg)
    data = [load_client_data(cfg, k, num_clients) for k in range(num_clients)]
    learners = [
        build_learner(cfg, d.input_shape, d.num_classes, partition_id=k) for k, d in enumerate(data)
    ]
    ring = InProcessRing(learners, data)
    outbox: list[dict[str, torch.Tensor] | None] = [None] * num_clients
    for round_number in range(1, rounds + 1):
        present = [k for k in range(num_clients) if joins.get(k, 1) <= round_number]
        sent: list[dict[str, torch.Tensor] | None] = [None] * num_clients
        nodes: list[dict[str, float] | None] = [None] * num_clients
        for k in present:
            learner, node_data = learners[k], data[k]
            senders = RING.in_neighbours(k, num_clients, set(present), round_number)
            received = outbox[senders[0]] if senders else None
            incoming = peers(received) if received else []
            result = node_round(learner, incoming, node_data, round_number)
            if result.intake.rejections:  # in process, a refusal is a bug: say it loudly
                raise PayloadError(
                    f"round {round_number}: node {k} refused {result.intake.rejections}"
                )
            nodes[k] = result.metrics
            sent[k] = result.payload or None
        outbox = sent
        there = [n for n in nodes if n is not None]
        keys = sorted(set().union(*there))
        mean = {k: sum(n.get(k, 0.0) for n in there) / len(there) for k in keys}
        record = {"round": round_number, "mean": mean, "nodes": nodes}
        ring.history.append(record)
        if on_round is not None:
            on_round(record)
    return ring
