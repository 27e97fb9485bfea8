"""A SuperNode that crashed and restarted (empty context.state, same run) resumes its
private state from the checkpoint on its own disk; without a checkpoint-dir it starts
fresh; another run never reads it."""

from __future__ import annotations

from flwr.app import Context, RecordDict

from drdfl_flwr.client_app import train
from drdfl_flwr.payload import METRICS
from tests.test_client_app import RUN, train_message


def fresh_node(tmp_path, run_id: int = 1, checkpoint: bool = True) -> Context:
    node_config = {"partition-id": 0, "num-partitions": 3}
    if checkpoint:
        node_config["checkpoint-dir"] = str(tmp_path)
    return Context(
        run_id=run_id, node_id=77, node_config=node_config, state=RecordDict(), run_config=RUN
    )


def rounds_trained(context: Context) -> float:
    return train(train_message(), context).content[METRICS]["rounds_trained"]


def test_restarted_node_resumes_its_private_state_from_its_checkpoint(tmp_path):
    assert rounds_trained(fresh_node(tmp_path)) == 1.0
    assert (tmp_path / "run-1" / "partition-0.pt").is_file()
    # the crash: a new SuperNode process, an empty context.state, the same run
    assert rounds_trained(fresh_node(tmp_path)) == 2.0


def test_without_checkpoint_dir_a_restarted_node_starts_fresh(tmp_path):
    assert rounds_trained(fresh_node(tmp_path, checkpoint=False)) == 1.0
    assert rounds_trained(fresh_node(tmp_path, checkpoint=False)) == 1.0
    assert not any(tmp_path.iterdir())


def test_another_run_does_not_read_this_runs_checkpoint(tmp_path):
    rounds_trained(fresh_node(tmp_path, run_id=1))
    assert rounds_trained(fresh_node(tmp_path, run_id=2)) == 1.0
