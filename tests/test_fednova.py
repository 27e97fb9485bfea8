"""FedNova: the step-normalized hub update, ||a||_1 for SGD with momentum, the node's
wire format, and nodes that stay on one global model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from baselines.fednova import FedNovaLearner, fednova_reduce, normalizing_norm
from drdfl_flwr.config import ConfigError
from drdfl_flwr.payload import from_hub
from drdfl_flwr.records import from_array_record, to_array_record
from drdfl_flwr.registry import build_learner
from strategies.reducers import Contribution, ReductionError, weighted_mean
from tests.conftest import as_tensors, contribution, make_config, random_client_data

SHAPE, K = (1, 8, 8), 10


def node(partition_id: int = 0, **extra) -> FedNovaLearner:
    base = {"method": "fednova", "seed": 3, "local_epochs": 1, "batch_size": 16, "device": "cpu"}
    return build_learner(make_config(**{**base, **extra}), SHAPE, K, partition_id=partition_id)


def reply(partition_id: int, learner: FedNovaLearner, metrics: dict, examples: int) -> Contribution:
    return contribution(
        partition_id,
        to_array_record(learner.shared_payload()),
        {**metrics, "num-examples": float(examples)},
    )


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- ||a||_1 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9, 0.99])
def test_closed_form_norm_equals_the_recursion(rho):
    """JYWa/FedNova: c <- rho c + 1, a <- a + c per step."""
    a = c = 0.0
    for tau in range(1, 60):
        c = rho * c + 1.0
        a += c
        assert normalizing_norm(tau, rho) == pytest.approx(a, rel=1e-10)
    assert normalizing_norm(0, rho) == 0.0


def test_momentum_zero_gives_tau():
    assert [normalizing_norm(t, 0.0) for t in range(6)] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    learner = node(fednova_momentum=0.0)
    metrics = learner.fit(random_client_data(48))
    assert metrics["fednova_a"] == metrics["local_steps"] == 3.0


def test_norm_is_what_torch_sgd_with_momentum_moves():
    """With a constant gradient g, tau steps of torch's SGD(momentum=rho) from a zero
    buffer move the parameter by exactly lr * ||a||_1 * g: the norm matches the optimizer
    the node really uses."""
    g = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
    for rho, tau in [(0.9, 7), (0.5, 3), (0.0, 4)]:
        p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD([p], lr=0.1, momentum=rho)
        for _ in range(tau):
            opt.zero_grad()
            (g * p).sum().backward()
            opt.step()
        torch.testing.assert_close(-p.detach(), 0.1 * normalizing_norm(tau, rho) * g)


def test_a_node_with_more_data_reports_more_steps_and_a_larger_norm():
    small, large = node(0), node(1)
    m_small = small.fit(random_client_data(32, seed=1))
    m_large = large.fit(random_client_data(96, seed=2))
    assert m_large["local_steps"] == 3 * m_small["local_steps"] == 6.0
    assert m_large["fednova_a"] > m_small["fednova_a"] > 0
    assert m_small["fednova_a"] == pytest.approx(normalizing_norm(2, 0.9))
    assert m_large["fednova_a"] == pytest.approx(normalizing_norm(6, 0.9))


# -- the hub's reduction ---------------------------------------------------------------------
def test_reducer_normalizes_by_steps_and_is_not_fedavg():
    """Two nodes on the same data, one running twice the epochs (twice the steps, a larger
    ||a||_1): the hub's model is exactly x - tau_eff * sum p_i d_i, and not the weighted
    mean of the two trained models (what it becomes if the steps are ignored)."""
    data = random_client_data(48, seed=4)
    one, two = node(0, local_epochs=1), node(1, local_epochs=2)
    x = state(one.global_model)
    assert same(x, state(two.global_model))  # one seeded start point for every node
    metrics = [one.fit(data), two.fit(data)]
    assert metrics[1]["local_steps"] == 2 * metrics[0]["local_steps"]
    a = [m["fednova_a"] for m in metrics]
    assert a[1] > a[0]
    replies = [reply(p, n, m, 48) for p, (n, m) in enumerate(zip((one, two), metrics, strict=True))]
    out = as_tensors(fednova_reduce(replies, None))
    trained = [state(one.classifier), state(two.classifier)]
    p = [0.5, 0.5]
    tau_eff = p[0] * a[0] + p[1] * a[1]
    models = [
        {k: v.numpy() for k, v in from_array_record(to_array_record(t)).items()} for t in trained
    ]
    fedavg = as_tensors(
        weighted_mean(
            [
                contribution(
                    i, ArrayRecord({k: Array(v) for k, v in m.items()}), {"num-examples": 48.0}
                )
                for i, m in enumerate(models)
            ]
        )
    )
    assert set(out) == {f"model.{k}" for k in x}
    for k, x0 in x.items():
        d = [(x0 - t[k]) / ai for t, ai in zip(trained, a, strict=True)]
        want = x0 - tau_eff * (p[0] * d[0] + p[1] * d[1])
        torch.testing.assert_close(out[f"model.{k}"], want, rtol=1e-5, atol=1e-6)
    moved = [k for k in x if not torch.allclose(trained[0][k], trained[1][k])]
    assert moved, "the two nodes should have moved differently"
    for k in moved:
        assert not torch.allclose(out[f"model.{k}"], fedavg[k], rtol=1e-4, atol=1e-6), k


def test_reducer_weights_by_examples_and_uses_the_previous_aggregate():
    """From round two the base is the hub's own x; p_i = n_i / n."""
    x = {"model.w": np.array([1.0, 2.0], np.float32)}
    previous = dict(x)
    r = [
        contribution(0, ArrayRecord({"update.w": Array(np.array([1.0, 0.0], np.float32))}),
              {"num-examples": 10.0, "fednova_a": 2.0}),
        contribution(1, ArrayRecord({"update.w": Array(np.array([0.0, 1.0], np.float32))}),
              {"num-examples": 30.0, "fednova_a": 6.0}),
    ]  # fmt: skip
    out = fednova_reduce(r, previous)["model.w"]
    tau_eff = 0.25 * 2.0 + 0.75 * 6.0
    np.testing.assert_allclose(out, x["model.w"] - tau_eff * np.array([0.25, 0.75]), rtol=1e-6)


