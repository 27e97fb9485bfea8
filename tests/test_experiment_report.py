"""The grid's tables and figures: numbers land in the right cell, seeds aggregate as the
captions say, failures and gaps show, and the files are deterministic."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from drdfl_flwr.config import RunConfig
from drdfl_flwr.data import label_counts, load_client_data
from drdfl_flwr.experiments.grid import GridRun, Partition
from drdfl_flwr.experiments.outcomes import DONE, FAILED, PENDING, RunOutcome
from drdfl_flwr.experiments.plots import (
    convergence_plots,
    label_distribution_plots,
    mean_curve,
)
from drdfl_flwr.experiments.report import write_report
from drdfl_flwr.registry import method_spec

DIR01 = Partition("dirichlet", 0.1)
SHARD4 = Partition("shard", 4)
DETERMINISTIC = [
    "tables.md",
    "table_dirichlet_last.csv",
    "table_dirichlet_best.csv",
    "communication.csv",
    "runs.csv",
]


def grid_run(variant: str, dataset: str, partition: Partition, seed: int = 1) -> GridRun:
    method, isolated = variant.replace("+isolated", ""), "+isolated" in variant
    values = {"method": method, "dataset": dataset, "seed": seed, **partition.run_config()}
    if isolated:
        values["isolated"] = True
    cfg = RunConfig.from_run_config(values)
    return GridRun(variant, dataset, partition, seed, cfg)


def view(rnd: int, local: float, global_: float, std: float = 0.01) -> dict:
    return {
        "round": rnd,
        "local_t_acc": {"mean": local, "std": std},
        "global_t_acc": {"mean": global_, "std": std},
    }


def done(
    run: GridRun,
    last: tuple[float, float],
    best: tuple[int, float, float] | None = None,
    seconds: float = 1.0,
    params: float = 1000.0,
) -> RunOutcome:
    """A finished run: ``last`` = (Local-T, Global-T) at round 5, ``best`` = (round,
    Local-T, Global-T) by Local-T; Global-T's own best is elsewhere on purpose."""
    best_round, best_local, best_global = best or (5, *last)
    summary = {
        "rounds": 5,
        "wall_seconds": 10.0 * seconds,
        "mean_seconds_per_round": seconds,
        "mean_params_sent_per_client_per_round": params,
        "mean_bytes_sent_per_client_per_round": 4 * params,
        "mean_bytes_received_per_client_per_round": 8 * params,
        "topology": "ring",
        "last": view(5, *last),
        "best_by_local_t_acc": view(best_round, best_local, best_global),
        "best_by_global_t_acc": view(4, 0.1, 0.99),
    }
    rounds = [
        {
            "round": r,
            "seconds": seconds,
            "mean": {"local_t_acc": last[0] * r / 5, "global_t_acc": last[1]},
            "std": {"local_t_acc": 0.0, "global_t_acc": 0.0},
        }
        for r in range(1, 6)
    ]
    return RunOutcome(run, DONE, Path("/nowhere") / run.run_id, summary=summary, rounds=rounds)


def read_md_table(text: str, section: str, heading: str) -> list[dict[str, str]]:
    """The Markdown table under ``## section`` / ``### heading``, as dicts by header."""
    lines = text.split(f"## {section}\n", 1)[1].split(f"### {heading}\n", 1)[1].splitlines()
    end = next((i for i, line in enumerate(lines) if line.startswith("#")), len(lines))
    rows = [line for line in lines[:end] if line.startswith("|")]

    def split(line: str) -> list[str]:
        return [c.strip() for c in line.strip("|").split(" | ")]

    header = split(rows[0])
    return [dict(zip(header, split(r), strict=True)) for r in rows[2:]]


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {row["method"]: row for row in csv.DictReader(f)}


DIRICHLET = "Dirichlet-based non-IID (the paper's Table 2 layout)"
LAST = "last round"
BEST = "best round (by mean Local-T; the round is given)"


@pytest.fixture
def two_by_two() -> list[RunOutcome]:
    """local and fedavg on digits and cifar10 under β = 0.1, one seed, distinct numbers."""
    return [
        done(grid_run("local", "digits", DIR01), (0.50, 0.10)),
        done(grid_run("fedavg", "digits", DIR01), (0.60, 0.20), params=2_500_000),
        done(grid_run("local", "cifar10", DIR01), (0.70, 0.30)),
        done(grid_run("fedavg", "cifar10", DIR01), (0.8123, 0.40)),
    ]


