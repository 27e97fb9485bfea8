"""Run a grid: every run through the real simulation, resumable, with progress and a report.

Each run is ``drdfl_flwr.simulation.simulate`` on its own config, its results in
``<out>/runs/<run_id>/``. What is on disk decides what is left to do (see
:mod:`drdfl_flwr.experiments.outcomes`): a rerun of the same command skips finished runs
and retries failed and cut-off ones; a run that raises is recorded (``error.txt``) and
the grid goes on, so one bad setting costs one cell of the table, not the whole night.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drdfl_flwr.data import data_identity
from drdfl_flwr.experiments.grid import Grid, GridRun
from drdfl_flwr.experiments.outcomes import (
    DONE,
    FAILED,
    RunOutcome,
    read_outcome,
    write_data_identity,
)
from drdfl_flwr.registry import recorded_run_config
from drdfl_flwr.server_app import round_events
from strategies.rounds import RoundReport

Echo = Callable[[str], None]


class Progress:
    """Which run, which round, and the time left, estimated from the rounds done so far
    (every round of the grid counted alike)."""

    def __init__(self, runs: list[GridRun], echo: Echo) -> None:
        self.runs = runs
        self.echo = echo
        self.total_rounds = sum(run.cfg.num_server_rounds for run in runs)
        self.rounds_done = 0
        self.started = time.monotonic()
        self.index = 0

    def start_run(self, index: int) -> None:
        self.index = index
        run = self.runs[index]
        self.echo(
            f"[run {index + 1}/{len(self.runs)}] {run.variant} | {run.dataset} | "
            f"{run.partition.label} | seed {run.seed} -> {run.run_id}"
        )

    def round_done(self, report: RoundReport) -> None:
        """The round's one line (the simulation's own per-round log is off): mean
        accuracies where the round evaluated, seconds, time left, and what happened to
        the nodes (skipped, joined, absent)."""
        self.rounds_done += 1
        run = self.runs[self.index]
        mean = report.mean
        shown = [
            f"{label} {100 * mean[key]:.2f}%"
            for key, label in (("local_t_acc", "Local-T"), ("global_t_acc", "Global-T"))
            if key in mean
        ] or ["training"]
        parts = [
            f"  [run {self.index + 1}/{len(self.runs)} | round {report.round}/"
            f"{run.cfg.num_server_rounds}] {shown[0]}",
            *shown[1:],
            f"{report.seconds:.1f}s",
            f"elapsed {_clock(self.elapsed)}, about {_clock(self.left)} left",
            *round_events(report),
        ]
        self.echo(" | ".join(parts))

    def skip_run(self, index: int) -> None:
        """A run that ended early (failure): its remaining rounds are no longer ahead."""
        self.total_rounds -= self.runs[index].cfg.num_server_rounds
        self.rounds_done = min(self.rounds_done, self.total_rounds)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def left(self) -> float:
        if self.rounds_done == 0:
            return float("nan")
        return self.elapsed / self.rounds_done * (self.total_rounds - self.rounds_done)


def pending_runs(grid: Grid, runs_dir: Path, retry_failed: bool = True) -> list[GridRun]:
    """The runs still to do: not finished with this very config (failed ones too, unless
    ``retry_failed`` is off)."""
    todo = []
    for run in grid.runs:
        status = read_outcome(run, runs_dir).status
        if status == DONE or (status == FAILED and not retry_failed):
            continue
        todo.append(run)
    return todo


def run_grid(
    grid: Grid,
    out: Path,
    retry_failed: bool = True,
    echo: Echo = print,
    simulate_fn: Callable[..., dict[str, Any]] | None = None,
    plots: bool = True,
) -> list[RunOutcome]:
    """Run what is left of ``grid`` into ``out``, then write the report (its figures too
    unless ``plots`` is off); returns every run's outcome. ``simulate_fn`` replaces the
    simulation (tests)."""
    from drdfl_flwr.simulation import simulate

    simulate_fn = simulate_fn or simulate
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(grid.source, out / "grid.toml")
    todo = pending_runs(grid, runs_dir, retry_failed)
    echo(
        f"{grid.name}: {len(grid.runs)} runs, {len(grid.runs) - len(todo)} already done, "
        f"{len(todo)} to run -> {out}"
    )
    progress = Progress(todo, echo)
    for index, run in enumerate(todo):
        progress.start_run(index)
        run_dir = runs_dir / run.run_id
        if run_dir.exists():  # a cut-off or failed attempt: start it clean
            shutil.rmtree(run_dir)
        cfg = run.cfg.replace(results_dir=str(runs_dir), run_name=run.run_id)
        try:
            identity = data_identity(cfg)  # what the run reads, taken before it reads it
            summary = simulate_fn(
                cfg,
                grid.options.clients,
                cpus_per_client=grid.options.cpus_per_client,
                gpus_per_client=grid.options.gpus_per_client,
                on_round=progress.round_done,
                log_rounds=False,  # progress.round_done prints the round's line
            )
            if not summary.get("last"):  # a run whose every node failed is no result
                raise RuntimeError(
                    "no node returned an evaluation in any round: every node failed "
                    f"(see the log and {run_dir / 'metrics.jsonl'})"
                )
            write_data_identity(run_dir, identity)
        except Exception as err:  # noqa: BLE001 - recorded in the table, the grid goes on
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "run_config.json").write_text(json.dumps(recorded_run_config(cfg), indent=2))
            (run_dir / "error.txt").write_text(
                "".join(traceback.format_exception(err)) + f"\n{type(err).__name__}: {err}\n"
            )
            progress.skip_run(index)
            echo(f"  FAILED: {type(err).__name__}: {err} (see {run_dir / 'error.txt'})")
    outcomes = [read_outcome(run, runs_dir) for run in grid.runs]
    write_all(grid, outcomes, out, echo, plots=plots)
    return outcomes


def write_all(
    grid: Grid, outcomes: list[RunOutcome], out: Path, echo: Echo = print, plots: bool = True
) -> None:
    """Tables, communication table and, with ``plots``, the figures (headline, trade-off,
    convergence, label distributions: most of the time a report takes, since drawing the
    label distributions reads the dataset)."""
    from drdfl_flwr.experiments.plots import (
        convergence_plots,
        label_distribution_plots,
        report_figures,
    )
    from drdfl_flwr.experiments.report import write_report

    written = write_report(
        outcomes, out, title=grid.name, primary=grid.options.primary_comparisons()
    )
    if plots:
        written += report_figures(outcomes, out)
        written += convergence_plots(outcomes, out)
        written += label_distribution_plots(list(grid.runs), out, grid.options.clients)
    done = sum(o.status == DONE for o in outcomes)
    failed = [o.run.run_id for o in outcomes if o.status == FAILED]
    echo(
        f"{done}/{len(outcomes)} runs done"
        + (f", {len(failed)} failed: {', '.join(failed)}" if failed else "")
        + f"; wrote {', '.join(p.name for p in written)} in {out}"
    )


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan: nothing to estimate from yet
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
