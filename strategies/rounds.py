"""The one round loop every method runs on: membership, schedule, evaluation cadence,
byte counting and a typed report per round. What a node receives is up to a router:
the relay (decentralized methods: in-neighbours' payloads, never averaged) or the hub
(centralized methods: one reduced aggregate for everyone).

Two schedules:

* ``synchronous``: every node trains in parallel on what it was routed from the
  previous round. One round costs one local training.
* ``sequential``: Algorithm 1 of paper 001 literally (relay only). Nodes train one after
  another in ring order, each on what its predecessor sent moments before, so a payload
  travels the whole ring once per round.

Who is messaged, routed from and failed is the membership's to say
(:mod:`strategies.membership`): ring positions are partition ids; a node that errors or
misses the round timeout is failed for that round and suspended until it answers again
(one failed node never ends a run); a partition not yet seen joins when it appears;
with ``participation`` below 1 only the round's drawn positions take part, the others
are not messaged (their state stays as it is) and the router routes around them as
around a dead node (the relay hands a participant its nearest participating
in-neighbours' latest payloads; the hub reduces the participants' replies and sends its
aggregate to participants only). Sequential rounds take the participants in ring order.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from strategies.membership import UNREACHABLE, Member, Membership
from strategies.topology import MODES
from strategies.wire import (
    CONFIG,
    EVALUATE_KEY,
    IN_META_PREFIX,
    MADE_IN_ROUND,
    METRICS,
    OUT_PAYLOAD,
    REJECTIONS,
    SERVER_ROUND,
    content_bytes,
    reply_bytes,
)


@dataclass(frozen=True)
class Reply:
    """One node's answer to a train message: its payload (as it came, for the relay to
    forward untouched) and its metrics."""

    partition_id: int
    payload: ArrayRecord
    metrics: dict[str, float]


def mean_std(per_node: dict[Any, dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Unweighted mean and std over nodes of every numeric metric any node reported."""
    keys = sorted({k for metrics in per_node.values() for k in metrics})
    mean, std = {}, {}
    for key in keys:
        values = [m[key] for m in per_node.values() if key in m and not math.isnan(float(m[key]))]
        if values:
            mean[key] = float(np.mean(values))
            std[key] = float(np.std(values))
    return mean, std


class NothingTrainedError(RuntimeError):
    """Every node asked in a round failed: nothing trained (see RoundLoop)."""


AGGREGATE_PREFIX = "aggregate_"  # metrics of the hub's fresh aggregate (Router.scores_aggregate)


