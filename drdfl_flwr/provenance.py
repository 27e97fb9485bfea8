"""Which code made a result: recorded with every run, checked before a run counts as done.

A results folder outlives the code that wrote it. When scoring changes (a metric added,
a method scored at another round), a folder written before still holds a ``summary.json``
that looks finished; read as done, it would mix two scorings in one table. So every run
records ``provenance.json``: the results format (:data:`RESULTS_FORMAT`, raised whenever
what a run reports or how it is scored changes), the code version (git commit and whether
the tracked files differed from it), and the versions of the libraries that decide the
numbers. A run under another results format is *stale*: shown so, re-run by the grid,
never counted done.

Format history:

1. the paper's Local-T / Global-T (sampled Local-T, pooled Global-T); DFML scored on its
   peak snapshot, DSLTH one local round behind (the release's reading).
2. the full-test-set readings beside them (``global_t_balanced_acc``,
   ``expected_local_t_acc``, ``absent_class_acc``, their standard errors); every method
   scored on the model its last local round produced (DFML's peak as ``peak_*``, DSLTH
   at ``dslth.scored-at = "trained"``); isolated DSLTH fuses with no mask.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import subprocess
from pathlib import Path
from typing import Any

from drdfl_flwr.atomic import write_atomically

RESULTS_FORMAT = 2
PROVENANCE_FILE = "provenance.json"
LIBRARIES = ("drdfl-flwr", "flwr", "torch", "flwr-datasets", "numpy")  # this project first
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), *args],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


@functools.cache
def code_version() -> dict[str, Any]:
    """The commit the project's files come from and whether tracked files differ from it
    (untracked results folders do not count). ``commit`` is ``None`` where the code is
    not a git checkout (an installed FAB on a SuperNode)."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance() -> dict[str, Any]:
    return {
        "results_format": RESULTS_FORMAT,
        "code": code_version(),
        "versions": library_versions(),
    }


def write_provenance(run_dir: Path) -> None:
    write_atomically(Path(run_dir) / PROVENANCE_FILE, json.dumps(provenance(), indent=2) + "\n")


def recorded_format(run_dir: Path) -> int:
    """The results format a run was written under: 1 for a run that recorded none (every
    run before provenance was recorded), 0 for an unreadable record."""
    path = Path(run_dir) / PROVENANCE_FILE
    if not path.is_file():
        return 1
    try:
        return int(json.loads(path.read_text()).get("results_format", 0))
    except (json.JSONDecodeError, ValueError, TypeError, AttributeError):
        return 0
