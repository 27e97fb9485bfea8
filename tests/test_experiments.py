"""The grid runner: a conf file expands into the runs it names, every run's config is
validated before anything runs, failures are recorded and the grid goes on, and a rerun
resumes without redoing finished work. The simulation is replaced by a stand-in that
writes what a real run writes (the real one runs in tests/test_every_method.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drdfl_flwr.config import ConfigError, RunConfig
from drdfl_flwr.experiments.__main__ import main
from drdfl_flwr.experiments.grid import load_grid
from drdfl_flwr.experiments.outcomes import DONE, FAILED, PENDING, read_outcome
from drdfl_flwr.experiments.runner import run_grid
from drdfl_flwr.methods.drdfl import DRDFLOptions
from drdfl_flwr.results import ResultsWriter
from drdfl_flwr.server_app import run_dir_for
from strategies.rounds import RoundReport

CONF = """
method = "drdfl"
dataset = "digits"
num-server-rounds = 2
[drdfl]
noise-variance = 0.2
[grid]
clients = 3
variants = "local, drdfl, drdfl+isolated, drdfl@full{topology-k=1;drdfl.noise-variance=0.3}"
partitions = "dirichlet:0.1, shard:2, iid"
seeds = "1, 2"
"""


def write_conf(tmp_path: Path, text: str = CONF) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(text)
    return path


class FakeSimulation:
    """Writes metrics.jsonl / summary.json like a real run; fails for chosen variants."""

    def __init__(self, fail_methods: tuple[str, ...] = ()) -> None:
        self.fail_methods = fail_methods
        self.calls: list[RunConfig] = []

    def __call__(self, cfg: RunConfig, num_clients: int, **kwargs) -> dict:
        self.calls.append(cfg)
        if cfg.method in self.fail_methods:
            raise RuntimeError(f"{cfg.method} exploded")
        writer = ResultsWriter(run_dir_for(cfg), cfg.to_run_config())
        for rnd in range(1, cfg.num_server_rounds + 1):
            acc = 0.1 * rnd + 0.01 * cfg.seed
            record = {
                "round": rnd,
                "seconds": 1.0,
                "mean": {"local_t_acc": acc, "global_t_acc": acc / 2},
                "std": {"local_t_acc": 0.01, "global_t_acc": 0.02},
            }
            writer.log_round(record)
            # the progress line reads the typed report: one node holding the means
            kwargs["on_round"](
                RoundReport(rnd, "synchronous", "ring", 1.0, nodes={0: record["mean"]})
            )
        return writer.finish()


def test_a_conf_expands_into_every_combination_with_its_values(tmp_path):
    grid = load_grid(write_conf(tmp_path))
    assert len(grid.runs) == 4 * 3 * 2
    run = next(r for r in grid.runs if r.variant.startswith("drdfl@full"))
    assert run.cfg.topology == "full" and run.cfg.topology_k == 1
    assert run.cfg.options(DRDFLOptions).noise_variance == 0.3
    plain = next(r for r in grid.runs if r.variant == "drdfl")
    assert plain.cfg.options(DRDFLOptions).noise_variance == 0.2  # the file's section
    isolated = next(r for r in grid.runs if r.variant == "drdfl+isolated")
    assert isolated.cfg.isolated and not plain.cfg.isolated
    shard = next(r for r in grid.runs if r.partition.kind == "shard")
    assert shard.cfg.partitioner == "shard" and shard.cfg.classes_per_client == 2
    assert {r.seed for r in grid.runs} == {1, 2} and all(r.cfg.seed == r.seed for r in grid.runs)
    assert len({r.run_id for r in grid.runs}) == len(grid.runs)


def test_partitions_can_be_scoped_to_one_dataset(tmp_path):
    conf = CONF.replace(
        'partitions = "dirichlet:0.1, shard:2, iid"',
        'datasets = "digits, cifar10"\npartitions = "dirichlet:0.1, cifar10/shard:4"',
    )
    grid = load_grid(write_conf(tmp_path, conf))
    settings = {(r.dataset, r.partition.key) for r in grid.runs}
    assert settings == {
        ("digits", "dirichlet:0.1"),
        ("cifar10", "dirichlet:0.1"),
        ("cifar10", "shard:4"),
    }


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('variants = "drdfl, nosuchmethod"', "method"),
        ('variants = "drdfl@star"', "topology"),
        ('variants = "drdfl{drdfl.noise-variance=-1}"', "drdfl.noise-variance"),
        ('variants = "drdfl{what}"', "grid.variants"),
        ('partitions = "dirichlet:abc"', "grid.partitions"),
        ('partitions = "zipf:2"', "grid.partitions"),
        ('seeds = "1, two"', "grid.seeds"),
        ('datasets = "mnist"', "grid.datasets"),
        ("clients = 1", "grid.clients"),
    ],
)
def test_a_bad_grid_value_fails_before_anything_runs_naming_the_key(tmp_path, line, key):
    name = line.split(" = ")[0]
    lines = [ln for ln in CONF.splitlines() if not ln.startswith(f"{name} =")]
    with pytest.raises(ConfigError) as err:
        load_grid(write_conf(tmp_path, "\n".join(lines) + f"\n{line}\n"))
    assert err.value.key == key


def test_a_failed_run_is_recorded_the_grid_goes_on_and_a_rerun_retries_only_it(tmp_path):
    grid = load_grid(write_conf(tmp_path), {"grid.variants": "local, drdfl"})
    out = tmp_path / "out"
    fake = FakeSimulation(fail_methods=("local",))
    outcomes = run_grid(grid, out, simulate_fn=fake, echo=lambda line: None, plots=False)
    assert len(fake.calls) == len(grid.runs)
    failed = [o for o in outcomes if o.status == FAILED]
    assert {o.run.variant for o in failed} == {"local"} and "local exploded" in failed[0].error
    assert all(o.status == DONE for o in outcomes if o.run.variant == "drdfl")
    tables = (out / "tables.md").read_text()
    assert "failed" in tables and failed[0].run.run_id in tables

    again = FakeSimulation()
    outcomes = run_grid(grid, out, simulate_fn=again, echo=lambda line: None, plots=False)
    assert {c.method for c in again.calls} == {"local"} and len(again.calls) == len(failed)
    assert all(o.status == DONE for o in outcomes)


def test_an_interrupted_run_is_pending_and_a_changed_config_reruns_only_what_changed(tmp_path):
    conf = write_conf(tmp_path)
    grid = load_grid(conf, {"grid.variants": "local, drdfl", "grid.seeds": "1"})
    out = tmp_path / "out"
    run_grid(grid, out, simulate_fn=FakeSimulation(), echo=lambda line: None, plots=False)
    cut = grid.runs[0]
    (out / "runs" / cut.run_id / "summary.json").unlink()  # as if killed mid-run
    assert read_outcome(cut, out / "runs").status == PENDING

    changed = load_grid(
        conf,
        {"grid.variants": "local, drdfl", "grid.seeds": "1", "drdfl.noise-variance": 0.4},
    )
    fake = FakeSimulation()
    run_grid(changed, out, simulate_fn=fake, echo=lambda line: None, plots=False)
    reran = {(c.method, c.partitioner) for c in fake.calls}
    expected = {("drdfl", r.cfg.partitioner) for r in changed.runs if r.cfg.method == "drdfl"}
    assert reran == expected | {(cut.cfg.method, cut.cfg.partitioner)}


def test_progress_says_which_run_which_round_and_time_left(tmp_path):
    grid = load_grid(write_conf(tmp_path), {"grid.variants": "local", "grid.seeds": "1"})
    lines: list[str] = []
    run_grid(grid, tmp_path / "out", simulate_fn=FakeSimulation(), echo=lines.append, plots=False)
    assert lines[0].startswith("grid: 3 runs, 0 already done, 3 to run")
    assert any(line.startswith("[run 2/3] local | digits | s = 2 | seed 1") for line in lines)
    assert any("[run 3/3 | round 2/2]" in line and "left" in line for line in lines)


def test_the_command_lists_runs_and_rebuilds_the_report(tmp_path, capsys):
    conf = write_conf(tmp_path)
    out = tmp_path / "out"
    grid = load_grid(conf, {"grid.variants": "local", "grid.seeds": "1"})
    run_grid(grid, out, simulate_fn=FakeSimulation(), echo=lambda line: None)
    args = [
        str(conf),
        "--out",
        str(out),
        "--set",
        'grid.variants="local"',
        "--set",
        'grid.seeds="1"',
    ]
    assert main([*args, "--list"]) == 0
    *listed, total = capsys.readouterr().out.splitlines()
    assert len(listed) == 3 and all(line.startswith("done") for line in listed)
    assert total == "3 runs: 3 done, 0 failed, 0 pending"
    (out / "tables.md").unlink()
    assert main([*args, "--report-only"]) == 0
    assert "local" in (out / "tables.md").read_text()
    assert main([str(conf), "--set", "grid.clients=1"]) == 2
    assert "grid.clients" in capsys.readouterr().err


def test_every_conf_file_is_a_valid_grid():
    for conf in sorted((Path(__file__).resolve().parents[1] / "conf").glob("*.toml")):
        grid = load_grid(conf)
        assert grid.runs, conf
        for run in grid.runs:
            assert json.dumps(run.cfg.to_run_config())


def test_a_run_in_which_every_node_failed_is_recorded_failed_not_done(tmp_path):
    """Every node raising leaves a metrics.jsonl of failed rounds and a summary without
    a single evaluated round: that is a failure of the cell, not a result."""
    grid = load_grid(write_conf(tmp_path))

    def all_nodes_fail(cfg, num_clients, **kwargs):
        writer = ResultsWriter(run_dir_for(cfg), cfg.to_run_config())
        writer.log_round({"round": 1, "seconds": 0.1, "failed": [0, 1], "mean": {}, "std": {}})
        return writer.finish()

    outcomes = run_grid(
        grid, tmp_path / "out", simulate_fn=all_nodes_fail, echo=lambda _: None, plots=False
    )
    assert {o.status for o in outcomes} == {FAILED}
    assert "every node failed" in outcomes[0].error


@pytest.mark.parametrize(
    ("primary", "named"),
    [
        ("drdfl - locl @ local_t_acc", "'locl', not a variant of the grid"),
        ("drdfl - local @ local_t_se", "metric 'local_t_se' is not one of"),
        ("drdfl minus local", "is not 'a - b @ metric'"),
    ],
)
def test_a_bad_primary_comparison_is_refused_naming_it(tmp_path, primary, named):
    conf = write_conf(tmp_path)
    with pytest.raises(ConfigError, match="grid.primary") as err:
        load_grid(conf, {"grid.variants": "local, drdfl", "grid.primary": primary})
    assert named in str(err.value)


def test_primary_comparisons_are_parsed_in_order(tmp_path):
    conf = write_conf(tmp_path)
    grid = load_grid(
        conf,
        {
            "grid.variants": "local, drdfl{drdfl.noise-variance=0.2}, drdfl+isolated",
            "grid.primary": "drdfl{drdfl.noise-variance=0.2} - local @ expected_local_t_acc, "
            "drdfl{drdfl.noise-variance=0.2} - drdfl+isolated @ global_t_balanced_acc",
        },
    )
    assert [c.text for c in grid.options.primary_comparisons()] == [
        "drdfl{drdfl.noise-variance=0.2} - local @ expected_local_t_acc",
        "drdfl{drdfl.noise-variance=0.2} - drdfl+isolated @ global_t_balanced_acc",
    ]