def test_a_cell_shows_the_numbers_of_its_own_run(tmp_path, two_by_two):
    write_report(two_by_two, tmp_path, "t")
    rows = {
        r["method"]: r for r in read_md_table((tmp_path / "tables.md").read_text(), DIRICHLET, LAST)
    }
    assert list(rows) == ["local", "fedavg"]  # grid order
    assert rows["fedavg"]["cifar10 β = 0.1 Local-T"] == "**81.23 ± 1.00**"  # best: bold
    assert rows["fedavg"]["cifar10 β = 0.1 Global-T"] == "**40.00 ± 1.00**"
    assert rows["local"]["digits β = 0.1 Local-T"] == "50.00 ± 1.00"
    assert rows["local"]["cifar10 β = 0.1 Global-T"] == "30.00 ± 1.00"
    text = (tmp_path / "tables.md").read_text()
    assert "mean ± std over clients" in text
    table = read_csv(tmp_path / "table_dirichlet_last.csv")
    assert float(table["fedavg"]["cifar10 β = 0.1 Local-T"]) == pytest.approx(81.23)
    assert float(table["local"]["digits β = 0.1 Local-T std"]) == pytest.approx(1.0)
    assert float(table["local"]["digits β = 0.1 Global-T"]) == pytest.approx(10.0)


def test_several_seeds_give_mean_and_std_over_seeds(tmp_path):
    outcomes = [
        done(grid_run("local", "digits", DIR01, seed=1), (0.80, 0.20)),
        done(grid_run("local", "digits", DIR01, seed=2), (0.90, 0.40)),
    ]
    write_report(outcomes, tmp_path, "t")
    text = (tmp_path / "tables.md").read_text()
    (row,) = read_md_table(text, DIRICHLET, LAST)
    assert row["digits β = 0.1 Local-T"] == "85.00 ± 7.07"  # sample std (n - 1)
    assert row["digits β = 0.1 Global-T"] == "30.00 ± 14.14"
    assert "over 2 seeds" in text
    table = read_csv(tmp_path / "table_dirichlet_last.csv")
    assert float(table["local"]["digits β = 0.1 Local-T"]) == pytest.approx(85.0)
    assert float(table["local"]["digits β = 0.1 Local-T std"]) == pytest.approx(7.0711, abs=1e-4)


def test_failed_and_missing_cells(tmp_path):
    failed = grid_run("fedavg", "digits", DIR01, seed=2)
    outcomes = [
        done(grid_run("local", "digits", DIR01, seed=1), (0.5, 0.1)),
        done(grid_run("fedavg", "digits", DIR01, seed=1), (0.6, 0.2)),
        RunOutcome(grid_run("local", "digits", DIR01, seed=2), PENDING, Path("x")),
        RunOutcome(failed, FAILED, Path("x"), error="Traceback:\n  line\nValueError: boom"),
        RunOutcome(grid_run("local", "digits", SHARD4), PENDING, Path("x")),
    ]
    write_report(outcomes, tmp_path, "t")
    text = (tmp_path / "tables.md").read_text()
    rows = {r["method"]: r for r in read_md_table(text, DIRICHLET, LAST)}
    assert rows["fedavg"]["digits β = 0.1 Local-T"] == "failed"
    assert rows["local"]["digits β = 0.1 Local-T"] == "50.00 ± 1.00 (1/2 seeds)"
    shard = read_md_table(text, "Shard-based non-IID (Table 3 layout)", LAST)
    assert {r["method"]: r["digits s = 4 Local-T"] for r in shard} == {"local": "–", "fedavg": "–"}
    failed_section = text.split("## Failed runs\n", 1)[1]
    assert f"`{failed.run_id}`: ValueError: boom" in failed_section
    assert "local__digits" not in failed_section
    csv_rows = read_csv(tmp_path / "table_shard_last.csv")
    assert csv_rows["local"]["digits s = 4 Local-T"] == ""
    assert (
        read_csv(tmp_path / "table_dirichlet_last.csv")["fedavg"]["digits β = 0.1 Global-T"]
        == "failed"
    )


