"""The serverless network, emulated: a router that only forwards payloads.

Flower routes every message through the SuperLink, so the ServerApp stands in for the
network: each round it hands a node the latest payloads of its in-neighbours (as the
topology says; for the directed ring, its nearest living predecessor) and stores what
the node sends back. It never averages, never looks inside a payload, and knows nothing
about the method.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, RecordDict

from strategies.reducers import EXAMPLES
from strategies.rounds import Member, Reply, Router
from strategies.topology import Topology
from strategies.wire import add_incoming


class Relay(Router):
    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.topology_name = topology.name
        self.payloads: dict[int, ArrayRecord] = {}  # by ring position: latest non-empty
        self.weights: dict[int, float] = {}  # the sender's training examples

    def content_for(
        self, position: int, server_round: int, members: list[Member], alive: set[int]
    ) -> tuple[RecordDict, list[int]]:
        """The in-neighbours' latest payloads, nothing else."""
        senders = [
            p
            for p in self.topology.in_neighbours(
                position, len(members), alive - {position}, server_round
            )
            if p in self.payloads
        ]
        content = RecordDict()
        for p in senders:
            add_incoming(content, members[p].partition_id, self.payloads[p], self.weights[p])
        return content, [members[p].partition_id for p in senders]

    def collect(self, server_round: int, replies: dict[int, Reply]) -> None:
        """Store each reply's payload for the node's out-neighbours; never average."""
        for position, reply in replies.items():
            if len(reply.payload):  # a node that shares nothing sends nothing on
                self.payloads[position] = reply.payload
                self.weights[position] = float(reply.metrics.get(EXAMPLES, 1.0))
            else:
                self.payloads.pop(position, None)