@dataclass
class RoundReport:
    """What one round did: per node metrics (training, evaluation, bytes), who each node
    received from, who failed. Its readers (the progress line, the alarms, the grid
    runner, the in-process ring) take it as it is; ``to_record()`` is its one
    serialization, the line in ``metrics.jsonl``."""

    round: int
    mode: str
    topology: str
    seconds: float = 0.0
    failed: list[int] = field(default_factory=list)
    rejoined: list[int] = field(default_factory=list)  # partitions re-admitted this round
    joined: list[int] = field(default_factory=list)  # partitions seen for the first time
    absent: list[int] = field(default_factory=list)  # partitions not seen yet
    participants: list[int] = field(default_factory=list)  # partitions drawn to take part
    node_ids: dict[int, int] = field(default_factory=dict)  # partition -> Flower node id
    nodes: dict[int, dict[str, float]] = field(default_factory=dict)
    received_from: dict[int, list[int]] = field(default_factory=dict)
    # partition -> {sender: reason} for every payload the node refused
    rejections: dict[int, dict[str, str]] = field(default_factory=dict)
    # partition -> {sender: round its payload was made in} for payloads older than the
    # previous round (the sender sat out since): what the in-meta's made-in-round says
    stale: dict[int, dict[str, int]] = field(default_factory=dict)
    # partition -> why the hub left its contribution out of the round's aggregate
    left_out: dict[int, str] = field(default_factory=dict)
    # partition -> the error its ClientApp answered with (it raised)
    errors: dict[int, str] = field(default_factory=dict)
    # partition -> why no training reply came: Flower's word that the node is unavailable
    # (its heartbeat lapsed: a dead SuperNode) or no answer at all within the round timeout
    unanswered: dict[int, str] = field(default_factory=dict)
    asked: int = 0  # train messages sent this round
    trained: int = 0  # of which came back with a reply that is not an error
    raised: int = 0  # of which came back with the error of a ClientApp that raised
    # the run's first round only: seconds from asking every node to all of them placed
    discovery_seconds: float | None = None

    def node(self, partition_id: int) -> dict[str, float]:
        return self.nodes.setdefault(partition_id, {})

    @property
    def mean(self) -> dict[str, float]:
        """Every metric's unweighted mean over the nodes that reported it."""
        return mean_std(self.nodes)[0]

    @property
    def std(self) -> dict[str, float]:
        return mean_std(self.nodes)[1]

    def to_record(self) -> dict[str, Any]:
        mean, std = mean_std(self.nodes)
        record = {
            "round": self.round,
            "mode": self.mode,
            "topology": self.topology,
            "seconds": self.seconds,
            "failed": self.failed,
            "rejoined": self.rejoined,
            "joined": self.joined,
            "absent": self.absent,
            "participants": self.participants,
            "node_ids": {str(p): n for p, n in sorted(self.node_ids.items())},
            "nodes": {str(p): m for p, m in sorted(self.nodes.items())},
            "received_from": {str(p): s for p, s in sorted(self.received_from.items())},
            "rejections": {str(p): r for p, r in sorted(self.rejections.items())},
            "stale": {str(p): s for p, s in sorted(self.stale.items())},
            "left_out": {str(p): r for p, r in sorted(self.left_out.items())},
            "errors": {str(p): e for p, e in sorted(self.errors.items())},
            "unanswered": {str(p): e for p, e in sorted(self.unanswered.items())},
            "contributions_left_out": len(self.left_out),
            "mean": mean,
            "std": std,
        }
        if self.discovery_seconds is not None:
            record["discovery_seconds"] = self.discovery_seconds
        return record


class Router(ABC):
    """Decides what each node receives; knows nothing about the method's maths."""

    topology_name: str
    modes: tuple[str, ...] = MODES
    # Every method is scored at one point of the round, for the tables' Local-T /
    # Global-T: after the node's local training, asked for in the train message itself
    # (one restore of private state, one message and one barrier fewer per node and
    # round). True: a second, separate evaluation message carries the fresh aggregate
    # (the hub), scored as ``aggregate_local_t_acc`` / ``aggregate_global_t_acc``.
    scores_aggregate: bool = False

    @abstractmethod
    def content_for(
        self, position: int, server_round: int, members: list[Member], alive: set[int]
    ) -> tuple[RecordDict, list[int]]:
        """The train message content for one node, and the partition ids it carries."""

    @abstractmethod
    def collect(self, server_round: int, replies: dict[int, Reply]) -> dict[int, str]:
        """Take in the replies (by ring position) that answered this round; return the
        partitions whose contribution was left out, and why (a hub's screening)."""

    def evaluation_content(self, position: int, members: list[Member]) -> RecordDict:
        """What an aggregate-evaluation message carries besides its config."""
        return RecordDict()


# Seconds between looks for replies. Flower's deployed Grid.send_and_receive sleeps 3 s
# between looks (up to 3 s added to every round trip; benchmarks/deployment_speed.py);
# its in-memory (simulation) grid looks every 0.1 s.
REPLY_POLL_SECONDS = 0.2


