"""``partitioner = "dirichlet-client"``: a Dirichlet label skew that gives every client data
at any number of clients (flwr-datasets' per-class Dirichlet cannot draw 1,000 partitions of
CIFAR-10 at beta 0.1), drawn from the run's seed, with every sample used once."""

from __future__ import annotations

import numpy as np
import pytest

from drdfl_flwr.config import RunConfig
from drdfl_flwr.data import check_partition_plan
from drdfl_flwr.partitioners import client_dirichlet_indices

CIFAR_LIKE = np.repeat(np.arange(10), 5000)  # 50,000 labels, 10 balanced classes


def test_a_thousand_clients_at_beta_0_1_all_hold_data_and_every_sample_is_used_once():
    parts = client_dirichlet_indices(CIFAR_LIKE, 1000, 0.1, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() == sizes.max() == 50
    used = np.concatenate(parts)
    assert len(np.unique(used)) == len(used) == len(CIFAR_LIKE)
    # skewed as beta 0.1 should be: most clients hold one or two classes in the main
    top_share = np.array([np.bincount(CIFAR_LIKE[p], minlength=10).max() / 50 for p in parts])
    assert np.median(top_share) > 0.6  # 0.66, as Dir(0.1) draws: its median max 0.655


def test_large_beta_is_close_to_iid_and_the_seed_decides():
    parts = client_dirichlet_indices(CIFAR_LIKE, 100, 1000.0, seed=3)
    top_share = np.array([np.bincount(CIFAR_LIKE[p], minlength=10).max() / 500 for p in parts])
    assert np.median(top_share) < 0.2
    again = client_dirichlet_indices(CIFAR_LIKE, 100, 1000.0, seed=3)
    other = client_dirichlet_indices(CIFAR_LIKE, 100, 1000.0, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


@pytest.mark.parametrize("labels, clients, beta", [(np.zeros(5), 6, 0.1), (CIFAR_LIKE, 10, 0.0)])
def test_impossible_requests_are_refused(labels, clients, beta):
    with pytest.raises(ValueError):
        client_dirichlet_indices(labels, clients, beta, seed=0)


def test_the_partition_plan_of_many_small_clients_is_drawn_where_dirichlet_fails():
    """On the 1,347 digits over 300 clients at beta 0.05: flwr-datasets' Dirichlet gives up
    and the check says what to use instead; the per-client draw gives every client 4-5."""
    base = {"dataset": "digits", "dirichlet_beta": 0.05}
    with pytest.raises(Exception, match="dirichlet-client"):
        check_partition_plan(RunConfig(partitioner="dirichlet", **base), 300)
    counts = check_partition_plan(RunConfig(partitioner="dirichlet-client", **base), 300)
    assert counts.shape == (300, 10) and set(counts.sum(1)) == {4, 5}
