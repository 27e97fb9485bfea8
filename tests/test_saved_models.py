"""``save-models``: each node keeps its trained model on its own disk, filed with the
run's records, and ``load_node_model`` gives back the very learner: it scores what the
node reported in its last round. Nothing of it travels in a message."""

from __future__ import annotations

import json
import zlib

import pytest
from flwr.app import Context, RecordDict

from drdfl_flwr.config import RunConfig
from drdfl_flwr.data import load_client_data
from drdfl_flwr.inprocess import InProcessGrid
from drdfl_flwr.node import evaluation_metrics
from drdfl_flwr.saved_models import load_node_model, saved_partitions
from drdfl_flwr.server_app import app as SERVER_APP

NODES = 3


def run_in_process(cfg: RunConfig) -> None:
    """The app's ServerApp over the app's ClientApps, in this process (no Ray)."""
    run_id = zlib.crc32(repr(cfg).encode())
    grid = InProcessGrid(cfg.to_run_config(), NODES, run_id=run_id)
    server = Context(
        run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config()
    )
    SERVER_APP(grid, server)


@pytest.mark.parametrize("method", ["drdfl", "fedavg"])
def test_a_saved_model_loads_back_and_scores_what_the_node_reported(method, tmp_path):
    cfg = RunConfig(
        method=method,
        dataset="digits",
        num_server_rounds=2,
        local_epochs=1,
        subset_train=150,
        subset_test=60,
        results_dir=str(tmp_path),
        run_name="kept",
        save_models=True,
        device="cpu",
    )
    run_in_process(cfg)
    run_dir = tmp_path / "kept"
    assert saved_partitions(run_dir) == [0, 1, 2]
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for partition in range(NODES):
        learner = load_node_model(run_dir, partition)
        assert learner.rounds_trained == 2 and learner.partition_id == partition
        data = load_client_data(cfg, partition, NODES)
        scored = evaluation_metrics(learner, data)
        reported = last["nodes"][str(partition)]
        assert scored["local_t_acc"] == pytest.approx(reported["local_t_acc"], abs=1e-9)
        assert scored["global_t_acc"] == pytest.approx(reported["global_t_acc"], abs=1e-9)


def test_a_missing_model_is_named_with_what_the_run_holds(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "node-0.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"partition 4 .*partitions \[0\]"):
        load_node_model(tmp_path, 4)
    with pytest.raises(FileNotFoundError, match="save-models"):
        load_node_model(tmp_path / "elsewhere", 0)


def test_save_models_is_off_by_default_and_nothing_is_written(tmp_path):
    cfg = RunConfig(
        method="local",
        dataset="digits",
        num_server_rounds=1,
        local_epochs=1,
        subset_train=150,
        subset_test=60,
        results_dir=str(tmp_path),
        run_name="plain",
        device="cpu",
    )
    run_in_process(cfg)
    assert (tmp_path / "plain" / "metrics.jsonl").is_file()
    assert not (tmp_path / "plain" / "models").exists()
