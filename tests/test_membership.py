"""Membership of the ring on real SuperNodes: slow nodes are asked once, a dead node costs
one round timeout, a restarted node (new Flower node id) is re-admitted by partition-id,
and with ``min-nodes`` a node that appears late joins the ring."""

from __future__ import annotations

import pytest

from strategies.relay import Relay
from strategies.rounds import RoundLoop
from strategies.topology import Ring
from tests.fake_grid import FakeGrid


def run(grid: FakeGrid, rounds: int, **loop_args) -> tuple[RoundLoop, list[dict]]:
    records: list[dict] = []
    loop = RoundLoop(
        Relay(Ring()),
        node_wait_timeout=20,
        round_timeout=1,
        on_round=lambda r: records.append(r.to_record()),
        **loop_args,
    )
    loop.start(grid, num_rounds=rounds)
    return loop, records


def node_of(grid: FakeGrid, partition: int) -> int:
    return next(n for n, p in grid.partition_of.items() if p == partition)


def test_discovery_waits_for_a_slow_node_without_asking_it_again():
    grid = FakeGrid(3)
    grid.mute, grid.unmute_at_pull = {2}, 3  # partition 2 answers on the third look
    loop, _ = run(grid, rounds=1)
    assert [m.partition_id for m in loop.membership.members] == [0, 1, 2]
    assert sorted(grid.asked) == sorted(grid.partition_of)  # each node asked exactly once


def test_a_dead_node_costs_one_round_and_is_not_messaged_again():
    grid = FakeGrid(4, fail=lambda p, r: p == 1 and r >= 2)
    dead = node_of(grid, 1)
    original_fail = grid.fail

    def fail(p, r):
        if original_fail(p, r):
            grid.mute.add(1)  # dead: it answers nothing, queries included
            return True
        return False

    grid.fail = fail
    _, records = run(grid, rounds=5)
    assert [r for p, r in grid.sent if p == 1] == [1, 2]  # round 2 lost; never sent again
    assert grid.asked.count(dead) == 2  # discovery, then one query that never returns
    assert [rec["failed"] for rec in records] == [[], [1], [1], [1], [1]]
    # the ring closed around it: partition 2 received from partition 0 from round 3 on
    assert records[2]["received_from"]["2"] == [0]


def test_a_node_flower_reports_unavailable_is_named_so_not_as_silent():
    """Flower answers a train message to a node whose heartbeat lapsed with its own error
    reply, sent from the SuperLink (node id 0), not from the node: the round names the
    node and the cause, and the ring goes on as for a silent node."""
    from flwr.app import Error, Message, MessageType
    from flwr.common.constant import ErrorCode

    grid = FakeGrid(4)
    answer = grid.answer

    def heartbeat_lapsed_in_round_2(msg):
        train = msg.metadata.message_type == MessageType.TRAIN
        if grid.partition_of.get(msg.metadata.dst_node_id) == 1 and (
            not train or int(msg.content["config"]["server-round"]) >= 2
        ):
            if not train and not grid.sent:
                return answer(msg)  # alive for discovery
            reply = Message(
                Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node unavailable"), reply_to=msg
            )
            reply.metadata.__dict__["_src_node_id"] = 0  # the SuperLink's, as in Flower
            return reply
        return answer(msg)

    grid.answer = heartbeat_lapsed_in_round_2
    _, records = run(grid, rounds=3)
    assert [rec["failed"] for rec in records] == [[], [1], [1]]
    why = records[1]["unanswered"]["1"]
    assert "Flower reported the node unavailable" in why and "Node unavailable" in why
    assert records[0]["unanswered"] == {} and records[1]["errors"] == {}
    assert records[2]["received_from"]["2"] == [0]  # the ring closed around it


def test_a_restarted_node_rejoins_under_its_new_id_and_gets_its_predecessors_payload():
    grid = FakeGrid(3)
    old = node_of(grid, 1)
    new = 424242

    def crash_then_restart(p, r):
        if (p, r) == (1, 2):  # crashes during round 2, comes back under a new id
            del grid.partition_of[old]
            grid.partition_of[new] = 1
            return True
        return False

    grid.fail = crash_then_restart
    loop, records = run(grid, rounds=4)
    assert [rec["failed"] for rec in records] == [[], [1], [], []]
    assert records[2]["rejoined"] == [1]
    assert records[1]["node_ids"]["1"] == old and records[2]["node_ids"]["1"] == new
    assert [r for p, r in grid.order if p == 1] == [1, 3, 4]
    assert records[2]["received_from"]["1"] == [0]
    assert loop.membership.members[1].node_id == new and loop.membership.position_of(old) is None


