"""A federation in one Python process: the app's own server round over nodes that are the
app's own ClientApp, without Ray, processes or sockets.

:class:`InProcessGrid` is a :class:`flwr.serverapp.Grid` that answers every message by
calling the ClientApp (``drdfl_flwr.client_app.app``, the one ``flwr run`` loads) with one
persistent :class:`flwr.app.Context` per node, as a SuperNode would: its node config names
the partition, its run config is the run's, its ``state`` lives from message to message.
Every message and every reply goes through Flower's wire format, so nothing is shared by
reference between the server and the nodes.

Over it, :func:`run_ring` runs the real :class:`~strategies.rounds.RoundLoop` and router
(the relay on the configured topology, or the hub): the same routing, participation,
joins, reduction and evaluation as a deployment, in seconds. It hands back the trained
learners (a notebook projects their codes, draws their reconstructions) and every round's
metrics. :func:`simulate_in_process` runs a whole job (``run_job``, results folder and all)
the same way: the grid runner's stand-in for the Ray engine, which must give the same
``runs.csv`` (tests/test_every_method.py).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from drdfl_flwr.client_app import app as CLIENT_APP
from drdfl_flwr.client_app import restore
from drdfl_flwr.config import RunConfig
from drdfl_flwr.data import ClientData
from drdfl_flwr.learner import Learner
from drdfl_flwr.payload import PayloadError
from drdfl_flwr.registry import check_run_config
from drdfl_flwr.server_app import build_router, run_job
from strategies.rounds import RoundLoop, RoundReport
from strategies.wire import NUM_PARTITIONS, PARTITION_ID

_RUN_IDS = itertools.count(1_000_001)  # each in-process run its own warm learners


@contextmanager
def server_identity(run_id: int) -> Iterator[None]:
    """The task identity Flower's ServerApp process has (``Message(...)`` reads it), for
    as long as an in-process run lasts; whatever was set before is put back."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, run_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def over_the_wire(message: Message) -> Message:
    """The message as the other side receives it: serialized and parsed again."""
    return message_from_proto(message_to_proto(message))


