"""The grid command explains itself: ``--set`` takes what ``flwr run --run-config`` takes
(and bare words), a wrong value or key is named with the fix, ``--list`` ends with totals,
a closed pipe ends it quietly, and a run prints one line per round."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import datasets
import pytest

from drdfl_flwr.config import ConfigError, RunConfig
from drdfl_flwr.data import label_counts
from drdfl_flwr.experiments.__main__ import main, parse_overrides
from drdfl_flwr.experiments.grid import load_grid
from drdfl_flwr.experiments.runner import run_grid
from drdfl_flwr.server_app import run_job
from strategies.relay import Relay
from strategies.rounds import RoundLoop
from strategies.topology import Ring
from tests.fake_grid import FakeGrid
from tests.test_experiments import FakeSimulation, write_conf
from tests.test_reproduce import ROOT, write_parquet


def test_set_takes_flower_style_pairs_and_bare_words():
    assert parse_overrides(
        [
            "method=drdfl",  # a bare word is a string
            "num-server-rounds=2 local-epochs=1",  # as flwr run --run-config
            'grid.variants="local, drdfl" grid.seeds=1,2 isolated=true',
            "drdfl.noise-variance=0.3 classifier='small-cnn'",
        ]
    ) == {
        "method": "drdfl",
        "num-server-rounds": 2,
        "local-epochs": 1,
        "grid.variants": "local, drdfl",
        "grid.seeds": "1,2",
        "isolated": True,
        "drdfl.noise-variance": 0.3,
        "classifier": "small-cnn",
    }


def test_the_command_runs_what_set_says(tmp_path, capsys):
    args = [str(write_conf(tmp_path)), "--out", str(tmp_path / "out"), "--list"]
    assert main([*args, "--set", 'grid.variants="" grid.seeds="7"', "--set", "method=fedavg"]) == 0
    runs = capsys.readouterr().out.splitlines()[:-1]
    assert len(runs) == 3 and all(line.endswith("seed7") and "fedavg__" in line for line in runs)


@pytest.mark.parametrize(
    ("item", "named", "fix"),
    [
        ('method="drdfl', "method=\"drdfl'", "--set 'method=\"drdfl\"'"),
        ("grid.seeds=1, 2", "'2' is not a key=value pair", "--set 'grid.seeds=\"1, 2\"'"),
        ("num-server-rounds = 2", "not key=value", "no spaces around ="),
    ],
)
def test_a_set_argument_that_does_not_parse_is_named_with_its_fix(
    tmp_path, capsys, item, named, fix
):
    assert main([str(write_conf(tmp_path)), "--set", item, "--list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set ") and named in err and fix in err
    assert err.count("\n") == 1


def test_an_unknown_grid_key_gets_a_did_you_mean(tmp_path, capsys):
    assert main([str(write_conf(tmp_path)), "--set", "grid.variant=local", "--list"]) == 2
    err = capsys.readouterr().err
    assert "run config 'grid.variant' = 'local': unknown run-config key" in err
    assert "did you mean 'grid.variants'" in err


def test_a_grid_error_says_key_and_value_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_grid(write_conf(tmp_path), {"grid.variants": "nope"})
    message = str(err.value)
    assert message.startswith("run config 'method' = 'nope': must be one of drdfl, ")
    assert message.count("run config") == 1
    assert message.endswith("(grid run nope, digits, dirichlet:0.1, seed 1)")


def test_list_ends_with_the_totals(tmp_path, capsys):
    conf, out = write_conf(tmp_path), tmp_path / "out"
    one = {"grid.seeds": "1", "grid.partitions": "iid"}
    ran = load_grid(conf, {**one, "grid.variants": "local, drdfl"})
    failing = FakeSimulation(fail_methods=("local",))
    run_grid(ran, out, simulate_fn=failing, echo=lambda line: None, plots=False)
    args = ["--set", 'grid.variants="local, drdfl, fedavg" grid.seeds="1" grid.partitions=iid']
    assert main([str(conf), "--out", str(out), *args, "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "failed   local__digits__iid__seed1",
        "done     drdfl__digits__iid__seed1",
        "pending  fedavg__digits__iid__seed1",
        "3 runs: 1 done, 1 failed, 1 pending",
    ]


def test_list_into_a_closed_pipe_ends_quietly(tmp_path):
    """``--list | head -1``: the reader is gone; no traceback, no "Exception ignored"."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "drdfl_flwr.experiments", str(write_conf(tmp_path)), "--list"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
    finally:
        os.close(write)
    assert done.stderr == "" and done.returncode == 1


