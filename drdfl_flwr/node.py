"""One round of one node, written once: the ClientApp, the in-process ring and the
benchmarks all train a round through :func:`node_round`, so they cannot drift apart.

The round: take in what arrived (validated, a bad payload costs only itself), train with
the round's seed, score the trained model when asked, and hand back the payload and the
metrics. With ``isolated = true`` the node neither takes in nor sends anything and changes
nothing else (same data, seeds, model, schedule): the "does sharing help?" control.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from drdfl_flwr.adversary import attacking, flipped_labels, hostile_payload, replayed
from drdfl_flwr.data import ClientData
from drdfl_flwr.intake import Intake, take_in
from drdfl_flwr.learner import Learner, measured_fit
from drdfl_flwr.payload import Incoming, Tensors
from drdfl_flwr.scoring import majority_floor
from strategies.reducers import EXAMPLES


class Stopwatch:
    """Seconds spent in each step of a message (``time_*`` metrics), so a slow round can
    be told apart: restoring state, absorbing, training, saving, evaluating."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now


@dataclass
class NodeRound:
    payload: Tensors  # what the node sends its out-neighbours (empty: nothing)
    metrics: dict[str, float]
    intake: Intake  # what was taken in and what was refused, by sender


def evaluation_metrics(learner: Learner, data: ClientData) -> dict[str, float]:
    """Local-T and Global-T and the Local-T size, whichever message asked for them."""
    metrics = learner.evaluate(data)
    metrics["num-examples-local-t"] = float(len(data.y_local_test))
    return metrics


def round_intake(
    learner: Learner,
    incoming: Sequence[Incoming],
    server_round: int,
    undecodable: Mapping[str, str] | None = None,
) -> Intake:
    """What the node takes in: nothing at all when ``isolated``, else :func:`take_in`."""
    if learner.cfg.isolated:
        return Intake()
    return take_in(learner, incoming, server_round, undecodable)


def node_evaluation(
    learner: Learner,
    incoming: Sequence[Incoming],
    data: ClientData,
    server_round: int,
    undecodable: Mapping[str, str] | None = None,
    clock: Stopwatch | None = None,
) -> tuple[dict[str, float], Intake]:
    """Score the model the node holds once it has taken in ``incoming`` (a hub's fresh
    aggregate: the model it trains from next), without training; the metrics, with the
    seconds it took (``time_evaluate``), and what was taken in and refused."""
    clock = clock or Stopwatch()
    intake = round_intake(learner, incoming, server_round, undecodable)
    metrics = evaluation_metrics(learner, data)
    clock.lap("time_evaluate")
    return {**metrics, **clock.laps}, intake


def node_round(
    learner: Learner,
    incoming: Sequence[Incoming],
    data: ClientData,
    server_round: int,
    evaluate: bool = True,
    undecodable: Mapping[str, str] | None = None,
    clock: Stopwatch | None = None,
) -> NodeRound:
    """Take in ``incoming`` (sent in round ``server_round``), train one round, score the
    trained model if ``evaluate``, and return the payload to send with the metrics.
    ``undecodable``: senders whose payload did not decode (counted as refused). A round
    the node has already trained (its state says so) is answered from its record, with
    ``replayed_round`` = 1, and trains nothing: a resumed run is the run it resumes."""
    clock = clock or Stopwatch()
    isolated = learner.cfg.isolated
    if 0 < server_round <= learner.last_round:
        # The node's state already holds this round (a resumed run, a restarted
        # SuperLink asks again): answer from that round's record, never train it twice.
        metrics = {**learner.last_metrics, "replayed_round": 1.0}
        return NodeRound({} if isolated else learner.shared_payload(), metrics, Intake())
    intake = round_intake(learner, incoming, server_round, undecodable)
    clock.lap("time_absorb")
    torch.manual_seed(learner.round_seed)  # the same draws wherever the round runs
    hostile = attacking(learner.cfg, learner.partition_id)
    flip = hostile and learner.cfg.attack == "label-flip"
    metrics = measured_fit(learner, flipped_labels(data) if flip else data)
    clock.lap("time_fit")
    if evaluate:
        metrics.update(evaluation_metrics(learner, data))
        metrics.update(
            majority_floor(data.y_local_test, data.y_global_test, data.own_labels, data.num_classes)
        )
        clock.lap("time_evaluate")
    payload = {} if isolated else learner.shared_payload()
    if hostile and payload:
        cfg = learner.cfg
        if cfg.attack == "stale":
            payload = replayed(learner, payload)
        payload = hostile_payload(payload, cfg.attack, cfg.attack_strength, learner.round_seed)
        metrics["attacking"] = 1.0
    metrics.update(
        {
            EXAMPLES: float(len(data.y_train)),
            "payloads_received": float(len(intake.accepted) + len(intake.rejections)),
            "payloads_rejected": float(len(intake.rejections)),
            "rounds_trained": float(learner.rounds_trained),
        }
    )
    if server_round > 0:
        learner.last_round, learner.last_metrics = server_round, dict(metrics)
    return NodeRound(payload, metrics, intake)
