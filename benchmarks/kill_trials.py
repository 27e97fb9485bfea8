"""A killed grid loses nothing (issue 30, item 4): SIGKILL a grid run at random moments,
run the same command again, and compare with a grid that was never interrupted.

Each trial starts the grid in its own process group, kills the whole group (the runner,
Ray and every ClientApp) with SIGKILL after a random delay, then runs the same command to
the end. Checked per trial: every run's metrics.jsonl holds rounds 1..R once each, in
order, with no torn line, and tables.md and runs.csv are byte-identical to the
uninterrupted grid's (same seeds, same results).

    python benchmarks/kill_trials.py --trials 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = 'grid.variants="local, drdfl, fedavg" num-server-rounds=3'


def grid_command(out: Path) -> list[str]:
    return [
        sys.executable, "-m", "drdfl_flwr.experiments", "conf/cpu-smoke.toml",
        "--out", str(out), "--no-plots", "--set", SETTINGS,
    ]  # fmt: skip


def run(out: Path, kill_after: float | None = None) -> bool:
    """Run the grid into ``out``; with ``kill_after``, SIGKILL its process group then.
    True when it was killed before it finished."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen(
        grid_command(out), cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        proc.wait(timeout=kill_after)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def rounds_once(out: Path, rounds: int) -> bool:
    for path in (out / "runs").glob("*/metrics.jsonl"):
        lines = path.read_text().splitlines()
        if [json.loads(line)["round"] for line in lines] != list(range(1, rounds + 1)):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--work", default="/tmp/kill-trials")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    reference = work / "uninterrupted"
    started = time.time()
    run(reference)
    full = time.time() - started
    print(f"uninterrupted grid: {full:.0f} s", flush=True)
    rng = random.Random(args.seed)
    passed = 0
    for trial in range(1, args.trials + 1):
        out = work / f"trial{trial}"
        delay = rng.uniform(3.0, 0.9 * full)
        killed = run(out, kill_after=delay)
        cut = sorted(p.parent.name for p in (out / "runs").glob("*/metrics.jsonl"))
        run(out)
        same = all(
            (out / name).read_bytes() == (reference / name).read_bytes()
            for name in ("tables.md", "runs.csv")
        )
        once = rounds_once(out, 3)
        passed += same and once
        print(
            f"trial {trial}: killed after {delay:.1f} s ({'killed' if killed else 'had finished'},"
            f" {len(cut)} run folders then); rounds once: {once}; tables and runs.csv "
            f"identical: {same}",
            flush=True,
        )
    print(f"{passed}/{args.trials} trials resumed to the uninterrupted grid's results")


if __name__ == "__main__":
    main()
