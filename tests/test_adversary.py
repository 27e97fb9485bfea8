"""A hostile neighbour, measured and bounded: attacks that every node-side check lets
through (well-formed payloads), the ring's bounded-trust merge that refuses them, and the
hub's robust reductions from Flower's own aggregation functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drdfl_flwr.adversary import flipped_labels, hostile_payload
from drdfl_flwr.config import ConfigError
from drdfl_flwr.intake import take_in
from drdfl_flwr.node import node_round
from drdfl_flwr.payload import peers
from drdfl_flwr.registry import build_learner, hub_reducer
from strategies.reducers import EXAMPLES, Contribution, reduce_screened
from tests.conftest import make_config, random_client_data

SHAPE, K = (1, 8, 8), 10


def drdfl(**extra):
    return make_config(method="drdfl", local_epochs=1, device="cpu", **extra)


@pytest.mark.parametrize("attack", ["sign-flip", "scale", "noise"])
def test_an_attack_is_well_formed_so_the_node_checks_let_it_through(attack):
    cfg = drdfl()
    sender, receiver = build_learner(cfg, SHAPE, K, 0), build_learner(cfg, SHAPE, K, 1)
    data = random_client_data(64, SHAPE, K)
    sender.fit(data)
    receiver.fit(data)
    hostile = hostile_payload(sender.shared_payload(), attack, 10.0, seed=0)
    assert (hostile["stats.var"] > 0).all()
    intake = take_in(receiver, peers(hostile), 2)
    assert not intake.rejections and intake.accepted


def test_the_attacker_sends_the_hostile_payload_and_only_it():
    cfg = drdfl(attack="sign-flip", attack_partitions="0")
    data = random_client_data(64, SHAPE, K)
    attacker, honest = build_learner(cfg, SHAPE, K, 0), build_learner(cfg, SHAPE, K, 1)
    sent = node_round(attacker, [], data, 1)
    key = "learngene.encoder.0.weight" if "learngene.encoder.0.weight" in sent.payload else None
    key = key or next(k for k in sent.payload if k.startswith("learngene."))
    assert torch.equal(sent.payload[key], -attacker.shared_payload()[key])
    assert sent.metrics["attacking"] == 1.0
    assert "attacking" not in node_round(honest, [], data, 1).metrics


def test_a_stale_attacker_replays_its_first_payload_across_a_restart():
    """``stale``: round 1's payload, every later round, while the node itself trains on;
    the replay survives the node's state round trip (a restarted ClientApp)."""
    cfg = drdfl(attack="stale", attack_partitions="0")
    data = random_client_data(64, SHAPE, K)
    attacker = build_learner(cfg, SHAPE, K, 0)
    first = node_round(attacker, [], data, 1).payload
    restarted = build_learner(cfg, SHAPE, K, 0)
    restarted.load_bytes(attacker.to_bytes())
    later = node_round(restarted, [], data, 2)
    assert later.metrics["attacking"] == 1.0 and restarted.rounds_trained == 2
    assert first.keys() == later.payload.keys()
    assert all(torch.equal(first[k], later.payload[k]) for k in first)
    honest_now = restarted.shared_payload()
    assert any(not torch.equal(first[k], honest_now[k]) for k in first)  # it trained on


def test_label_flip_trains_on_flipped_labels():
    data = random_client_data(64, SHAPE, K)
    flipped = flipped_labels(data)
    assert torch.equal(flipped.y_train, K - 1 - data.y_train)
    assert torch.equal(flipped.y_local_test, data.y_local_test)  # scored on the truth


@pytest.mark.parametrize("attack", ["sign-flip", "scale", "noise"])
def test_the_ring_defence_refuses_the_attack_and_keeps_honest_neighbours(attack):
    cfg = drdfl(ring_defence="outlier")
    data = [random_client_data(64, SHAPE, K, seed=s) for s in range(3)]
    nodes = [build_learner(cfg, SHAPE, K, p) for p in range(3)]
    for node, d in zip(nodes, data, strict=True):
        node_round(node, [], d, 1)
    honest = take_in(nodes[1], peers(nodes[0].shared_payload()), 2)
    assert honest.accepted and not honest.rejections
    hostile = hostile_payload(nodes[0].shared_payload(), attack, 10.0, seed=1)
    refused = take_in(nodes[2], peers(hostile), 2)
    assert not refused.accepted and "outlier" in refused.rejections["0"]


def contribution(partition: int, value: float) -> Contribution:
    return Contribution(partition, {"w": np.full(3, value, np.float32)}, {EXAMPLES: 10.0})


@pytest.mark.parametrize("kind", ["median", "trimmed-mean", "krum"])
def test_a_robust_hub_reduction_outvotes_one_scaled_contribution(kind):
    """Four honest nodes near 1.0, one attacker at 1,000: the mean moves by ~200, the
    robust reductions (Flower's functions) stay with the honest ones."""
    cfg = make_config(method="fedavg", hub_reduction=kind, device="cpu")
    replies = [contribution(p, 1.0 + 0.01 * p) for p in range(4)] + [contribution(4, 1000.0)]
    robust = reduce_screened(hub_reducer(cfg), replies, None).aggregate["w"]
    mean = reduce_screened(hub_reducer(make_config(method="fedavg")), replies, None).aggregate
    assert np.all(robust < 1.1) and np.all(mean["w"] > 100)


def test_a_robust_reduction_is_refused_for_a_method_with_its_own_reducer():
    with pytest.raises(ConfigError, match="hub-reduction") as err:
        make_config(method="fednova", hub_reduction="median")  # checks as at start-up
    assert "fednova_reduce" in str(err.value)


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("attack", "flip", "attack"),
        ("attack_partitions", "1, x", "attack-partitions"),
        ("ring_defence", "strong", "ring-defence"),
        ("hub_reduction", "mode", "hub-reduction"),
        ("attack_strength", -1.0, "attack-strength"),
    ],
)
def test_a_bad_adversary_setting_is_refused_by_name(key, value, named):
    with pytest.raises(ConfigError, match=named):
        make_config(method="drdfl", **{key: value})


def test_identifiers_are_left_alone_so_dfml_takes_the_attack_in():
    """Before: sign-flip negated DFML's integer arch_id and its own check refused the
    payload, so the attack measured DFML's id check, not DFML."""
    cfg = make_config(method="dfml", local_epochs=1, device="cpu")
    sender, receiver = build_learner(cfg, SHAPE, K, 0), build_learner(cfg, SHAPE, K, 1)
    data = random_client_data(64, SHAPE, K)
    sender.fit(data)
    receiver.fit(data)
    for attack in ("sign-flip", "noise"):
        hostile = hostile_payload(sender.shared_payload(), attack, 10.0, seed=0)
        assert torch.equal(hostile["arch_id"], sender.shared_payload()["arch_id"])
        assert take_in(receiver, peers(hostile), 2).accepted
