"""A ring of learners in one Python process, for looking inside the models and for
timing the same work without a framework.

:func:`drdfl_flwr.simulation.simulate` runs the real thing (ServerApp, ClientApps, Ray,
byte accounting) but the trained modules stay in the simulated nodes. A notebook that
wants to project a node's codes or draw its reconstructions needs the learner objects;
:func:`run_ring` trains them here, each round in the same order a ClientApp does (absorb
the predecessor's last payload, seed with the round seed, fit), passing each payload to
the ring successor only; a hub method's payloads are reduced by its reducer and the
aggregate goes to every node, which also scores it, as on the hub. It is for inspection
and for the benchmarks' plain-loop floor (``benchmarks/overhead.py``): no Flower
messages, no timeouts, no bytes counted, and only the ring topology or the star.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from drdfl_flwr.config import RunConfig
from drdfl_flwr.data import ClientData, load_client_data
from drdfl_flwr.intake import take_in
from drdfl_flwr.learner import Learner
from drdfl_flwr.node import Stopwatch, evaluation_metrics, node_round
from drdfl_flwr.payload import Incoming, PayloadError, from_hub, peers
from drdfl_flwr.registry import build_learner, check_run_config, hub_reducer
from strategies.membership import sample_participants
from strategies.reducers import Arrays, Contribution, reduce_screened
from strategies.rounds import AGGREGATE_PREFIX
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

    Node ``k`` receives only the last payload of its nearest predecessor taking part in
    the round (a hub method: the aggregate of the previous round's participants); the
    round's participants are the relay's (``cfg.participation``,
    :func:`strategies.rounds.sample_participants`); ``cfg.isolated`` cuts every link.
    ``joins`` maps a node to the round it appears in (absent before, bypassed by the ring;
    it then joins as a node that appears late on SuperNodes does, through
    ``Learner.receive``). Every round records the nodes' training metrics, their
    Local-T / Global-T evaluation and the seconds of each step (``time_*``, as the
    ClientApp reports them) (``None`` for a node not there yet or sitting out)."""
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
    reducer = hub_reducer(cfg)  # a hub method: reduce, send to everyone
    reduced: Arrays | None = None
    weight = 0.0  # the training examples the aggregate was reduced from (the hub's weight)
    outbox: list[dict[str, torch.Tensor] | None] = [None] * num_clients
    for round_number in range(1, rounds + 1):
        drawn = set(sample_participants(cfg.seed, round_number, num_clients, cfg.participation))
        present = [k for k in range(num_clients) if joins.get(k, 1) <= round_number and k in drawn]
        sent: list[dict[str, torch.Tensor] | None] = [None] * num_clients
        nodes: list[dict[str, float] | None] = [None] * num_clients
        for k in present:
            learner, node_data = learners[k], data[k]
            if reducer is not None:
                incoming = _aggregate(reduced, weight)
            else:
                senders = RING.in_neighbours(k, num_clients, set(present), round_number)
                received = outbox[senders[0]] if senders else None
                incoming = peers(received) if received else []
            clock = Stopwatch()
            result = node_round(learner, incoming, node_data, round_number, clock=clock)
            # in process, a refusal is a bug, unless an attack or a defence is measured
            measured = cfg.attack != "none" or cfg.ring_defence != "none"
            if result.intake.rejections and not measured:
                raise PayloadError(
                    f"round {round_number}: node {k} refused {result.intake.rejections}"
                )
            nodes[k] = {**result.metrics, **clock.laps}
            sent[k] = result.payload or None
        if reducer is not None:
            contributions = [
                Contribution(k, {n: t.numpy() for n, t in sent[k].items()}, nodes[k])
                for k in present
                if sent[k] is not None and nodes[k] is not None
            ]
            reduction = reduce_screened(reducer, contributions, reduced)
            if reduction.refused and cfg.attack == "none":  # a bug unless attacked
                raise PayloadError(f"round {round_number}: the hub refused {reduction.refused}")
            if reduction.aggregate is not None:
                reduced, weight = reduction.aggregate, reduction.weight
                aggregate = _aggregate(reduced, weight)
                for k in present:  # the hub's evaluation message: the fresh aggregate
                    scores = _score_aggregate(learners[k], aggregate, data[k], round_number)
                    nodes[k].update(scores)  # type: ignore[union-attr]
        for k in present:  # a node that sat out keeps its last payload on offer
            outbox[k] = sent[k]
        there = [n for n in nodes if n is not None]
        keys = sorted(set().union(*there))
        mean = {k: sum(n.get(k, 0.0) for n in there) / len(there) for k in keys}
        record = {"round": round_number, "mean": mean, "nodes": nodes}
        ring.history.append(record)
        if on_round is not None:
            on_round(record)
    return ring


def _aggregate(reduced: Arrays | None, weight: float) -> list[Incoming]:
    """What every node receives from the hub: the aggregate, with the weight the hub
    gives it (the training examples of the replies it was reduced from)."""
    if reduced is None:
        return []
    tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in reduced.items()}
    return from_hub(tensors, weight)


def _score_aggregate(
    learner: Learner, aggregate: list[Incoming], data: ClientData, round_number: int
) -> dict[str, float]:
    """Local-T and Global-T of the fresh aggregate on this node, without keeping it (the
    hub's evaluation message: the ClientApp restores the node's saved state to do it),
    and the seconds it took (``aggregate_time_evaluate``, as the hub records them)."""
    clock = Stopwatch()
    trial = copy.deepcopy(learner)
    take_in(trial, aggregate, round_number)
    scores = evaluation_metrics(trial, data)
    clock.lap("time_evaluate")
    return {AGGREGATE_PREFIX + k: v for k, v in {**scores, **clock.laps}.items()}
