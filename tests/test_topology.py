"""The topologies of the DRDFL paper's Tables 8-9 and the fixed random graph of DSLTH's
release: who hears from whom, per round."""

from __future__ import annotations

import pytest

from strategies.relay import Relay
from strategies.rounds import RoundLoop
from strategies.topology import build_topology
from tests.fake_grid import FakeGrid

M = 8
ALL = set(range(M))


def test_directed_ring_is_the_predecessor():
    ring = build_topology("ring")
    assert [ring.in_neighbours(p, M, ALL, 1) for p in range(M)] == [[(p - 1) % M] for p in range(M)]
    assert ring.in_neighbours(3, M, ALL - {2}, 1) == [1]  # a dead predecessor is bypassed


def test_bidirectional_ring_is_left_and_right():
    ring = build_topology("bi-ring")
    assert ring.in_neighbours(0, M, ALL, 1) == [1, M - 1]
    assert ring.in_neighbours(4, M, ALL - {3, 5}, 1) == [2, 6]
    assert ring.in_neighbours(0, 2, {0, 1}, 1) == [1]  # two nodes: one neighbour, not twice


def test_fully_connected_is_every_living_other():
    full = build_topology("full")
    assert full.in_neighbours(2, M, ALL, 1) == sorted(ALL - {2})
    assert full.in_neighbours(2, M, ALL - {5}, 1) == sorted(ALL - {2, 5})


@pytest.mark.parametrize("k", [1, 3, 7])
def test_random_k_never_self_never_repeats_and_repeats_with_the_seed(k):
    a, b = build_topology("random-k", k=k, seed=11), build_topology("random-k", k=k, seed=11)
    other_seed = build_topology("random-k", k=k, seed=12)
    graphs = {}
    for rnd in range(1, 21):
        for p in range(M):
            got = a.in_neighbours(p, M, ALL, rnd)
            assert p not in got
            assert len(got) == len(set(got)) == k
            assert got == b.in_neighbours(p, M, ALL, rnd)  # same seed, same graph
            graphs[(rnd, p)] = got
    if k == M - 1:  # every other node: nothing left to draw
        return
    assert len({tuple(g) for g in graphs.values()}) > 1  # it is dynamic
    assert any(
        other_seed.in_neighbours(p, M, ALL, rnd) != graphs[(rnd, p)]
        for rnd in range(1, 21)
        for p in range(M)
    )


def test_random_k_with_fewer_living_nodes_takes_all_of_them():
    rk = build_topology("random-k", k=5, seed=0)
    assert rk.in_neighbours(0, M, {0, 3, 6}, 4) == [3, 6]


def fixed_graph(topology, num_nodes: int, alive=None, server_round: int = 1) -> list[list[int]]:
    alive = set(range(num_nodes)) if alive is None else alive
    return [topology.in_neighbours(p, num_nodes, alive, server_round) for p in range(num_nodes)]


def is_connected(graph: list[list[int]]) -> bool:
    seen, todo = {0}, [0]
    while todo:
        for q in graph[todo.pop()]:
            if q not in seen:
                seen.add(q)
                todo.append(q)
    return len(seen) == len(graph)


def test_fixed_random_is_one_undirected_graph_for_every_round():
    """The release's graph stands still: same neighbours every round, symmetric, no loops."""
    topology = build_topology("fixed-random", k=10, seed=42)
    first = fixed_graph(topology, 20)
    for p, neighbours in enumerate(first):
        assert p not in neighbours
        assert len(neighbours) == len(set(neighbours))
        assert all(p in first[q] for q in neighbours)  # undirected
    assert is_connected(first)
    for rnd in range(2, 31):
        assert fixed_graph(topology, 20, server_round=rnd) == first  # fixed
    assert fixed_graph(build_topology("fixed-random", k=10, seed=42), 20) == first  # seeded
    assert fixed_graph(build_topology("fixed-random", k=10, seed=43), 20) != first
    degrees = [len(n) for n in first]
    assert sum(degrees) / 20 == 10  # 100 edges: mean degree k
    assert len(set(degrees)) > 1  # random, not regular (the release's: 2 to 14)


@pytest.mark.parametrize(
    "num_nodes, k, mean_degree",
    [(20, 10, 10.0), (20, 4, 4.0), (8, 3, 3.0), (5, 10, 4.0), (20, 1, 1.9), (2, 1, 1.0)],
)
def test_fixed_random_mean_degree_is_k_capped_and_connected(num_nodes, k, mean_degree):
    """round(M k / 2) edges, at least a spanning tree's M - 1, at most every pair."""
    for seed in range(10):
        graph = fixed_graph(build_topology("fixed-random", k=k, seed=seed), num_nodes)
        assert sum(map(len, graph)) / num_nodes == pytest.approx(mean_degree)
        assert is_connected(graph), (seed, graph)


def test_fixed_random_never_hears_from_dead_nodes():
    topology = build_topology("fixed-random", k=6, seed=5)
    full = fixed_graph(topology, 12)
    dead = {2, 7, 11}
    alive = set(range(12)) - dead
    for p in alive:
        got = topology.in_neighbours(p, 12, alive, 3)
        assert got == [q for q in full[p] if q not in dead]  # no stand-in: the graph is fixed
    # what the relay passes: the living others, the node itself left out
    assert topology.in_neighbours(0, 12, alive - {0}, 3) == [q for q in full[0] if q not in dead]


def test_unknown_topology_is_named():
    with pytest.raises(ValueError, match="torus"):
        build_topology("torus")


@pytest.mark.parametrize("name", ["bi-ring", "full", "random-k", "fixed-random"])
def test_relay_routes_what_the_topology_says_and_records_it(name):
    grid = FakeGrid(5)
    records: list[dict] = []
    topology = build_topology(name, k=2, seed=3)
    RoundLoop(
        Relay(topology), node_wait_timeout=5, on_round=lambda r: records.append(r.to_record())
    ).start(grid, num_rounds=3)
    for rnd in (2, 3):
        record = records[rnd - 1]
        assert record["topology"] == name
        for p in range(5):
            expected = topology.in_neighbours(p, 5, set(range(5)), rnd)
            assert record["received_from"][str(p)] == expected
            origins = sorted(int(o[0]) for o in grid.received[(p, rnd)])
            assert origins == expected
            assert all(o[1] == rnd - 1 for o in grid.received[(p, rnd)])  # last round's
