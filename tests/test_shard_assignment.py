"""Shard partitions keep every class: flwr-datasets' independent draw per client dropped 15
of CIFAR-100's classes at 10 clients x 20, silently; ``shard-assignment = "balanced"``
(the default) gives every class to some client, ``"random"`` keeps the old draw and says
which classes left. Results recorded before the key existed count as ``random``."""

from __future__ import annotations

import json
import logging

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from drdfl_flwr.config import RunConfig
from drdfl_flwr.data import balanced_class_assignment, label_counts
from drdfl_flwr.experiments.grid import load_grid
from drdfl_flwr.experiments.outcomes import DONE, PENDING, read_outcome
from drdfl_flwr.experiments.runner import run_grid
from tests.test_experiments import FakeSimulation, write_conf


@given(
    num_partitions=st.integers(1, 40),
    num_labels=st.integers(1, 60),
    per_partition=st.integers(1, 60),
    seed=st.integers(0, 2**32 - 1),
)
def test_balanced_assignment_covers_every_class_evenly(
    num_partitions, num_labels, per_partition, seed
):
    per_partition = min(per_partition, num_labels)
    labels = list(range(num_labels))
    got = balanced_class_assignment(
        num_partitions, labels, per_partition, np.random.default_rng(seed)
    )
    assert sorted(got) == list(range(num_partitions))
    assert all(len(set(held)) == per_partition for held in got.values())
    holders = np.bincount(np.concatenate(list(got.values())), minlength=num_labels)
    assert holders.max() - holders.min() <= 1
    if num_partitions * per_partition >= num_labels:
        assert holders.min() >= 1


def test_balanced_assignment_follows_the_seed():
    def draw(seed):
        return balanced_class_assignment(10, list(range(100)), 20, np.random.default_rng(seed))

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_shards_keep_every_class_by_default_and_random_names_what_it_drops(caplog):
    """Digits, 5 clients x 2 classes: the balanced default holds all 10 classes, each on
    one client; at seed 42 flwr-datasets' own draw holds 6 and the log names the 4 lost."""
    cfg = RunConfig(partitioner="shard", classes_per_client=2, seed=42)
    balanced = label_counts(cfg, 5)
    assert ((balanced > 0).sum(axis=1) == 2).all()
    assert ((balanced > 0).sum(axis=0) == 1).all()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        dropped = label_counts(cfg.replace(shard_assignment="random"), 5)
    unheld = [k for k in range(10) if dropped[:, k].sum() == 0]
    assert unheld
    assert f"{len(unheld)} of 10 classes are held by no client" in caplog.text
    assert str(unheld) in caplog.text
    assert 'shard-assignment = "balanced"' in caplog.text


def test_a_run_recorded_before_the_key_existed_counts_as_random_shards_only(tmp_path):
    conf = write_conf(tmp_path)
    overrides = {
        "grid.variants": "local",
        "grid.seeds": "1",
        "grid.partitions": "dirichlet:0.1, shard:2",
    }
    grid = load_grid(conf, overrides)
    out = tmp_path / "out"
    run_grid(grid, out, simulate_fn=FakeSimulation(), echo=lambda line: None, plots=False)
    for run in grid.runs:  # as written by the code before shard-assignment existed
        path = out / "runs" / run.run_id / "run_config.json"
        recorded = json.loads(path.read_text())
        del recorded["shard-assignment"]
        path.write_text(json.dumps(recorded))

    def states(extra):
        runs = load_grid(conf, {**overrides, **extra}).runs
        return {r.partition.kind: read_outcome(r, out / "runs").status for r in runs}

    assert states({}) == {"dirichlet": DONE, "shard": PENDING}
    assert states({"shard-assignment": "random"}) == {"dirichlet": DONE, "shard": DONE}
