"""The oracle ceiling (``oracle-absent-per-class``): a node also trains on real images of
the classes it lacks, taken from the other nodes' training data, while it is scored on
its own class prior, so its absent-class accuracy measures what real examples of those
classes would teach it."""

from __future__ import annotations

import pytest
import torch

from drdfl_flwr.config import ConfigError, RunConfig
from drdfl_flwr.data import load_client_data
from drdfl_flwr.inprocess import run_ring

SPLIT = RunConfig(dataset="digits", partitioner="shard", classes_per_client=3, seed=3)
NODES = 4


def test_a_node_gets_real_images_of_exactly_the_classes_it_lacks():
    plain = load_client_data(SPLIT, 1, NODES)
    oracle = load_client_data(SPLIT.replace(oracle_absent_per_class=7), 1, NODES)
    held = set(plain.y_train.tolist())
    n = len(plain.y_train)
    assert torch.equal(oracle.x_train[:n], plain.x_train)  # its own images first, unchanged
    extra_y = oracle.y_train[n:]
    assert set(extra_y.tolist()) == set(range(10)) - held
    assert torch.bincount(extra_y, minlength=10).max() <= 7
    # every extra image is one another node trains on, with the label it has there
    others = [load_client_data(SPLIT, q, NODES) for q in (0, 2, 3)]
    pool = {
        (tuple(x.flatten().tolist()), int(y))
        for o in others
        for x, y in zip(o.x_train, o.y_train, strict=True)
    }
    for x, y in zip(oracle.x_train[n:], extra_y, strict=True):
        assert (tuple(x.flatten().tolist()), int(y)) in pool
    # scored as the node it is: its prior and test data are its own
    assert torch.equal(oracle.own_labels, plain.y_train)
    assert torch.equal(oracle.y_local_test, plain.y_local_test)


def test_without_the_oracle_own_labels_are_the_training_labels():
    plain = load_client_data(SPLIT, 0, NODES)
    assert plain.y_own is None and plain.own_labels is plain.y_train


def test_a_negative_oracle_count_is_refused_by_name():
    with pytest.raises(ConfigError, match="oracle-absent-per-class"):
        RunConfig(oracle_absent_per_class=-1)


def test_the_oracle_teaches_the_absent_classes_and_keeps_them_scored_as_absent():
    """Local with the oracle reports an absent-class accuracy (the node's own prior
    still lacks those classes) far above Local's, which never saw them."""
    cfg = SPLIT.replace(method="local", num_server_rounds=3, local_epochs=2)
    absent = {}
    for oracle in (0, 50):
        ring = run_ring(cfg.replace(oracle_absent_per_class=oracle), NODES, rounds=3)
        last = ring.history[-1]["nodes"]
        absent[oracle] = sum(m["absent_class_acc"] for m in last) / len(last)
    assert absent[0] < 0.05 < 0.5 < absent[50], absent
