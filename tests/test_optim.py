"""The generic optimizer and its learning-rate schedule (drdfl_flwr/optim.py): the
defaults are the Adam every method trained with before, every method that uses the
generic optimizer builds it from the config (a paper's own optimizer is left alone), the
schedule steps once per local round and a node restored from its state continues it, and
every bad value is refused by its key."""

from __future__ import annotations

import math

import pytest
import torch

from drdfl_flwr import registry
from drdfl_flwr.config import ConfigError, RunConfig
from drdfl_flwr.learner import measured_fit
from drdfl_flwr.optim import build_optimizer, lr_factor
from drdfl_flwr.registry import build_learner
from tests.conftest import make_config, random_client_data

SHAPE, CLASSES = (1, 8, 8), 10
# optimizers a paper prescribes, kept whatever ``optimizer`` says: method -> attribute
OWN_OPTIMIZERS = {"dslth": {"optimizer"}}


def optimizers(learner) -> dict[str, torch.optim.Optimizer]:
    return {k: v for k, v in learner.modules().items() if isinstance(v, torch.optim.Optimizer)}


def test_the_defaults_build_the_adam_every_method_used_before():
    params = [torch.nn.Parameter(torch.zeros(3))]
    built = build_optimizer(RunConfig(), params)
    assert type(built) is torch.optim.Adam
    assert built.defaults == torch.optim.Adam(params, lr=1e-3).defaults


def test_default_training_is_bit_identical_to_a_hand_built_adam():
    """A FedAvg node trained two rounds with the defaults (constant schedule, rescheduled
    every round) ends exactly where one trained with ``torch.optim.Adam(lr)`` ends."""
    data = random_client_data(n=48)
    cfg = make_config(method="fedavg", local_epochs=1, batch_size=16)
    ours, theirs = (build_learner(cfg, SHAPE, CLASSES) for _ in range(2))
    theirs.optimizer = torch.optim.Adam(theirs.classifier.parameters(), lr=cfg.learning_rate)
    for learner in (ours, theirs):
        for _ in range(2):
            torch.manual_seed(learner.round_seed)
            learner.fit(data)
    for a, b in zip(ours.classifier.parameters(), theirs.classifier.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("changes", "kind", "defaults"),
    [
        ({"optimizer": "sgd"}, torch.optim.SGD, {"momentum": 0.0, "weight_decay": 0.0}),
        (
            {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4},
            torch.optim.SGD,
            {"momentum": 0.9, "weight_decay": 5e-4},
        ),
        ({"weight_decay": 1e-4}, torch.optim.Adam, {"weight_decay": 1e-4}),
        ({"optimizer": "adamw", "weight_decay": 0.01}, torch.optim.AdamW, {"weight_decay": 0.01}),
    ],
)
def test_the_optimizer_keys_build_the_optimizer_they_name(changes, kind, defaults):
    cfg = RunConfig(learning_rate=0.05, **changes)
    built = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))])
    assert type(built) is kind and built.defaults["lr"] == 0.05
    assert {k: built.defaults[k] for k in defaults} == defaults


@pytest.mark.parametrize("method", list(registry.METHODS))
def test_every_method_trains_with_the_configured_optimizer_unless_its_paper_says(method):
    """Every optimizer a learner keeps is the run's SGD (momentum, weight decay) except
    those its paper prescribes; FedNova builds its own each round and keeps none."""
    cfg = make_config(
        method=method, optimizer="sgd", momentum=0.5, weight_decay=1e-4, classifier_norm="batch"
    )
    learner = build_learner(cfg, SHAPE, CLASSES)
    kept = optimizers(learner)
    own = OWN_OPTIMIZERS.get(method, set())
    generic = {name: opt for name, opt in kept.items() if name not in own}
    assert set(kept) >= own
    assert generic or method in ("fednova", "dslth"), f"{method} keeps no optimizer"
    for name, opt in generic.items():
        assert type(opt) is torch.optim.SGD, (method, name)
        assert opt.defaults["momentum"] == 0.5 and opt.defaults["weight_decay"] == 1e-4
    if method == "dslth":  # the release's SGD on the scores: no momentum, its own rate
        sgd = kept["optimizer"]
        assert (
            sgd.defaults["momentum"] == 0.0
            and sgd.defaults["lr"] == cfg.options(registry.method_spec("dslth").options).score_lr
        )