def test_reducer_refuses_what_it_cannot_normalize():
    ok = {"num-examples": 10.0, "fednova_a": 2.0}
    upd = np.zeros(2, np.float32)

    def rec(**arrays):
        return ArrayRecord({k.replace("__", "."): Array(v) for k, v in arrays.items()})

    with pytest.raises(ReductionError, match="fednova_a"):
        fednova_reduce(
            [contribution(0, rec(update__w=upd, start__w=upd), {"num-examples": 1.0})], None
        )
    with pytest.raises(ReductionError, match="fednova_a"):
        fednova_reduce(
            [contribution(0, rec(update__w=upd, start__w=upd), {**ok, "fednova_a": math.inf})], None
        )
    with pytest.raises(ReductionError, match="start point"):
        fednova_reduce([contribution(0, rec(update__w=upd), ok)], None)
    with pytest.raises(ReductionError, match="another model than the others"):
        fednova_reduce(
            [
                contribution(0, rec(update__w=upd, start__w=upd), ok),
                contribution(1, rec(update__w=upd, start__w=upd + 1), ok),
            ],
            None,
        )
    with pytest.raises(ReductionError, match="start.v"):  # a start entry missing
        fednova_reduce([contribution(0, rec(update__w=upd, update__v=upd, start__w=upd), ok)], None)
    with pytest.raises(ReductionError, match="shape"):
        previous = {"model.w": np.zeros(3, np.float32)}
        fednova_reduce([contribution(0, rec(update__w=upd), ok)], previous)


def test_running_statistics_are_averaged_not_stepped():
    """With BatchNorm, parameters travel as normalized updates and running statistics as
    ``mean.*``, which the hub averages by examples (a rescaled running variance could turn
    negative)."""
    nodes = [node(p, classifier_norm="batch") for p in range(2)]
    datas = [random_client_data(32, seed=5), random_client_data(96, seed=6)]
    replies = [
        reply(p, n, n.fit(d), len(d.y_train))
        for p, (n, d) in enumerate(zip(nodes, datas, strict=True))
    ]
    payload = nodes[0].shared_payload()
    params = {k for k, _ in nodes[0].classifier.named_parameters()}
    assert {k.removeprefix("update.") for k in payload if k.startswith("update.")} == params
    stats = {k.removeprefix("mean.") for k in payload if k.startswith("mean.")}
    assert stats and all(k.endswith(("running_mean", "running_var")) for k in stats)
    out = as_tensors(fednova_reduce(replies, None))
    for k in stats:
        want = (
            32 * nodes[0].classifier.state_dict()[k] + 96 * nodes[1].classifier.state_dict()[k]
        ) / 128
        torch.testing.assert_close(out[f"model.{k}"], want)
    for n in nodes:
        n.absorb(from_hub(out))
    floats = [
        {k: v for k, v in state(n.classifier).items() if v.is_floating_point()} for n in nodes
    ]
    assert same(*floats)  # the integer num_batches_tracked stays each node's own


# -- the node ---------------------------------------------------------------------------------
def test_round_trip_keeps_every_node_on_one_global_model():
    """Two rounds through two nodes (different data sizes, so different steps), the
    reducer and absorb: after absorb every node holds exactly the hub's x; round one sends
    the start point, round two does not."""
    nodes = [node(p) for p in range(2)]
    datas = [random_client_data(32, seed=7), random_client_data(80, seed=8)]
    previous = None
    for rnd in range(2):
        replies = []
        for p, (n, d) in enumerate(zip(nodes, datas, strict=True)):
            replies.append(reply(p, n, n.fit(d), len(d.y_train)))
            has_start = any(k.startswith("start.") for k in n.shared_payload())
            assert has_start == (rnd == 0)
        assert not same(state(nodes[0].classifier), state(nodes[1].classifier))
        previous = fednova_reduce(replies, previous)
        aggregate = as_tensors(previous)
        for n in nodes:  # what the hub's message of the next round brings
            n.absorb(from_hub(aggregate, weight=112.0))
        for n in nodes:
            for model in (n.global_model, n.classifier):
                assert same(
                    state(model), {k.removeprefix("model."): v for k, v in aggregate.items()}
                )
        nodes[0].load_bytes(nodes[0].to_bytes())  # context.state round trip: nothing lost
        assert int(nodes[0].nova.aggregates) == rnd + 1


def test_options_are_validated():
    for bad in ({"fednova_momentum": 1.0}, {"fednova_momentum": -0.1}, {"fednova_lr": 0.0}):
        with pytest.raises(ConfigError, match="fednova"):
            make_config(method="fednova", **bad)
