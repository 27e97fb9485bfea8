"""No private module starts equal to a shared one, and private modules differ between
nodes. That whatever a method averages, exchanges or replaces starts bit-identical on
every node is part of the contract every method keeps (tests/test_method_contract.py).
"""

from __future__ import annotations

import pytest
import torch

from drdfl_flwr.registry import build_learner
from tests.conftest import make_config

SHAPE, CLASSES = (1, 8, 8), 10


def fresh(method: str, seed: int, partition_id: int):
    return build_learner(
        make_config(method=method, seed=seed, classifier_norm="batch"), SHAPE, CLASSES, partition_id
    )


@pytest.mark.parametrize("method", ["drdfl", "drdfl-cfl", "drdfl-vf"])
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
