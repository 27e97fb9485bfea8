"""Run a job in-process through Flower's Ray simulation engine (Jupyter, benchmarks, tests).

``flwr run .`` is the way for the command line; this is the same ServerApp logic and the
same ClientApp handlers, started with ``flwr.simulation.run_simulation`` so that a
notebook gets the summary back as a Python object. The run config is handed to the
nodes by a client mod, because ``run_simulation`` itself takes none.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from drdfl_flwr.client_app import build_client_app, with_run_config
from drdfl_flwr.config import RunConfig
from drdfl_flwr.registry import check_run_config
from drdfl_flwr.server_app import run_job


def simulate(
    cfg: RunConfig,
    num_clients: int,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
    verbose: bool = False,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    log_rounds: bool = True,
) -> dict[str, Any]:
    """Run ``cfg`` on ``num_clients`` simulated SuperNodes; returns the written summary.

    ``cpus_per_client`` / ``gpus_per_client`` are Ray resources per ClientApp actor:
    with 8 CPUs and 2 per client, 4 clients train at a time. ``on_round`` gets every
    round's record as it is written (progress bars, benchmarks); ``log_rounds`` off
    leaves the per-round progress line to it (see :func:`run_job`).
    """
    if num_clients < 2:
        raise ValueError(f"num_clients={num_clients}: a ring needs at least 2 nodes")
    check_run_config(cfg)  # before Ray starts
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    summary: dict[str, Any] = {}
    failures: list[Exception] = []

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            summary.update(run_job(grid, cfg, on_round=on_round, log_rounds=log_rounds))
        except Exception as err:
            failures.append(err)  # run_simulation only logs it; the caller gets it
            raise

    client_app = build_client_app(mods=[with_run_config(cfg.to_run_config())])
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_clients,
        backend_config={
            "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
            "init_args": {"logging_level": "ERROR", "log_to_driver": True},
        },
        verbose_logging=verbose,
    )
    if failures:
        raise failures[0]
    if not summary:
        raise RuntimeError("the simulation ended without a summary; see the log above")
    return summary
