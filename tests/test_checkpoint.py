"""A SuperNode that crashed and restarted (empty context.state, same run) resumes its
private state from the checkpoint on its own disk; without a checkpoint-dir it starts
fresh; another run never reads it."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict

from drdfl_flwr import data as data_module
from drdfl_flwr.client_app import train
from drdfl_flwr.config import RunConfig
from strategies.wire import CONFIG, METRICS, RUN_KEY
from tests.test_client_app import RUN, train_message


def fresh_node(tmp_path, run_id: int = 1, checkpoint: bool = True) -> Context:
    node_config = {"partition-id": 0, "num-partitions": 3}
    if checkpoint:
        node_config["checkpoint-dir"] = str(tmp_path)
    return Context(
        run_id=run_id,
        node_id=77,
        node_config=node_config,
        state=RecordDict(),
        run_config=dict(RUN),
    )


def reply_metrics(context: Context, run_key: str | None = None, server_round: int = 1):
    message = train_message(server_round=server_round)
    if run_key is not None:  # what the relay puts in every message
        message.content[CONFIG][RUN_KEY] = run_key
    return train(message, context).content[METRICS]


def rounds_trained(context: Context, run_key: str | None = None, server_round: int = 1) -> float:
    return reply_metrics(context, run_key, server_round)["rounds_trained"]


def test_restarted_node_resumes_its_private_state_from_its_checkpoint(tmp_path):
    assert rounds_trained(fresh_node(tmp_path), "k1") == 1.0
    assert (tmp_path / "run-k1" / "partition-0.pt").is_file()
    # the crash: a new SuperNode process, an empty context.state, the same run
    assert rounds_trained(fresh_node(tmp_path), "k1", server_round=2) == 2.0


def test_a_resumed_run_has_a_new_run_id_but_the_same_run_key(tmp_path):
    rounds_trained(fresh_node(tmp_path, run_id=1), "k1")
    assert rounds_trained(fresh_node(tmp_path, run_id=99), "k1", server_round=2) == 2.0


def test_a_round_the_node_already_trained_is_answered_from_its_record(tmp_path):
    """A resumed run (or a restarted SuperLink) asks again for the round the killed run
    was in, which the node's checkpoint already holds: the node answers with that round's
    metrics and payload and trains nothing, so rounds_trained grows by exactly one per
    round (before: by two, and the resumed run was not the run it resumed)."""
    first = reply_metrics(fresh_node(tmp_path), "k1")
    again = reply_metrics(fresh_node(tmp_path), "k1")  # restarted, asked round 1 again
    assert again["rounds_trained"] == 1.0 and again["replayed_round"] == 1.0
    assert again["local_passes"] == first["local_passes"] and "replayed_round" not in first
    assert rounds_trained(fresh_node(tmp_path), "k1", server_round=2) == 2.0


def test_another_run_never_reads_this_runs_checkpoint(tmp_path):
    rounds_trained(fresh_node(tmp_path, run_id=1), "k1")
    assert rounds_trained(fresh_node(tmp_path, run_id=2), "k2") == 1.0
    # without a key in the message the node files by Flower's run id
    rounds_trained(fresh_node(tmp_path, run_id=3))
    assert (tmp_path / "run-3" / "partition-0.pt").is_file()


def test_without_checkpoint_dir_a_restarted_node_starts_fresh(tmp_path):
    assert rounds_trained(fresh_node(tmp_path, checkpoint=False)) == 1.0
    assert rounds_trained(fresh_node(tmp_path, checkpoint=False)) == 1.0
    assert not any(tmp_path.iterdir())


def test_a_node_decodes_its_partition_once_and_serves_it_from_its_disk(tmp_path, monkeypatch):
    cfg = RunConfig(dataset="digits")
    first = data_module.load_client_data(cfg, 1, 3, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("partition1-of3-*.pt")

    def no_decoding(*args):
        raise AssertionError("decoded again although the node has it on disk")

    monkeypatch.setattr(data_module, "_client_data", no_decoding)
    again = data_module.load_client_data(cfg, 1, 3, cache_dir=tmp_path)
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_train, again.y_train)
    # another split is another file, never the cached one
    with pytest.raises(AssertionError, match="decoded again"):
        data_module.load_client_data(cfg.replace(dirichlet_beta=0.9), 1, 3, cache_dir=tmp_path)
    monkeypatch.undo()
    cached.write_bytes(b"damaged")  # a damaged cache is rebuilt, not fatal
    rebuilt = data_module.load_client_data(cfg, 1, 3, cache_dir=tmp_path)
    assert torch.equal(first.x_train, rebuilt.x_train)
