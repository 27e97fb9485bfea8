"""A real deployment on this host: a SuperLink and three SuperNodes started by
deploy/local.sh, a DRDFL run through ``flwr run``, one SuperNode killed mid-run and
restarted, one that joins after round 1, a SuperLink restart with resume, TLS.
Every process started is stopped by PID at the end.

Marked ``deployment`` (and ``slow``): about 6 minutes on 2 cores, so not in the default
test run; ``pytest -m deployment -s`` runs it and prints the round records."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "local.sh"

pytestmark = [pytest.mark.slow, pytest.mark.deployment]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "DEPLOY_DIR": str(tmp_path / "deploy"),
        "SUPERLINK_PORT": str(free_port()),
        "NODE_PORT_BASE": str(free_port()),
        "FLWR_HOME": str(tmp_path / "flwr"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_DATASETS_OFFLINE": "1",
        **extra,
    }


def runner(env: dict[str, str]):
    def script(*args: str) -> str:
        done = subprocess.run(
            [str(SCRIPT), *args], env=env, cwd=ROOT, capture_output=True, text=True, check=True
        )
        print(done.stdout, end="")
        return done.stdout

    return script


@pytest.fixture
def deployment(tmp_path):
    env = environment(tmp_path)
    script = runner(env)
    script("start", "3")
    try:
        script("connection")
        yield env, script
    finally:
        script("stop")
        leftovers = list((tmp_path / "deploy").glob("*.pid"))
        assert not leftovers, leftovers


def flwr_run(env: dict[str, str], run_config: str, *options: str) -> str:
    """``flwr run`` of this app on the trial deployment; its output."""
    return subprocess.run(
        ["flwr", "run", ".", "drdfl-local", *options, "--run-config", run_config],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    ).stdout


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(2)
    raise TimeoutError(f"waited {timeout:.0f}s for {what}")


def test_drdfl_on_three_supernodes_survives_a_killed_and_restarted_node(deployment, tmp_path):
    env, script = deployment
    results = tmp_path / "results"
    run_config = (
        f'num-server-rounds=5 local-epochs=1 round-timeout=120 results-dir="{results}" '
        'run-name="deployment"'
    )
    print(flwr_run(env, run_config))
    run_dir = results / "deployment"
    wait_for(lambda: len(records(run_dir)) >= 1, 600, "round 1")
    script("kill-node", "1")
    wait_for(lambda: any(r["failed"] == [1] for r in records(run_dir)), 600, "a round without 1")
    script("start-node", "1", "3")
    wait_for(lambda: (run_dir / "summary.json").is_file(), 900, "the end of the run")
    rounds = records(run_dir)
    for r in rounds:
        print(
            f"round {r['round']}: {r['seconds']:.1f}s failed={r['failed']} "
            f"rejoined={r['rejoined']} node_ids={r['node_ids']} "
            f"rounds_trained={ {p: m.get('rounds_trained') for p, m in r['nodes'].items()} }"
        )
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    bypassed = [r["round"] for r in rounds if r["failed"] == [1]]
    rejoined = [r["round"] for r in rounds if r["rejoined"] == [1]]
    assert bypassed and rejoined and rejoined[0] > bypassed[-1]
    before, after = rounds[0]["node_ids"]["1"], rounds[-1]["node_ids"]["1"]
    assert before != after  # Flower gave the restarted SuperNode a new id
    # it resumed its private state: its rounds_trained counts the rounds before the crash
    trained_by_1 = sum(
        1 for r in rounds if "1" in r["nodes"] and "rounds_trained" in r["nodes"]["1"]
    )
    assert rounds[-1]["nodes"]["1"]["rounds_trained"] == trained_by_1
    for partition in ("0", "2"):  # the survivors trained every round
        assert all(partition in r["nodes"] for r in rounds)
        assert rounds[-1]["nodes"][partition]["rounds_trained"] == 5
    summary = json.loads((run_dir / "summary.json").read_text())
    print(
        "survivors' last round:",
        {
            p: (round(m["local_t_acc"], 3), round(m["global_t_acc"], 3))
            for p, m in rounds[-1]["nodes"].items()
        },
    )
    assert summary["last"]["round"] == 5


def test_a_supernode_that_starts_after_round_one_joins_the_ring(tmp_path):
    env = environment(tmp_path)
    script = runner(env)
    script("start", "0")  # the SuperLink alone
    try:
        script("connection")
        for k in (0, 1):
            script("start-node", str(k), "3")
        results = tmp_path / "results"
        run_config = (
            f'num-server-rounds=5 local-epochs=1 min-nodes=2 results-dir="{results}" '
            'run-name="late"'
        )
        flwr_run(env, run_config)
        run_dir = results / "late"
        wait_for(lambda: len(records(run_dir)) >= 1, 600, "round 1")
        script("start-node", "2", "3")
        wait_for(lambda: (run_dir / "summary.json").is_file(), 900, "the end of the run")
    finally:
        script("stop")
    assert not list((tmp_path / "deploy").glob("*.pid"))
    rounds = records(run_dir)
    for r in rounds:
        node_2 = r["nodes"].get("2", {})
        print(
            f"round {r['round']}: {r['seconds']:.1f}s absent={r['absent']} joined={r['joined']} "
            f"received_from={r['received_from']} node 2: rounds_trained="
            f"{node_2.get('rounds_trained')} priors_frozen={node_2.get('priors_frozen')} "
            f"Local-T={node_2.get('local_t_acc')}"
        )
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    joined = [r["round"] for r in rounds if r["joined"] == [2]]
    assert rounds[0]["absent"] == [2] and len(joined) == 1 and joined[0] >= 2
    first = rounds[joined[0] - 1]
    assert first["received_from"]["2"] == [1]  # its predecessor's payload ...
    assert first["nodes"]["2"]["priors_frozen"] == 1.0  # ... taken by Algorithm 2
    assert rounds[-1]["received_from"]["0"] == [2]  # and its successor now hears from it
    assert all(r["failed"] == [] for r in rounds)
    for partition in ("0", "1"):
        assert rounds[-1]["nodes"][partition]["rounds_trained"] == 5


def test_with_tls_an_unregistered_supernode_is_refused(tmp_path):
    env = environment(tmp_path, TLS="1")
    script = runner(env)
    script("certs", "3")
    script("start", "2")  # registers node-0 and node-1's public keys, then starts them
    try:
        script("start-node", "2", "3")  # node-2 has a key pair but was never registered
        log = tmp_path / "deploy" / "supernode-2.log"
        wait_for(lambda: "Failed to activate SuperNode" in log.read_text(), 120, "the refusal")
        for k in (0, 1):  # the registered ones are in, over TLS
            wait_for(
                lambda k=k: (
                    "SuperNode ID" in (tmp_path / "deploy" / f"supernode-{k}.log").read_text()
                ),
                120,
                f"node {k} to connect",
            )
        listed = subprocess.run(
            ["flwr", "supernode", "list", "drdfl-local", "--format", "json"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        print(listed)
        assert listed.count('"online"') == 2
    finally:
        script("stop")
    assert not list((tmp_path / "deploy").glob("*.pid"))


def test_a_run_interrupted_at_the_superlink_resumes_after_its_last_round(deployment, tmp_path):
    env, script = deployment
    results = tmp_path / "results"
    run_config = f'num-server-rounds=4 local-epochs=1 results-dir="{results}" run-name="trial"'
    flwr_run(env, run_config)
    run_dir = results / "trial"
    wait_for(lambda: len(records(run_dir)) >= 2, 600, "round 2")
    script("kill-superlink")
    interrupted = records(run_dir)
    script("start-superlink")
    flwr_run(env, f"{run_config} resume=true", "--stream")
    wait_for(lambda: (run_dir / "summary.json").is_file(), 120, "the summary")
    rounds = records(run_dir)
    for r in rounds:
        trained = {p: m.get("rounds_trained") for p, m in r["nodes"].items()}
        print(f"round {r['round']}: {r['seconds']:.1f}s rounds_trained={trained}")
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert rounds[: len(interrupted)] == interrupted  # kept as written
    # the nodes went on from their checkpoints, not from scratch
    assert all(m["rounds_trained"] >= 3 for m in rounds[2]["nodes"].values())


def test_three_supernodes_each_train_on_their_own_folder(tmp_path):
    """Own data on real SuperNodes: the pre-split command writes three folders of different
    sizes and classes; each SuperNode (deploy/local.sh OWN_DATA) trains on its own whole,
    no partitioner; the per-node counts of the run are the folders'. (A missing or
    malformed folder: tests/test_own_data.py.)"""
    devices = tmp_path / "devices"
    split = subprocess.run(
        [
            sys.executable,
            "-m",
            "drdfl_flwr.experiments.presplit",
            "--num-partitions",
            "3",
            "--out",
            str(devices),
            "--set",
            'dataset="digits" partitioner="dirichlet" dirichlet-beta=0.3',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    print(split.stdout)
    from datasets import Dataset

    sizes = {
        str(k): len(Dataset.from_parquet(str(devices / f"node-{k}" / "train.parquet")))
        for k in range(3)
    }
    env = environment(tmp_path, OWN_DATA=str(devices), CHECKPOINTS="0")
    script = runner(env)
    script("start", "3")
    try:
        script("connection")
        results = tmp_path / "results"
        print(
            flwr_run(
                env,
                f'method="fedavg" num-server-rounds=2 local-epochs=1 results-dir="{results}" '
                'run-name="own"',
            )
        )
        run_dir = results / "own"
        wait_for(lambda: (run_dir / "summary.json").is_file(), 600, "the end of the run")
        last = records(run_dir)[-1]
        counts = {p: int(m["num-examples"]) for p, m in last["nodes"].items()}
        print("folders:", sizes, "run:", counts)
        assert counts == sizes and len(set(sizes.values())) == 3
        assert all("global_t_acc" in m for m in last["nodes"].values())
    finally:
        script("stop")
