"""Who hears from whom: communication graphs over nodes ordered by partition id.

The relay asks a topology, each round, which nodes' latest payloads a node receives.
Nodes that failed or stayed silent are not in ``alive``; a ring then bypasses them
(paper 001, A.4: a node that times out is skipped and its upstream neighbour connects
to the next one), so a dead node never silences the rest of the ring.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class Topology(ABC):
    """A (possibly round-dependent) directed graph over positions 0..M-1."""

    @abstractmethod
    def in_neighbours(
        self, position: int, num_nodes: int, alive: set[int], server_round: int
    ) -> list[int]:
        """Positions whose latest payloads the node at ``position`` receives."""


class Ring(Topology):
    """Each node receives from its nearest living predecessor: n_m = (m - 1) mod M."""

    def in_neighbours(
        self, position: int, num_nodes: int, alive: set[int], server_round: int
    ) -> list[int]:
        for step in range(1, num_nodes):
            candidate = (position - step) % num_nodes
            if candidate in alive:
                return [candidate]
        return []


TOPOLOGIES: dict[str, type[Topology]] = {"ring": Ring}


def build_topology(name: str) -> Topology:
    try:
        return TOPOLOGIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown topology {name!r}; choose one of {', '.join(TOPOLOGIES)}"
        ) from None
