"""DFML learner: cyclic schedule, WSM masking, payload validation, state round-trip."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from drdfl_flwr.config import ConfigError, RunConfig
from drdfl_flwr.data import ClientData
from drdfl_flwr.methods.dfml import (
    ARCHITECTURES,
    DFMLLearner,
    class_proportions,
    cyclic_alpha,
    node_architecture,
    wsm_cross_entropy,
)
from drdfl_flwr.payload import PayloadError, peers
from tests.conftest import make_config

SHAPE = (1, 8, 8)
K = 4


def make_cfg(**dfml) -> RunConfig:
    base = {
        "method": "dfml",
        "device": "cpu",
        "local_epochs": 1,
        "batch_size": 16,
        "dfml_period": 4,
        "dfml_alpha_min": 0.0,
        "dfml_alpha_max": 0.8,
    }
    return make_config(**{**base, **dfml})


def make_data(classes=(0, 1, 2, 3), n: int = 32, seed: int = 0) -> ClientData:
    gen = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=gen)]
    x = torch.randn(n, *SHAPE, generator=gen)
    return ClientData(x, y, x[:8], y[:8], x[:16], y[:16], K)


def learner(partition_id: int = 0, **dfml) -> DFMLLearner:
    torch.manual_seed(100 + partition_id)
    return DFMLLearner(make_cfg(**dfml), SHAPE, K, partition_id=partition_id)


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- schedule --------------------------------------------------------------------------------
def test_cyclic_alpha_values():
    a = [cyclic_alpha(r, 4, 0.1, 0.7) for r in range(9)]
    expected_cycle = [0.1, 0.1 + 0.6 * 0.25, 0.1 + 0.6 * 0.75, 0.7]
    assert a[:4] == pytest.approx(expected_cycle)
    assert a[4:8] == pytest.approx(expected_cycle)  # restarts every period
    assert a[8] == pytest.approx(0.1)
    assert all(x <= y for x, y in zip(a[:3], a[1:4], strict=True))  # rises within a period
    assert cyclic_alpha(5, 1, 0.2, 0.6) == pytest.approx(0.6)
    for bad in [(0, 0, 0.0, 1.0), (0, 3, 0.5, 0.4), (0, 3, -0.1, 0.5), (0, 3, 0.0, 1.5)]:
        with pytest.raises(ValueError):
            cyclic_alpha(*bad)


def test_fit_reports_scheduled_alpha():
    node, other = learner(0, dfml_alpha_min=0.2, dfml_alpha_max=0.9), learner(1)
    data = make_data()
    for r in range(6):
        node.absorb(peers(other.shared_payload()))
        metrics = node.fit(data)
        assert metrics["alpha"] == pytest.approx(cyclic_alpha(r, 4, 0.2, 0.9))
        assert metrics["num_peers"] == 1.0
        assert math.isfinite(metrics["l_kl"]) and metrics["l_kl"] >= 0


@pytest.mark.parametrize("round_index, moves", [(0, True), (1, False)])
def test_loss_weight_follows_schedule(round_index, moves):
    """Period 2 from 0 to 1: round 0 is pure WSM, round 1 pure KL. With a peer identical to
    the own model the KL gradient is zero, so the model moves in round 0 and not in 1."""
    # one batch: after a step the peer's own update would make the two differ
    node = learner(dfml_period=2, dfml_alpha_min=0.0, dfml_alpha_max=1.0, batch_size=64)
    node.rounds_trained = round_index
    node.absorb(peers(node.shared_payload()))  # the peer is an exact copy (small-cnn: no BN)
    # plain SGD: Adam would blow the ~1e-9 rounding noise of a zero KL gradient up to lr
    node.optimizer = torch.optim.SGD(node.model.parameters(), lr=0.5)
    before = params(node.model)
    node.fit(make_data())
    after = params(node.model)
    still = all(torch.allclose(before[k], after[k], rtol=0, atol=1e-6) for k in before)
    assert still is not moves


@pytest.mark.parametrize("share, students", [("own", 1), ("received", 2)])
def test_mutual_losses_combine_with_alpha(share, students):
    node, other = learner(0, dfml_share=share), learner(1)
    other.fit(make_data(classes=(2, 3), seed=1))  # both start from the common model
    node.absorb(peers(other.shared_payload()))
    data = make_data()
    beta = class_proportions(data.y_train, K)
    for alpha in (0.0, 0.3, 1.0):
        parts = node.mutual_losses(data.x_train, data.y_train, alpha, beta)
        assert len(parts) == students
        assert all(p["l_kl"].item() > 0 for p in parts)  # every student distils
        for p in parts:
            assert p["total"].item() == pytest.approx(
                (1 - alpha) * p["l_wsm"].item() + alpha * p["l_kl"].item(), rel=1e-5
            )


# -- WSM -------------------------------------------------------------------------------------
def test_wsm_masks_and_reweights_absent_classes():
    y = torch.tensor([0, 0, 0, 1, 1, 0])
    beta = class_proportions(y, K)
    assert beta.tolist() == pytest.approx([4 / 6, 2 / 6, 0.0, 0.0])
    logits = torch.randn(6, K, requires_grad=True)
    loss = wsm_cross_entropy(logits, y, beta)
    loss.backward()
    assert torch.all(logits.grad[:, 2:] == 0)  # absent classes get no supervised gradient
    assert torch.all(logits.grad[:, :2].abs() > 0)
    # the closed form: -log(beta_y e^z_y / sum_k beta_k e^z_k)
    z = logits.detach()
    manual = -(beta[y] * z.gather(1, y[:, None]).squeeze(1).exp()).log() + (
        (beta * z.exp()).sum(1).log()
    )
    assert loss.item() == pytest.approx(manual.mean().item(), rel=1e-5)
    # raising an absent logit changes nothing under WSM, but does under plain CE
    bumped = z.clone()
    bumped[:, 3] += 5.0
    assert wsm_cross_entropy(bumped, y, beta).item() == pytest.approx(loss.item(), rel=1e-6)
    assert F.cross_entropy(bumped, y).item() > F.cross_entropy(z, y).item() + 0.1


def test_fit_leaves_absent_class_outputs_untouched_without_peers():
    node = learner()
    head = node.model.head[-1]
    w, b = head.weight.detach().clone(), head.bias.detach().clone()
    node.fit(make_data(classes=(0, 1)))
    assert torch.equal(head.weight[2:], w[2:]) and torch.equal(head.bias[2:], b[2:])
    assert not torch.equal(head.weight[:2], w[:2])


# -- payloads ----------------------------------------------------------------------------------
def test_payload_carries_architecture_and_heterogeneous_absorb():
    cnn = learner(0, dfml_architectures="small-cnn,resnet8")
    res = learner(1, dfml_architectures="small-cnn,resnet8")
    assert (cnn.arch, res.arch) == ("small-cnn", "resnet8")
    assert res.shared_payload()["arch_id"].tolist() == [ARCHITECTURES.index("resnet8")]
    res.absorb(peers(cnn.shared_payload()))
    cnn.absorb(peers(res.shared_payload()))
    assert cnn.peer_archs == ["resnet8"] and res.peer_archs == ["small-cnn"]
    data = make_data()
    for node in (cnn, res):
        metrics = node.fit(data)
        assert all(math.isfinite(v) for v in metrics.values())
        assert node.predict(data.x_global_test).shape == (16, K)


def test_node_architecture_cycles_and_validates():
    cfg = make_cfg(dfml_architectures="small-cnn, resnet8,resnet18")
    assert [node_architecture(cfg, i) for i in range(4)] == [
        "small-cnn",
        "resnet8",
        "resnet18",
        "small-cnn",
    ]
    assert node_architecture(make_cfg(dfml_architectures=""), 3) == "small-cnn"  # = classifier
    with pytest.raises(ConfigError) as err:
        make_cfg(dfml_architectures="small-cnn,vgg")
    assert err.value.key == "dfml.architectures"


@pytest.mark.parametrize(
    "field, value, key",
    [
        ("dfml_share", "nobody", "dfml.share"),
        ("dfml_predict", "best", "dfml.predict"),
        ("dfml_period", 0, "dfml.period"),
        ("dfml_alpha_min", -0.1, "dfml.alpha-min"),
        ("dfml_alpha_max", 1.5, "dfml.alpha-max"),
    ],
)
def test_bad_dfml_config_is_refused_by_run_config(field, value, key):
    with pytest.raises(ConfigError) as err:
        make_cfg(**{field: value})
    assert err.value.key == key


def _corrupt(kind: str, payload: dict) -> dict:
    p = dict(payload)
    key = next(k for k in p if k.endswith("weight"))
    if kind == "no-arch":
        del p["arch_id"]
    elif kind == "unknown-arch":
        p["arch_id"] = torch.tensor([99])
    elif kind == "float-arch":
        p["arch_id"] = torch.tensor([0.0])
    elif kind == "wrong-arch":
        p["arch_id"] = torch.tensor([ARCHITECTURES.index("resnet8")])
    elif kind == "dtype":
        p[key] = p[key].long()
    elif kind == "not-tensor":
        p[key] = [1.0, 2.0]
    return p


@pytest.mark.parametrize(
    "kind", ["no-arch", "unknown-arch", "float-arch", "wrong-arch", "dtype", "not-tensor"]
)  # NaN, misshapen, missing and unknown entries: tests/test_method_contract.py
def test_malformed_payload_rejected_without_change(kind):
    node, sender, earlier = learner(0), learner(1), learner(2)
    node.absorb(peers(earlier.shared_payload()))
    state_before = {
        k: params(m) for k, m in node.modules().items() if isinstance(m, torch.nn.Module)
    }
    good, bad = sender.shared_payload(), _corrupt(kind, sender.shared_payload())
    with pytest.raises(PayloadError):
        node.absorb(peers(good, bad))  # a bad one among good ones changes nothing either
    assert node.peer_archs == ["small-cnn"]
    for name, module in node.modules().items():
        if isinstance(module, torch.nn.Module):
            assert same(state_before[name], params(module)), name


# -- state -------------------------------------------------------------------------------------
def test_state_round_trip_restores_everything():
    cfg = {"dfml_architectures": "resnet8", "dfml_period": 1}  # BN buffers; peak every round
    node = learner(0, **cfg)
    node.absorb(peers(learner(1).shared_payload(), learner(2, **cfg).shared_payload()))
    data = make_data()
    node.fit(data)
    blob = node.to_bytes()

    clone = learner(0, **cfg)
    clone.load_bytes(blob)
    assert clone.peer_archs == ["small-cnn", "resnet8"]
    assert (clone.peak_round, clone.rounds_trained) == (0, 1)
    assert same(params(clone.peers), params(node.peers))
    assert same(params(clone.model), params(node.model))
    assert same(params(clone.peak), params(node.peak))
    assert (
        clone.optimizer.state_dict()["state"].keys() == node.optimizer.state_dict()["state"].keys()
    )
    # identical continued training proves optimizer state and RNG inputs came back too
    m1, m2 = node.fit(data), clone.fit(data)
    assert m1 == pytest.approx(m2)
    assert same(params(clone.model), params(node.model))
    assert same(params(clone.peers), params(node.peers))
    for k, v in node.shared_payload().items():
        assert torch.equal(v, clone.shared_payload()[k])


def test_state_for_another_architecture_is_refused():
    blob = learner(0, dfml_architectures="resnet8").to_bytes()
    with pytest.raises(ValueError):
        learner(0).load_bytes(blob)


# -- peak model and sharing --------------------------------------------------------------------
def test_peak_model_snapshot_at_alpha_max():
    node = learner(dfml_period=2, dfml_predict="peak")
    data = make_data()
    node.fit(data)  # round 0: alpha_min, not a peak
    assert node.peak_round == -1
    assert torch.equal(node.predict(data.x_global_test), node.model(data.x_global_test))
    node.fit(data)  # round 1: alpha_max -> snapshot
    assert node.peak_round == 1
    snapshot = params(node.model)
    node.fit(data)  # round 2: the model moves on, predictions stay with the peak
    assert same(params(node.peak), snapshot) and not same(params(node.model), snapshot)
    with torch.no_grad():
        node.peak.eval()
        assert torch.equal(node.predict(data.x_global_test), node.peak(data.x_global_test))
    current = learner(dfml_period=2)  # the default: the current model predicts
    current.fit(data)
    current.fit(data)
    current.fit(data)
    assert torch.equal(current.predict(data.x_global_test), current.model(data.x_global_test))


def test_scored_on_the_current_model_with_the_peak_as_a_named_second_metric():
    """Every method of a table is scored on the model its last local round produced: the
    table's Local-T is the current model's, the peak snapshot's is ``peak_local_t_acc``."""
    data = make_data()
    node = learner(dfml_period=2)
    node.fit(data)
    assert "peak_local_t_acc" not in node.evaluate(data)  # no peak yet
    for _ in range(2):
        node.fit(data)
    scores = node.evaluate(data)
    prior = torch.log(class_proportions(data.y_train, K))
    with torch.no_grad():
        node.model.eval()
        node.peak.eval()
        current = (node.model(data.x_local_test) + prior).argmax(1)
        peak = (node.peak(data.x_local_test) + prior).argmax(1)
    assert scores["local_t_acc"] == (current == data.y_local_test).double().mean().item()
    assert scores["peak_local_t_acc"] == (peak == data.y_local_test).double().mean().item()
    assert node.predict_with == "current"  # scoring the peak left the predictor alone


