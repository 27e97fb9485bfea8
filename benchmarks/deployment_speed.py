"""Seconds per round of a real 3-SuperNode deployment on this host, beside Flower's floor.

    python benchmarks/deployment_speed.py [--rounds 5] [--app PATH]

One SuperLink and three SuperNodes on 127.0.0.1 (deploy/local.sh, stopped by PID). On
them, in turn: Flower's floor (benchmarks/floor-app: empty messages, empty replies),
waited for with Flower's Grid.send_and_receive and with our exchange; then DRDFL on
digits (1 local epoch) from ``--app`` (default: this checkout; a worktree of an older
commit gives the "before"), on nodes without a checkpoint-dir (every ClientApp process
partitions and decodes the dataset) and, on a second deployment, with one (decoded once
per node, state checkpointed). Round 1 holds the ring's discovery and every node's first
start, so the typical round is the median of rounds 2..R. Prints one table."""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOOR_APP = ROOT / "benchmarks" / "floor-app"  # Flower 1.41: letters, digits, hyphens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    """deploy/local.sh start 3 / connection / stop, in a private DEPLOY_DIR and FLWR_HOME."""

    def __init__(self, work: Path, checkpoints: bool) -> None:
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "DEPLOY_DIR": str(work / "deploy"),
            "SUPERLINK_PORT": str(free_port()),
            "NODE_PORT_BASE": str(free_port()),
            "FLWR_HOME": str(work / "flwr"),
            "CHECKPOINTS": "1" if checkpoints else "0",
            "FLWR_TELEMETRY_ENABLED": "0",
            "HF_DATASETS_OFFLINE": "1",
        }
        self.script = ROOT / "deploy" / "local.sh"

    def __enter__(self) -> Deployment:
        subprocess.run([self.script, "start", "3"], env=self.env, check=True, capture_output=True)
        subprocess.run([self.script, "connection"], env=self.env, check=True, capture_output=True)
        listening(int(self.env["SUPERLINK_PORT"]))  # local.sh returns before it listens
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run([self.script, "stop"], env=self.env, check=True, capture_output=True)

    def run(self, app: Path, run_config: str) -> None:
        done = subprocess.run(
            ["flwr", "run", str(app), "drdfl-local", "--stream", "--run-config", run_config],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"flwr run {app.name} failed (exit {done.returncode}):\n"
                f"{(done.stdout + done.stderr)[-3000:]}"
            )


def listening(port: int, seconds: float = 60) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port`` (a first
    ``flwr run`` that comes too early fails with "Connection to the SuperLink is
    unavailable")."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                message = f"no SuperLink listening on port {port} after {seconds}s"
                raise TimeoutError(message) from None
            time.sleep(0.5)


def wait_for(path: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(1)
    if not path.is_file():
        raise TimeoutError(f"{path} did not appear: the run failed (see `flwr ls`)")


def floor_rounds(deployment: Deployment, rounds: int, poll: str, work: Path) -> list[float]:
    out = work / f"floor-{poll}.json"
    deployment.run(FLOOR_APP, f'num-server-rounds={rounds} out="{out}" poll="{poll}"')
    wait_for(out)
    return json.loads(out.read_text())


def drdfl_rounds(deployment: Deployment, app: Path, rounds: int, work: Path) -> list[dict]:
    results, name = work / "results", f"speed-{time.monotonic_ns()}"
    deployment.run(
        app,
        f'num-server-rounds={rounds} local-epochs=1 results-dir="{results}" run-name="{name}"',
    )
    wait_for(results / name / "summary.json")
    lines = (results / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def typical(seconds: list[float]) -> float:
    return statistics.median(seconds[1:] or seconds)


def node_work(records: list[dict]) -> float:
    """Median over rounds 2..R of the slowest node's timed work (restore .. evaluate)."""
    per_round = [
        max(sum(v for k, v in n.items() if k.startswith("time_")) for n in r["nodes"].values())
        for r in records
    ]
    return typical(per_round)


def step_medians(records: list[dict]) -> str:
    """Each timed step's median over nodes and rounds 2..R (where a node's time goes)."""
    later = records[1:] or records
    steps = sorted(
        {k for r in later for n in r["nodes"].values() for k in n if k.startswith("time_")}
    )
    medians = {
        k: statistics.median(n.get(k, 0.0) for r in later for n in r["nodes"].values())
        for k in steps
    }
    return ", ".join(f"{k.removeprefix('time_')} {v:.2f}" for k, v in medians.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--app", type=Path, default=ROOT, help="the drdfl-flwr checkout to run")
    args = parser.parse_args()
    rows: list[tuple[str, list[float], float | None]] = []
    steps: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with Deployment(work / "a", checkpoints=False) as nodes:
            for poll in ("flower", "fast"):
                rows.append(
                    (f"floor, {poll} poll", floor_rounds(nodes, args.rounds, poll, work), None)
                )
            records = drdfl_rounds(nodes, args.app, args.rounds, work)
            rows.append(
                ("DRDFL, no checkpoint-dir", [r["seconds"] for r in records], node_work(records))
            )
        with Deployment(work / "b", checkpoints=True) as nodes:
            records = drdfl_rounds(nodes, args.app, args.rounds, work)
            rows.append(
                ("DRDFL, checkpoint-dir", [r["seconds"] for r in records], node_work(records))
            )
    floor = typical(rows[0][1])
    print(f"3 SuperNodes + SuperLink on 127.0.0.1, {args.rounds} rounds, app {args.app}")
    print(f"{'':26} {'s/round (median 2..R)':>22} {'x floor':>8} {'node work s':>12}  all rounds")
    for name, seconds, work_s in rows:
        shown = " ".join(f"{s:.1f}" for s in seconds)
        node = f"{work_s:12.2f}" if work_s is not None else f"{'-':>12}"
        print(f"{name:26} {typical(seconds):22.2f} {typical(seconds) / floor:8.2f} {node}  {shown}")
    for name, medians in steps.items():
        print(f"{name}: median seconds per step: {medians}")


if __name__ == "__main__":
    main()
