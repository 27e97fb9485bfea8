"""Run a job in-process through Flower's Ray simulation engine (Jupyter, benchmarks, tests).

``flwr run .`` is the way for the command line; this is the same ServerApp logic and the
same ClientApp handlers, started with ``flwr.simulation.run_simulation`` so that a
notebook gets the summary back as a Python object. The run config is handed to the
nodes by a client mod, because ``run_simulation`` itself takes none.

Ray runs on this machine alone unless told otherwise: ``ray_address`` (or the
``RAY_ADDRESS`` environment variable) attaches the run to a Ray cluster started with
``ray start`` on several machines (docs/scale.md). GPUs asked per client are checked
before the run starts: where Ray would see none, :class:`NoGpuError` says so, instead of
Flower's "ActorPool is empty" from inside the engine. A cluster node lost during a run
stops it with :class:`NodeLostError` (Flower would go on, skipping partitions).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from typing import Any

from flwr.app import Context
from flwr.clientapp.typing import Mod
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from drdfl_flwr import vce_delivery
from drdfl_flwr.client_app import build_client_app, with_run_config
from drdfl_flwr.config import RunConfig
from drdfl_flwr.data import check_partition_plan
from drdfl_flwr.registry import check_run_config
from drdfl_flwr.server_app import run_job
from strategies.rounds import RoundReport

LOCAL = "local"  # Ray's address for "start a fresh instance on this machine"


SIMULATION_EXTRA = (
    "Flower's simulation engine needs Ray, which the device install leaves out "
    '(a SuperNode does not need it): pip install "drdfl-flwr[simulation]" '
    '(in a checkout: pip install -e ".[simulation]")'
)


def require_ray() -> None:
    """A device install has no Ray: say what to install, before anything starts."""
    if importlib.util.find_spec("ray") is None:
        raise ModuleNotFoundError(SIMULATION_EXTRA)


class NoGpuError(RuntimeError):
    """GPUs were asked for each ClientApp where Ray sees none (raised before the run)."""


def ray_address_for(ray_address: str | None) -> str:
    """The Ray cluster a run attaches to: ``ray_address``, else ``RAY_ADDRESS``, else a
    fresh local instance. Never Ray's own fallback of joining whatever cluster was last
    ``ray start``-ed on this machine: a run attaches only when asked to."""
    return ray_address or os.environ.get("RAY_ADDRESS") or LOCAL


def ray_resources(ray_address: str) -> tuple[float, float, str]:
    """(CPUs, GPUs) the simulation's Ray would have, and where that was looked up: the
    Ray instance this process is already connected to, else the cluster at
    ``ray_address`` (connected to and left again), else this machine (what a local Ray
    detects too, without starting one: every CPU, and the GPUs torch sees)."""
    import ray

    if ray.is_initialized():
        found = ray.cluster_resources()
        where = "in the Ray instance this process is connected to"
    elif ray_address != LOCAL:
        ray.init(address=ray_address, logging_level="ERROR", log_to_driver=False)
        try:
            found = ray.cluster_resources()
        finally:
            ray.shutdown()
        where = f"in the Ray cluster at {ray_address}"
    else:
        import torch

        gpus = torch.cuda.device_count()
        found = {"CPU": os.cpu_count() or 1, "GPU": gpus}
        where = f"on this machine (torch.cuda.device_count() = {gpus})"
    return float(found.get("CPU", 0.0)), float(found.get("GPU", 0.0)), where


def visible_gpus(ray_address: str) -> tuple[float, str]:
    """How many GPUs the simulation's Ray would have, and where that was looked up."""
    _, gpus, where = ray_resources(ray_address)
    return gpus, where


# Messages kept out per ClientApp actor (strategies.rounds.exchange): enough that an actor
# always finds its next message queued, few enough that Flower's engine, which scans
# every stored message for every node ten times a second, does not grow quadratic.
IN_FLIGHT_PER_ACTOR = 4


