"""The warm cache is bounded by what its learners hold in memory, not by the size of
their saved state: a DSLTH learner saves its scores but holds its fixed random weights,
gradients and Adam's moments too."""

from __future__ import annotations

import pytest
import torch

from drdfl_flwr.registry import build_learner
from drdfl_flwr.warm import WarmLearners, resident_bytes
from tests.conftest import make_config, random_client_data

pytestmark = pytest.mark.fast


def trained(method: str, partition_id: int = 0):
    learner = build_learner(make_config(method=method, local_epochs=1), (1, 8, 8), 10, partition_id)
    learner.fit(random_client_data(32))
    return learner


@pytest.mark.parametrize("method", ["fedavg", "dslth", "drdfl"])
def test_a_trained_learner_is_counted_with_the_gradients_of_what_it_trains(method):
    fresh = build_learner(make_config(method=method), (1, 8, 8), 10)
    modules = [m for m in fresh.modules().values() if isinstance(m, torch.nn.Module)]
    trainable = sum(
        p.numel() * p.element_size() for m in modules for p in m.parameters() if p.requires_grad
    )
    assert resident_bytes(fresh) >= trainable
    assert resident_bytes(trained(method)) >= resident_bytes(fresh) + trainable


def test_dslth_holds_more_than_it_saves():
    learner = trained("dslth")
    assert resident_bytes(learner) > len(learner.to_bytes())


def test_the_cache_keeps_learners_within_the_budget_in_memory_least_recent_first():
    learners = [trained("fedavg", p) for p in range(3)]
    size = resident_bytes(learners[0])
    cache = WarmLearners()
    for p, learner in enumerate(learners):
        cache.put(p, f"token{p}", learner, budget=2 * size + size // 2)
    assert len(cache) == 2
    assert cache.take(0, "token0") is None  # the oldest went first
    assert cache.take(2, "token2") is learners[2]
    cache.put(9, "big", learners[1], budget=size - 1)  # larger than the whole budget
    assert cache.take(9, "big") is None
