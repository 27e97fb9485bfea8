"""Beyond one CPU machine (docs/scale.md): GPUs asked per client, and Flower's simulation
on a Ray cluster of several nodes.

The fast tests check the GPU check without Ray (the detection is replaced); the ``ray``
test packs ClientApp actors by a declared GPU fraction on a GPU-less Ray node; the
``slow`` ones start a two-node Ray cluster on this machine (a head and a worker, one CPU
each, in their own process groups and temp dirs), run the simulation on it and kill the
worker mid-run. Where a ClientApp ran is recorded by a test-only client mod
(tests/ray_probe.py): the Ray node, actor and process of every call.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from drdfl_flwr import simulation
from drdfl_flwr.config import ConfigError, RunConfig
from drdfl_flwr.experiments.grid import load_grid
from drdfl_flwr.experiments.runner import run_grid
from drdfl_flwr.learner import resolve_device
from drdfl_flwr.simulation import NoGpuError, check_gpus, ray_address_for, simulate
from tests.ray_probe import RayNode, cluster_nodes, max_overlap, read_records, where_mod
from tests.test_experiments import write_conf

NO_GPU_HERE = "on this machine (torch.cuda.device_count() = 0)"


def tiny_job(tmp_path: Path, rounds: int, name: str) -> RunConfig:
    return RunConfig(
        method="drdfl",
        dataset="digits",
        num_server_rounds=rounds,
        local_epochs=1,
        results_dir=str(tmp_path),
        run_name=name,
    )


def metrics(tmp_path: Path, name: str) -> list[dict]:
    path = tmp_path / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- GPUs asked where there is none: stop before the run, say what to change -----------------


@pytest.fixture
def no_gpu(monkeypatch):
    """No GPU anywhere, and a simulation engine that must not be reached."""
    looked: list[str] = []

    def ray_resources(address):
        looked.append(address)
        return 2.0, 0.0, NO_GPU_HERE

    def run_simulation(**kwargs):
        raise AssertionError("the simulation engine started although no GPU is visible")

    monkeypatch.setattr(simulation, "ray_resources", ray_resources)
    monkeypatch.setattr(simulation, "run_simulation", run_simulation)
    return looked


def test_gpus_per_client_without_a_gpu_stops_before_the_run_and_says_what_to_change(
    no_gpu, tmp_path
):
    with pytest.raises(NoGpuError) as err:
        simulate(tiny_job(tmp_path, 1, "gpu"), 4, gpus_per_client=0.25)
    message = str(err.value)
    assert "gpus_per_client=0.25" in message and "grid.gpus-per-client=0.25" in message
    assert "no GPU is visible to Ray " + NO_GPU_HERE in message
    assert "Set it to 0" in message and 'device = "auto" or "cpu"' in message
    assert "machine or Ray cluster with GPUs" in message
    assert not (tmp_path / "gpu").exists()  # nothing written, nothing started


def test_no_gpu_asked_looks_for_none(no_gpu):
    check_gpus(0.0, "local")
    assert no_gpu == []


def test_the_grid_command_checks_the_gpus_once_before_any_run(no_gpu, tmp_path, capsys):
    from drdfl_flwr.experiments.__main__ import main

    conf = "method = 'drdfl'\nnum-server-rounds = 1\n[grid]\nclients = 3\ngpus-per-client = 0.5\n"
    out = tmp_path / "out"
    assert main([str(write_conf(tmp_path, conf)), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: gpus_per_client=0.5 (grid.gpus-per-client")
    assert no_gpu == ["local"] and not out.exists()


def test_a_grid_with_gpus_per_client_records_the_gpu_error_for_each_run(no_gpu, tmp_path):
    conf = "method = 'drdfl'\nnum-server-rounds = 1\n[grid]\nclients = 3\ngpus-per-client = 0.5\n"
    grid = load_grid(write_conf(tmp_path, conf))
    lines: list[str] = []
    run_grid(grid, tmp_path / "out", echo=lines.append, plots=False)
    failed = [line for line in lines if "FAILED" in line]
    assert len(failed) == len(grid.runs) == 1
    assert "NoGpuError: gpus_per_client=0.5 (grid.gpus-per-client=0.5 in a grid file)" in failed[0]


def test_the_local_check_asks_torch_and_starts_no_ray(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(NoGpuError, match=r"torch\.cuda\.device_count\(\) = 0"):
        check_gpus(0.5, "local")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_gpus(0.5, "local")


def test_a_cluster_is_asked_for_its_gpus(monkeypatch):
    """Attached to a cluster, the check connects, reads the cluster's GPUs and leaves
    (the engine connects on its own)."""
    import ray

    calls: list[str] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address, **k: calls.append(f"init {address}"))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    with pytest.raises(NoGpuError, match="in the Ray cluster at 10.0.0.1:6379"):
        check_gpus(0.25, "10.0.0.1:6379")
    assert calls == ["init 10.0.0.1:6379", "shutdown"]
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    check_gpus(0.25, "10.0.0.1:6379")


def test_the_ray_address_is_the_argument_else_ray_address_else_a_local_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address_for(None) == "local"  # never Ray's "the last cluster ray start-ed"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_address_for(None) == "10.0.0.1:6379"
    assert ray_address_for("10.0.0.2:6379") == "10.0.0.2:6379"


def test_simulate_hands_the_address_resources_and_mods_to_flower(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setattr(simulation, "ray_resources", lambda address: (8.0, 1.0, "there"))
    seen = {}

    def run_simulation(**kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(simulation, "run_simulation", run_simulation)

    def mod(msg, context, call_next):
        return call_next(msg, context)

    with pytest.raises(RuntimeError, match="without a summary"):  # the engine did nothing
        simulate(tiny_job(tmp_path, 1, "x"), 3, 2.0, 0.5, mods=[mod])
    backend = seen["backend_config"]
    assert backend["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert backend["init_args"]["address"] == "10.0.0.1:6379"
    assert seen["client_app"]._mods[-1] is mod


def test_the_in_flight_limit_follows_the_actor_pool():
    """Four messages out per ClientApp actor, the actors counted as Flower counts them."""
    assert simulation.in_flight_limit(16.0, 2.0, 1.0, 0.0) == 4 * 16
    assert simulation.in_flight_limit(16.0, 2.0, 3.0, 0.0) == 4 * 5
    assert simulation.in_flight_limit(16.0, 2.0, 1.0, 0.5) == 4 * 4  # the GPUs bind first
    assert simulation.in_flight_limit(16.0, 2.0, 32.0, 0.0) == 4  # never below one actor's


def test_device_auto_picks_cuda_only_where_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="CUDA is not available on this node"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cpu").type == "cpu"


# -- A declared GPU on a GPU-less Ray node: actors are packed by the fraction ----------------


@pytest.mark.ray
def test_actors_are_packed_by_the_gpu_fraction_and_train_where_torch_says(tmp_path):
    """One declared GPU, 0.5 per client: Ray fits two ClientApp actors (CPU would allow
    four), both get GPU 0, and the learner, whose torch sees no CUDA, trains on the CPU
    (device = "auto")."""
    import ray

    probe = tmp_path / "probe"
    probe.mkdir()
    gpus_free: list[float] = []
    ray.init(
        address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR"
    )
    try:
        summary = simulate(
            tiny_job(tmp_path, 2, "packed"),
            4,
            cpus_per_client=0.5,
            gpus_per_client=0.5,
            mods=[where_mod(probe)],
            on_round=lambda record: gpus_free.append(ray.available_resources().get("GPU", 0)),
        )
    finally:
        ray.shutdown()
    assert summary["last"]["round"] == 2
    calls = read_records(probe)
    assert {c["partition"] for c in calls} == {0, 1, 2, 3}
    assert len({c["actor_id"] for c in calls}) == 2  # 1 GPU / 0.5 per client
    assert max_overlap(calls) <= 2
    assert gpus_free == [0, 0]  # both halves of the GPU held while the run is on
    assert all(c["gpu_ids"] == ["0"] and c["cuda_visible_devices"] == "0" for c in calls)
    assert all(not c["torch_cuda"] and c["device"] == "cpu" for c in calls)


# -- Two Ray nodes on this machine: a head and a worker, one CPU each ------------------------


@pytest.fixture
def two_nodes():
    """A head and a worker (``ray start``, one CPU each, private temp dirs and ports),
    stopped by their process groups afterwards; yields (head, worker, {node id: role})."""
    root = Path(tempfile.mkdtemp(prefix="rx", dir="/tmp"))  # short: Ray's socket paths
    nodes: list[RayNode] = []
    try:
        head = RayNode(root / "h")
        nodes.append(head)
        head.wait_started()
        worker = RayNode(root / "w", head_address=head.address)
        nodes.append(worker)
        worker.wait_started()
        roles = cluster_nodes(head.address, expected=2)
        assert sorted(roles.values()) == ["head", "worker"], roles
        yield head, worker, roles
    finally:
        for node in reversed(nodes):
            node.stop()


@pytest.mark.slow
@pytest.mark.ray
def test_a_run_on_a_two_node_cluster_places_clientapps_on_both_nodes(two_nodes, tmp_path):
    head, _, roles = two_nodes
    probe = tmp_path / "probe"
    probe.mkdir()
    summary = simulate(
        tiny_job(tmp_path, 2, "cluster"), 4, ray_address=head.address, mods=[where_mod(probe)]
    )
    assert summary["last"]["round"] == 2
    assert all(r["failed"] == [] for r in metrics(tmp_path, "cluster"))
    calls = read_records(probe)
    assert {roles[c["node_id"]] for c in calls} == {"head", "worker"}
    assert len({c["pid"] for c in calls}) == 2  # one ClientApp actor per node (1 CPU each)
    assert {c["partition"] for c in calls} == {0, 1, 2, 3}


@pytest.mark.slow
@pytest.mark.ray
def test_a_worker_killed_mid_run_stops_the_run_and_loses_no_state(two_nodes, tmp_path):
    """SIGKILL the worker node's processes early in round 2 of 6. Measured
    (docs/scale.md): Flower keeps the dead actor in its pool and the messages that land
    on it fail, so partitions are skipped (``failed``) from round 2; nothing a node had
    trained is lost (Flower keeps every node's context in the driver): a partition that
    answers again goes on from its own count. Once Ray has declared the node dead,
    simulate stops the run with NodeLostError instead of going on."""
    head, worker, roles = two_nodes
    probe = tmp_path / "probe"
    probe.mkdir()
    killed: dict[str, float | None] = {}

    def on_round(record):
        if record["round"] == 1:  # round 2's messages go out right after this returns

            def kill():
                worker.kill()
                killed["at"] = time.time()

            threading.Timer(0.3, kill).start()
        if record["round"] == 3:  # hold the run until Ray has declared the worker dead
            killed["declared"] = worker_declared_dead(roles, timeout=90.0)

    cfg = tiny_job(tmp_path, 6, "killed").replace(local_epochs=2, round_timeout=120.0)
    with pytest.raises(simulation.NodeLostError) as err:
        simulate(cfg, 4, ray_address=head.address, mods=[where_mod(probe)], on_round=on_round)
    assert killed["declared"] is not None  # Ray's health checks: some seconds
    assert "left the cluster (noticed after round 4)" in str(err.value)
    assert "run it again on the nodes that are left" in str(err.value)
    rounds = metrics(tmp_path, "killed")
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]  # the rounds before the stop
    assert rounds[0]["failed"] == []
    assert any(r["failed"] for r in rounds[1:])  # the worker's share is lost from round 2
    # no state lost: every partition's count is the rounds it trained, wherever it ran
    for partition in ("0", "1", "2", "3"):
        trained = 0
        for record in rounds:
            node = record["nodes"].get(partition)
            if node is not None and "rounds_trained" in node:
                trained += 1
                assert node["rounds_trained"] == trained, (partition, record["round"])
    calls = read_records(probe)
    assert {roles[c["node_id"]] for c in calls if c["end"] < killed["at"]} == {"head", "worker"}
    assert {roles[c["node_id"]] for c in calls if c["start"] > killed["at"] + 1} <= {"head"}


def worker_declared_dead(roles: dict[str, str], timeout: float) -> float | None:
    """Seconds until Ray's GCS lists the worker node as dead (None: not within timeout);
    called inside the run, where the engine's Ray connection is up."""
    import ray

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        if not any(role == "worker" and node in alive for node, role in roles.items()):
            return time.monotonic() - start
        time.sleep(0.5)
    return None