def test_best_takes_the_global_t_of_the_best_local_t_round(tmp_path):
    outcomes = [done(grid_run("local", "digits", DIR01), (0.5, 0.1), best=(3, 0.9, 0.3))]
    write_report(outcomes, tmp_path, "t")
    (row,) = read_md_table((tmp_path / "tables.md").read_text(), DIRICHLET, BEST)
    assert row["digits β = 0.1 Local-T"] == "90.00 ± 1.00 (round 3)"
    assert row["digits β = 0.1 Global-T"] == "30.00 ± 1.00"  # not best_by_global's 99
    table = read_csv(tmp_path / "table_dirichlet_best.csv")["local"]
    assert float(table["digits β = 0.1 Global-T"]) == pytest.approx(30.0)
    assert table["digits β = 0.1 round"] == "3"


def test_tables_are_byte_identical_across_writes(tmp_path, two_by_two):
    # Same results, different timing and run folders: only timing.md may differ.
    again = [
        done(
            grid_run(o.run.variant, o.run.dataset, o.run.partition, o.run.seed),  # a new grid
            (o.summary["last"]["local_t_acc"]["mean"], o.summary["last"]["global_t_acc"]["mean"]),
            seconds=7.5,
            params=o.summary["mean_params_sent_per_client_per_round"],
        )
        for o in two_by_two
    ]
    first = write_report(two_by_two, tmp_path / "a", "grid")
    second = write_report(again, tmp_path / "b", "grid")
    assert [p.name for p in first] == [p.name for p in second]
    for name in DETERMINISTIC:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert str(tmp_path) not in (tmp_path / "a" / "tables.md").read_text()
    assert "7.50" in (tmp_path / "b" / "timing.md").read_text()


def test_runs_and_communication_csv_parse_back(tmp_path, two_by_two):
    write_report(two_by_two, tmp_path, "t")
    with (tmp_path / "runs.csv").open(newline="") as f:
        runs = list(csv.DictReader(f))
    assert [r["run_id"] for r in runs] == [o.run.run_id for o in two_by_two]
    assert float(runs[3]["last_local_t_mean"]) == pytest.approx(81.23)
    assert runs[3]["partition"] == "dirichlet:0.1" and runs[3]["status"] == "done"
    with (tmp_path / "communication.csv").open(newline="") as f:
        comm = {(r["variant"], r["dataset"]): r for r in csv.DictReader(f)}
    fedavg = comm[("fedavg", "digits")]
    assert fedavg["runs on"].startswith("hub") and comm[("local", "digits")]["runs on"].startswith(
        "relay"
    )
    assert fedavg["personalized part"] == method_spec("fedavg").personalized
    assert float(fedavg["params sent/round/client"]) == 2_500_000
    assert "2.50 M" in (tmp_path / "tables.md").read_text()


