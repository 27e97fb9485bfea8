"""An in-process Grid for strategy tests: per-node handlers, everything logged."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from strategies.wire import (
    CONFIG,
    EVALUATE_KEY,
    IN_PAYLOAD_PREFIX,
    METRICS,
    OUT_PAYLOAD,
    REJECTIONS,
)

EVAL_METRICS = {"local_t_acc": 0.5, "global_t_acc": 0.25}


class FakeGrid(Grid):
    """Answers messages by calling per-node handlers in-process, logging everything."""

    def __init__(
        self,
        num_nodes: int,
        fail: Callable[[int, int], bool] = lambda p, r: False,
        silent: frozenset[int] = frozenset(),
        payload_fn: Callable[[int, int], ArrayRecord] | None = None,
        rejections_fn: Callable[[int, int], dict[str, str]] | None = None,
    ):
        # node ids deliberately not in partition order
        self.partition_of = {1000 + 7 * (num_nodes - p): p for p in range(num_nodes)}
        self.num_nodes = num_nodes
        self.fail = fail
        self.silent = silent  # partitions that reply with an empty payload (isolated)
        self.received: dict[tuple[int, int], list[np.ndarray]] = {}  # (partition, round)
        self.order: list[tuple[int, int]] = []  # training order of (partition, round)
        self.contents: dict[tuple[int, int], RecordDict] = {}  # train message per (p, round)
        self.eval_contents: dict[tuple[int, int], RecordDict] = {}  # evaluate messages
        self.payload_fn = payload_fn  # (partition, round) -> reply payload
        self.rejections_fn = rejections_fn  # (partition, round) -> {sender: reason} refused
        self.evaluated_in_training: list[tuple[int, int]] = []  # train messages that evaluated
        self.pushed = 0
        self.sent: list[tuple[int, int]] = []  # every train message, answered or not
        self.pending: dict[str, Message] = {}  # pushed, not yet pulled, by message id
        self.asked: list[int] = []  # node ids, in the order they were asked
        self.mute: set[int] = set()  # partitions whose description answer never comes
        self.pulls = 0  # looks for replies so far
        self.unmute_at_pull = 0  # the look on which the muted partitions answer (0: never)
        self.hidden: set[int] = set()  # partitions whose nodes have not registered yet

    def get_node_ids(self) -> Iterable[int]:
        return [n for n, p in self.partition_of.items() if p not in self.hidden]

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover
        """Abstract in Grid; the relay pushes and pulls itself (strategies.rounds.exchange)."""
        return [r for r in (self.answer(m) for m in messages) if r is not None]

    def answer(self, msg: Message) -> Message | None:
        """The node's reply to one message, or None (it stays silent)."""
        partition = self.partition_of.get(msg.metadata.dst_node_id)
        if partition is None:
            return None
        if msg.metadata.message_type == MessageType.QUERY:
            info = ConfigRecord({"partition-id": partition, "num-partitions": self.num_nodes})
            return Message(RecordDict({CONFIG: info}), reply_to=msg)
        if msg.metadata.message_type == MessageType.TRAIN:
            rnd = int(msg.content[CONFIG]["server-round"])
            self.sent.append((partition, rnd))
            if self.fail(partition, rnd):
                return None  # silent node: no reply within the timeout
            self.order.append((partition, rnd))
            self.contents[(partition, rnd)] = msg.content
            self.received[(partition, rnd)] = [
                rec["origin"].numpy() if "origin" in rec else None
                for name, rec in msg.content.array_records.items()
                if name.startswith(IN_PAYLOAD_PREFIX)
            ]
            # a payload that names its origin and carries some bulk
            payload = ArrayRecord(
                {
                    "origin": Array(np.array([partition, rnd], dtype=np.int64)),
                    "bulk": Array(np.full(100 + partition, rnd, np.float32)),
                }
            )
            if self.payload_fn is not None:
                payload = self.payload_fn(partition, rnd)
            if partition in self.silent:
                payload = ArrayRecord()
            metrics = {"l": 1.0, "num-examples": 10.0 * (partition + 1)}
            if msg.content[CONFIG].get(EVALUATE_KEY, False):
                metrics.update(EVAL_METRICS)
                self.evaluated_in_training.append((partition, rnd))
            content = RecordDict({OUT_PAYLOAD: payload, METRICS: MetricRecord(metrics)})
            refused = self.rejections_fn(partition, rnd) if self.rejections_fn else None
            if refused:
                content[REJECTIONS] = ConfigRecord(refused)
            return Message(content, reply_to=msg)
        rnd = int(msg.content[CONFIG]["server-round"])
        self.eval_contents[(partition, rnd)] = msg.content
        return Message(RecordDict({METRICS: MetricRecord(EVAL_METRICS)}), reply_to=msg)

    # unused by the relay
    def set_run(self, run):  # pragma: no cover
        pass

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *a, **k):  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages):
        """Messages are answered (by ``answer``) on the first pull that asks for them;
        a description query of a partition in ``mute`` never is. Ids like Flower's."""
        ids = []
        for msg in messages:
            self.pushed += 1
            message_id = f"m{self.pushed}"
            msg.metadata.__dict__["_message_id"] = message_id  # as Flower's grids do
            self.pending[message_id] = msg
            if msg.metadata.message_type == MessageType.QUERY:
                self.asked.append(msg.metadata.dst_node_id)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        if self.pulls == self.unmute_at_pull:
            self.mute = set()
        replies = []
        for message_id in message_ids:
            msg = self.pending.get(message_id)
            if msg is None:
                continue
            is_query = msg.metadata.message_type == MessageType.QUERY
            if is_query and self.partition_of.get(msg.metadata.dst_node_id) in self.mute:
                continue
            del self.pending[message_id]
            reply = self.answer(msg)
            if reply is None:
                continue  # silent: never answers
            reply.metadata.__dict__["_reply_to_message_id"] = message_id
            replies.append(reply)
        return replies