def exchange(
    grid: Grid, messages: list[Message], timeout: float, max_in_flight: int = 0
) -> list[Message]:
    """Flower's send_and_receive (push, then pull until every reply is in or ``timeout``
    passes), looking for replies every REPLY_POLL_SECONDS.

    ``max_in_flight`` > 0 keeps at most that many messages pushed and unanswered, pushing
    the next as replies come. Flower 1.41's simulation engine needs it: ten times a
    second it asks the LinkState for each node's next message, and every ask scans every
    message stored, so 100 nodes with 100 messages out cost 100,000 checks a second,
    under the lock and the GIL the ClientApp actors' dispatch needs too (docs/scale.md).
    A deployment leaves it at 0: each SuperNode pulls only its own messages, and every
    node should have its message at once. A message still waiting when ``timeout``
    passes is never pushed (its node counts as not answering)."""
    waiting = list(messages)
    pending: set[str] = set()
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while True:
        room = len(waiting) if max_in_flight <= 0 else max_in_flight - len(pending)
        if room > 0 and waiting:
            batch, waiting = waiting[:room], waiting[room:]
            pending |= set(grid.push_messages(batch))
        if not pending:
            break
        arrived = list(grid.pull_messages(list(pending)))
        replies.extend(arrived)
        pending -= {r.metadata.reply_to_message_id for r in arrived}
        if not pending and not waiting:
            break
        if time.monotonic() >= deadline:
            break
        if not arrived or not waiting:
            time.sleep(REPLY_POLL_SECONDS)
    return replies


RoundCallback = Callable[[RoundReport], None]


