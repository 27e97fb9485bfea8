"""The relay routes each payload only to the successor, never averages, survives failures,
and counts exactly the bytes Flower serializes."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    RecordDict,
)
from flwr.common.serde import recorddict_to_proto

from strategies.relay import Relay
from strategies.rounds import RoundLoop
from strategies.topology import Ring, build_topology
from strategies.wire import OUT_PAYLOAD
from tests.fake_grid import FakeGrid


def run(grid: FakeGrid, mode: str, rounds: int = 3) -> list[dict]:
    records: list[dict] = []
    loop = RoundLoop(
        Relay(Ring()),
        mode=mode,
        node_wait_timeout=5,
        round_timeout=1,
        on_round=lambda r: records.append(r.to_record()),
    )
    loop.start(grid, num_rounds=rounds)
    return records


@pytest.mark.parametrize("num_nodes", [2, 5])
def test_synchronous_node_receives_only_predecessors_last_round_payload(num_nodes):
    grid = FakeGrid(num_nodes)
    run(grid, "synchronous")
    for p in range(num_nodes):
        assert grid.received[(p, 1)] == []
        for rnd in (2, 3):
            (only,) = grid.received[(p, rnd)]
            assert only.tolist() == [(p - 1) % num_nodes, rnd - 1]


def test_sequential_payload_travels_the_ring_within_a_round():
    grid = FakeGrid(4)
    run(grid, "sequential")
    assert grid.order == [(p, r) for r in (1, 2, 3) for p in range(4)]
    for rnd in (1, 2, 3):
        for p in range(1, 4):
            (only,) = grid.received[(p, rnd)]
            assert only.tolist() == [p - 1, rnd]  # same round: Algorithm 1
        expected_first = [] if rnd == 1 else [[3, rnd - 1]]
        assert [a.tolist() for a in grid.received[(0, rnd)]] == expected_first


@pytest.mark.parametrize("mode", ["synchronous", "sequential"])
def test_failed_node_is_bypassed_and_run_continues(mode):
    grid = FakeGrid(4, fail=lambda p, r: p == 2 and r == 2)
    records = run(grid, mode, rounds=3)
    assert [r["failed"] for r in records] == [[], [2], []]
    # the successor of the silent node gets the nearest living predecessor's payload
    (got,) = grid.received[(3, 3 if mode == "synchronous" else 2)]
    assert got[0] == 1
    assert (2, 3) in grid.order  # the node is asked again once it is back


def test_relay_forwards_payload_unchanged():
    grid = FakeGrid(3)
    loop = RoundLoop(Relay(build_topology("ring")), node_wait_timeout=5)
    loop.start(grid, num_rounds=2)
    # what the relay holds is exactly what each node sent last: no averaging
    for position, member in enumerate(loop.membership.members):
        bulk = loop.router.payloads[position]["bulk"].numpy()
        np.testing.assert_array_equal(bulk, np.full(100 + member.partition_id, 2, np.float32))


def test_counted_bytes_equal_serialized_message():
    grid = FakeGrid(3)
    records = run(grid, "synchronous", rounds=2)
    for rec in records:
        for partition, metrics in rec["nodes"].items():
            p, rnd = int(partition), rec["round"]
            sent = ArrayRecord(
                {
                    "origin": Array(np.array([p, rnd], dtype=np.int64)),
                    "bulk": Array(np.full(100 + p, rnd, np.float32)),
                }
            )
            wire = recorddict_to_proto(RecordDict({OUT_PAYLOAD: sent})).SerializeToString()
            assert metrics["bytes_sent"] == len(wire)
            assert metrics["params_sent"] == 2 + 100 + p
            assert metrics["bytes_received"] > (len(wire) if rnd > 1 else 0)


def test_whole_reply_and_transmitted_message_are_counted_beside_the_payload():
    records = run(FakeGrid(3), "synchronous", rounds=1)
    for metrics in records[0]["nodes"].values():
        assert metrics["bytes_sent"] < metrics["bytes_reply"] < metrics["bytes_message"]


def test_a_nodes_refusal_reaches_the_round_record_with_its_reason():
    reason = "payload 'stats.var' holds non-positive variances"
    grid = FakeGrid(3, rejections_fn=lambda p, rnd: {"0": reason} if (p, rnd) == (1, 2) else None)
    records = run(grid, "synchronous", rounds=2)
    assert records[0]["rejections"] == {}
    assert records[1]["rejections"] == {"1": {"0": reason}}


def test_missing_nodes_time_out_with_a_clear_error():
    class EmptyGrid(FakeGrid):
        def get_node_ids(self):
            return []

    with pytest.raises(TimeoutError, match="node-wait-timeout"):
        RoundLoop(Relay(Ring()), node_wait_timeout=0.5).start(EmptyGrid(3), num_rounds=1)


def test_a_node_that_shares_nothing_sends_nothing_on():
    """An isolated node's empty reply is not forwarded as an empty record, and counts 0
    bytes; its successor receives nothing, not a stale payload."""
    grid = FakeGrid(3, silent=frozenset({1}))
    records = run(grid, "synchronous", rounds=3)
    for rnd in (2, 3):
        assert grid.received[(2, rnd)] == []
        (got,) = grid.received[(1, rnd)]
        assert got.tolist() == [0, rnd - 1]
    for rec in records:
        assert rec["nodes"]["1"]["bytes_sent"] == 0 and rec["nodes"]["1"]["params_sent"] == 0
        assert rec["nodes"]["0"]["bytes_sent"] > 0


@pytest.mark.parametrize("mode", ["synchronous", "sequential"])
def test_relay_nodes_evaluate_in_the_train_message_on_evaluation_rounds(mode):
    """No separate evaluation message (one restore and one barrier fewer per round), and
    the accuracies still reach the round's record, on the rounds eval-every names."""
    grid, records = FakeGrid(3), []
    loop = RoundLoop(
        Relay(Ring()),
        mode=mode,
        node_wait_timeout=5,
        eval_every=2,
        on_round=lambda r: records.append(r.to_record()),
    )
    loop.start(grid, num_rounds=3)
    assert grid.eval_contents == {}
    assert sorted(grid.evaluated_in_training) == [(p, r) for p in range(3) for r in (2, 3)]
    assert ["local_t_acc" in r["mean"] for r in records] == [False, True, True]


def test_the_first_round_records_how_long_discovery_took():
    """The time to find every node is a number a large federation needs (issue 33: 1,000
    nodes in under 60 s); it is in the first round's record and nowhere else."""
    records = run(FakeGrid(4), "synchronous", rounds=3)
    assert 0.0 <= records[0]["discovery_seconds"] < 30.0
    assert all("discovery_seconds" not in r for r in records[1:])
