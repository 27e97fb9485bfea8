"""The round loop's traffic: what it counts (bytes as Flower serializes them) and how
many messages it keeps out at once (``max_in_flight``, for Flower's simulation engine)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.serde import message_to_proto

from strategies.relay import Relay
from strategies.rounds import RoundLoop, exchange
from strategies.topology import build_topology
from strategies.wire import CONFIG, METRICS, OUT_PAYLOAD, content_bytes, field_bytes, reply_bytes
from tests.fake_grid import FakeGrid


@pytest.mark.parametrize("size", [0, 1, 15, 16, 127, 128, 40_000, 2_100_000])
def test_reply_sizes_equal_a_full_serialization_of_each_part(size):
    payload = ArrayRecord({"w": Array(np.zeros(size, np.float32))}) if size else ArrayRecord()
    content = RecordDict({OUT_PAYLOAD: payload, METRICS: MetricRecord({"loss": 1.0})})
    reply = Message(content, dst_node_id=5, message_type="train")
    expected_sent = content_bytes(RecordDict({OUT_PAYLOAD: payload})) if size else 0
    assert reply_bytes(reply) == {
        "bytes_sent": expected_sent,
        "bytes_reply": content_bytes(content),
        "bytes_message": message_to_proto(reply).ByteSize(),
    }


@pytest.mark.parametrize("size", [0, 127, 128, 16_383, 16_384, 2**21])
def test_field_bytes_is_protobufs_length_delimited_encoding(size):
    record = ConfigRecord({"b": b"x" * size})
    item_alone = content_bytes(RecordDict({"k": record}))
    # a RecordDict of one item is that item as a length-delimited field
    from flwr.common.serde import recorddict_to_proto

    item = recorddict_to_proto(RecordDict({"k": record})).items[0]
    assert field_bytes(item.ByteSize()) == item_alone


class CountingGrid(FakeGrid):
    """Records the most train messages ever pushed and not yet answered."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.most_in_flight = 0

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        out = [m for m in self.pending.values() if m.metadata.message_type == "train"]
        self.most_in_flight = max(self.most_in_flight, len(out))
        return ids

    def pull_messages(self, message_ids):
        """One train message answered per look, as from a slow engine."""
        trains = [m for m in message_ids if self.pending[m].metadata.message_type == "train"]
        return super().pull_messages(trains[:1] or message_ids)


def ring_loop(max_in_flight: int) -> RoundLoop:
    return RoundLoop(Relay(build_topology("ring")), max_in_flight=max_in_flight)


def test_max_in_flight_bounds_the_messages_out_and_every_node_still_trains(monkeypatch):
    monkeypatch.setattr("strategies.rounds.REPLY_POLL_SECONDS", 0.0)
    grid = CountingGrid(12)
    ring_loop(3).start(grid, num_rounds=2)
    assert grid.most_in_flight == 3
    assert sorted(grid.order) == sorted((p, r) for p in range(12) for r in (1, 2))


def test_without_a_limit_every_message_goes_out_at_once(monkeypatch):
    monkeypatch.setattr("strategies.rounds.REPLY_POLL_SECONDS", 0.0)
    grid = CountingGrid(12)
    ring_loop(0).start(grid, num_rounds=1)
    assert grid.most_in_flight == 12


def test_a_message_never_pushed_before_the_timeout_counts_as_unanswered(monkeypatch):
    monkeypatch.setattr("strategies.rounds.REPLY_POLL_SECONDS", 0.0)
    grid = FakeGrid(4, fail=lambda p, r: True)  # nobody answers
    config = RecordDict({CONFIG: ConfigRecord({"server-round": 1})})
    messages = [Message(config, dst_node_id=n, message_type="train") for n in grid.partition_of]
    assert exchange(grid, messages, timeout=0.0, max_in_flight=2) == []
    assert grid.pushed == 2  # the other two waited and were never sent


def test_a_negative_limit_is_refused_by_name():
    with pytest.raises(ValueError, match="max_in_flight"):
        ring_loop(-1)
