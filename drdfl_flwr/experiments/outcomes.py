"""What a grid run left on disk, read back: the one input of tables and plots.

A run's folder (``<out>/runs/<run_id>/``) holds ``run_config.json`` (the exact config),
``metrics.jsonl`` (one record per round) and, once it finished, ``summary.json`` and
``data.json`` (the identity of the data it read, :func:`drdfl_flwr.data.data_identity`);
a run that raised leaves ``error.txt`` instead. Reading state from the folder, never from
memory, is what lets an interrupted grid resume and a report be rebuilt at any time.

What a finished run is compared on is what decides its results, never where things lie:
its config without the bookkeeping keys and without ``data-dir`` (a path, different on
every machine), plus the data's identity (dataset name, rows and SHA-256 of the parquet
files). So a results folder copied to another clone, or read with the datasets in another
folder, still counts every run done.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drdfl_flwr.atomic import write_atomically
from drdfl_flwr.config import RunConfig
from drdfl_flwr.data import data_identity
from drdfl_flwr.experiments.grid import GridRun
from drdfl_flwr.provenance import RESULTS_FORMAT, recorded_format
from drdfl_flwr.registry import method_spec, recorded_run_config

DONE, FAILED, PENDING, STALE = "done", "failed", "pending", "stale"
# where results go and whether a run continues: they do not change the results
BOOKKEEPING_KEYS = ("results-dir", "run-name", "resume")
# where the data lies: machine-dependent; what it is (DATA_FILE) is compared instead
LOCATION_KEYS = ("data-dir",)
DATA_FILE = "data.json"
# Keys whose default changed what runs do when they were added: a run recorded before the
# key existed ran with the value here, not with today's default (shard classes were drawn
# independently per client, flwr-datasets' "random" mode, until "balanced" came).
BEFORE_KEY_EXISTED = {"shard-assignment": "random"}
# Keys that only shape one partitioner's split: a Dirichlet run does not depend on them
PARTITIONER_KEYS = {
    "dirichlet-beta": "dirichlet",
    "classes-per-client": "shard",
    "shard-assignment": "shard",
}


@dataclass(frozen=True)
class RunOutcome:
    run: GridRun
    status: str  # done | failed | pending | stale
    run_dir: Path
    error: str = ""
    summary: dict[str, Any] | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl records


def read_outcome(run: GridRun, runs_dir: Path) -> RunOutcome:
    """The state of ``run`` under ``runs_dir``: done (summary written by the same config
    on the same data under today's results format), stale (the same, under another
    format: :mod:`drdfl_flwr.provenance`), failed (error.txt), or pending (nothing, or a
    run cut off part way). A stale run is never counted done: the grid runs it again."""
    run_dir = runs_dir / run.run_id
    rounds = _read_rounds(run_dir / "metrics.jsonl")
    summary_path, error_path = run_dir / "summary.json", run_dir / "error.txt"
    if summary_path.is_file() and _same_config(run, run_dir) and _same_data(run, run_dir):
        if recorded_format(run_dir) != RESULTS_FORMAT:
            return RunOutcome(run, STALE, run_dir, rounds=rounds)
        summary = json.loads(summary_path.read_text())
        return RunOutcome(run, DONE, run_dir, summary=summary, rounds=rounds)
    if error_path.is_file():
        return RunOutcome(run, FAILED, run_dir, error=error_path.read_text().strip(), rounds=rounds)
    return RunOutcome(run, PENDING, run_dir, rounds=rounds)


def _same_config(run: GridRun, run_dir: Path) -> bool:
    """A finished folder counts only if it ran this run's config (a changed conf file
    re-runs the runs it changed, and only those). A key the recorded config lacks was
    added to the code after the run: it counts as its default, since a new key's default
    keeps what ran before (``min-nodes = 0``, every node from the start); set to anything
    else, the run is redone. Where a new key's default does change what runs, the value
    old runs had is in ``BEFORE_KEY_EXISTED``."""
    path = run_dir / "run_config.json"
    if not path.is_file():
        return False
    wanted = json.loads(json.dumps(recorded_run_config(run.cfg)))
    defaults = {**_defaults(), **BEFORE_KEY_EXISTED}
    ran = {k: defaults[k] for k in wanted if k in defaults}
    ran.update(json.loads(path.read_text()))
    return _what_counts(ran, run.cfg.method) == _what_counts(wanted, run.cfg.method)


@functools.cache
def _defaults() -> dict[str, Any]:
    """Every key's default value, as a run config on disk holds it."""
    return json.loads(json.dumps(recorded_run_config(RunConfig())))


def write_data_identity(run_dir: Path, identity: dict[str, Any]) -> None:
    """Record the identity of the data a run read (the runner, once the run finished)."""
    write_atomically(run_dir / DATA_FILE, json.dumps(identity, indent=2, sort_keys=True) + "\n")


def _same_data(run: GridRun, run_dir: Path) -> bool:
    """The run read the data this run would read: equal identities, whatever the folders'
    paths (the files are hashed once per process, not once per run). A folder without
    ``data.json`` (written before identities were recorded) does not count."""
    path = run_dir / DATA_FILE
    if not path.is_file():
        return False
    try:
        recorded = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return recorded == data_identity(run.cfg)


def _what_counts(values: dict[str, Any], method: str) -> dict[str, Any]:
    """The keys a run's results depend on: the generic ones and its method's own section.
    Where results go does not change them, nor where the data lies (its identity is
    compared instead: :func:`_same_data`), nor another method's section (changing
    ``drdfl.noise-variance`` re-runs DRDFL's cells, not FedAvg's), nor another
    partitioner's keys."""
    own = method_spec(method).sections
    partitioner = values.get("partitioner")
    return {
        k: v
        for k, v in values.items()
        if k not in BOOKKEEPING_KEYS
        and k not in LOCATION_KEYS
        and PARTITIONER_KEYS.get(k, partitioner) == partitioner
        and ("." not in k or k.partition(".")[0] in own)
    }


def _read_rounds(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut off by an interruption
            break
    return records
