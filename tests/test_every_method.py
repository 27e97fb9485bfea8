"""Every registered method, and DRDFL on every decentralized topology, end to end through
Flower's Ray simulation engine: the ``cpu-smoke`` preset (embedded digits, 3 clients, two
rounds) run by the grid runner, as a user runs it, then its report and a resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from drdfl_flwr import registry
from drdfl_flwr.experiments.grid import load_grid
from drdfl_flwr.experiments.outcomes import DONE
from drdfl_flwr.experiments.runner import run_grid
from drdfl_flwr.inprocess import simulate_in_process
from tests.smoke_checks import NODES, TOPOLOGY_CASES, check_routing

pytestmark = pytest.mark.ray  # tests/test_every_method_inprocess.py: the same without Ray

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "conf" / "cpu-smoke.toml"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu-smoke")
    grid = load_grid(SMOKE)
    outcomes = run_grid(grid, out)
    return grid, {o.run.variant: o for o in outcomes}, out


def rounds_of(outcome) -> list[dict]:
    lines = (outcome.run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_the_smoke_grid_covers_every_method(smoke):
    grid, _, _ = smoke
    assert {run.cfg.method for run in grid.runs} == set(registry.METHODS)


@pytest.mark.parametrize("method", list(registry.METHODS))
def test_every_method_runs_end_to_end(method, smoke):
    _, by_variant, _ = smoke
    outcome = next(o for v, o in by_variant.items() if o.run.cfg.method == method)
    assert outcome.status == DONE, outcome.error
    spec = registry.method_spec(method)
    rounds = rounds_of(outcome)
    assert outcome.summary["last"]["round"] == len(rounds) == outcome.run.cfg.num_server_rounds
    last = rounds[-1]
    assert last["failed"] == [] and sorted(last["nodes"]) == ["0", "1", "2"]
    assert last["topology"] == ("star" if spec.centralized else "ring")
    for partition, node in last["nodes"].items():
        assert 0.0 <= node["local_t_acc"] <= 1.0 and 0.0 <= node["global_t_acc"] <= 1.0
        senders = last["received_from"][partition]
        if method == "local":
            assert node["bytes_sent"] == 0 and senders == []
            continue
        assert node["bytes_sent"] > 0
        # what arrived is what the topology says: the hub's aggregate, or the predecessor's
        assert senders == ([-1] if spec.centralized else [(int(partition) - 1) % NODES])
        assert node["payloads_received"] == 1.0 and node["payloads_rejected"] == 0.0


def test_isolated_drdfl_sends_and_receives_nothing(smoke):
    _, by_variant, _ = smoke
    last = rounds_of(by_variant["drdfl+isolated"])[-1]
    for node in last["nodes"].values():
        assert node["bytes_sent"] == 0 and node["payloads_received"] == 0.0


def test_drdfl_vf_sends_its_trunk_and_moments_and_the_ring_tells_every_node_every_class(smoke):
    """DRDFL-VF's payload is DRDFL's plus the trunk and the class moments; on a ring of
    three, after two rounds each node holds the moments its predecessor merged from its
    own predecessor, so the union of the three nodes' classes."""
    _, by_variant, _ = smoke
    vf, paper = rounds_of(by_variant["drdfl-vf"])[-1], rounds_of(by_variant["drdfl"])[-1]
    assert vf["nodes"]["0"]["params_sent"] > paper["nodes"]["0"]["params_sent"]
    first = rounds_of(by_variant["drdfl-vf"])[0]
    for partition, node in vf["nodes"].items():
        own = first["nodes"][partition]["health_vf_classes_known"]  # nothing received yet
        assert own <= node["health_vf_classes_known"] == 10.0, partition
        assert node.get("health_vf_absent_known", 1.0) == 1.0, partition


@pytest.mark.parametrize(("variant", "expected"), TOPOLOGY_CASES)
def test_drdfl_runs_on_every_decentralized_topology(variant, expected, smoke):
    _, by_variant, _ = smoke
    last = rounds_of(by_variant[variant])[-1]
    assert last["topology"] == variant.split("@")[1].split("{")[0] and last["failed"] == []
    check_routing(last, expected)


def test_the_report_has_every_variant_with_its_own_numbers(smoke):
    grid, by_variant, out = smoke
    tables = (out / "tables.md").read_text()
    for variant, outcome in by_variant.items():
        assert f"| {variant} |" in tables
        last = outcome.summary["last"]["local_t_acc"]
        assert f"{100 * last['mean']:.2f} ± {100 * last['std']:.2f}" in tables
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert {row["run_id"] for row in rows} == {run.run_id for run in grid.runs}
    assert (out / "convergence_digits.png").is_file()
    assert (out / "grid.toml").read_text() == SMOKE.read_text()


def test_a_rerun_of_a_finished_grid_runs_nothing(smoke):
    grid, _, out = smoke
    before = (out / "tables.md").read_text()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    outcomes = run_grid(grid, out, simulate_fn=must_not_run)
    assert all(o.status == DONE for o in outcomes)
    assert (out / "tables.md").read_text() == before


def test_the_same_seed_gives_the_same_numbers(smoke, tmp_path):
    """Two grids, same seed: the runs they share give the same table rows."""
    _, _, out = smoke
    grid = load_grid(SMOKE, {"grid.variants": "local, drdfl"})
    run_grid(grid, tmp_path)
    first = {r["run_id"]: r for r in csv.DictReader((out / "runs.csv").open())}
    for row in csv.DictReader((tmp_path / "runs.csv").open()):
        assert row == first[row["run_id"]]


def test_the_in_process_federation_gives_the_same_runs_csv(smoke, tmp_path):
    """drdfl_flwr.inprocess (the notebooks' and benchmarks' run_ring, the grid runner's
    --in-process) runs the server's own round loop over the app's own ClientApp: the
    same smoke grid gives the very same runs.csv as Flower's Ray engine."""
    grid, _, out = smoke
    run_grid(grid, tmp_path, simulate_fn=simulate_in_process, plots=False)
    assert (tmp_path / "runs.csv").read_text() == (out / "runs.csv").read_text()