class RoundLoop:
    """Runs a job's rounds over a Flower :class:`~flwr.serverapp.Grid` with one router;
    every finished round's :class:`RoundReport` goes to ``on_round``. Not a Flower
    ``Strategy``: it drives the grid itself (the relay's routing and the sequential
    schedule fit no strategy's configure/aggregate pair) and returns nothing."""

    def __init__(
        self,
        router: Router,
        mode: str = "synchronous",
        round_timeout: float = 600.0,
        node_wait_timeout: float = 300.0,
        min_nodes: int = 0,
        eval_every: int = 1,
        on_round: RoundCallback | None = None,
        participation: float = 1.0,
        seed: int = 0,
        max_in_flight: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode not in router.modes:
            raise ValueError(
                f"{type(router).__name__} runs {' or '.join(router.modes)} rounds only"
            )
        self.router = router
        self.mode = mode
        self.round_timeout = round_timeout
        self.membership = Membership(node_wait_timeout, min_nodes)
        if not 0.0 < participation <= 1.0:
            raise ValueError(f"participation must lie in (0, 1], got {participation}")
        self.participation = participation
        if max_in_flight < 0:
            raise ValueError(f"max_in_flight must be >= 0 (0 = no limit), got {max_in_flight}")
        self.max_in_flight = max_in_flight  # see exchange(): simulation engines need it
        self.seed = seed  # with the round, it draws the participants
        self.eval_every = eval_every
        self.num_rounds = 0  # set by start()
        self.on_round = on_round
        self.report = RoundReport(0, mode, router.topology_name)

    def summary(self) -> None:
        log(
            INFO,
            "%s on the %s topology, %s mode, round timeout %.0fs",
            type(self.router).__name__,
            self.router.topology_name,
            self.mode,
            self.round_timeout,
        )

    # -- training ----------------------------------------------------------------------
    def message_for(
        self, position: int, server_round: int, config: ConfigRecord, evaluate: bool = False
    ) -> Message:
        content, senders = self.router.content_for(
            position, server_round, self.membership.members, self.membership.routable()
        )
        round_config = ConfigRecord(dict(config))
        round_config[SERVER_ROUND] = server_round
        if evaluate:
            round_config[EVALUATE_KEY] = True
        content[CONFIG] = round_config
        member = self.membership.members[position]
        partition = member.partition_id
        self.report.received_from[partition] = senders
        stale = {
            name.removeprefix(IN_META_PREFIX): int(meta[MADE_IN_ROUND])
            for name, meta in content.config_records.items()
            if name.startswith(IN_META_PREFIX) and MADE_IN_ROUND in meta
        }
        if stale:
            self.report.stale[partition] = stale
        self.report.node(partition)["bytes_received"] = content_bytes(content)
        return Message(content, dst_node_id=member.node_id, message_type=MessageType.TRAIN)

    def train_messages(self, server_round: int, config: ConfigRecord) -> list[Message]:
        """One train message for every active position, in ring order."""
        evaluate = self._evaluation_due(server_round)
        return [
            self.message_for(p, server_round, config, evaluate) for p in self.membership.active()
        ]

    def _evaluation_due(self, server_round: int) -> bool:
        return server_round % self.eval_every == 0 or server_round == self.num_rounds

    def take_train_replies(self, server_round: int, replies: Iterable[Message]) -> None:
        """Count what each node sent and hand the replies to the router."""
        collected: dict[int, Reply] = {}
        for reply in replies:
            position = self.membership.position_of(reply.metadata.src_node_id)
            if position is None:
                continue
            partition = self.membership.members[position].partition_id
            if reply.has_error():
                log(
                    WARNING,
                    "round %d: node %d (partition %d) failed: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    partition,
                    reply.error.reason,
                )
                self.report.errors[partition] = str(reply.error.reason)
                self.report.raised += reply.error.code not in UNREACHABLE
                continue
            self.report.trained += 1
            payload = reply.content.array_records.get(OUT_PAYLOAD, ArrayRecord())
            metrics = dict(reply.content[METRICS]) if METRICS in reply.content else {}
            metrics.update(reply_bytes(reply))
            metrics["params_sent"] = sum(int(a.numpy().size) for a in payload.values())
            if REJECTIONS in reply.content.config_records:
                refused = {k: str(v) for k, v in reply.content.config_records[REJECTIONS].items()}
                self.report.rejections[partition] = refused
                for sender, reason in refused.items():
                    log(
                        WARNING,
                        "round %d: partition %d refused the payload of sender %s: %s",
                        server_round,
                        partition,
                        sender,
                        reason,
                    )
            self.report.node(partition).update(metrics)
            self.membership.answered(position)
            collected[position] = Reply(partition, payload, metrics)
        for partition, reason in self.router.collect(server_round, collected).items():
            self.report.left_out[partition] = reason

    def _send(self, grid: Grid, messages: list[Message], server_round: int) -> list[Message]:
        """Send train messages; nodes that fail or time out leave ``alive`` for now.

        Flower answers a message to a node it holds for dead (no heartbeat for twice the
        SuperNode's 30 s heartbeat interval) with an error reply of its own, sent from the
        SuperLink, not from the node: it is attributed here by the message it answers, so
        the log and the round record's ``unanswered`` say the true cause and how long it
        took, instead of "no answer"."""
        for message in messages:
            self.membership.messaged(self.membership.position_of(message.metadata.dst_node_id))
        self.report.asked += len(messages)
        started = time.monotonic()
        replies = exchange(grid, messages, self.round_timeout, self.max_in_flight)
        waited = time.monotonic() - started
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        answered: set[int] = set()
        from_nodes = []
        for reply in replies:
            node_id = sent_to.get(reply.metadata.reply_to_message_id)
            if node_id is None:
                continue
            answered.add(node_id)
            if self.membership.position_of(reply.metadata.src_node_id) is not None:
                from_nodes.append(reply)
            else:  # the SuperLink's own error reply for an unreachable node
                self._unanswered(
                    server_round,
                    node_id,
                    f"Flower reported the node unavailable after {waited:.0f}s "
                    f"({reply.error.reason if reply.has_error() else 'no reason given'})",
                )
        for message in messages:
            if message.metadata.dst_node_id not in answered:
                self._unanswered(
                    server_round,
                    message.metadata.dst_node_id,
                    f"no answer within the round timeout of {self.round_timeout:.0f}s",
                )
        return from_nodes

    def _unanswered(self, server_round: int, node_id: int, why: str) -> None:
        partition = self.membership.members[self.membership.position_of(node_id)].partition_id
        self.report.unanswered[partition] = why
        log(
            WARNING,
            "round %d: node %d (partition %d) skipped: %s",
            server_round,
            node_id,
            partition,
            why,
        )

    def train_round(self, grid: Grid, server_round: int, config: ConfigRecord) -> None:
        if self.mode == "synchronous":
            messages = self.train_messages(server_round, config)
            self.take_train_replies(server_round, self._send(grid, messages, server_round))
            return
        evaluate = self._evaluation_due(server_round)
        for position in self.membership.active():
            message = self.message_for(position, server_round, config, evaluate)
            self.take_train_replies(server_round, self._send(grid, [message], server_round))

    def stop_if_nothing_trained(self, server_round: int) -> None:
        """A round in which every node asked answered with an error (its ClientApp raised:
        a partitioner that cannot draw the partitions, a bad config) stops the run: a run
        in which nothing trained must not end looking like one that worked. Nodes that
        gave no answer at all (gone, restarting) are the fault tolerance's to handle, so
        a round that is only silent goes on."""
        report = self.report
        if report.asked and not report.trained and report.raised == report.asked:
            first = next(iter(sorted(report.errors.items())))
            raise NothingTrainedError(
                f"round {server_round}: none of the {report.asked} nodes asked trained; "
                f"every ClientApp failed (partition {first[0]}: {first[1].strip()[-300:]})"
            )

    # -- evaluation --------------------------------------------------------------------
    def evaluation_messages(self, server_round: int, config: ConfigRecord) -> list[Message]:
        """The router's evaluation message for every active position (the hub's fresh
        aggregate)."""
        round_config = ConfigRecord(dict(config))
        round_config[SERVER_ROUND] = server_round
        messages = []
        for position in self.membership.active():
            member = self.membership.members[position]
            content = self.router.evaluation_content(position, self.membership.members)
            content[CONFIG] = round_config
            messages.append(
                Message(content, dst_node_id=member.node_id, message_type=MessageType.EVALUATE)
            )
        return messages

    def take_evaluation_replies(self, replies: Iterable[Message]) -> None:
        """The fresh aggregate's scores, each key prefixed ``aggregate_`` so that they
        never stand in for the after-training Local-T / Global-T of the tables."""
        for reply in replies:
            position = self.membership.position_of(reply.metadata.src_node_id)
            if reply.has_error() or position is None:
                continue
            partition = self.membership.members[position].partition_id
            scores = {AGGREGATE_PREFIX + k: v for k, v in dict(reply.content[METRICS]).items()}
            self.report.node(partition).update(scores)

    # -- the loop ----------------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        num_rounds: int = 3,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        first_round: int = 1,
    ) -> None:
        """Rounds ``first_round`` .. ``num_rounds`` (a resumed run starts after its last
        completed round; what the relay held for the next round is gone, so that first
        round carries no payloads, like round 1)."""
        self.summary()
        self.num_rounds = num_rounds
        asked = time.time()
        self.membership.discover(grid)
        discovery_seconds = time.time() - asked
        log(INFO, "Discovery took %.1f s", discovery_seconds)
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        for server_round in range(first_round, num_rounds + 1):
            started = time.time()
            self.report = RoundReport(server_round, self.mode, self.router.topology_name)
            if server_round == first_round:
                self.report.discovery_seconds = discovery_seconds
            self.report.participants = self.membership.draw(
                self.seed, server_round, self.participation
            )
            if server_round > first_round:
                joined, rejoined = self.membership.refresh(grid, server_round)
                self.report.joined, self.report.rejoined = joined, rejoined
            self.train_round(grid, server_round, train_config)
            self.stop_if_nothing_trained(server_round)
            self.report.node_ids = self.membership.node_ids()
            self.report.absent = self.membership.absent()
            self.report.failed = self.membership.failed()
            if self._evaluation_due(server_round) and self.router.scores_aggregate:
                messages = self.evaluation_messages(server_round, evaluate_config)
                replies = exchange(grid, messages, self.round_timeout, self.max_in_flight)
                self.take_evaluation_replies(replies)
            self.report.seconds = time.time() - started
            if self.on_round:
                self.on_round(self.report)
