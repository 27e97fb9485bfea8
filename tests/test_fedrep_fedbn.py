"""FedRep (personal head, head-then-body training) and FedBN (BatchNorm stays local) on the hub."""

from __future__ import annotations

import pytest
import torch

from baselines.common import head_names, norm_names
from baselines.fedrep import FedRepOptions
from drdfl_flwr import registry
from drdfl_flwr.config import CLASSIFIERS, DENSE_CLASSIFIERS, NORMS, ConfigError, RunConfig
from drdfl_flwr.models import build_classifier
from drdfl_flwr.payload import from_hub
from drdfl_flwr.registry import build_learner, resolved_topology
from strategies.reducers import weighted_mean
from tests.conftest import as_tensors, contribution, make_config, random_client_data

SHAPE = (1, 8, 8)
K = 10
BATCH = 16


def make_cfg(method: str, **extra) -> RunConfig:
    base = {"method": method, "seed": 5, "local_epochs": 1, "batch_size": BATCH, "device": "cpu"}
    if method == "fedbn":
        base["classifier_norm"] = "batch"
    return make_config(**{**base, **extra})


def learner_for(method: str, partition_id: int = 0, **extra):
    return build_learner(make_cfg(method, **extra), SHAPE, K, partition_id=partition_id)


def state(learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.classifier.state_dict().items()}


def params(learner, names) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.classifier.named_parameters() if n in names}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def shifted(payload, by: float = 0.25):
    return {k: v + by for k, v in payload.items()}


# ---------------------------------------------------------------- registry and config


def test_both_run_on_the_hub_and_fedrep_reads_its_section():
    for name in ("fedrep", "fedbn"):
        spec = registry.method_spec(name)
        assert spec.centralized and spec.reducer is weighted_mean
        assert resolved_topology(make_cfg(name)) == "star"
    opts = make_cfg("fedrep").options(FedRepOptions)
    assert (opts.head_epochs, opts.body_epochs) == (1, 4)  # DRDFL paper B.1.3
    opts = make_cfg("fedrep", fedrep_head_epochs=2, fedrep_body_epochs=3).options(FedRepOptions)
    assert (opts.head_epochs, opts.body_epochs) == (2, 3)
    for key in ("head_epochs", "body_epochs"):
        with pytest.raises(ConfigError) as err:
            make_cfg("fedrep", **{f"fedrep_{key}": 0})
        assert err.value.key == f"fedrep.{key.replace('_', '-')}"
    with pytest.raises(ConfigError, match="topology"):
        make_cfg("fedrep", topology="ring")


@pytest.mark.parametrize(
    "classifier, norm, ok",
    [
        ("small-cnn", "auto", False),
        ("small-cnn", "none", False),
        ("small-cnn", "group", False),
        ("small-cnn", "batch", True),
        ("resnet8", "auto", True),
        ("resnet8", "group", False),
        ("resnet18", "batch", True),
    ],
)
def test_fedbn_refuses_a_classifier_without_batchnorm(classifier, norm, ok):
    kw = {"method": "fedbn", "classifier": classifier, "classifier_norm": norm}
    if ok:
        make_config(**kw)
    else:
        with pytest.raises(ConfigError) as err:
            make_config(**kw)
        assert err.value.key == "classifier-norm" and "batch" in str(err.value)


def test_fedbn_check_agrees_with_the_built_models():
    """The config check's rule matches what build_classifier actually builds."""
    for classifier in DENSE_CLASSIFIERS:
        for norm in NORMS:
            try:
                model = build_classifier(classifier, (3, 8, 8), K, norm)
                has_bn = bool(norm_names(model))
            except ValueError:
                has_bn = False
            kw = {"method": "fedbn", "classifier": classifier, "classifier_norm": norm}
            if has_bn:
                make_config(**kw)
            else:
                with pytest.raises(ConfigError, match="classifier-norm"):
                    make_config(**kw)
    assert "alexnet-dslth" in CLASSIFIERS and "alexnet-dslth" not in DENSE_CLASSIFIERS


# ---------------------------------------------------------------- FedRep


def test_fedrep_absorb_moves_the_body_and_keeps_the_head():
    learner = learner_for("fedrep")
    learner.fit(random_client_data(40, SHAPE, K))
    head = head_names(learner.classifier)
    assert head == {"head.2.weight", "head.2.bias"}  # the small CNN's last linear layer
    before = state(learner)
    aggregate = shifted(learner.shared_payload())
    assert set(aggregate) == set(before) - head  # the body, all of it
    learner.absorb(from_hub(aggregate))
    after = state(learner)
    assert same({k: after[k] for k in head}, {k: before[k] for k in head})
    assert same({k: after[k] for k in aggregate}, aggregate)


def test_fedrep_each_phase_moves_only_its_own_part():
    learner = learner_for("fedrep")
    data = random_client_data(40, SHAPE, K)
    head = learner.head_parameter_names()
    body = {n for n, _ in learner.classifier.named_parameters()} - head
    gen = learner.round_generator()

    head0, body0 = params(learner, head), params(learner, body)
    learner.train_head(data, gen)
    head1, body1 = params(learner, head), params(learner, body)
    assert same(body1, body0)
    assert all(not torch.equal(head1[n], head0[n]) for n in head)

    learner.train_body(data, gen)
    head2, body2 = params(learner, head), params(learner, body)
    assert same(head2, head1)
    assert all(not torch.equal(body2[n], body1[n]) for n in body)
    # requires_grad is restored after each phase
    assert all(p.requires_grad for p in learner.classifier.parameters())


