"""The figures' names and files: variants named as the papers write them, the headline
and trade-off figures written by the report from a small grid, and the architecture
picture covering every registered method with the registry's relay/hub split."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from drdfl_flwr.experiments.architecture import architecture_figure, rows, runs_on
from drdfl_flwr.experiments.names import display_name, method_name
from drdfl_flwr.experiments.outcomes import FAILED, RunOutcome
from drdfl_flwr.experiments.plots import (
    headline_plot,
    last_node_accuracies,
    ordered_variants,
    report_figures,
    tradeoff_plots,
    variant_styles,
)
from drdfl_flwr.experiments.report import write_report
from drdfl_flwr.registry import METHODS, method_spec
from tests.test_experiment_report import DIR01, SHARD4, done, grid_run


@pytest.mark.parametrize(
    "variant, name",
    [
        ("drdfl", "DRDFL"),
        ("drdfl+isolated", "DRDFL (isolated)"),
        ('drdfl{mode="sequential"}', "DRDFL (sequential)"),
        ('fedbn{classifier-norm="batch"}', "FedBN (batch norm)"),
        ("dfedpgp+isolated", "DFedPGP (isolated)"),
        ("dispfl", "DisPFL"),
        ("drdfl-vf+isolated", "DRDFL-VF (isolated)"),
        ("drdfl-cfl", "DRDFL-CFL"),
        ("drdfl@full", "DRDFL (full)"),
        ("drdfl@random-k{topology-k=1}", "DRDFL (random-k, k=1)"),
        ('drdfl{drdfl.ablation="no-pr"}', "DRDFL (ablation no-pr)"),
        (
            "fedfed{fedfed.distill-rounds=1;num-server-rounds=3}",
            "FedFed (distill-rounds=1, rounds=3)",
        ),
        ('dslth{dslth.procedure="epochs"}', "DSLTH (procedure=epochs)"),
        ("not a variant!", "not a variant!"),
    ],
)
def test_display_name(variant, name):
    assert display_name(variant) == name


def test_every_registered_method_is_named_by_the_title_on_its_spec():
    names = {m: display_name(m) for m in METHODS}
    assert (
        names == {m: method_spec(m).title for m in METHODS} == {m: method_name(m) for m in METHODS}
    )
    assert len(set(names.values())) == len(names)  # no two methods look alike in a figure
    assert method_name("no-such-method") == "no-such-method"


def test_isolated_twins_sit_beside_their_variant_in_the_same_colour():
    order = ordered_variants(["local", "drdfl", "fedavg", "drdfl+isolated", "cvae+isolated"])
    assert order == ["local", "drdfl", "drdfl+isolated", "fedavg", "cvae+isolated"]
    styles = variant_styles(order)
    assert styles["drdfl"]["color"] == styles["drdfl+isolated"]["color"]
    assert styles["drdfl+isolated"]["hatch"] and not styles["drdfl"]["hatch"]
    assert len({styles[v]["color"] for v in ("local", "drdfl", "fedavg", "cvae+isolated")}) == 4


def with_nodes(outcome: RunOutcome, local: list[float], global_: list[float]) -> RunOutcome:
    """Per-node accuracies (fractions) in the last round's record, as metrics.jsonl holds
    them; an earlier round gets other values, which must not be read."""
    for record in outcome.rounds:
        record["nodes"] = {str(k): {"local_t_acc": 0.01, "global_t_acc": 0.01} for k in range(3)}
    outcome.rounds[-1]["nodes"] = {
        str(k): {"local_t_acc": lt, "global_t_acc": gt, "l": 1.0}
        for k, (lt, gt) in enumerate(zip(local, global_, strict=True))
    }
    outcome.rounds.append({"round": 6, "nodes": {"0": {"l": 1.0}}})  # trained, not evaluated
    return outcome


@pytest.fixture
def small_grid() -> list[RunOutcome]:
    """local, drdfl and its isolated twin over 3 seeds on cifar10 β = 0.1, one failed
    fedavg seed, and one seed of local on a second column (s = 4)."""
    outcomes = []
    for seed in range(3):
        for k, variant in enumerate(("local", "drdfl", "drdfl+isolated")):
            run = grid_run(variant, "cifar10", DIR01, seed)
            value = 0.6 + 0.05 * k + 0.01 * seed
            outcomes.append(with_nodes(done(run, (value, 0.2)), [value, value, 0.5], [0.2] * 3))
    failed = grid_run("fedavg", "cifar10", DIR01)
    outcomes.append(RunOutcome(failed, FAILED, Path("x"), error="ValueError: boom"))
    outcomes.append(
        with_nodes(done(grid_run("local", "cifar10", SHARD4), (0.7, 0.3)), [0.7], [0.3])
    )
    return outcomes


def test_last_node_accuracies_are_the_last_evaluated_rounds(small_grid):
    points = last_node_accuracies(small_grid[1])  # drdfl, seed 0
    assert points == [(65.0, 20.0), (65.0, 20.0), (50.0, 20.0)]


def test_the_report_writes_headline_and_tradeoff_pngs_without_pyplot(tmp_path, small_grid):
    had_pyplot = "matplotlib.pyplot" in sys.modules
    paths = write_report(small_grid, tmp_path, "t") + report_figures(small_grid, tmp_path)
    names = [p.name for p in paths]
    assert "headline.png" in names
    assert "tradeoff_cifar10_dirichlet-0.1.png" in names
    assert "tradeoff_cifar10_shard-4.png" in names
    (tmp_path / "1").mkdir()
    one_column = report_figures([o for o in small_grid if o.run.partition == DIR01], tmp_path / "1")
    assert "tradeoff.png" in [p.name for p in one_column]  # one column: no dataset in the name
    for name in ("headline.png", "tradeoff_cifar10_dirichlet-0.1.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and 5_000 < len(data) < 300_000, name
    if not had_pyplot:
        assert "matplotlib.pyplot" not in sys.modules


def test_no_figure_before_any_run_finished(tmp_path, small_grid):
    unfinished = [o for o in small_grid if o.status == FAILED]
    assert headline_plot(unfinished, tmp_path) == []
    assert tradeoff_plots(unfinished, tmp_path) == []


def test_the_architecture_figure_covers_every_method_as_the_registry_runs_it(tmp_path):
    table = rows()
    assert sorted(row.method for row in table) == sorted(METHODS)
    assert [row.method for row in table[:3]] == ["drdfl", "dfml", "dslth"]  # the papers' first
    for row in table:
        spec = method_spec(row.method)
        assert (row.title, row.sends, row.keeps) == (spec.title, spec.sends, spec.keeps)
        assert row.sends and row.keeps and row.runs_on == runs_on(row.method)
    for method in METHODS:
        expected = "hub" if method_spec(method).centralized else "relay"
        assert runs_on(method) == ("none" if method == "local" else expected)
    path = architecture_figure(tmp_path / "architecture.png")
    assert path.read_bytes().startswith(b"\x89PNG")
