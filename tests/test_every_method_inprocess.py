"""Every registered method end to end in seconds, without Ray: the app's ServerApp (its
registered main, as ``flwr run`` calls it) drives the real round loop, relay or hub, over
a Grid that hands every message to the app's real ClientApp in this process
(drdfl_flwr/inprocess.py). The runs are those of the ``cpu-smoke`` preset (embedded
digits, 3 nodes, two rounds; the variants' own keys from the same file), so this and
tests/test_every_method.py (the same grid through Flower's Ray engine, marked ``ray``)
cannot drift apart."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.app import Context, MessageType, RecordDict

from drdfl_flwr import registry
from drdfl_flwr.config import RunConfig
from drdfl_flwr.experiments.grid import GridRun
from drdfl_flwr.inprocess import InProcessGrid
from drdfl_flwr.server_app import app as SERVER_APP
from tests.smoke_checks import NODES, SMOKE, TOPOLOGY_CASES, check_routing

ROOT = Path(__file__).resolve().parents[1]
RUNS = {run.variant: run for run in SMOKE.runs}
# a fifth of the digits: every path runs, in a fraction of the time
SMALLER = {"subset_train": 300, "subset_test": 150}


def first_run_of(method: str) -> GridRun:
    return next(run for run in SMOKE.runs if run.cfg.method == method)


@dataclass
class Finished:
    cfg: RunConfig
    run_dir: Path
    rounds: list[dict]
    summary: dict
    grid: InProcessGrid


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """variant -> its finished run, each variant run once for the whole module."""
    done: dict[str, Finished] = {}

    def run(variant: str, **changes) -> Finished:
        key = variant + repr(sorted(changes.items()))
        if key not in done:
            results = tmp_path_factory.mktemp("results")
            cfg = RUNS[variant].cfg.replace(
                results_dir=str(results), run_name="run", **SMALLER, **changes
            )
            run_id = zlib.crc32(key.encode())  # its own warm learners (drdfl_flwr.warm)
            grid = InProcessGrid(cfg.to_run_config(), NODES, run_id=run_id)
            server = Context(
                run_id=run_id,
                node_id=0,
                node_config={},
                state=RecordDict(),
                run_config=cfg.to_run_config(),
            )
            SERVER_APP(grid, server)
            run_dir = results / "run"
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            summary = json.loads((run_dir / "summary.json").read_text())
            done[key] = Finished(cfg, run_dir, [json.loads(x) for x in lines], summary, grid)
        return done[key]

    return run


def check_completed(run: Finished) -> None:
    """Every round ran on every node, every node scored every round, results written."""
    rounds = run.cfg.num_server_rounds
    assert [r["round"] for r in run.rounds] == list(range(1, rounds + 1))
    assert run.summary["rounds"] == rounds and run.summary["last"]["round"] == rounds
    assert (run.run_dir / "convergence.png").stat().st_size > 0
    handled = run.grid.handled
    assert handled[MessageType.QUERY] == NODES and handled[MessageType.TRAIN] == NODES * rounds
    for record in run.rounds:
        assert record["failed"] == [] and sorted(record["nodes"]) == [str(p) for p in range(NODES)]
        for node in record["nodes"].values():
            assert 0.0 <= node["local_t_acc"] <= 1.0, record["round"]
            assert 0.0 <= node["global_t_acc"] <= 1.0, record["round"]
            assert node["rounds_trained"] == record["round"]


def test_the_runs_cover_every_method():
    assert {run.cfg.method for run in SMOKE.runs} == set(registry.METHODS)


@pytest.mark.parametrize("method", list(registry.METHODS))
def test_every_method_runs_every_round_on_every_node(method, finished):
    run = finished(first_run_of(method).variant)
    check_completed(run)
    spec = registry.method_spec(method)
    # a hub's nodes also score its fresh aggregate, through the evaluate handler
    evaluated = run.grid.handled[MessageType.EVALUATE]
    assert evaluated == (NODES * run.cfg.num_server_rounds if spec.centralized else 0)
    for record in run.rounds:
        assert record["topology"] == ("star" if spec.centralized else "ring")
        if spec.centralized:
            for node in record["nodes"].values():
                assert 0.0 <= node["aggregate_local_t_acc"] <= 1.0
                assert 0.0 <= node["aggregate_global_t_acc"] <= 1.0
        for partition, node in record["nodes"].items():
            if method == "local":
                assert node["bytes_sent"] == 0 and record["received_from"][partition] == []
                assert node["payloads_received"] == 0.0
            else:
                assert node["bytes_sent"] > 0 and node["params_sent"] > 0
    if method == "local":
        return
    # by the last round, what arrived is what the topology says: the hub's aggregate or
    # the ring predecessor's payload, and it was taken
    last = run.rounds[-1]
    for partition, node in last["nodes"].items():
        expected = [-1] if spec.centralized else [(int(partition) - 1) % NODES]
        assert last["received_from"][partition] == expected
        assert node["payloads_received"] == 1.0 and node["payloads_rejected"] == 0.0


def test_an_isolated_run_sends_and_receives_nothing(finished):
    run = finished("drdfl+isolated")
    check_completed(run)
    assert run.cfg.isolated
    for record in run.rounds:
        for node in record["nodes"].values():
            assert node["bytes_sent"] == 0 and node["params_sent"] == 0
            assert node["payloads_received"] == 0.0


@pytest.mark.parametrize(("variant", "expected"), TOPOLOGY_CASES)
def test_drdfl_runs_on_every_decentralized_topology(variant, expected, finished):
    run = finished(variant)
    check_completed(run)
    last = run.rounds[-1]
    assert last["topology"] == variant.split("@")[1].split("{")[0]
    check_routing(last, expected)


def test_drdfl_vf_sends_its_trunk_and_moments_and_the_ring_tells_every_node_every_class(finished):
    """As in tests/test_every_method.py: DRDFL's payload plus the trunk and the moments, and
    after two rounds on a ring of three every node knows every class of the ring."""
    vf, paper = finished("drdfl-vf"), finished("drdfl")
    assert (
        vf.rounds[-1]["nodes"]["0"]["params_sent"] > paper.rounds[-1]["nodes"]["0"]["params_sent"]
    )
    for partition, node in vf.rounds[-1]["nodes"].items():
        own = vf.rounds[0]["nodes"][partition]["health_vf_classes_known"]  # nothing received yet
        assert own <= node["health_vf_classes_known"] == 10.0, partition
        assert node.get("health_vf_absent_known", 1.0) == 1.0, partition