def test_fedrep_optimizers_split_the_parameters():
    learner = learner_for("fedrep")
    named = dict(learner.classifier.named_parameters())
    head = learner.head_parameter_names()
    assert head == {"head.2.weight", "head.2.bias"}

    def ids(optimizer):
        return {id(p) for group in optimizer.param_groups for p in group["params"]}

    assert ids(learner.head_optimizer) == {id(named[n]) for n in head}
    assert ids(learner.body_optimizer) == {id(p) for n, p in named.items() if n not in head}
    optimizers = (learner.head_optimizer, learner.body_optimizer)
    lrs = [g["lr"] for o in optimizers for g in o.param_groups]
    assert lrs == [learner.cfg.learning_rate] * 2


def test_fedrep_fit_trains_head_then_body_with_the_right_step_count():
    """Hooks on both optimizers watch the real fit: every head step leaves the body as it
    was at the start of the round, every body step leaves the head as the head phase left
    it, head steps all come first, and there are (head + body epochs) x batches steps."""
    n, head_epochs, body_epochs = 40, 2, 3
    learner = learner_for("fedrep", fedrep_head_epochs=head_epochs, fedrep_body_epochs=body_epochs)
    head = learner.head_parameter_names()
    body = {n for n, _ in learner.classifier.named_parameters()} - head
    start_body = params(learner, body)
    log: list[str] = []
    ref: dict[str, dict[str, torch.Tensor]] = {}

    grads = dict(learner.classifier.named_parameters())

    def on_head_step(*_):
        assert same(params(learner, body), start_body)
        assert not any(grads[n].requires_grad for n in body)  # no gradient into the body
        log.append("head")

    def on_body_step(*_):
        if "head" not in ref:
            ref["head"] = params(learner, head)
        assert same(params(learner, head), ref["head"])
        assert not any(grads[n].requires_grad for n in head)
        log.append("body")

    learner.head_optimizer.register_step_post_hook(on_head_step)
    learner.body_optimizer.register_step_post_hook(on_body_step)
    metrics = learner.fit(random_client_data(n, SHAPE, K))
    batches = -(-n // BATCH)  # 3
    assert log == ["head"] * (head_epochs * batches) + ["body"] * (body_epochs * batches)
    assert metrics["local_steps"] == (head_epochs + body_epochs) * batches
    assert learner.rounds_trained == 1
    assert metrics["health_head_update"] > 0 and metrics["health_body_update"] > 0


# ---------------------------------------------------------------- FedBN


def test_fedbn_absorb_loads_the_aggregate_and_keeps_batchnorm():
    learner = learner_for("fedbn")
    learner.fit(random_client_data(40, SHAPE, K))
    bn = norm_names(learner.classifier)
    assert {k.rsplit(".", 1)[0] for k in bn} == {"features.1", "features.5"}
    before = state(learner)
    assert int(before["features.1.num_batches_tracked"]) > 0  # statistics were tracked
    aggregate = shifted(learner.shared_payload())
    assert set(aggregate) == set(before) - bn  # every conv and linear entry
    learner.absorb(from_hub(aggregate))
    after = state(learner)
    assert same({k: after[k] for k in bn}, {k: before[k] for k in bn})
    assert same({k: after[k] for k in aggregate}, aggregate)


# ---------------------------------------------------------------- both


@pytest.mark.parametrize("method", ["fedrep", "fedbn"])
def test_hub_round_without_ray(method):
    """Two nodes fit on their own data, the hub's weighted mean comes back: the shared
    entries become the example-weighted mean on both, each keeps its private entries."""
    sizes = [40, 72]
    learners = [learner_for(method, partition_id=i) for i in range(2)]
    replies, payloads = [], []
    for i, (learner, n) in enumerate(zip(learners, sizes, strict=True)):
        learner.fit(random_client_data(n, SHAPE, K, seed=10 + i))
        payloads.append(learner.shared_payload())
        replies.append(contribution(i, payloads[-1], {"num-examples": float(n)}))
    aggregate = weighted_mean(replies)
    private = [learner.private_names() for learner in learners]
    assert private[0] and private[0] == private[1]
    assert not private[0] & set(aggregate.keys())
    before = [state(learner) for learner in learners]
    for learner in learners:
        learner.absorb(from_hub(as_tensors(aggregate), weight=float(sum(sizes))))
    total = float(sum(sizes))
    for learner, old in zip(learners, before, strict=True):
        new = state(learner)
        for key in payloads[0]:
            expected = (sizes[0] * payloads[0][key] + sizes[1] * payloads[1][key]) / total
            torch.testing.assert_close(new[key], expected, rtol=1e-5, atol=1e-6)
        assert same({k: new[k] for k in private[0]}, {k: old[k] for k in private[0]})
    # the shared parts are now equal on both nodes, the private ones still differ
    a, b = state(learners[0]), state(learners[1])
    assert same({k: a[k] for k in payloads[0]}, {k: b[k] for k in payloads[0]})
    assert any(not torch.equal(a[k], b[k]) for k in private[0] if a[k].is_floating_point())