def test_a_node_that_appears_late_joins_the_ring_at_its_partition():
    grid = FakeGrid(4)
    grid.hidden = {2}
    answer = grid.answer

    def register_after_round_2(msg):
        reply = answer(msg)
        if (1, 2) in grid.order:
            grid.hidden = set()
        return reply

    grid.answer = register_after_round_2
    loop, records = run(grid, rounds=5, min_nodes=3)
    assert [rec["absent"] for rec in records] == [[2], [2], [], [], []]
    assert [rec["joined"] for rec in records] == [[], [], [2], [], []]
    assert all(rec["failed"] == [] for rec in records)  # absent is not failed
    assert [r for p, r in grid.order if p == 2] == [3, 4, 5]
    # before: the ring closed over the gap (3 heard from 1); after: 2 in its place
    assert records[1]["received_from"]["3"] == [1]
    assert records[2]["received_from"]["2"] == [1]  # the joiner gets its predecessor's
    assert records[3]["received_from"]["3"] == [2]  # and its successor gets the joiner's
    assert "2" not in records[0]["nodes"] and "2" in records[2]["nodes"]
    assert [m.partition_id for m in loop.membership.members] == [0, 1, 2, 3]


def test_without_min_nodes_discovery_waits_for_every_partition():
    grid = FakeGrid(3)
    grid.hidden = {1}
    loop = RoundLoop(Relay(Ring()), node_wait_timeout=1.5)
    with pytest.raises(TimeoutError, match="only 2 of 3 nodes"):
        loop.membership.discover(grid)


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        ([(0, 2), (0, 2)], "both say partition-id=0"),
        ([(0, 2), (5, 2)], "partition-id=5, outside 0..1"),
        ([(0, 2), (1, 3)], "num-partitions=3, others said 2"),
    ],
)
def test_inconsistent_node_configs_are_named(answers, message):
    grid = FakeGrid(2)
    pull = grid.pull_messages

    def lying_pull(ids):  # the two nodes answer (partition-id, num-partitions) as given
        replies = pull(ids)
        for reply, (partition_id, num_partitions) in zip(replies, answers, strict=True):
            reply.content["config"]["partition-id"] = partition_id
            reply.content["config"]["num-partitions"] = num_partitions
        return replies

    grid.pull_messages = lying_pull
    with pytest.raises(ValueError, match=message):
        RoundLoop(Relay(Ring()), node_wait_timeout=5).membership.discover(grid)


def test_min_nodes_above_num_partitions_is_named():
    with pytest.raises(ValueError, match="min-nodes=5 exceeds the nodes' num-partitions=3"):
        RoundLoop(Relay(Ring()), node_wait_timeout=5, min_nodes=5).membership.discover(FakeGrid(3))


def test_a_late_node_with_another_num_partitions_is_not_admitted():
    grid = FakeGrid(3)
    grid.hidden = {2}
    pull = grid.pull_messages

    def pull_then_show_a_misconfigured_node(ids):
        replies = pull(ids)
        for reply in replies:
            info = reply.content.config_records.get("config")
            if info is not None and info["partition-id"] == 2:  # it says M = 4
                info["num-partitions"] = 4
        grid.hidden = set()
        return replies

    grid.pull_messages = pull_then_show_a_misconfigured_node
    _, records = run(grid, rounds=3, min_nodes=2)
    assert [rec["absent"] for rec in records] == [[2], [2], [2]]
    assert all(rec["joined"] == [] for rec in records)


def unreachable_once(grid: FakeGrid, partition: int, code: int):
    """The first description query to ``partition`` comes back as Flower's error ``code``
    (the SuperLink's answer for a node it has had no heartbeat from)."""
    from flwr.app import Error, Message, MessageType

    answer, refused = grid.answer, []

    def once(msg):
        query = msg.metadata.message_type == MessageType.QUERY
        if query and grid.partition_of.get(msg.metadata.dst_node_id) == partition and not refused:
            refused.append(msg)
            return Message(Error(code=code, reason="Node Unavailable"), reply_to=msg)
        return answer(msg)

    grid.answer = once
    return refused


def test_a_node_flower_could_not_reach_during_discovery_is_asked_again_not_an_error():
    from flwr.common.constant import ErrorCode

    grid = FakeGrid(3)
    refused = unreachable_once(grid, 2, ErrorCode.NODE_UNAVAILABLE)
    loop, records = run(grid, rounds=1)
    assert refused and [m.partition_id for m in loop.membership.members] == [0, 1, 2]
    assert grid.asked.count(node_of(grid, 2)) == 2 and records[0]["failed"] == []


def test_a_node_whose_clientapp_fails_to_describe_itself_still_stops_discovery():
    from flwr.common.constant import ErrorCode

    grid = FakeGrid(3)
    unreachable_once(grid, 2, ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
    with pytest.raises(RuntimeError, match="could not describe itself"):
        run(grid, rounds=1)
