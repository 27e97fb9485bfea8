"""The in-process ring the notebooks inspect models with: payloads go to the successor only,
isolation cuts every link, and bad arguments are named."""

from __future__ import annotations

import pytest
import torch

from drdfl_flwr.config import RunConfig
from drdfl_flwr.inprocess import run_ring


def test_each_node_absorbs_only_its_predecessors_payload(monkeypatch):
    from drdfl_flwr.methods.drdfl import DRDFLLearner

    calls: list[tuple[int, list[int]]] = []
    shared_payload = DRDFLLearner.shared_payload

    def tagged_payload(self):  # every payload says who sent it
        return {**shared_payload(self), "sender": torch.tensor(self.partition_id)}

    def absorb(self, incoming):
        calls.append((self.partition_id, [int(i.tensors["sender"]) for i in incoming]))

    monkeypatch.setattr(DRDFLLearner, "shared_payload", tagged_payload)
    monkeypatch.setattr(DRDFLLearner, "absorb", absorb)
    cfg = RunConfig(dataset="digits", device="cpu", method="drdfl", local_epochs=1)
    ring = run_ring(cfg, num_clients=3, rounds=2)
    # round 1 receives nothing; in round 2 node k gets node k-1's round-1 payload only
    assert sorted(calls) == [(0, [2]), (1, [0]), (2, [1])]
    assert [r["round"] for r in ring.history] == [1, 2]
    assert {"local_t_acc", "global_t_acc"} <= set(ring.history[-1]["mean"])


def test_isolated_ring_absorbs_nothing(monkeypatch):
    from drdfl_flwr.methods.drdfl import DRDFLLearner

    calls = []
    monkeypatch.setattr(DRDFLLearner, "absorb", lambda self, inc: calls.append(inc))
    cfg = RunConfig(dataset="digits", device="cpu", method="drdfl", local_epochs=1, isolated=True)
    run_ring(cfg, num_clients=3, rounds=2)
    assert calls == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 1, "rounds": 1}, "num_clients=1"),
        ({"num_clients": 3, "rounds": 0}, "rounds=0"),
        ({"num_clients": 3, "rounds": 2, "joins": {3: 2}}, "joins="),
        ({"num_clients": 3, "rounds": 2, "joins": {1: 3}}, "joins="),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_ring(RunConfig(dataset="digits", device="cpu"), **kwargs)


def test_a_node_that_joins_later_is_bypassed_until_then_and_joins_by_algorithm_2():
    cfg = RunConfig(dataset="digits", device="cpu", method="drdfl", local_epochs=1)
    ring = run_ring(cfg, num_clients=3, rounds=3, joins={1: 2})
    assert ring.history[0]["nodes"][1] is None  # not there in round 1
    assert ring.history[1]["nodes"][1]["priors_frozen"] == 1.0  # joined in round 2
    assert ring.history[1]["nodes"][0]["priors_frozen"] == 0.0
    assert ring.learners[1].rounds_trained == 2 and ring.learners[0].rounds_trained == 3


def test_the_ring_runs_the_servers_participation_and_hub():
    """run_ring is the server's own round: the hub's reduction and the evaluation of its
    aggregate, the relay's participation draw, the trained learners handed back."""
    from strategies.membership import sample_participants

    cfg = RunConfig(
        dataset="digits", device="cpu", method="fedavg", local_epochs=1, participation=0.5
    )
    ring = run_ring(cfg, num_clients=4, rounds=3)
    for record in ring.history:
        drawn = sample_participants(cfg.seed, record["round"], 4, 0.5)
        assert [k for k, n in enumerate(record["nodes"]) if n] == drawn
        assert "aggregate_local_t_acc" in record["mean"]
    trained = [
        sum(k in sample_participants(cfg.seed, r, 4, 0.5) for r in (1, 2, 3)) for k in range(4)
    ]
    assert [learner.rounds_trained for learner in ring.learners] == trained
    assert [d.num_classes for d in ring.data] == [10] * 4
