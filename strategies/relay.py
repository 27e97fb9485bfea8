"""The serverless network, emulated: a router that only forwards payloads.

Flower routes every message through the SuperLink, so the ServerApp stands in for the
network: each round it hands a node the latest payloads of its in-neighbours (as the
topology says; for the directed ring, its nearest living predecessor) and stores what
the node sends back. It never averages, never looks inside a payload, and knows nothing
about the method.

With partial participation (``participation`` below 1) the round loop passes only the
living participants as ``alive``, so a node that sits out the round is bypassed exactly
like a dead one; what it sent last stays stored until it sends again, and a payload
older than the previous round (its sender sat out since) goes out marked with the round
it was made in (``made-in-round`` in its in-meta).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, RecordDict

from strategies.membership import Member
from strategies.reducers import EXAMPLES
from strategies.rounds import Reply, Router
from strategies.topology import Topology
from strategies.wire import add_incoming


class Relay(Router):
    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.topology_name = topology.name
        self.payloads: dict[int, ArrayRecord] = {}  # by ring position: latest non-empty
        self.weights: dict[int, float] = {}  # the sender's training examples
        self.made_in: dict[int, int] = {}  # the round each stored payload was made in

    def content_for(
        self, position: int, server_round: int, members: list[Member], alive: set[int]
    ) -> tuple[RecordDict, list[int]]:
        """The in-neighbours' latest payloads, nothing else; one made before the previous
        round (its sender sat out since) marked with the round it was made in."""
        senders = [
            p
            for p in self.topology.in_neighbours(
                position, len(members), alive - {position}, server_round
            )
            if p in self.payloads
        ]
        content = RecordDict()
        for p in senders:
            made_in = self.made_in.get(p, server_round)
            stale = made_in if made_in < server_round - 1 else None
            add_incoming(content, members[p].partition_id, self.payloads[p], self.weights[p], stale)
        return content, [members[p].partition_id for p in senders]

    def collect(self, server_round: int, replies: dict[int, Reply]) -> dict[int, str]:
        """Store each reply's payload for the node's out-neighbours; never average, never
        refuse (each receiver checks what it takes in)."""
        for position, reply in replies.items():
            if len(reply.payload):  # a node that shares nothing sends nothing on
                self.payloads[position] = reply.payload
                self.weights[position] = float(reply.metrics.get(EXAMPLES, 1.0))
                self.made_in[position] = server_round
            else:
                self.payloads.pop(position, None)
                self.made_in.pop(position, None)
        return {}
