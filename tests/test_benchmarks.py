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
