"""What a dead SuperNode costs the round it dies in, on a real deployment (issue 30, item 3).

    python benchmarks/dead_node.py [--trials 3] [--rounds 6] [--round-timeout 120]

Each trial: a SuperLink and three SuperNodes on 127.0.0.1 (deploy/local.sh, stopped by
PID), DRDFL on digits for ``--rounds`` rounds; once round 2 is recorded, SuperNode 1 is
killed (``--how crash``: SIGKILL of its process group, as a power loss; ``stop``:
SIGTERM first, as ``deploy/local.sh kill-node``) after a random 0-10 s more, part way through a
round. Printed per trial: the seconds of every round, the round in which node 1 was first
missing, what the round record's ``unanswered`` says about it (Flower's NODE_UNAVAILABLE
reply after its heartbeat lapsed, or the round timeout), and how long after the kill that
round's record was written.

What bounds the wait: a Flower 1.41 SuperNode sends a heartbeat every 30 s
(``flwr.common.constant.HEARTBEAT_DEFAULT_INTERVAL``, not settable from the SuperNode's
command line) and the SuperLink holds it alive until ``HEARTBEAT_PATIENCE`` (2) intervals
after its last one; from then on it answers a message to that node with its own error
reply, which ends the relay's wait for it. So a node killed at a random moment is given
up 30-60 s after its death, or at ``round-timeout`` if that comes first; a suspended node
is not waited for again.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from deployment_speed import ROOT, Deployment


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trial(work: Path, rounds: int, round_timeout: float, how: str, rng: random.Random) -> dict:
    results, name = work / "results", "dead-node"
    run_dir = results / name
    with Deployment(work, checkpoints=False) as nodes:
        run = subprocess.Popen(
            [
                "flwr",
                "run",
                str(ROOT),
                "drdfl-local",
                "--stream",
                "--run-config",
                f"num-server-rounds={rounds} local-epochs=1 round-timeout={round_timeout} "
                f'results-dir="{results}" run-name="{name}"',
            ],
            env=nodes.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 1200
            while len(read_records(run_dir / "metrics.jsonl")) < 2:
                if time.monotonic() > deadline or run.poll() is not None:
                    raise RuntimeError("the run did not reach round 2 (see `flwr ls`)")
                time.sleep(0.5)
            time.sleep(rng.uniform(0, 10))
            if how == "crash":  # SIGKILL: no goodbye to the SuperLink, as a power loss
                pid = int((Path(nodes.env["DEPLOY_DIR"]) / "supernode-1.pid").read_text())
                os.killpg(pid, signal.SIGKILL)
            else:  # deploy/local.sh kill-node: SIGTERM, then SIGKILL after 5 s
                subprocess.run([nodes.script, "kill-node", "1"], env=nodes.env, check=True)
            killed_at = time.time()
            seen_at: dict[int, float] = {}
            while not (run_dir / "summary.json").is_file():
                for record in read_records(run_dir / "metrics.jsonl"):
                    seen_at.setdefault(record["round"], time.time())
                if time.monotonic() > deadline or run.poll() not in (None, 0):
                    raise RuntimeError("the run did not finish (see `flwr ls`)")
                time.sleep(0.2)
        finally:
            run.wait(timeout=300)
    records = read_records(run_dir / "metrics.jsonl")
    first_missing = next(r for r in records if 1 in r["failed"])
    healthy = [r["seconds"] for r in records[1:] if not r["failed"]]
    return {
        "seconds": [round(r["seconds"], 1) for r in records],
        "round": first_missing["round"],
        "round_seconds": first_missing["seconds"],
        "healthy_median": statistics.median(healthy) if healthy else float("nan"),
        "why": first_missing.get("unanswered", {}).get("1", "(not recorded)"),
        "after_kill": seen_at.get(first_missing["round"], float("nan")) - killed_at,
        "later_rounds": [r["seconds"] for r in records if r["round"] > first_missing["round"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--round-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--how",
        choices=("crash", "stop"),
        default="crash",
        help="crash: SIGKILL the SuperNode; stop: SIGTERM it (deploy/local.sh kill-node)",
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print(
        f"3 SuperNodes on 127.0.0.1, DRDFL on digits, round-timeout {args.round_timeout:g}s, "
        f"node 1 ended by {args.how}"
    )
    for k in range(args.trials):
        with tempfile.TemporaryDirectory() as tmp:
            t = trial(Path(tmp), args.rounds, args.round_timeout, args.how, rng)
        print(
            f"trial {k}: round {t['round']} took {t['round_seconds']:.1f}s "
            f"(healthy rounds: median {t['healthy_median']:.1f}s); its record came "
            f"{t['after_kill']:.1f}s after the kill; later rounds "
            f"{' '.join(f'{s:.1f}' for s in t['later_rounds'])}s; all rounds {t['seconds']}"
        )
        print(f"  unanswered[1]: {t['why']}")


if __name__ == "__main__":
    main()
