"""Every benchmark script runs: its ``--smoke`` mode (digits, a few iterations) ends
with its table, so that a change that breaks a benchmark shows before someone needs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run_benchmark(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0", "HF_DATASETS_OFFLINE": "1"}
        | {k: v for k, v in os.environ.items() if k in ("PATH", "HOME")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_privacy_vf_prints_every_attack():
    out = run_benchmark("privacy_vf.py", "--smoke")
    for row in ("FedNova / FedAvg: DLG", "DRDFL: DLG", "DRDFL-VF: inversion of one image"):
        assert row in out, out


# script, arguments that make it small, a line its output must hold
SMALL_RUNS = [
    ("communication_table.py", (), "| drdfl-vf |"),
    ("step_cost.py", ("--batch-size", "4", "--steps", "3"), "DRDFL"),
    ("round_cost.py", ("--smoke", "--variants", "drdfl,drdfl-vf"), "| drdfl-vf |"),
    (
        "attacks.py",
        (
            "--methods",
            "fedavg,drdfl",
            "--attacks",
            "sign-flip",
            "--clients",
            "4",
            "--rounds",
            "2",
            "--attacker",
            "1",
        ),
        "sign-flip",
    ),
    ("late_join.py", ("--clients", "3", "--join-round", "2", "--rounds", "3"), "join"),
    ("kill_trials.py", ("--trials", "1", "--work", "{tmp}"), "1/1"),
    (
        "dslth_released.py",
        ("--rounds", "1", "--clients", "2", "--subset-train", "100", "--subset-test", "50")
        + ("--out", "{tmp}"),
        "RESULT isolated=",
    ),
    ("install_size.py", ("--top", "3"), "MiB"),
    ("vf_alignment.py", ("--smoke", "--heads"), "| oracle: real features of every class |"),
    (
        "overhead.py",
        ("--methods", "fedavg", "--clients", "3,4", "--rounds", "3", "--no-plain")
        + ("--subset-train", "200", "--subset-test", "100", "--out", "{tmp}"),
        "| fedavg | 4 |",
    ),
    ("deployment_speed.py", ("--rounds", "2"), "floor"),
    ("dead_node.py", ("--trials", "1", "--rounds", "3"), "trial"),
]


@pytest.mark.parametrize(
    ("script", "args", "expected"), SMALL_RUNS, ids=[s for s, *_ in SMALL_RUNS]
)
def test_every_benchmark_runs_small(script, args, expected, tmp_path):
    out = run_benchmark(script, *(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert expected.lower() in out.lower(), out[-2000:]
