"""The simulation engine's message extractor (drdfl_flwr/vce_delivery.py) hands the
actors what Flower's own would, in one scan per tick instead of one per node: each
node's oldest undelivered message once, stamped delivered; nothing for nodes outside the
engine's mapping; invalid messages left to the LinkState's own check. Compared tick by
tick against Flower 1.41's ``InMemoryLinkState.get_message_ins`` on the same store."""

from __future__ import annotations

import copy
import threading
from types import SimpleNamespace

import pytest
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

from drdfl_flwr.vce_delivery import waiting_messages

pytestmark = pytest.mark.fast


class Store:
    """The fields of Flower's in-memory LinkState that both extractors read; its
    validity check drops the messages marked expired (Flower's checks TTL and
    federation membership, and writes error replies)."""

    def __init__(self, messages: dict[str, SimpleNamespace]) -> None:
        self.lock = threading.RLock()
        self.message_ins_store = messages
        self.checked: list[set[str]] = []

    def _check_stored_messages(self, message_ids: set[str], run_id=None) -> None:
        self.checked.append(set(message_ids))
        for message_id in message_ids:
            if self.message_ins_store[message_id].expired:
                del self.message_ins_store[message_id]


def message(node: int, expired: bool = False) -> SimpleNamespace:
    meta = SimpleNamespace(dst_node_id=node, delivered_at="", run_id=1)
    return SimpleNamespace(metadata=meta, expired=expired)


def flowers_tick(state: Store, nodes: list[int]) -> list[SimpleNamespace]:
    """One tick of Flower 1.41's ``add_messages_to_queue``: every node, limit 1."""
    out = []
    for node in nodes:
        out += InMemoryLinkState.get_message_ins(state, node_id=node, limit=1)
    return out


def ticks(extract, state: Store, nodes: list[int]) -> list[list[tuple[str, int]]]:
    ids = {id(m): k for k, m in state.message_ins_store.items()}
    rounds = []
    while True:
        taken = extract(state, nodes)
        if not taken:
            return rounds
        assert all(m.metadata.delivered_at for m in taken)
        rounds.append(sorted((ids[id(m)], m.metadata.dst_node_id) for m in taken))


def test_each_tick_delivers_what_flowers_extractor_delivers():
    messages = {}
    for k, node in enumerate([5, 7, 5, 9, 7, 5, 11, 9]):  # 11 is not in the engine's mapping
        messages[f"m{k}"] = message(node, expired=(k == 3))
    messages["m1"].metadata.delivered_at = "2026-12-06T00:00:00"  # already delivered
    nodes = [5, 7, 9]
    theirs = ticks(flowers_tick, Store(copy.deepcopy(messages)), nodes)
    ours = ticks(lambda s, n: waiting_messages(s, set(n)), Store(copy.deepcopy(messages)), nodes)
    assert ours == theirs
    # one per node per tick, the oldest first; m3 expired, m1 was delivered before
    assert ours == [[("m0", 5), ("m4", 7), ("m7", 9)], [("m2", 5)], [("m5", 5)]]


def test_nothing_waiting_costs_no_check_and_no_call_per_node():
    state = Store({"a": message(1)})
    state.message_ins_store["a"].metadata.delivered_at = "done"
    assert waiting_messages(state, set(range(1000))) == []
    assert state.checked == []  # not even Flower's validity check: nothing to deliver


def test_simulate_puts_it_in_place_of_flowers_extractor():
    from flwr.server.superlink.fleet.vce import vce_api

    from drdfl_flwr import vce_delivery

    assert vce_delivery.install()
    assert vce_api.add_messages_to_queue is vce_delivery._extractor
    assert vce_delivery.install()  # twice is once
    assert vce_delivery._ORIGINAL[0] is not vce_delivery._extractor
