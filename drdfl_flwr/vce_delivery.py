"""How Flower's simulation engine hands messages to its ClientApp actors, made to cost
what the messages cost rather than what the federation's size costs.

Why. Flower 1.41's engine (``flwr.server.superlink.fleet.vce.vce_api``) runs a thread,
``add_messages_to_queue``, that ten times a second asks the LinkState for the next
message of *every* node in the federation, one call per node, and each call scans
*every* message stored. With 1,000 nodes that is 1,000 calls a tick even when only the
100 nodes drawn for a round have anything waiting, and while discovery has a message out
to each of the 1,000, 1,000 x 1,000 checks a tick, all under the LinkState's lock and the
GIL the actors' dispatch needs too (measured: a 1,000-client discovery took 83 s beside
other work on this machine, and the driver process held 30 % of a core in the rounds).

What changes. :func:`add_messages_to_queue` replaces Flower's extractor with one scan of
the stored messages per tick: each node's oldest undelivered message goes to the queue,
stamped delivered, after the same validity check Flower's ``get_message_ins`` makes
(expired messages and those between nodes no longer in the federation are deleted by
the LinkState's own ``_check_stored_messages``, which writes their error replies). At
most one message per node per tick, as Flower's ``limit=1``; nodes outside the engine's
node mapping are left alone, as Flower's loop over that mapping leaves them.

It reads the in-memory LinkState's own fields (``lock``, ``message_ins_store``), so it
is installed only on the Flower version it was written against (:data:`WRITTEN_FOR`) and
only when that LinkState has them; anywhere else Flower's own extractor runs, with a
warning. ``DRDFL_FLOWER_EXTRACTOR=1`` in the environment keeps Flower's own (to measure
the difference). Installed by :func:`drdfl_flwr.simulation.simulate` (grids, notebooks,
benchmarks); ``flwr run`` starts Flower's engine without it. A deployment (SuperLink
and SuperNodes) does not use this engine at all.
"""

from __future__ import annotations

import os
import threading
from logging import WARNING
from queue import Queue
from typing import Any

import flwr
from flwr.common.logger import log
from flwr.supercore.date import now

WRITTEN_FOR = "1.41."
# set to 1, Flower's own extractor stays (benchmarks/overhead.py --flower-extractor)
KEEP_FLOWERS = "DRDFL_FLOWER_EXTRACTOR"


def waiting_messages(state: Any, nodes: Any) -> list[Any]:
    """Each node's oldest undelivered, still valid message (nodes in ``nodes`` only),
    stamped delivered under the LinkState's lock: what one tick of Flower's extractor
    takes with ``get_message_ins(node_id, limit=1)`` for every node, in one scan."""
    with state.lock:
        candidates = {
            message_id
            for message_id, message in state.message_ins_store.items()
            if message.metadata.delivered_at == "" and message.metadata.dst_node_id in nodes
        }
        if not candidates:
            return []
        state._check_stored_messages(candidates)  # Flower's own validity check and cleanup
        taken: dict[int, Any] = {}
        for message_id, message in state.message_ins_store.items():  # insertion order
            if message_id in candidates and message.metadata.dst_node_id not in taken:
                taken[message.metadata.dst_node_id] = message
        stamp = now().isoformat()
        for message in taken.values():
            message.metadata.delivered_at = stamp
        return list(taken.values())


def add_messages_to_queue(
    state: Any, queue: Queue, nodes_mapping: Any, f_stop: threading.Event
) -> None:
    """Flower's extractor thread, one scan of the stored messages per tick."""
    while not f_stop.is_set():
        for message in waiting_messages(state, nodes_mapping):
            queue.put(message)
        f_stop.wait(0.1)


_ORIGINAL: list[Any] = []  # Flower's extractor, once ours is in place (at most one)


def _extractor(state: Any, queue: Queue, nodes_mapping: Any, f_stop: threading.Event) -> None:
    if hasattr(state, "message_ins_store") and hasattr(state, "lock"):
        add_messages_to_queue(state, queue, nodes_mapping, f_stop)
    else:
        log(WARNING, "Unknown LinkState %s: Flower's own message extractor runs", type(state))
        _ORIGINAL[0](state, queue, nodes_mapping, f_stop)


def install() -> bool:
    """Put :func:`add_messages_to_queue` in place of Flower's extractor (once per
    process); True if it is in place."""
    if _ORIGINAL:  # in place already
        return True
    if os.environ.get(KEEP_FLOWERS) == "1":  # a benchmark's "before"
        return False
    if not flwr.__version__.startswith(WRITTEN_FOR):
        log(
            WARNING,
            "drdfl_flwr.vce_delivery was written for Flower %sx, this is %s: Flower's own "
            "message extractor runs (a federation of thousands polls every node each tick)",
            WRITTEN_FOR,
            flwr.__version__,
        )
        return False
    from flwr.server.superlink.fleet.vce import vce_api

    _ORIGINAL.append(vce_api.add_messages_to_queue)
    vce_api.add_messages_to_queue = _extractor
    return True
