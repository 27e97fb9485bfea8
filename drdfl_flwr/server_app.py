"""The ServerApp: a relay for decentralized methods (never an aggregator), a hub for
centralized ones.

It validates the run config, builds the router the method calls for (the relay on the
configured topology, or the hub with the method's reducer) under the one round loop,
and writes per-round results. Progress goes to the log, one line per round.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from drdfl_flwr.checkpoint import IDLE_STATE_FOLDER
from drdfl_flwr.config import RunConfig
from drdfl_flwr.health import HEALTH_PREFIX, AlarmTracker, health_view
from drdfl_flwr.registry import (
    check_run_config,
    hub_reducer,
    method_spec,
    recorded_run_config,
    resolved_topology,
)
from drdfl_flwr.results import ResultsWriter
from strategies.hub import Hub
from strategies.relay import Relay
from strategies.rounds import RoundLoop, RoundReport, Router, mean_std
from strategies.topology import build_topology
from strategies.wire import RUN_FOLDER, RUN_KEY

app = ServerApp()


def run_dir_for(cfg: RunConfig) -> Path:
    isolated = "-isolated" if cfg.isolated else ""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.run_name or f"{cfg.method}{isolated}-{cfg.dataset}-{stamp}"
    return (Path(cfg.results_dir).expanduser() / name).resolve()


def progress_line(report: RoundReport, num_rounds: int) -> str:
    mean, std = mean_std(report.nodes)
    parts = [f"[round {report.round}/{num_rounds}] {report.seconds:.1f}s"]
    for key, label in (("local_t_acc", "Local-T"), ("global_t_acc", "Global-T")):
        if key in mean:
            parts.append(f"{label} {100 * mean[key]:.2f}±{100 * std[key]:.2f}%")
    parts.append(f"sent {mean.get('bytes_sent', 0) / 1024:.1f} KiB/client")
    health = {k.removeprefix(HEALTH_PREFIX): v for k, v in health_view(mean).items()}
    shown = [f"{k} {v:.3g}" for k, v in health.items() if "." not in k and "alarm" not in k]
    if shown:
        parts.append("health: " + ", ".join(shown))
    return " | ".join(parts + round_events(report))


LISTED = 12  # partitions named in a progress line; the round record has them all


def listed(partitions: list[int]) -> str:
    """A list of partitions for a log line: whole up to :data:`LISTED`, else its start
    and a count (1,000 clients at 10 % would print 100 numbers a round)."""
    if len(partitions) <= LISTED:
        return str(partitions)
    shown = ", ".join(map(str, partitions[:LISTED]))
    return f"[{shown}, ... {len(partitions) - LISTED} more]"


def round_events(report: RoundReport) -> list[str]:
    """What happened to the nodes in a round, for its progress line: the partitions
    drawn to take part when not all are (``participation``), those skipped (a node
    failed or timed out), those that joined, rejoined or went absent, and those whose
    contribution the hub left out of its aggregate."""
    events = []
    participants = report.participants
    ring = len(report.node_ids) + len(report.absent)
    if len(participants) < ring:
        events.append(f"{len(participants)}/{ring} taking part {listed(participants)}")
    if report.failed:
        events.append(f"skipped partitions {listed(report.failed)}")
    for change, partitions in (
        ("joined", report.joined),
        ("rejoined", report.rejoined),
        ("absent", report.absent),
    ):
        if partitions:
            events.append(f"{change} {listed(partitions)}")
    if report.left_out:
        events.append(f"hub left out partitions {sorted(report.left_out)}")
    return events


def build_router(cfg: RunConfig) -> Router:
    """The hub with the method's reducer (centralized methods), else the relay on the
    configured topology."""
    spec = method_spec(cfg.method)
    if spec.centralized:
        return Hub(hub_reducer(cfg))
    return Relay(build_topology(resolved_topology(cfg), k=cfg.topology_k, seed=cfg.seed))


def run_job(
    grid: Grid,
    cfg: RunConfig,
    on_round: Callable[[RoundReport], None] | None = None,
    run_key: str | None = None,
    log_rounds: bool = True,
    max_in_flight: int = 0,
) -> dict:
    """Run the configured job on ``grid``; returns the summary that was written.
    ``on_round`` also gets every round's report (the grid runner's progress). ``run_key``
    files the nodes' checkpoints (Flower's run id; a resumed run keeps the first one's).
    ``log_rounds`` off leaves the per-round progress line to the caller (the grid
    runner prints its own); alarms are logged either way. ``max_in_flight`` bounds the
    train messages out at once (0: all; see ``strategies.rounds.exchange``).
    The whole config is checked here, once, before anything is written."""
    check_run_config(cfg)
    writer = ResultsWriter(
        run_dir_for(cfg), recorded_run_config(cfg), resume=cfg.resume, run_key=run_key
    )
    log(INFO, "Results go to %s", writer.run_dir)
    if cfg.resume:
        log(
            INFO,
            "Resuming %s after round %d of %d",
            cfg.run_name,
            writer.completed_rounds,
            cfg.num_server_rounds,
        )

    alarms = AlarmTracker()

    def record_round(report: RoundReport) -> None:
        writer.log_report(report)
        if log_rounds:
            log(INFO, progress_line(report, cfg.num_server_rounds))
        last = report.round == cfg.num_server_rounds
        for is_warning, message in alarms.update(report.round, report.nodes, last):
            log(WARNING if is_warning else INFO, message)
        if on_round is not None:
            on_round(report)

    loop = RoundLoop(
        build_router(cfg),
        mode=cfg.mode,
        round_timeout=cfg.round_timeout,
        node_wait_timeout=cfg.node_wait_timeout,
        min_nodes=cfg.min_nodes,
        participation=cfg.participation,
        seed=cfg.seed,
        max_in_flight=max_in_flight,
        eval_every=cfg.eval_every,
        on_round=record_round,
    )
    key = ConfigRecord({RUN_KEY: writer.run_key})
    if cfg.save_models or cfg.idle_state == "disk":
        key[RUN_FOLDER] = writer.run_dir.name  # only then: other runs' messages stay as before
    loop.start(
        grid,
        num_rounds=cfg.num_server_rounds,
        first_round=writer.completed_rounds + 1,
        train_config=key,
        evaluate_config=key,
    )
    summary = writer.finish()
    # idle-state = "disk" in simulation: the nodes' states waited in the run's folder
    shutil.rmtree(writer.run_dir / IDLE_STATE_FOLDER, ignore_errors=True)
    log(INFO, "Summary: %s", summary.get("last"))
    log(
        INFO, "Results written to %s (metrics.jsonl, summary.json, convergence.png)", writer.run_dir
    )
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_job(grid, RunConfig.from_run_config(context.run_config), run_key=str(context.run_id))