def test_shares_own_model_by_default_and_received_on_request():
    data = make_data()
    own, passer, sender = learner(0), learner(0, dfml_share="received"), learner(1)
    for node in (own, passer):
        node.absorb(peers(sender.shared_payload()))
        node.fit(data)
    own_payload = own.shared_payload()
    assert all(torch.equal(own_payload[f"model.{k}"], v) for k, v in own.model.state_dict().items())
    passed = passer.shared_payload()
    updated_peer = passer.peers["0"].state_dict()
    assert all(torch.equal(passed[f"model.{k}"], v) for k, v in updated_peer.items())
    original = sender.shared_payload()
    assert not all(torch.equal(passed[k], original[k]) for k in original)  # it was trained


def test_resnet18_payload_over_the_wire_on_cifar_shapes():
    from drdfl_flwr.records import from_array_record, to_array_record

    cfg = make_cfg(dfml_architectures="resnet8,resnet18")
    torch.manual_seed(0)
    small = DFMLLearner(cfg, (3, 32, 32), 10, partition_id=0)
    big = DFMLLearner(cfg, (3, 32, 32), 10, partition_id=1)
    wire = from_array_record(to_array_record(big.shared_payload()))
    small.absorb(peers(wire))
    assert small.peer_archs == ["resnet18"]
    assert same(params(small.peers["0"]), params(big.model))
    tiny = DFMLLearner(make_cfg(dfml_architectures="resnet8"), (1, 6, 6), K)  # 6x6: no small-cnn
    with pytest.raises(PayloadError, match="cannot run here"):
        tiny.absorb(peers(small.shared_payload() | {"arch_id": torch.tensor([0])}))


