"""The star of centralized FL: a router that reduces every reply into one aggregate.

Each round the hub reduces the replies with the reducer the method's spec gives (the
weighted mean by examples of :mod:`strategies.reducers`, or a method's own, kept in its
file: FedNova's step-normalized update, FedFed's pooling) and sends every node the
result the next round, marked as the hub's aggregate with the total weight behind it. A
node's Local-T and Global-T are those of the model it holds after its local training in
the round, as for every relay method (one evaluation point for the tables; the DRDFL
paper's Table 2 scores FedNova that way). The round's evaluation message carries the
fresh aggregate as well, and the node scores it without keeping it (FedAvg's global
model, FedRep's global body with the node's head): ``aggregate_local_t_acc`` /
``aggregate_global_t_acc``, a table of their own. That evaluation traffic is not counted
in ``bytes_received``, which is the training exchange. Methods without a reducer (a
bit-packed DSLTH mask, for one) cannot run here: their configuration is refused before
the run starts, and :class:`Hub` refuses a missing reducer too.
"""

from __future__ import annotations

from logging import WARNING

from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common import log

from strategies.membership import Member
from strategies.reducers import Arrays, Contribution, Reducer, reduce_screened
from strategies.rounds import Reply, Router
from strategies.topology import STAR
from strategies.wire import HUB, add_incoming


class Hub(Router):
    topology_name = STAR
    modes = ("synchronous",)
    scores_aggregate = True  # and, apart, the fresh aggregate (``aggregate_*`` metrics)

    def __init__(self, reducer: Reducer | None) -> None:
        if not callable(reducer):
            raise ValueError(
                f"the hub needs a reducer (a method's spec names one); got {reducer!r}"
            )
        self.reduce = reducer
        self.reduced: Arrays | None = None  # the aggregate, as the reducer returned it
        self.aggregate: ArrayRecord | None = None  # the same, as every node receives it
        self.weight = 0.0

    def content_for(
        self, position: int, server_round: int, members: list[Member], alive: set[int]
    ) -> tuple[RecordDict, list[int]]:
        content = RecordDict()
        if self.aggregate is None:
            return content, []
        add_incoming(content, HUB, self.aggregate, self.weight)
        return content, [-1]

    def evaluation_content(self, position: int, members: list[Member]) -> RecordDict:
        """The fresh aggregate, so that nodes also score the model they train from next."""
        content, _ = self.content_for(position, 0, members, set())
        return content

    def collect(self, server_round: int, replies: dict[int, Reply]) -> dict[int, str]:
        """Reduce the round's non-empty replies, leaving out every one that fails a check
        (:func:`~strategies.reducers.reduce_screened`); keep the previous aggregate if
        none is left. Returns the left-out partitions and why."""
        useful, refused = [], {}
        for _, reply in sorted(replies.items()):
            if not len(reply.payload):
                continue
            try:
                arrays = {k: a.numpy() for k, a in reply.payload.items()}
            except Exception as err:  # noqa: BLE001 - the sender's bytes, not the hub's bug
                refused[reply.partition_id] = f"payload does not decode: {err}"
                continue
            useful.append(Contribution(reply.partition_id, arrays, reply.metrics))
        if not useful and not refused:
            return {}
        reduction = reduce_screened(self.reduce, useful, self.reduced)
        refused.update(reduction.refused)
        for partition, reason in sorted(refused.items()):
            log(
                WARNING,
                "round %d: hub left out partition %d's contribution: %s",
                server_round,
                partition,
                reason,
            )
        if reduction.aggregate is None:
            log(
                WARNING,
                "round %d: hub kept the previous aggregate: %s",
                server_round,
                reduction.error,
            )
            return refused
        self.reduced, self.weight = reduction.aggregate, reduction.weight
        self.aggregate = ArrayRecord({k: Array(v) for k, v in self.reduced.items()})
        return refused
