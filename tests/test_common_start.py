"""One common initial model: whatever a method averages, exchanges or replaces starts
bit-identical on every node of a run, and no private module starts equal to a shared one.

Parametrized over the registry, so a new method is covered without editing this file.
"""

from __future__ import annotations

import pytest
import torch

from drdfl_flwr import registry
from drdfl_flwr.registry import build_learner
from tests.conftest import make_config

SHAPE, CLASSES = (1, 8, 8), 10


def fresh(method: str, seed: int, partition_id: int):
    return build_learner(
        make_config(method=method, seed=seed, classifier_norm="batch"), SHAPE, CLASSES, partition_id
    )


@pytest.mark.parametrize("method", list(registry.METHODS))
def test_what_nodes_share_starts_identical_on_every_node(method):
    a, b = fresh(method, seed=3, partition_id=0), fresh(method, seed=3, partition_id=4)
    start_a, start_b = a.common_start(), b.common_start()
    assert start_a.keys() == start_b.keys()
    differing = [k for k in start_a if not torch.equal(start_a[k], start_b[k])]
    assert differing == [], f"{method}: partitions 0 and 4 start with different {differing}"


@pytest.mark.parametrize("method", list(registry.METHODS))
def test_the_common_start_depends_on_the_run_seed(method):
    """Not a constant: another seed is another common model (unless nothing is shared)."""
    one, other = fresh(method, 3, 0).common_start(), fresh(method, 4, 0).common_start()
    floats = [k for k, v in one.items() if v.is_floating_point() and v.numel() > 1]
    if floats:
        assert any(not torch.equal(one[k], other[k]) for k in floats)


@pytest.mark.parametrize("method", ["drdfl", "drdfl-cfl", "drdfl-gen"])
@pytest.mark.parametrize("seed", [0, 1, 7, 42])
@pytest.mark.parametrize("partition_id", [0, 1, 2])
def test_private_persona_never_starts_equal_to_the_shared_learngene(method, seed, partition_id):
    """PersonaNet and Learngene have the same trunk; drawn from one seed they coincide
    (seed 0, partition 0 did before the streams were split)."""
    learner = fresh(method, seed, partition_id)
    shared = list(learner.learngene.parameters())
    for p in learner.persona.parameters():
        for q in shared:
            assert p.shape != q.shape or not torch.equal(p, q)


def test_private_modules_differ_between_nodes():
    """Private parts come from each node's own stream (DRDFL's PersonaNet)."""
    a, b = fresh("drdfl", 0, 0), fresh("drdfl", 0, 1)
    pa, pb = next(a.persona.parameters()), next(b.persona.parameters())
    assert not torch.equal(pa, pb)
