"""A run interrupted at the SuperLink side resumes after its last completed round: the
results keep the rounds already written, the loop starts at the next round, and what
cannot be resumed is refused with a reason."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord

from drdfl_flwr.config import ConfigError, RunConfig
from drdfl_flwr.results import ResultsWriter
from strategies.relay import Relay
from strategies.rounds import RoundLoop
from strategies.topology import Ring
from strategies.wire import CONFIG as CONFIG_RECORD
from strategies.wire import RUN_KEY
from tests.fake_grid import FakeGrid

CONFIG = {"method": "drdfl", "run-name": "trial", "resume": False}


def record(r: int) -> dict:
    accuracy = {"local_t_acc": 0.1 * r, "global_t_acc": 0.05 * r}
    return {"round": r, "seconds": 1.0, "mean": accuracy, "std": accuracy}


def interrupted(tmp_path, rounds: int = 2):
    writer = ResultsWriter(tmp_path / "trial", CONFIG, run_key="first-run-id")
    for r in range(1, rounds + 1):
        writer.log_round(record(r))
    with writer.metrics_path.open("a") as f:
        f.write('{"round": 3, "mean": {"loc')  # the crash, mid-line
    return tmp_path / "trial"


def test_resume_keeps_complete_rounds_and_drops_the_half_written_one(tmp_path):
    run_dir = interrupted(tmp_path)
    first_key = (run_dir / "run_key").read_text()
    writer = ResultsWriter(run_dir, {**CONFIG, "resume": True}, resume=True, run_key="new-id")
    assert writer.completed_rounds == 2
    assert writer.run_key == first_key  # the nodes' checkpoints are filed under it
    writer.log_round(record(3))
    lines = [json.loads(x) for x in writer.metrics_path.read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3]
    assert writer.finish()["last"]["round"] == 3


def test_resume_refuses_another_config_and_a_finished_run(tmp_path):
    run_dir = interrupted(tmp_path)
    with pytest.raises(ValueError, match=r"other values of \['method'\]"):
        ResultsWriter(run_dir, {**CONFIG, "method": "dfml", "resume": True}, resume=True)
    ResultsWriter(run_dir, CONFIG, resume=True).finish()
    with pytest.raises(ValueError, match="finished run"):
        ResultsWriter(run_dir, CONFIG, resume=True)


def test_resume_needs_a_run_name():
    with pytest.raises(ConfigError, match="resume"):
        RunConfig(resume=True)


def test_the_loop_starts_after_the_last_completed_round():
    grid = FakeGrid(3)
    records: list[dict] = []
    RoundLoop(
        Relay(Ring()), node_wait_timeout=5, on_round=lambda r: records.append(r.to_record())
    ).start(grid, num_rounds=4, first_round=3)
    assert [r["round"] for r in records] == [3, 4]
    assert sorted({r for _, r in grid.sent}) == [3, 4]
    # the relay's payloads of round 2 are gone: round 3 carries none, round 4 the ring's
    assert all(grid.received[(p, 3)] == [] for p in range(3))
    assert records[1]["received_from"]["1"] == [0]


def test_the_run_key_reaches_every_train_message():
    grid = FakeGrid(3)
    RoundLoop(Relay(Ring()), node_wait_timeout=5).start(
        grid, num_rounds=2, train_config=ConfigRecord({RUN_KEY: "first-run-id"})
    )
    assert {str(c[CONFIG_RECORD][RUN_KEY]) for c in grid.contents.values()} == {"first-run-id"}
