"""Who hears from whom: communication graphs over nodes ordered by partition id.

The relay asks a topology, each round, which nodes' latest payloads a node receives
(its in-neighbours). Nodes that failed or stayed silent are not in ``alive``; the rings
then bypass them (paper 001, A.4: a node that times out is skipped and its upstream
neighbour connects to the next one), so a dead node never silences the rest.

The DRDFL paper's Tables 8-9 compare a directed ring (the default), a fully connected
graph, a dynamic random graph and the star of centralized FL; DisPFL and DFedPGP call
"ring" the bidirectional one (left and right neighbours). The star is not a graph the
relay routes on: its hub reduces every reply (:mod:`strategies.hub`). ``fixed-random``
stands for the fixed undirected graph DSLTH's release trains on (MCE-PL's
``20_adj_matrix.txt``: 20 nodes, 2 to 14 neighbours, mean 10.4).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable


class Topology(ABC):
    """A (possibly round-dependent) directed graph over positions 0..M-1."""

    name: str

    @abstractmethod
    def in_neighbours(
        self, position: int, num_nodes: int, alive: set[int], server_round: int
    ) -> list[int]:
        """Positions whose latest payloads the node at ``position`` receives (never itself)."""


def _nearest_alive(position: int, num_nodes: int, alive: set[int], step: int) -> int | None:
    for distance in range(1, num_nodes):
        candidate = (position + step * distance) % num_nodes
        if candidate in alive and candidate != position:
            return candidate
    return None


class Ring(Topology):
    """Directed ring: each node receives from its nearest living predecessor,
    n_m = (m - 1) mod M (DRDFL, Algorithm 1)."""

    name = "ring"

    def in_neighbours(self, position, num_nodes, alive, server_round):
        predecessor = _nearest_alive(position, num_nodes, alive, -1)
        return [] if predecessor is None else [predecessor]


class BidirectionalRing(Topology):
    """Left and right neighbours (nearest living on each side), as DisPFL and DFedPGP
    use the word "ring"."""

    name = "bi-ring"

    def in_neighbours(self, position, num_nodes, alive, server_round):
        left = _nearest_alive(position, num_nodes, alive, -1)
        right = _nearest_alive(position, num_nodes, alive, +1)
        return sorted({p for p in (left, right) if p is not None})


class FullyConnected(Topology):
    """Every living node hears from every other living node."""

    name = "full"

    def in_neighbours(self, position, num_nodes, alive, server_round):
        return sorted(p for p in alive if p != position and p < num_nodes)


class RandomK(Topology):
    """Dynamic graph: each round, each node hears from ``k`` distinct other living nodes
    drawn uniformly, seeded by (seed, round, node), so two runs with the same seed see the
    same graphs (DFedPGP draws its neighbours with seed t + i the same way). Fewer than
    ``k`` living others: all of them."""

    name = "random-k"

    def __init__(self, k: int, seed: int) -> None:
        if k < 1:
            raise ValueError(f"topology-k must be >= 1, got {k}")
        self.k = k
        self.seed = seed

    def in_neighbours(self, position, num_nodes, alive, server_round):
        others = sorted(p for p in alive if p != position and p < num_nodes)
        rng = random.Random(f"{self.seed}/{server_round}/{position}")
        return sorted(rng.sample(others, min(self.k, len(others))))


class FixedRandom(Topology):
    """A fixed, connected, undirected random graph: the same in every round, drawn only
    from ``seed`` and the number of nodes. It has ``max(M - 1, round(M * k / 2))``
    edges (capped at all ``M (M - 1) / 2`` pairs), so the mean degree is ``k`` (at
    most ``M - 1``): a random spanning tree (each node, in a seeded random order, linked
    to one node before it) keeps it connected, and the remaining edges are drawn
    uniformly from the pairs left. This stands for the release of DSLTH / MCE-PL, whose
    ``20_adj_matrix.txt`` is one fixed undirected graph of 20 nodes with 2 to 14
    neighbours (mean 10.4): ``topology-k = 10`` gives 100 edges, mean degree 10.

    A dead node is nobody's in-neighbour; unlike the rings, nobody is rewired to stand
    in for it (the graph is fixed, as in the release)."""

    name = "fixed-random"

    def __init__(self, k: int, seed: int) -> None:
        if k < 1:
            raise ValueError(f"topology-k must be >= 1, got {k}")
        self.k = k
        self.seed = seed
        self._graphs: dict[int, list[set[int]]] = {}

    def adjacency(self, num_nodes: int) -> list[set[int]]:
        """The neighbours of each of the ``num_nodes`` positions (symmetric, no loops)."""
        if num_nodes not in self._graphs:
            self._graphs[num_nodes] = self._draw(num_nodes)
        return self._graphs[num_nodes]

    def _draw(self, num_nodes: int) -> list[set[int]]:
        rng = random.Random(f"fixed-random/{self.seed}/{num_nodes}")
        neighbours: list[set[int]] = [set() for _ in range(num_nodes)]
        order = list(range(num_nodes))
        rng.shuffle(order)
        for i in range(1, num_nodes):  # a random spanning tree: connected
            a, b = order[i], order[rng.randrange(i)]
            neighbours[a].add(b)
            neighbours[b].add(a)
        pairs = num_nodes * (num_nodes - 1) // 2
        edges = min(pairs, max(num_nodes - 1, round(num_nodes * self.k / 2)))
        free = [
            (a, b)
            for a in range(num_nodes)
            for b in range(a + 1, num_nodes)
            if b not in neighbours[a]
        ]
        for a, b in rng.sample(free, edges - (num_nodes - 1) if num_nodes else 0):
            neighbours[a].add(b)
            neighbours[b].add(a)
        return neighbours

    def in_neighbours(self, position, num_nodes, alive, server_round):
        if not 0 <= position < num_nodes:
            return []
        return sorted(p for p in self.adjacency(num_nodes)[position] if p in alive)


# The one catalogue of the relay's topologies: name -> builder(k, seed). The config's
# choices (drdfl_flwr.config.TOPOLOGIES) are these, the hub's STAR, and "auto".
TOPOLOGIES: dict[str, Callable[[int, int], Topology]] = {
    "ring": lambda k, seed: Ring(),
    "bi-ring": lambda k, seed: BidirectionalRing(),
    "full": lambda k, seed: FullyConnected(),
    "random-k": RandomK,
    "fixed-random": FixedRandom,
}
TOPOLOGY_NAMES = tuple(TOPOLOGIES)  # the relay's
STAR = "star"  # the hub's (strategies.hub): no graph the relay routes on

# The schedules a round runs on (strategies.rounds): synchronous, every node on what was
# routed the previous round; sequential, one node after another in ring order.
MODES = ("synchronous", "sequential")


def build_topology(name: str, k: int = 2, seed: int = 0) -> Topology:
    """The topology called ``name`` (``k`` and ``seed`` are used by random-k, as the
    number of in-neighbours, and fixed-random, as the mean degree, only)."""
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology {name!r}; choose one of {', '.join(TOPOLOGY_NAMES)}")
    return TOPOLOGIES[name](k, seed)
