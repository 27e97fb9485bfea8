"""Results that reproduce from any clone: a results folder copied elsewhere, read with the
datasets in another folder, still counts every run done (a run is compared on its config
and the identity of its data, never on paths), and ``--report-only`` never replaces a
report with one that holds fewer finished runs."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drdfl_flwr.data import data_identity
from drdfl_flwr.experiments.__main__ import main
from drdfl_flwr.experiments.grid import load_grid
from drdfl_flwr.experiments.outcomes import DATA_FILE, DONE, PENDING, read_outcome
from drdfl_flwr.experiments.runner import pending_runs, run_grid
from tests.test_experiments import CONF, FakeSimulation, write_conf

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
# every file the report writes that holds no image: equal bytes from equal runs
REPORT_TEXTS = ("tables.md", "timing.md", "runs.csv", "communication.csv")


def write_parquet(folder: Path, labels: list[int], offset: int = 0) -> None:
    """A parquet dataset in the hub's layout; ``img`` is never decoded by these tests."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", labels), ("test", labels[: len(labels) // 2])):
        table = pa.table({"img": [i + offset for i in range(len(rows))], "label": rows})
        pq.write_table(table, folder / f"{split}.parquet")


def local_grid(conf: Path, data_root: Path):
    return load_grid(
        conf,
        {
            "grid.variants": "local, drdfl",
            "grid.seeds": "1",
            "grid.datasets": "cifar10",
            "grid.partitions": "iid",
            "grid.data-root": str(data_root),
        },
    )


def test_a_run_counts_done_on_the_same_data_wherever_it_lies_and_pending_on_other_data(
    tmp_path,
):
    write_parquet(tmp_path / "here" / "cifar10", [k % 10 for k in range(40)])
    conf = write_conf(tmp_path, CONF.replace('dataset = "digits"', 'dataset = "cifar10"'))
    out = tmp_path / "out"
    grid = local_grid(conf, tmp_path / "here")
    run_grid(grid, out, simulate_fn=FakeSimulation(), echo=lambda line: None, plots=False)
    recorded = json.loads((out / "runs" / grid.runs[0].run_id / DATA_FILE).read_text())
    assert recorded["dataset"] == "cifar10" and recorded["splits"]["train"]["rows"] == 40
    assert recorded == data_identity(grid.runs[0].cfg)

    # the same files in another folder, the results in another folder: still done
    shutil.copytree(tmp_path / "here", tmp_path / "there")
    shutil.copytree(out, tmp_path / "copy")
    moved = local_grid(conf, tmp_path / "there")
    assert moved.runs[0].cfg.data_dir != grid.runs[0].cfg.data_dir
    assert {read_outcome(r, tmp_path / "copy" / "runs").status for r in moved.runs} == {DONE}

    # other bytes under the same name: pending (the labels are the same, the images not)
    write_parquet(tmp_path / "there" / "cifar10", [k % 10 for k in range(40)], offset=1)
    assert {read_outcome(r, tmp_path / "copy" / "runs").status for r in moved.runs} == {PENDING}

    # a finished folder with no identity record does not count either
    (out / "runs" / grid.runs[0].run_id / DATA_FILE).unlink()
    assert read_outcome(grid.runs[0], out / "runs").status == PENDING
    assert read_outcome(grid.runs[1], out / "runs").status == DONE


def test_report_only_refuses_to_replace_a_report_with_more_finished_runs(tmp_path, capsys):
    conf = write_conf(tmp_path)
    out = tmp_path / "out"
    grid = load_grid(conf, {"grid.variants": "local, drdfl", "grid.seeds": "1"})
    run_grid(grid, out, simulate_fn=FakeSimulation(), echo=lambda line: None, plots=False)
    before = (out / "tables.md").read_text()
    assert "6 runs: 6 done" in before
    # DRDFL's 3 runs no longer match: the report would drop them
    args = [str(conf), "--out", str(out), "--set", 'grid.variants="local, drdfl"']
    args += ["--set", 'grid.seeds="1"', "--set", "drdfl.noise-variance=0.4"]
    capsys.readouterr()
    assert main([*args, "--report-only", "--no-plots"]) == 1
    err = capsys.readouterr().err
    assert str(out) in err and "reports 6 finished runs" in err and "only 3 of the 6" in err
    assert (out / "tables.md").read_text() == before
    assert main([*args, "--report-only", "--force", "--no-plots"]) == 0
    assert "6 runs: 3 done, 0 failed, 3 pending." in (out / "tables.md").read_text()


needs_cifar = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"the CIFAR parquet files are not at {SHARED} (../shared/datasets)"
)


def copied_grid(tmp_path: Path, committed: Path) -> tuple[Path, Path]:
    """``committed`` copied into another clone's results, and its conf file pointing at
    the datasets in another folder (the same files, linked one by one, so that the
    folders, which the grid resolves to absolute paths, differ from the committed ones)."""
    copy = tmp_path / "clone" / "results" / committed.name
    shutil.copytree(committed, copy)
    data_root = tmp_path / "data"
    for dataset in ("cifar10", "cifar100"):
        (data_root / dataset).mkdir(parents=True)
        for file in (SHARED / dataset).glob("*.parquet"):
            (data_root / dataset / file.name).symlink_to(file)
    conf = tmp_path / f"{committed.name}.toml"
    text = (committed / "grid.toml").read_text()
    assert 'data-root = "../shared/datasets"' in text
    conf.write_text(text.replace('"../shared/datasets"', json.dumps(str(data_root))))
    return conf, copy


