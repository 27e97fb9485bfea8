"""DFedPGP: private head, body averaged uniformly with the in-neighbours, head then body."""

from __future__ import annotations

import pytest
import torch

from baselines.common import head_names
from baselines.dfedpgp import DFedPGPLearner, DFedPGPOptions
from drdfl_flwr import registry
from drdfl_flwr.config import ConfigError
from drdfl_flwr.payload import peers
from drdfl_flwr.registry import resolved_topology
from tests.conftest import make_config, random_client_data

SHAPE = (1, 8, 8)
K = 10


def make_learner(partition_id: int = 0, **kw) -> DFedPGPLearner:
    base = {"method": "dfedpgp", "device": "cpu", "batch_size": 16, "seed": 5}
    torch.manual_seed(1000 + partition_id)  # different initial weights per node
    return DFedPGPLearner(make_config(**{**base, **kw}), SHAPE, K, partition_id=partition_id)


def state(learner: DFedPGPLearner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.classifier.state_dict().items()}


def split(learner, snapshot):
    head = head_names(learner.classifier)
    return (
        {k: v for k, v in snapshot.items() if k in head},
        {k: v for k, v in snapshot.items() if k not in head},
    )


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_registered_decentralized_with_release_defaults():
    spec = registry.method_spec("dfedpgp")
    assert spec.reducer is None and not spec.centralized
    cfg = make_config(method="dfedpgp")
    assert resolved_topology(cfg) == "ring"
    assert (cfg.options(DFedPGPOptions).head_epochs, cfg.options(DFedPGPOptions).body_epochs) == (
        1,
        5,
    )
    for topology in ("bi-ring", "full", "random-k"):
        make_config(method="dfedpgp", topology=topology)
    with pytest.raises(ConfigError, match="topology"):
        make_config(method="dfedpgp", topology="star")
    with pytest.raises(ConfigError, match="dfedpgp.head-epochs"):
        make_config(method="dfedpgp", dfedpgp_head_epochs=-1)


def test_head_never_leaves_the_node():
    node = make_learner()
    head = head_names(node.classifier)
    assert head == {"head.2.weight", "head.2.bias"}  # the last linear layer
    payload = node.shared_payload()
    assert not head & payload.keys()
    assert payload.keys() == set(node.classifier.state_dict()) - head
    before_head, _ = split(node, state(node))
    node.absorb(peers(make_learner(1).shared_payload(), make_learner(2).shared_payload()))
    after_head, _ = split(node, state(node))
    assert same(before_head, after_head)  # bit-identical


def test_body_after_absorb_is_the_uniform_mean_of_own_and_received():
    node, a, b = make_learner(0), make_learner(1), make_learner(2)
    own = node.shared_payload()
    pa, pb = a.shared_payload(), b.shared_payload()
    # example counts differ, but the release averages uniformly
    incoming = peers(pa)[0:1] + [peers(pa, pb, weight=500.0)[1]]
    node.absorb(incoming)
    _, body = split(node, state(node))
    for key in own:
        expected = torch.stack([own[key], pa[key], pb[key]]).mean(0)
        assert torch.equal(body[key], expected), key
        assert not torch.equal(body[key], own[key])
    # nothing received: the body stays the own one
    lone = make_learner(3)
    before = state(lone)
    lone.absorb([])
    assert same(before, state(lone))


def test_head_phase_moves_only_the_head_and_body_phase_only_the_body():
    data = random_client_data(n=48, shape=SHAPE)
    # BatchNorm makes the frozen body's running statistics part of the check
    head_only = make_learner(dfedpgp_head_epochs=1, dfedpgp_body_epochs=0, classifier_norm="batch")
    head0, body0 = split(head_only, state(head_only))
    metrics = head_only.fit(data)
    head1, body1 = split(head_only, state(head_only))
    assert same(body0, body1)
    assert not any(torch.equal(head0[k], head1[k]) for k in head0)
    assert metrics["local_steps"] == 3.0 and "l_ce_body" not in metrics

    body_only = make_learner(dfedpgp_head_epochs=0, dfedpgp_body_epochs=2, classifier_norm="batch")
    head0, body0 = split(body_only, state(body_only))
    body_only.fit(data)
    head1, body1 = split(body_only, state(body_only))
    assert same(head0, head1)
    moved = [
        k for k in body0 if body0[k].is_floating_point() and not torch.equal(body0[k], body1[k])
    ]
    assert {"features.0.weight", "features.1.running_mean", "head.0.weight"} <= set(moved)


def test_fit_runs_both_phases_with_the_release_epochs():
    node = make_learner()
    metrics = node.fit(random_client_data(n=32, shape=SHAPE))  # 2 batches per epoch
    assert metrics["local_steps"] == 2.0 * (1 + 5)
    assert {"l_ce_head", "l_ce_body", "health_body_spread"} <= metrics.keys()
    assert node.rounds_trained == 1
