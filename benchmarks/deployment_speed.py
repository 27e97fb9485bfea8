"""Seconds per round of a real 3-SuperNode deployment on this host, side by side:
SuperNodes without a checkpoint-dir (every ClientApp process partitions and decodes the
dataset again) and with one (decoded once per node, state checkpointed).

    python benchmarks/deployment_speed.py [--rounds 3]

Starts and stops everything through deploy/local.sh (by PID); prints one table."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deployment_rounds(checkpoints: bool, rounds: int, work: Path) -> list[dict]:
    env = {
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
    script = ROOT / "deploy" / "local.sh"
    subprocess.run([script, "start", "3"], env=env, check=True, capture_output=True)
    try:
        subprocess.run([script, "connection"], env=env, check=True, capture_output=True)
        results = work / "results"
        run_config = (
            f'num-server-rounds={rounds} local-epochs=1 results-dir="{results}" run-name="speed"'
        )
        subprocess.run(
            ["flwr", "run", ".", "drdfl-local", "--stream", "--run-config", run_config],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=1800,
        )
        deadline = time.monotonic() + 120
        summary = results / "speed" / "summary.json"
        while not summary.is_file() and time.monotonic() < deadline:
            time.sleep(1)
        lines = (results / "speed" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]
    finally:
        subprocess.run([script, "stop"], env=env, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for checkpoints in (False, True):
        with tempfile.TemporaryDirectory() as work:
            records = deployment_rounds(checkpoints, args.rounds, Path(work))
        restore = [n.get("time_restore", 0.0) for r in records for n in r["nodes"].values()]
        rows.append(
            (
                "with checkpoint-dir" if checkpoints else "without checkpoint-dir",
                [round(r["seconds"], 1) for r in records],
                sum(restore) / len(restore),
            )
        )
    print(f"3 SuperNodes + SuperLink on 127.0.0.1, DRDFL on digits, {args.rounds} rounds")
    print(f"{'nodes':24} {'seconds per round':28} {'mean time_restore (s)':>22}")
    for name, seconds, restore in rows:
        print(f"{name:24} {str(seconds):28} {restore:22.2f}")


if __name__ == "__main__":
    main()