def in_flight_limit(
    cpus: float, gpus: float, cpus_per_client: float, gpus_per_client: float
) -> int:
    """The round loop's ``max_in_flight`` for the pool of ClientApp actors Flower will
    start on ``cpus`` and ``gpus`` (as many as the CPUs, and the GPUs where asked, hold)."""
    actors = int(cpus // cpus_per_client) if cpus_per_client > 0 else 1
    if gpus_per_client > 0:
        actors = min(actors, int(gpus // gpus_per_client))
    return IN_FLIGHT_PER_ACTOR * max(1, actors)


def no_gpu_message(gpus_per_client: float, where: str) -> str:
    asked = f"{gpus_per_client:g}"
    return (
        f"gpus_per_client={asked} (grid.gpus-per-client={asked} in a grid file) asks Ray "
        f"for {asked} GPU per ClientApp, but no GPU is visible to Ray {where}, so not one "
        "ClientApp could start (Flower would stop with 'ActorPool is empty'). Set it to 0 "
        'to train on the CPU (with the run config\'s device = "auto" or "cpu"; "auto" '
        "picks cuda only where torch sees a GPU), or run on a machine or Ray cluster with "
        "GPUs (docs/scale.md)."
    )


def check_gpus(gpus_per_client: float, ray_address: str) -> None:
    """Raise :class:`NoGpuError` when GPUs are asked per client and Ray would see none."""
    if gpus_per_client > 0:
        refuse_without_gpus(gpus_per_client, *visible_gpus(ray_address))


def refuse_without_gpus(gpus_per_client: float, gpus: float, where: str) -> None:
    """:func:`check_gpus` on resources already looked up."""
    if gpus_per_client > 0 and gpus <= 0:
        raise NoGpuError(no_gpu_message(gpus_per_client, where))


class NodeLostError(RuntimeError):
    """A Ray node left the cluster during a run attached to it (raised after the round
    in which Ray declared it dead)."""


class NodeWatch:
    """Stops a run attached to a Ray cluster when one of its nodes leaves.

    Measured (docs/scale.md): Flower's engine keeps a lost node's ClientApp actors in
    its pool, and every message that lands on one fails at once, so the dead actors take
    more than their share: with one of two nodes killed, 1 to 4 of 4 partitions were
    skipped per round, and the run went on with numbers that mean little. Called after
    every round; a node counts once it was seen alive during the run. Ray declares a
    node dead some seconds after it went (11 s here), so the rounds in between are
    recorded with their skipped partitions."""

    def __init__(self) -> None:
        self.alive: dict[str, str] = {}

    def __call__(self, round_number: int) -> None:
        import ray

        if not ray.is_initialized():
            return
        for node in ray.nodes():
            node_id, host = node["NodeID"], node.get("NodeManagerAddress", "?")
            if node["Alive"]:
                self.alive[node_id] = host
            elif node_id in self.alive:
                raise NodeLostError(
                    f"Ray node {node_id[:12]} ({host}) left the cluster (noticed after "
                    f"round {round_number}). Flower's simulation engine does not replace "
                    "the ClientApp actors it had there: every message that lands on them "
                    "fails, so the run stops here rather than go on skipping partitions. "
                    "The rounds so far are in the run's metrics.jsonl; run it again on the "
                    "nodes that are left (a grid rerun redoes it). See docs/scale.md."
                )


def simulate(
    cfg: RunConfig,
    num_clients: int,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
    verbose: bool = False,
    on_round: Callable[[RoundReport], None] | None = None,
    log_rounds: bool = True,
    ray_address: str | None = None,
    mods: Sequence[Mod] = (),
) -> dict[str, Any]:
    """Run ``cfg`` on ``num_clients`` simulated SuperNodes; returns the written summary.

    ``cpus_per_client`` / ``gpus_per_client`` are Ray resources per ClientApp actor:
    with 8 CPUs and 2 per client, 4 clients train at a time; with 1 GPU and 0.5 per
    client, 2. GPUs asked where Ray sees none raise :class:`NoGpuError` before the run.
    ``ray_address`` (default ``RAY_ADDRESS``, else a fresh local Ray) attaches to a Ray
    cluster: the ClientApp actors then run on its nodes, the ServerApp here; a node that
    leaves the cluster during the run stops it with :class:`NodeLostError`.
    ``on_round`` gets every round's report as it is written (progress bars,
    benchmarks); ``log_rounds`` off leaves the per-round progress line to it (see
    :func:`run_job`). ``mods`` are further client mods, run inside the run-config one
    (instrumentation: the scale tests record where each ClientApp ran).
    """
    if num_clients < 2:
        raise ValueError(f"num_clients={num_clients}: a ring needs at least 2 nodes")
    check_run_config(cfg)  # before Ray starts
    require_ray()
    check_partition_plan(cfg, num_clients)  # a plan that cannot be drawn fails here, once
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    address = ray_address_for(ray_address)
    cpus, gpus, where = ray_resources(address)  # once: on a cluster, a connection
    refuse_without_gpus(gpus_per_client, gpus, where)
    max_in_flight = in_flight_limit(cpus, gpus, cpus_per_client, gpus_per_client)
    summary: dict[str, Any] = {}
    failures: list[Exception] = []
    watch = NodeWatch() if address != LOCAL else None

    def round_done(report: RoundReport) -> None:
        if watch is not None:
            watch(report.round)
        if on_round is not None:
            on_round(report)

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            summary.update(
                run_job(
                    grid,
                    cfg,
                    on_round=round_done,
                    log_rounds=log_rounds,
                    max_in_flight=max_in_flight,
                )
            )
        except Exception as err:
            failures.append(err)  # run_simulation only logs it; the caller gets it
            raise

    client_app = build_client_app(mods=[with_run_config(cfg.to_run_config()), *mods])
    vce_delivery.install()  # one scan of the messages per tick, not one per node
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_clients,
        backend_config={
            "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
            "init_args": {"logging_level": "ERROR", "log_to_driver": True, "address": address},
        },
        verbose_logging=verbose,
    )
    if failures:
        raise failures[0]
    if not summary:
        raise RuntimeError("the simulation ended without a summary; see the log above")
    return summary
