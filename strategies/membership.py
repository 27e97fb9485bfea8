"""Who is in the ring, and who takes part in a round: the round loop's one membership
object, beside the topology (which says who hears whom among those it is told are there).

Ring positions are partition ids 0..M-1 (M = the nodes' ``num-partitions``). Each slot
holds the Flower node id of its partition (identity: partition <-> node id; a restarted
SuperNode comes back with a new id and takes its slot again) and one liveness state:

* ``ABSENT``: its partition has not appeared yet (``min-nodes`` below M); it joins when
  it does, and is bypassed like a dead node until then;
* ``ACTIVE``: discovered, or answered its last train message;
* ``UNANSWERED``: messaged this round and gave no answer, or an error (it is failed for
  this round, and suspended from the next: a dead node costs one round timeout);
* ``SUSPENDED``: not messaged until it answers a description query;
* ``ADMITTED``: answered a query since and not messaged since (it sat out): neither
  failed nor suspended again for not having trained.

Apart from the states, the round's participants (``participation`` below 1, FedAvg's
client sampling: :func:`sample_participants`): a slot that is not drawn sits out the
round, its state left as it is. The round loop asks this object who is messaged
(:meth:`active`), whom a router may route from (:meth:`routable`) and who failed
(:meth:`failed`); :meth:`discover` forms the ring and :meth:`refresh` admits nodes
between rounds, both by asking each node once who it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from strategies.wire import CONFIG, NUM_PARTITIONS, PARTITION_ID

ABSENT = -1  # the node id of a ring slot whose partition has not appeared yet

# the liveness state of a slot (see the module's docstring)
ABSENT_SLOT = "absent"
ACTIVE = "active"
UNANSWERED = "unanswered"
SUSPENDED = "suspended"
ADMITTED = "admitted"

# Flower's error codes that say a node or its message could not be reached, not that the
# node's ClientApp failed: a query answered so is asked again rather than held against it
UNREACHABLE = (
    ErrorCode.NODE_UNAVAILABLE,
    ErrorCode.MESSAGE_UNAVAILABLE,
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
)


@dataclass(frozen=True)
class Member:
    node_id: int
    partition_id: int

    @property
    def present(self) -> bool:
        return self.node_id != ABSENT


def sample_participants(
    seed: int, server_round: int, num_nodes: int, participation: float
) -> list[int]:
    """The ring positions that take part in ``server_round``, in ring order:
    ``max(1, round(participation * num_nodes))`` of ``0..num_nodes-1`` drawn without
    replacement by ``numpy.random.default_rng([seed, server_round])``; everyone at 1."""
    if not 0.0 < participation <= 1.0:
        raise ValueError(f"participation must lie in (0, 1], got {participation}")
    if participation == 1.0 or num_nodes == 0:
        return list(range(num_nodes))
    size = max(1, round(participation * num_nodes))
    rng = np.random.default_rng([seed % 2**64, server_round])
    return sorted(int(p) for p in rng.choice(num_nodes, size=size, replace=False))


class Membership:
    """The ring's slots, their liveness, this round's participants, and the description
    queries still out (see the module's docstring)."""

    def __init__(self, node_wait_timeout: float = 300.0, min_nodes: int = 0) -> None:
        if min_nodes < 0:
            raise ValueError(f"min-nodes must be >= 0 (0 = all), got {min_nodes}")
        self.node_wait_timeout = node_wait_timeout
        self.min_nodes = min_nodes
        self.members: list[Member] = []  # by ring position
        self.states: list[str] = []  # by ring position
        self._position_of: dict[int, int] = {}  # node id -> ring position
        self.participants: list[int] | None = None  # None: every position
        self._asked: dict[str, int] = {}  # pending description queries: message id -> node id

    def __len__(self) -> int:
        return len(self.members)

    # -- who ------------------------------------------------------------------------
    def position_of(self, node_id: int) -> int | None:
        return self._position_of.get(node_id)

    def draw(self, seed: int, server_round: int, participation: float) -> list[int]:
        """Draw this round's participants (:func:`sample_participants`); their partitions."""
        self.participants = sample_participants(
            seed, server_round, len(self.members), participation
        )
        return [self.members[p].partition_id for p in self.participants]

    def _taking_part(self) -> set[int]:
        if self.participants is None:
            return set(range(len(self.members)))
        return set(self.participants)

    def active(self) -> list[int]:
        """Ring positions that get this round's messages, in ring order: the participants
        but the suspended and the absent."""
        taking_part = self._taking_part()
        return [
            p
            for p, state in enumerate(self.states)
            if state not in (SUSPENDED, ABSENT_SLOT) and p in taking_part
        ]

    def routable(self) -> set[int]:
        """The positions a router may route from: the living participants (a node that
        sits out is bypassed like a dead one)."""
        alive = {p for p, state in enumerate(self.states) if state == ACTIVE}
        return alive & self._taking_part()

    def failed(self) -> list[int]:
        """Partitions present but neither alive nor admitted: those that did not answer
        this round and those suspended since."""
        return [
            m.partition_id
            for m, state in zip(self.members, self.states, strict=True)
            if state in (UNANSWERED, SUSPENDED) and m.present
        ]

    def absent(self) -> list[int]:
        return [m.partition_id for m in self.members if not m.present]

    def node_ids(self) -> dict[int, int]:
        """partition -> Flower node id, of every partition present."""
        return {m.partition_id: m.node_id for m in self.members if m.present}

    # -- a round's train messages -----------------------------------------------------
    def messaged(self, position: int) -> None:
        """A train message went to ``position``: it is alive again only if it answers."""
        self.states[position] = UNANSWERED

    def answered(self, position: int) -> None:
        self.states[position] = ACTIVE

    # -- discovery ----------------------------------------------------------------------
    def _ask(self, grid: Grid, node_ids: list[int]) -> None:
        """Send each node one description query; its answer is collected whenever it comes
        (a node asked is never asked again while its answer is pending)."""
        pending = set(self._asked.values())
        node_ids = [n for n in dict.fromkeys(node_ids) if n not in pending]
        if not node_ids:
            return
        queries = [
            Message(RecordDict({}), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids
        ]
        for node_id, message_id in zip(node_ids, grid.push_messages(queries), strict=True):
            self._asked[message_id] = node_id

    def _answers(self, grid: Grid, strict: bool) -> list[tuple[int, int, int]]:
        """(node id, partition-id, num-partitions) of every answer that has arrived. A node
        that cannot describe itself is an error while the ring forms (``strict``), a
        warning afterwards (the ring goes on without it). A node Flower could not reach
        (no heartbeat lately: a device that froze, a SuperLink that restarted moments
        ago) is neither: it is asked again."""
        if not self._asked:
            return []
        answers = []
        for reply in grid.pull_messages(list(self._asked)):
            node_id = self._asked.pop(reply.metadata.reply_to_message_id, None)
            if node_id is None:
                continue
            if reply.has_error() and reply.error.code in UNREACHABLE:
                # the network's doing, not the node config's: asked again on the next look
                log(INFO, "node %d not reachable yet: %s", node_id, reply.error.reason)
                continue
            if reply.has_error():
                reason = (
                    f"node {node_id} could not describe itself (is its node config right?): "
                    f"{reply.error.reason}"
                )
                if strict:
                    raise RuntimeError(reason)
                log(WARNING, reason)
                continue
            info = reply.content[CONFIG]
            answers.append((node_id, int(info[PARTITION_ID]), int(info[NUM_PARTITIONS])))
        return answers

    def discover(self, grid: Grid) -> list[Member]:
        """Ask every node for its partition id until enough have answered.

        Nodes may register after the ServerApp starts, and may answer slowly (a fresh
        ClientApp process per message): each node is asked once, answers are collected
        as they come, until all ``num-partitions`` (announced by the nodes themselves), or
        ``min-nodes`` of them when set, have answered, or ``node-wait-timeout`` passes.
        The partitions still missing get absent slots and join when they appear.
        """
        deadline = time.monotonic() + self.node_wait_timeout
        known: dict[int, int] = {}  # partition id -> node id
        expected: int | None = None
        shown = None  # the last waiting state logged: a line when it changes, not per second
        while True:
            self._ask(grid, [n for n in grid.get_node_ids() if n not in known.values()])
            for node_id, partition_id, num_partitions in self._answers(grid, strict=True):
                self._check_discovered(known, expected, node_id, partition_id, num_partitions)
                known[partition_id] = node_id
                expected = num_partitions
            if expected is not None and len(known) >= (self.min_nodes or expected):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(known)} of {expected or '?'} nodes answered within "
                    f"node-wait-timeout={self.node_wait_timeout}s"
                    + (f" (min-nodes={self.min_nodes})" if self.min_nodes else "")
                )
            if shown != (len(known), expected):
                shown = (len(known), expected)
                log(INFO, "Waiting for nodes: %d of %s answered", len(known), expected or "?")
            time.sleep(1.0)
        assert expected is not None
        self.members = [Member(known.get(p, ABSENT), p) for p in range(expected)]
        self.states = [ACTIVE if m.present else ABSENT_SLOT for m in self.members]
        self._position_of = {m.node_id: m.partition_id for m in self.members if m.present}
        missing = self.absent()
        log(
            INFO,
            "%d nodes ordered by partition-id%s",
            len(known),
            f"; partitions {missing} join when they appear" if missing else "",
        )
        return self.members

    def _check_discovered(
        self,
        known: dict[int, int],
        expected: int | None,
        node_id: int,
        partition_id: int,
        num_partitions: int,
    ) -> None:
        """Every node config must name the same ring, and each partition once."""
        if expected is not None and num_partitions != expected:
            raise ValueError(
                f"node {node_id} says num-partitions={num_partitions}, others "
                f"said {expected}: every node config must name the same"
            )
        if not 0 <= partition_id < num_partitions:
            raise ValueError(
                f"node {node_id} says partition-id={partition_id}, outside "
                f"0..{num_partitions - 1} (num-partitions={num_partitions})"
            )
        if partition_id in known:
            raise ValueError(
                f"nodes {known[partition_id]} and {node_id} both say partition-id={partition_id}"
            )
        if self.min_nodes > num_partitions:
            raise ValueError(
                f"min-nodes={self.min_nodes} exceeds the nodes' num-partitions={num_partitions}"
            )

    def refresh(self, grid: Grid, server_round: int) -> tuple[list[int], list[int]]:
        """Between rounds: admit nodes by partition-id, without waiting for anyone;
        returns the partitions that joined (first seen) and those that rejoined.

        A node that gave no answer is suspended (not messaged, so a dead node costs one
        round timeout, not one per round). Every node Flower lists that is not a current
        member, and every suspended member still listed, is asked once who it is; an
        answer naming a ring position admits that position under the answering node id:
        a restarted SuperNode comes back with a new id and resumes its private state
        from its own checkpoint; a node whose partition was absent joins the ring."""
        self.states = [SUSPENDED if s == UNANSWERED else s for s in self.states]
        listed = set(grid.get_node_ids())
        suspended_ids = {
            m.node_id
            for m, state in zip(self.members, self.states, strict=True)
            if state in (SUSPENDED, ABSENT_SLOT)
        }
        strangers = [n for n in listed if n not in self._position_of]
        self._ask(grid, strangers + sorted(suspended_ids & listed))
        joined: list[int] = []
        rejoined: list[int] = []
        for node_id, partition_id, num_partitions in self._answers(grid, strict=False):
            if num_partitions != len(self.members) or not 0 <= partition_id < num_partitions:
                log(
                    WARNING,
                    "round %d: node %d says partition-id=%d num-partitions=%d, not a place "
                    "in this ring of %d; ignored (check its node config)",
                    server_round,
                    node_id,
                    partition_id,
                    num_partitions,
                    len(self.members),
                )
                continue
            position = partition_id  # ring positions are partition ids 0..M-1
            old = self.members[position]
            if old.node_id != node_id:
                self._bind(position, node_id, server_round)
            if self.states[position] in (SUSPENDED, ABSENT_SLOT):
                self.states[position] = ADMITTED
                (rejoined if old.present else joined).append(partition_id)
        return joined, rejoined

    def _bind(self, position: int, node_id: int, server_round: int) -> None:
        """Ring position ``position`` is now node ``node_id``'s."""
        old = self.members[position]
        self._position_of.pop(old.node_id, None)
        self.members[position] = Member(node_id, old.partition_id)
        self._position_of[node_id] = position
        if old.present:
            log(
                INFO,
                "round %d: partition %d rejoins as node %d (was node %d)",
                server_round,
                old.partition_id,
                node_id,
                old.node_id,
            )
        else:
            log(
                INFO,
                "round %d: partition %d joins as node %d",
                server_round,
                old.partition_id,
                node_id,
            )