@needs_cifar
@pytest.mark.parametrize("name", ["cifar10-shards"])
def test_a_committed_grid_copied_elsewhere_is_all_done_and_its_report_rebuilds_byte_for_byte(
    tmp_path, capsys, name
):
    committed = ROOT / "benchmarks" / name
    conf, copy = copied_grid(tmp_path, committed)

    assert main([str(conf), "--out", str(copy), "--list"]) == 0
    *listed, total = capsys.readouterr().out.splitlines()
    # a grid committed part way (it resumes over several sittings): every committed run
    # is done, every other one pending, none stale or failed
    committed_runs = {path.name for path in (committed / "runs").iterdir()}
    status = {line.split()[1]: line.split()[0] for line in listed}
    assert committed_runs and committed_runs <= set(status)
    assert {status[run] for run in committed_runs} == {"done"}, "\n".join(listed)
    assert {s for run, s in status.items() if run not in committed_runs} <= {"pending"}
    done, pending = len(committed_runs), len(listed) - len(committed_runs)
    assert total == f"{len(listed)} runs: {done} done, 0 failed, {pending} pending"
    # listing changes nothing on disk: the recorded configs are the committed ones,
    # whichever folder the committing machine had the datasets in
    for ran in (copy / "runs").glob("*/run_config.json"):
        committed_config = committed / "runs" / ran.parent.name / "run_config.json"
        assert ran.read_bytes() == committed_config.read_bytes(), ran.parent.name

    assert main([str(conf), "--out", str(copy), "--report-only", "--no-plots"]) == 0
    for file in REPORT_TEXTS:
        assert (copy / file).read_bytes() == (committed / file).read_bytes(), file
    for csv in committed.glob("*.csv"):
        assert (copy / csv.name).read_bytes() == csv.read_bytes(), csv.name


def test_the_archived_grid_of_a_removed_method_says_it_was_removed_and_where_it_went(
    tmp_path, capsys
):
    """DRDFL-Gen left the registry (issue 29); its archived grid stays as its record, and
    listing it names the removal and where the record and the code are."""
    conf, copy = copied_grid(tmp_path, ROOT / "benchmarks" / "archive" / "drdfl-gen")
    assert main([str(conf), "--out", str(copy), "--list"]) == 2
    error = capsys.readouterr().err
    assert "'drdfl-gen': was removed (issue 29)" in error and "git show" in error


@needs_cifar
@pytest.mark.parametrize("name", ["cpu-bench"])
def test_an_archived_grid_made_under_an_older_results_format_lists_stale(tmp_path, capsys, name):
    """The archived grids ran the same configs on the same data, but under results format
    1: listed stale, never done, so neither a report nor a resumed grid takes them."""
    conf, copy = copied_grid(tmp_path, ROOT / "benchmarks" / "archive" / name)
    assert main([str(conf), "--out", str(copy), "--list"]) == 0
    *listed, total, note = capsys.readouterr().out.splitlines()
    statuses = [line.split()[0] for line in listed]
    # stale, or pending where a default the run relied on has changed since (FedFed's)
    assert set(statuses) <= {"stale", "pending"} and "stale" in statuses, "\n".join(listed)
    stale, pending = statuses.count("stale"), statuses.count("pending")
    assert total == f"{len(listed)} runs: 0 done, {stale} stale, 0 failed, {pending} pending"
    assert "another results format" in note
    grid = load_grid(conf)
    assert pending_runs(grid, copy / "runs") == list(grid.runs)  # the grid runs them again


def test_every_run_records_the_code_and_libraries_that_made_it_and_older_formats_are_stale(
    tmp_path,
):
    from drdfl_flwr.experiments.outcomes import STALE
    from drdfl_flwr.provenance import PROVENANCE_FILE, RESULTS_FORMAT

    conf, out = write_conf(tmp_path), tmp_path / "out"
    grid = load_grid(conf, {"grid.variants": "local", "grid.seeds": "1"})
    run_grid(grid, out, simulate_fn=FakeSimulation(), echo=lambda line: None, plots=False)
    run = grid.runs[0]
    record = json.loads((out / "runs" / run.run_id / PROVENANCE_FILE).read_text())
    assert record["results_format"] == RESULTS_FORMAT
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert record["code"]["commit"] == (head or None)
    assert isinstance(record["code"]["dirty"], bool) or not head
    assert set(record["versions"]) == {"drdfl-flwr", "flwr", "torch", "flwr-datasets", "numpy"}
    assert record["versions"]["torch"] == importlib.metadata.version("torch")
    assert read_outcome(run, out / "runs").status == DONE

    # the same run under an older format, or with no record (before formats): stale
    path = out / "runs" / run.run_id / PROVENANCE_FILE
    path.write_text(json.dumps({**record, "results_format": RESULTS_FORMAT - 1}))
    assert read_outcome(run, out / "runs").status == STALE
    path.unlink()
    assert read_outcome(run, out / "runs").status == STALE
    assert pending_runs(grid, out / "runs") == [run]