def test_lr_factor_per_schedule():
    constant = RunConfig(num_server_rounds=10)
    assert [lr_factor(constant, r) for r in (0, 5, 20)] == [1.0, 1.0, 1.0]
    step = RunConfig(lr_schedule="step", lr_step_rounds=3, lr_step_factor=0.5)
    assert [lr_factor(step, r) for r in range(7)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    cosine = RunConfig(lr_schedule="cosine", num_server_rounds=10, lr_min_factor=0.1)
    factors = [lr_factor(cosine, r) for r in range(12)]
    assert factors[0] == 1.0 and factors[5] == pytest.approx(0.55)
    assert factors[10] == factors[11] == pytest.approx(0.1)  # the floor, after the last round
    assert all(a > b for a, b in zip(factors[:10], factors[1:11], strict=True))
    assert factors[1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 10)))


def rates(learner) -> dict[str, list[float]]:
    return {name: [g["lr"] for g in opt.param_groups] for name, opt in optimizers(learner).items()}


@pytest.mark.parametrize("method", ["fedavg", "fedrep", "drdfl", "drdfl-vf", "dfml", "dslth"])
def test_the_schedule_steps_per_round_and_a_restored_node_continues_it(method):
    """Rates are set before each round from ``rounds_trained``; a node rebuilt from its
    saved state (to_bytes / load_bytes: a restart) trains its next round at the same
    rates, to the same weights, as the node that never stopped. DRDFL-VF's trunk keeps
    its multiple of the rate; DSLTH's own SGD keeps its rate."""
    cfg = make_config(
        method=method,
        local_epochs=1,
        batch_size=16,
        learning_rate=0.01,
        optimizer="sgd",
        momentum=0.9,
        lr_schedule="step",
        lr_step_rounds=1,
        lr_step_factor=0.5,
    )
    data = random_client_data(n=32)
    node = build_learner(cfg, SHAPE, CLASSES)
    before = rates(node)
    for _ in range(2):
        torch.manual_seed(node.round_seed)
        measured_fit(node, data)
    after_two = rates(node)  # the second round's: 0.5 x the first's
    for name, lrs in before.items():
        expected = lrs if name in OWN_OPTIMIZERS.get(method, set()) else [x / 2 for x in lrs]
        assert after_two[name] == pytest.approx(expected), name
    restored = build_learner(cfg, SHAPE, CLASSES)
    restored.load_bytes(node.to_bytes())
    assert rates(restored) == after_two and restored.rounds_trained == 2
    for learner in (node, restored):
        torch.manual_seed(learner.round_seed)
        measured_fit(learner, data)
    assert rates(restored) == rates(node)
    for name, lrs in before.items():
        if name not in OWN_OPTIMIZERS.get(method, set()):
            assert rates(node)[name] == pytest.approx([x / 4 for x in lrs]), name
    for (name, a), b in zip(node.state_dict().items(), restored.state_dict().values(), strict=True):
        if isinstance(a, dict) and "param_groups" not in a:  # a module's weights
            tensors = {k: t for k, t in a.items() if isinstance(t, torch.Tensor)}
            for key, tensor in tensors.items():
                assert torch.equal(tensor, b[key]), (name, key)


def test_a_round_built_optimizer_starts_at_its_rounds_rate():
    """DFML's second student gets a fresh optimizer every round: at that round's rate."""
    cfg = make_config(
        method="dfml",
        lr_schedule="step",
        lr_step_rounds=1,
        lr_step_factor=0.5,
        learning_rate=0.01,
    )
    node = build_learner(cfg, SHAPE, CLASSES)
    node.rounds_trained = 3
    assert node.new_optimizer([torch.nn.Parameter(torch.zeros(2))]).param_groups[0][
        "lr"
    ] == pytest.approx(0.01 / 8)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("optimizer", "rmsprop"),
        ("momentum", -0.1),
        ("momentum", 1.0),
        ("weight-decay", -1e-4),
        ("lr-schedule", "linear"),
        ("lr-step-rounds", 0),
        ("lr-step-factor", 0.0),
        ("lr-step-factor", 1.5),
        ("lr-min-factor", -0.1),
        ("lr-min-factor", 2.0),
        ("optimizer", 1),
    ],
)
def test_a_bad_optimizer_value_is_refused_by_its_key(key, value):
    values = {"optimizer": "sgd", key: value} if key == "momentum" else {key: value}
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config(values)
    assert err.value.key == key
    assert key in str(err.value) and repr(value) in str(err.value)


def test_momentum_with_adam_is_refused_as_sgds():
    with pytest.raises(ConfigError, match="SGD's") as err:
        RunConfig.from_run_config({"momentum": 0.9})
    assert err.value.key == "momentum"