# -- progress: one line per round ----------------------------------------------------------


def test_a_grid_run_prints_one_line_per_round_with_both_accuracies(tmp_path):
    grid = load_grid(write_conf(tmp_path), {"grid.variants": "local", "grid.seeds": "1"})
    fake, asked = FakeSimulation(), []

    def simulate(cfg, num_clients, **kwargs):
        asked.append(kwargs["log_rounds"])
        return fake(cfg, num_clients, **kwargs)

    lines: list[str] = []
    run_grid(grid, tmp_path / "out", simulate_fn=simulate, echo=lines.append, plots=False)
    assert asked == [False] * len(grid.runs)  # the app logs no second line per round
    rounds = [line for line in lines if "| round " in line]
    assert len(rounds) == sum(run.cfg.num_server_rounds for run in grid.runs)
    assert rounds[-1].startswith("  [run 3/3 | round 2/2] Local-T 21.00% | Global-T 10.50% | 1.0s")


def test_the_apps_round_line_can_be_left_to_the_caller(tmp_path, caplog):
    cfg = RunConfig(method="local", num_server_rounds=2, results_dir=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="flwr"):
        run_job(FakeGrid(3), cfg.replace(run_name="logged"))
        logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[round")]
        caplog.clear()
        run_job(FakeGrid(3), cfg.replace(run_name="quiet"), log_rounds=False)
        quiet = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[round")]
    assert len(logged) == 2 and quiet == []


def test_waiting_for_nodes_is_logged_when_the_count_changes(monkeypatch, caplog):
    grid = FakeGrid(3)
    grid.mute, grid.unmute_at_pull = {2}, 6  # partition 2 answers on the sixth look
    monkeypatch.setattr("strategies.rounds.time.sleep", lambda seconds: None)
    with caplog.at_level(logging.INFO, logger="flwr"):
        RoundLoop(Relay(Ring()), node_wait_timeout=60).membership.discover(grid)
    waiting = [r.getMessage() for r in caplog.records if "Waiting for nodes" in r.getMessage()]
    assert grid.pulls >= 6 and len(waiting) == len(set(waiting)) <= 2


def test_loading_data_shows_no_progress_bars(tmp_path, capfd):
    write_parquet(tmp_path / "cifar10", [k % 10 for k in range(40)])
    datasets.enable_progress_bars()
    cfg = RunConfig(dataset="cifar10", data_dir=str(tmp_path / "cifar10"), partitioner="iid")
    assert label_counts(cfg, 2).sum() == 40
    err = capfd.readouterr().err
    assert "examples" not in err and "%|" not in err, err


def test_no_plots_writes_the_tables_without_the_figures(tmp_path):
    conf, out = write_conf(tmp_path), tmp_path / "out"
    grid = load_grid(conf, {"grid.variants": "local", "grid.seeds": "1", "grid.partitions": "iid"})
    run_grid(grid, out, simulate_fn=FakeSimulation(), echo=lambda line: None, plots=False)
    assert (out / "tables.md").is_file()
    assert not list(out.glob("*.png"))
    args = ["--set", 'grid.variants="local" grid.seeds="1" grid.partitions=iid']
    assert main([str(conf), "--out", str(out), *args, "--report-only"]) == 0
    assert "convergence_digits.png" in {p.name for p in out.glob("*.png")}