class InProcessGrid(Grid):
    """``num_nodes`` SuperNodes in this process, each answering with ``client_app``.

    ``joins`` maps a partition to the round its node appears in: Flower does not list it
    before (the round loop's membership holds an absent slot for it and it joins when it
    appears, as a late SuperNode does). ``round`` is the round about to run, set by
    whoever drives the loop (:func:`run_ring`). A handler that raises raises here, with
    its own traceback (Flower would turn it into an error reply and the round loop would
    skip the node)."""

    def __init__(
        self,
        run_config: dict,
        num_nodes: int,
        run_id: int = 1,
        client_app: ClientApp = CLIENT_APP,
        joins: Mapping[int, int] | None = None,
    ):
        self.run_id = run_id
        self.client_app = client_app
        self.joins = dict(joins or {})
        self.round = 1
        # node ids deliberately not in partition order, as Flower's are not
        self.contexts = {
            5000 + 11 * (num_nodes - p): Context(
                run_id=run_id,
                node_id=5000 + 11 * (num_nodes - p),
                node_config={PARTITION_ID: p, NUM_PARTITIONS: num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for p in range(num_nodes)
        }
        self.pending: dict[str, Message] = {}
        self.pushed = 0
        self.handled: Counter[str] = Counter()  # message type -> messages answered

    def get_node_ids(self) -> Iterable[int]:
        return [
            node_id
            for node_id, context in self.contexts.items()
            if self.joins.get(int(context.node_config[PARTITION_ID]), 1) <= self.round
        ]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            self.pushed += 1
            message_id = f"m{self.pushed}"
            message.metadata.__dict__["_message_id"] = message_id
            message.metadata.__dict__["_run_id"] = self.run_id
            self.pending[message_id] = over_the_wire(message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Every pending message asked for is answered now, by its node's ClientApp."""
        replies = []
        for message_id in message_ids:
            message = self.pending.pop(message_id, None)
            if message is None:
                continue
            context = self.contexts[message.metadata.dst_node_id]
            run_config = dict(context.run_config)
            reply = self.client_app(message, context)
            if dict(context.run_config) != run_config:
                raise RuntimeError("a handler changed the run config")
            self.handled[message.metadata.message_type] += 1
            reply = over_the_wire(reply)
            reply.metadata.__dict__["_reply_to_message_id"] = message_id
            replies.append(reply)
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

    def node_state(self, partition_id: int) -> tuple[ClientData, Learner]:
        """A node's data and its learner as its saved state holds it now."""
        context = next(
            c for c in self.contexts.values() if c.node_config[PARTITION_ID] == partition_id
        )
        data, learner, _ = restore(context, str(context.run_id))
        return data, learner

    # the round loop never uses these
    def set_run(self, run_id):  # pragma: no cover
        self.run_id = run_id

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError


@dataclass
class InProcessRing:
    learners: list[Learner]
    data: list[ClientData]
    # one record per round: {"round", "mean": {metric: mean over nodes}, "nodes": [...]}
    # ("nodes" by partition; None for a node not there yet or sitting out)
    history: list[dict[str, Any]] = field(default_factory=list)


def run_ring(
    cfg: RunConfig,
    num_clients: int,
    rounds: int,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    joins: Mapping[int, int] | None = None,
) -> InProcessRing:
    """Train ``cfg`` for ``rounds`` rounds on ``num_clients`` nodes in process: the real
    round loop and router (relay on ``cfg``'s topology, or hub) over an
    :class:`InProcessGrid` of the real ClientApp, so participation, joins, the hub's
    reduction and the evaluation of its aggregate are the server's own.

    ``joins`` maps a node to the round it appears in (absent before, bypassed; it then
    joins as a node that appears late on SuperNodes does, through ``Learner.receive``).
    Every round's record (``history``, and ``on_round``) holds the nodes' metrics as the
    ClientApp reports them (``None`` for a node not there yet or sitting out) and their
    mean. A payload refused, by a node or the hub, raises :class:`PayloadError` unless
    an attack or a defence is being measured: in process, it is a bug."""
    joins = dict(joins or {})
    there_first = _nodes_in_round_1(num_clients, rounds, joins)
    check_run_config(cfg)
    grid = InProcessGrid(cfg.to_run_config(), num_clients, run_id=next(_RUN_IDS), joins=joins)
    history: list[dict[str, Any]] = []
    measured = cfg.attack != "none" or cfg.ring_defence != "none"

    def record_round(report: RoundReport) -> None:
        refused = {p: r for p, r in report.rejections.items() if r}
        if refused and not measured:
            raise PayloadError(f"round {report.round}: nodes refused {refused}")
        if report.left_out and cfg.attack == "none":
            raise PayloadError(f"round {report.round}: the hub refused {report.left_out}")
        record = {
            "round": report.round,
            "mean": report.mean,
            "nodes": [report.nodes.get(k) for k in range(num_clients)],
        }
        history.append(record)
        grid.round = report.round + 1  # who Flower lists when the next round starts
        if on_round is not None:
            on_round(record)

    loop = RoundLoop(
        build_router(cfg),
        mode=cfg.mode,
        min_nodes=there_first,
        participation=cfg.participation,
        seed=cfg.seed,
        eval_every=cfg.eval_every,
        on_round=record_round,
    )
    with server_identity(grid.run_id):
        loop.start(grid, num_rounds=rounds)
    states = [grid.node_state(k) for k in range(num_clients)]
    return InProcessRing(
        learners=[learner for _, learner in states],
        data=[data for data, _ in states],
        history=history,
    )


def _nodes_in_round_1(num_clients: int, rounds: int, joins: Mapping[int, int]) -> int:
    """How many nodes are there from round 1; a clear error for arguments that make no
    ring."""
    if num_clients < 2:
        raise ValueError(f"num_clients={num_clients}: a ring needs at least 2 nodes")
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: run at least one round")
    for k, first in joins.items():
        if not 0 <= k < num_clients or not 1 <= first <= rounds:
            raise ValueError(
                f"joins={{{k}: {first}}}: a node 0..{num_clients - 1} joining in round 1..{rounds}"
            )
    there_first = num_clients - sum(first > 1 for first in joins.values())
    if there_first < 1:
        raise ValueError(f"joins={dict(joins)}: at least one node must be there in round 1")
    return there_first


def simulate_in_process(
    cfg: RunConfig,
    num_clients: int,
    cpus_per_client: float = 1.0,
    on_round: Callable[[RoundReport], None] | None = None,
    log_rounds: bool = True,
    **_ray: Any,
) -> dict[str, Any]:
    """``drdfl_flwr.simulation.simulate`` without Ray: the whole job (``run_job``: the
    ServerApp's round loop, results folder and summary) over an :class:`InProcessGrid`;
    returns the summary. Takes the same arguments; of the Ray resources, torch runs on
    ``cpus_per_client`` threads, as Ray has a ClientApp actor do (its
    ``OMP_NUM_THREADS``), so that every float comes out as it does there."""
    if num_clients < 2:
        raise ValueError(f"num_clients={num_clients}: a ring needs at least 2 nodes")
    check_run_config(cfg)
    grid = InProcessGrid(cfg.to_run_config(), num_clients, run_id=next(_RUN_IDS))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cpus_per_client)))
    try:
        with server_identity(grid.run_id):
            return run_job(grid, cfg, on_round=on_round, log_rounds=log_rounds)
    finally:
        torch.set_num_threads(threads)