def test_convergence_plots_are_pngs_without_pyplot(tmp_path, two_by_two):
    had_pyplot = "matplotlib.pyplot" in sys.modules
    pending = RunOutcome(grid_run("local", "svhn", DIR01), PENDING, Path("x"))  # nothing to draw
    paths = convergence_plots([*two_by_two, pending], tmp_path)
    assert [p.name for p in paths] == ["convergence_digits.png", "convergence_cifar10.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    if not had_pyplot:
        assert "matplotlib.pyplot" not in sys.modules


def test_mean_curve_averages_seeds_round_by_round():
    rounds, means = mean_curve([{1: 10.0, 2: 20.0}, {1: 30.0}])
    assert rounds == [1, 2] and means == [20.0, 20.0]


def test_label_counts_match_client_data_and_differ_by_seed():
    cfg = RunConfig(dataset="digits", seed=1)
    counts = label_counts(cfg, 5)
    assert counts.shape == (5, 10)
    sizes = [len(load_client_data(cfg, p, 5).y_train) for p in range(5)]
    assert counts.sum(axis=1).tolist() == sizes
    assert not np.array_equal(counts, label_counts(RunConfig(dataset="digits", seed=2), 5))


def test_label_distribution_plots_write_png_and_counts(tmp_path):
    runs = [grid_run(v, "digits", DIR01, seed=s) for s in (1, 2) for v in ("local", "fedavg")]
    paths = label_distribution_plots(runs, tmp_path, 5)
    assert [p.name for p in paths] == [
        "labels_digits_dirichlet-0.1_seed1.png",
        "labels_digits_dirichlet-0.1_seed1.csv",
        "labels_digits_dirichlet-0.1_seed2.png",
        "labels_digits_dirichlet-0.1_seed2.csv",
    ]
    assert paths[0].read_bytes().startswith(b"\x89PNG")
    table = np.loadtxt(paths[1], delimiter=",", skiprows=1, dtype=int)[:, 1:]
    assert np.array_equal(table, label_counts(runs[0].cfg, 5))


def paired_outcomes(shared, isolated, local):
    """drdfl, drdfl+isolated and local over len(shared) seeds (Local-T values; Global-T
    the same minus 0.5)."""
    outcomes = []
    for seed, values in enumerate(zip(shared, isolated, local, strict=True)):
        for variant, value in zip(("drdfl", "drdfl+isolated", "local"), values, strict=True):
            run = grid_run(variant, "cifar10", DIR01, seed)
            outcomes.append(done(run, (value, value - 0.5)))
    return outcomes


def comparison_rows(tmp_path, outcomes) -> dict[tuple[str, str], list[str]]:
    write_report(outcomes, tmp_path, title="t")
    text = (tmp_path / "tables.md").read_text()
    section = text.split("## Exploratory paired differences over seeds")[1].split("\n## ")[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 4 and cells[0] not in ("a", "---"):
            rows[(cells[0], cells[1])] = cells
    return rows


def test_a_difference_is_called_only_when_its_seed_interval_excludes_zero(tmp_path):
    """Three seeds: drdfl beats its isolated twin by 0.9-1.1 points every seed (called
    higher, interval mean ± 4.303 s / sqrt 3); against Local it differs by +3, -2, +1
    points (mean +0.67, interval wide): not called."""
    rows = comparison_rows(
        tmp_path,
        paired_outcomes(
            shared=(0.600, 0.500, 0.700),
            isolated=(0.591, 0.490, 0.689),
            local=(0.570, 0.520, 0.690),
        ),
    )
    twin = rows[("drdfl", "drdfl+isolated")]
    diffs = np.array([0.9, 1.0, 1.1])
    half = 4.303 * diffs.std(ddof=1) / np.sqrt(3)
    assert twin[3] == "3"
    assert twin[4] == f"+1.00 [{1.0 - half:+.2f}, {1.0 + half:+.2f}]" and twin[6] == "higher"
    p = scipy.stats.ttest_rel([60.0, 50.0, 70.0], [59.1, 49.0, 68.9]).pvalue
    assert twin[5] == f"{p:.4f}"
    against_local = rows[("drdfl", "local")]
    assert against_local[4].startswith("+0.67 [") and against_local[6] == "not called"


def test_one_seed_gives_no_interval_and_no_verdict(tmp_path):
    rows = comparison_rows(tmp_path, paired_outcomes((0.6,), (0.5,), (0.4,)))
    assert rows[("drdfl", "drdfl+isolated")][4:7] == ["+10.00", "–", "not called (1 seed)"]


def test_the_hub_aggregate_has_a_table_of_its_own(tmp_path):
    """Scored after local training in the main tables; the fresh aggregate apart."""
    run = grid_run("fedavg", "cifar10", DIR01)
    outcome = done(run, (0.8, 0.3))
    outcome.summary["last"]["aggregate_local_t_acc"] = {"mean": 0.4, "std": 0.02}
    outcome.summary["last"]["aggregate_global_t_acc"] = {"mean": 0.5, "std": 0.03}
    write_report([outcome], tmp_path, title="t")
    text = (tmp_path / "tables.md").read_text()
    main, aggregate = text.split("## Hub methods: the fresh aggregate")
    assert "80.00 ± 1.00" in main and "40.00" not in main
    assert "| fedavg | cifar10 β = 0.1 | 40.00 ± 2.00 | 50.00 ± 3.00 |" in aggregate


def test_the_majority_class_floor_heads_every_table(tmp_path):
    """The floor is read from the runs' floor_* scores, one per seed (any finished run of
    a seed has the same partitions), and shown first, never bold, in Markdown and CSV."""
    outcomes = []
    for seed, floor in ((1, 0.60), (2, 0.70)):
        for variant, local in (("local", 0.80), ("drdfl", 0.85)):
            outcome = done(grid_run(variant, "cifar10", DIR01, seed), (local, 0.3))
            outcome.summary["last"]["floor_local_t_acc"] = {"mean": floor, "std": 0.05}
            outcome.summary["last"]["floor_global_t_acc"] = {"mean": 0.1, "std": 0.0}
            outcomes.append(outcome)
    write_report(outcomes, tmp_path, "t")
    rows = read_md_table((tmp_path / "tables.md").read_text(), DIRICHLET, LAST)
    assert rows[0]["method"] == "majority-class floor"
    assert rows[0]["cifar10 β = 0.1 Local-T"] == f"65.00 ± {np.std([60, 70], ddof=1):.2f}"
    assert rows[0]["cifar10 β = 0.1 Global-T"] == "10.00 ± 0.00"
    table = read_csv(tmp_path / "table_dirichlet_last.csv")
    assert float(table["majority-class floor"]["cifar10 β = 0.1 Local-T"]) == pytest.approx(65.0)
    runs = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert {r["floor_local_t_mean"] for r in runs} == {"60.0000", "70.0000"}


def test_primary_comparisons_are_one_bonferroni_family(tmp_path):
    """Declared comparisons: p-values from scipy's paired t-test, multiplied by the
    family size, intervals at 1 - 0.05/m; a difference that an uncorrected interval would
    call can stay uncalled once corrected."""
    from drdfl_flwr.experiments.grid import PrimaryComparison

    outcomes = paired_outcomes(
        shared=(0.600, 0.500, 0.700, 0.650),
        isolated=(0.591, 0.490, 0.689, 0.640),  # about +1 every seed
        local=(0.590, 0.470, 0.700, 0.630),  # +1, +3, 0, +2: uncorrected p ~ 0.06
    )
    primary = [
        PrimaryComparison("drdfl", "drdfl+isolated", "local_t_acc"),
        PrimaryComparison("drdfl", "local", "local_t_acc"),
        PrimaryComparison("drdfl", "local", "global_t_acc"),
    ]
    write_report(outcomes, tmp_path, "t", primary=primary)
    text = (tmp_path / "tables.md").read_text()
    section = text.split("## Primary comparisons")[1].split("\n## ")[0]
    assert "One family of 3 tests, Bonferroni-corrected" in section
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| drdfl")
    ]
    a, b = [60.0, 50.0, 70.0, 65.0], [59.1, 49.0, 68.9, 64.0]
    test = scipy.stats.ttest_rel(a, b)
    low, high = test.confidence_interval(1 - 0.05 / 3)
    assert rows[0][:5] == ["drdfl", "drdfl+isolated", "Local-T", "cifar10 β = 0.1", "4"]
    assert rows[0][5] == f"{test.pvalue:.4f}"
    assert rows[0][6] == f"+1.00 [{low:+.2f}, {high:+.2f}]"
    assert rows[0][7] == f"{min(1.0, 3 * test.pvalue):.4f}" and rows[0][8] == "higher"
    assert rows[1][8] == "not called" and rows[2][2] == "Global-T"
    exploratory = text.split("## Exploratory paired differences")[1]
    assert "uncorrected for multiplicity" in exploratory


def test_a_stale_run_is_counted_apart_and_left_out_of_the_tables(tmp_path):
    from drdfl_flwr.experiments.outcomes import STALE

    fresh = done(grid_run("local", "cifar10", DIR01, 1), (0.8, 0.3))
    stale = RunOutcome(grid_run("drdfl", "cifar10", DIR01, 1), STALE, Path("x"))
    write_report([fresh, stale], tmp_path, "t")
    text = (tmp_path / "tables.md").read_text()
    assert "2 runs: 1 done, 1 stale (made under another results format" in text
    rows = read_md_table(text, DIRICHLET, LAST)
    assert [r["cifar10 β = 0.1 Local-T"] for r in rows] == ["80.00 ± 1.00", "–"]
