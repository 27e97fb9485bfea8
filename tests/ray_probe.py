"""A client mod for the scale tests: each ClientApp call appends where it ran (Ray node,
actor, process, host), when, and what torch saw, to a JSON-lines file in a folder every
Ray node can write (these tests run their nodes on one machine)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod


def where_mod(folder: str | Path) -> Mod:
    folder = str(folder)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        import ray
        import torch

        from drdfl_flwr.learner import resolve_device

        start = time.time()
        reply = call_next(msg, context)
        runtime = ray.get_runtime_context()
        record = {
            "partition": int(context.node_config["partition-id"]),
            "kind": msg.metadata.message_type,
            "node_id": runtime.get_node_id(),
            "actor_id": runtime.get_actor_id(),
            "gpu_ids": [str(g) for g in runtime.get_accelerator_ids().get("GPU", [])],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "torch_cuda": torch.cuda.is_available(),
            "device": str(resolve_device(str(context.run_config.get("device", "auto")))),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": start,
            "end": time.time(),
            "error": reply.has_error(),
        }
        with open(os.path.join(folder, f"{os.getpid()}.jsonl"), "a") as out:
            out.write(json.dumps(record) + "\n")
        return reply

    return mod


def read_records(folder: str | Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted(Path(folder).glob("*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]


def max_overlap(records: list[dict]) -> int:
    """The most ClientApp calls that were running at one moment."""
    events = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RayNode:
    """One ``ray start --block`` node on this machine, in its own session, so that the
    node's processes (raylet, agents, the actors' workers) share one process group that
    :meth:`stop` and :meth:`kill` end by its id, and nothing else on the machine. Every
    port is chosen free, the temp dir is private (``ray start`` writes the cluster's
    address there, not into /tmp/ray where other processes' ``ray.init()`` would find
    it)."""

    def __init__(self, temp_dir: Path, head_address: str | None = None, num_cpus: int = 1):
        import subprocess
        import sys

        self.temp_dir = Path(temp_dir)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port() if head_address is None else None
        cmd = [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--block",
            "--num-cpus",
            str(num_cpus),
            "--num-gpus",
            "0",
            "--node-ip-address",
            "127.0.0.1",
            "--temp-dir",
            str(self.temp_dir),
            "--disable-usage-stats",
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--dashboard-agent-grpc-port",
            str(free_port()),
            "--runtime-env-agent-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
        ]
        if head_address is None:
            cmd += ["--head", "--port", str(self.port), "--include-dashboard", "false"]
            cmd += ["--dashboard-port", str(free_port())]
            cmd += ["--ray-client-server-port", str(free_port())]
        else:
            cmd += ["--address", head_address]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.log = self.temp_dir / "ray-start.log"
        self.process = subprocess.Popen(
            cmd,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_started(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited: {self.log.read_text()[-2000:]}")
            if "Ray runtime started" in self.log.read_text():
                return
            time.sleep(0.5)
        raise TimeoutError(f"ray start did not start in {timeout}s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL every process of the node (a machine that drops off)."""
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the node's process group (``ray start --block`` then ends its node's
        processes), SIGKILL what is left after ``grace`` seconds."""
        import signal

        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self.process.poll()  # reaps the leader once it is gone (a zombie is "alive")
            if not _group_alive(self.process.pid):
                return
            time.sleep(0.5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def cluster_nodes(address: str, expected: int, timeout: float = 60.0) -> dict[str, str]:
    """Connect, wait for ``expected`` live nodes, return ``{node id: "head"|"worker"}``,
    disconnect (the run connects on its own)."""
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        deadline = time.monotonic() + timeout
        while True:
            alive = [n for n in ray.nodes() if n["Alive"]]
            if len(alive) >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        return {
            n["NodeID"]: "head" if "node:__internal_head__" in n["Resources"] else "worker"
            for n in alive
        }
    finally:
        ray.shutdown()
