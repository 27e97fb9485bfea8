"""What the cpu-smoke grid's DRDFL topology runs must show, in both tiers (through Ray in
tests/test_every_method.py, in process in tests/test_every_method_inprocess.py)."""

from __future__ import annotations

from pathlib import Path

from drdfl_flwr.experiments.grid import load_grid

SMOKE = load_grid(Path(__file__).resolve().parents[1] / "conf" / "cpu-smoke.toml")
NODES = SMOKE.options.clients

# variant -> each node's senders in the last round (None: random-k with k = 1, one other node)
TOPOLOGY_CASES = [
    ("drdfl@bi-ring", lambda p: sorted({(p - 1) % NODES, (p + 1) % NODES})),
    ("drdfl@full", lambda p: sorted(set(range(NODES)) - {p})),
    ("drdfl@random-k{topology-k=1}", None),
]


def check_routing(last: dict, expected) -> None:
    """Every node of the round record ``last`` heard exactly from the senders its topology
    names, and refused none of their payloads."""
    for partition, node in last["nodes"].items():
        senders, p = last["received_from"][partition], int(partition)
        if expected is None:  # random-k, k = 1: one other node
            assert len(senders) == 1 and senders[0] != p
        else:
            assert senders == expected(p)
        assert node["payloads_received"] == len(senders) and node["payloads_rejected"] == 0.0