# -- no training whose result is thrown away --------------------------------------------------
def test_received_models_only_teach_when_the_own_model_is_shared():
    """With dfml-share=own a node cannot return a received model, so it must not spend
    training on it; only its own model changes."""
    node = learner(0, dfml_share="own")
    node.absorb(peers(learner(1).shared_payload(), learner(2).shared_payload()))
    peers_before = {k: params(p) for k, p in node.peers.items()}
    own_before = params(node.model)
    node.fit(make_data())
    for k, peer in node.peers.items():
        assert all(torch.equal(v, params(peer)[n]) for n, v in peers_before[k].items())
    assert any(not torch.equal(v, params(node.model)[n]) for n, v in own_before.items())


def test_the_passed_on_model_is_trained_and_sent_when_sharing_received():
    node = learner(0, dfml_share="received")
    node.absorb(peers(learner(1).shared_payload(), learner(2).shared_payload()))
    first, second = params(node.peers["0"]), params(node.peers["1"])
    node.fit(make_data())
    assert any(not torch.equal(v, params(node.peers["0"])[n]) for n, v in first.items())
    assert all(torch.equal(v, params(node.peers["1"])[n]) for n, v in second.items())
    sent = node.shared_payload()
    trained = params(node.peers["0"])
    assert all(torch.equal(sent[f"model.{n}"], v.cpu()) for n, v in trained.items())


