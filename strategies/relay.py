"""The serverless ring, emulated: a Flower strategy that only forwards payloads.

Flower routes every message through the SuperLink, so the ServerApp stands in for the
network: each round it hands a node the latest payloads of its in-neighbours (for a
ring, its nearest living predecessor) and stores what the node sends back. It never
averages, never looks inside a payload, and knows nothing about the method.

Two schedules:

* ``synchronous``: every node trains in parallel on what its predecessor sent in the
  previous round. Scales to any number of nodes; one round costs one local training.
* ``sequential``: Algorithm 1 of paper 001 literally. Nodes train one after another in
  ring order, each on what its predecessor sent moments before, so a payload travels the
  whole ring once per round. Costs M local trainings of wall time per round.

A node that errors or misses the round timeout is skipped for that round; its successor
receives the nearest living predecessor's latest payload. One failed node never ends a run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.result import Result

from drdfl_flwr.payload import CONFIG, METRICS, OUT_PAYLOAD, content_bytes, in_payload_name
from drdfl_flwr.results import mean_std
from strategies.topology import Topology

RoundCallback = Callable[[dict], None]


@dataclass
class RingMember:
    node_id: int
    partition_id: int


@dataclass
class RelayState:
    """What the relay remembers between rounds (never any model parameter of its own)."""

    members: list[RingMember] = field(default_factory=list)  # ring order
    payloads: dict[int, ArrayRecord] = field(default_factory=dict)  # by position
    alive: set[int] = field(default_factory=set)  # positions that answered last time
    position_of: dict[int, int] = field(init=False)  # node id -> ring position (derived)

    def __post_init__(self) -> None:
        self.position_of = {m.node_id: i for i, m in enumerate(self.members)}


class RingRelay(Strategy):
    def __init__(
        self,
        topology: Topology,
        mode: str = "synchronous",
        round_timeout: float = 600.0,
        node_wait_timeout: float = 300.0,
        eval_every: int = 1,
        on_round: RoundCallback | None = None,
    ) -> None:
        if mode not in ("synchronous", "sequential"):
            raise ValueError(f"mode must be 'synchronous' or 'sequential', got {mode!r}")
        self.topology = topology
        self.mode = mode
        self.round_timeout = round_timeout
        self.node_wait_timeout = node_wait_timeout
        self.eval_every = eval_every
        self.on_round = on_round
        self.state = RelayState()
        self._round_nodes: dict[int, dict[str, float]] = {}

    def summary(self) -> None:
        log(
            INFO,
            "RingRelay: %s topology, %s mode, round timeout %.0fs",
            type(self.topology).__name__,
            self.mode,
            self.round_timeout,
        )

    # -- membership -------------------------------------------------------------------
    def discover(self, grid: Grid) -> list[RingMember]:
        """Ask every node for its partition id until all ``num-partitions`` have answered.

        Nodes may register after the ServerApp starts, so this polls until the expected
        number (announced by the nodes themselves) is reached or the wait times out.
        """
        deadline = time.monotonic() + self.node_wait_timeout
        known: dict[int, RingMember] = {}
        expected: int | None = None
        while True:
            fresh = [n for n in grid.get_node_ids() if n not in known]
            if fresh:
                queries = [
                    Message(RecordDict({}), dst_node_id=n, message_type=MessageType.QUERY)
                    for n in fresh
                ]
                for reply in grid.send_and_receive(queries, timeout=30.0):
                    if reply.has_error():
                        raise RuntimeError(
                            f"node {reply.metadata.src_node_id} could not describe itself "
                            f"(is its node config right?): {reply.error.reason}"
                        )
                    info = reply.content[CONFIG]
                    node = reply.metadata.src_node_id
                    known[node] = RingMember(node, int(info["partition-id"]))
                    expected = int(info["num-partitions"])
            if expected is not None and len(known) >= expected:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(known)} of {expected or '?'} nodes answered within "
                    f"node-wait-timeout={self.node_wait_timeout}s"
                )
            log(INFO, "Waiting for nodes: %d of %s answered", len(known), expected or "?")
            time.sleep(1.0)
        members = sorted(known.values(), key=lambda m: m.partition_id)
        ids = [m.partition_id for m in members]
        if ids != list(range(len(ids))):
            raise ValueError(f"partition ids must be 0..{len(ids) - 1} without gaps, got {ids}")
        log(INFO, "Ring of %d nodes ordered by partition-id", len(members))
        self.state = RelayState(members=members, alive=set(range(len(members))))
        return members

    # -- training ----------------------------------------------------------------------
    def message_for(self, position: int, server_round: int, config: ConfigRecord) -> Message:
        """The train message for one node: its in-neighbours' latest payloads, nothing else."""
        senders = [
            p
            for p in self.topology.in_neighbours(
                position, len(self.state.members), self.state.alive - {position}, server_round
            )
            if p in self.state.payloads
        ]
        content = RecordDict({in_payload_name(p): self.state.payloads[p] for p in senders})
        round_config = ConfigRecord(dict(config))
        round_config["server-round"] = server_round
        round_config["senders"] = [self.state.members[p].partition_id for p in senders]
        content[CONFIG] = round_config
        return Message(
            content,
            dst_node_id=self.state.members[position].node_id,
            message_type=MessageType.TRAIN,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Synchronous schedule: one message per node, built from last round's payloads."""
        return [self.message_for(p, server_round, config) for p in range(len(self.state.members))]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Store each reply's payload for the node's out-neighbours; never average."""
        position_of = self.state.position_of
        for reply in replies:
            position = position_of.get(reply.metadata.src_node_id)
            if position is None:
                continue
            if reply.has_error():
                log(
                    WARNING,
                    "round %d: node %d (partition %d) failed: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    self.state.members[position].partition_id,
                    reply.error.reason,
                )
                continue
            payload = reply.content.array_records.get(OUT_PAYLOAD, ArrayRecord())
            if len(payload):  # a node that shares nothing (isolated, local) sends nothing on
                self.state.payloads[position] = payload
            else:
                self.state.payloads.pop(position, None)
            self.state.alive.add(position)
            metrics = dict(reply.content[METRICS]) if METRICS in reply.content else {}
            metrics["bytes_sent"] = (
                content_bytes(RecordDict({OUT_PAYLOAD: payload})) if len(payload) else 0
            )
            metrics["params_sent"] = sum(int(a.numpy().size) for a in payload.values())
            self._round_nodes.setdefault(position, {}).update(metrics)
        mean, _ = mean_std(self._round_nodes)
        return None, MetricRecord(mean) if mean else None

    def _send(self, grid: Grid, messages: list[Message], server_round: int) -> list[Message]:
        """Send train messages; nodes that fail or time out leave ``alive`` for now."""
        position_of = self.state.position_of
        for message in messages:
            position = position_of[message.metadata.dst_node_id]
            self._round_nodes.setdefault(position, {})["bytes_received"] = content_bytes(
                message.content
            )
            self.state.alive.discard(position)  # re-added by aggregate_train on success
        replies = list(grid.send_and_receive(messages, timeout=self.round_timeout))
        answered = {r.metadata.src_node_id for r in replies}
        for message in messages:
            if message.metadata.dst_node_id not in answered:
                log(
                    WARNING,
                    "round %d: node %d gave no answer within %.0fs; skipped",
                    server_round,
                    message.metadata.dst_node_id,
                    self.round_timeout,
                )
        return replies

    def train_round(self, grid: Grid, server_round: int, config: ConfigRecord) -> None:
        if self.mode == "synchronous":
            messages = list(self.configure_train(server_round, ArrayRecord(), config, grid))
            self.aggregate_train(server_round, self._send(grid, messages, server_round))
            return
        for position in range(len(self.state.members)):
            message = self.message_for(position, server_round, config)
            self.aggregate_train(server_round, self._send(grid, [message], server_round))

    # -- evaluation --------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        round_config = ConfigRecord(dict(config))
        round_config["server-round"] = server_round
        return [
            Message(
                RecordDict({CONFIG: round_config}),
                dst_node_id=m.node_id,
                message_type=MessageType.EVALUATE,
            )
            for m in self.state.members
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        position_of = self.state.position_of
        for reply in replies:
            if reply.has_error() or reply.metadata.src_node_id not in position_of:
                continue
            position = position_of[reply.metadata.src_node_id]
            self._round_nodes.setdefault(position, {}).update(dict(reply.content[METRICS]))
        mean, _ = mean_std(self._round_nodes)
        return MetricRecord(mean) if mean else None

    # -- the loop ----------------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable | None = None,
    ) -> Result:
        self.summary()
        self.discover(grid)
        result = Result()
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        for server_round in range(1, num_rounds + 1):
            started = time.time()
            self._round_nodes = {}
            self.train_round(grid, server_round, train_config)
            failed = sorted(
                self.state.members[p].partition_id
                for p in range(len(self.state.members))
                if p not in self.state.alive
            )
            if server_round % self.eval_every == 0 or server_round == num_rounds:
                replies = grid.send_and_receive(
                    list(
                        self.configure_evaluate(server_round, ArrayRecord(), evaluate_config, grid)
                    ),
                    timeout=self.round_timeout,
                )
                self.aggregate_evaluate(server_round, replies)
            mean, std = mean_std(self._round_nodes)
            record = {
                "round": server_round,
                "mode": self.mode,
                "seconds": time.time() - started,
                "failed": failed,
                "nodes": {
                    str(self.state.members[p].partition_id): metrics
                    for p, metrics in sorted(self._round_nodes.items())
                },
                "mean": mean,
                "std": std,
            }
            result.train_metrics_clientapp[server_round] = MetricRecord(mean)
            if self.on_round:
                self.on_round(record)
        return result