def test_health_reports_alpha_and_distance_to_received_predictions():
    node = learner(0)
    alone = node.fit(make_data())
    assert alone["health_alpha"] == alone["alpha"] and "health_kl_to_received" not in alone
    node.absorb(peers(learner(1).shared_payload()))
    metrics = node.fit(make_data())
    assert metrics["health_kl_to_received"] >= 0.0


def test_local_t_adds_the_local_prior_and_global_t_reads_balanced_logits(monkeypatch):
    """A model trained on logits + log beta is class-balanced: its top raw logit here is
    class 3, which this node never saw. Local-T (skewed toward classes 0 and 1) adds log
    beta back and predicts the local class; Global-T reads the raw, balanced logits."""
    node = learner()
    x = torch.zeros(8, 1, 8, 8)
    local_y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    data = ClientData(x, local_y, x, local_y, x, torch.full((8,), 3), K)
    logits = torch.zeros(K)
    logits[3], logits[0], logits[1] = 2.0, 1.0, 1.5
    monkeypatch.setattr(node, "predict", lambda xb: logits.expand(len(xb), K).clone())
    scores = node.evaluate(data)
    # prior: log 0.75 + 1.0 = 0.71 for class 0, log 0.25 + 1.5 = 0.11 for class 1, -inf for 3
    assert scores["local_t_acc"] == 6 / 8
    assert scores["global_t_acc"] == 1.0
