"""The scores every node reports: the full-test-set readings are what their definitions
say (checked against hand counts), the floor is the majority-class predictor's, and the
expected Local-T is a far tighter estimate than the sampled one."""

from __future__ import annotations

import math

import pytest
import torch

from drdfl_flwr.data import ClientData
from drdfl_flwr.node import node_round
from drdfl_flwr.registry import build_learner
from drdfl_flwr.scoring import (
    ABSENT_CLASS,
    EXPECTED_LOCAL_T,
    EXPECTED_LOCAL_T_SE,
    GLOBAL_T,
    GLOBAL_T_BALANCED,
    LOCAL_T,
    LOCAL_T_SE,
    majority_floor,
    score_logits,
)
from tests.conftest import make_config


def one_hot(labels: list[int], k: int = 3) -> torch.Tensor:
    return torch.eye(k)[torch.tensor(labels)]


def test_each_reading_is_its_definition_on_a_hand_counted_example():
    y_train = torch.tensor([0, 0, 0, 1])  # p = (0.75, 0.25, 0): class 2 absent
    y_local = torch.tensor([0, 0, 1])
    y_global = torch.tensor([0, 0, 1, 1, 2, 2])
    # per class on the global set: class 0 one of two right, class 1 both, class 2 one
    scores = score_logits(
        one_hot([0, 0, 0]), y_local, one_hot([0, 1, 1, 1, 2, 0]), y_global, y_train, 3
    )
    assert scores[LOCAL_T] == pytest.approx(2 / 3)
    assert scores[GLOBAL_T] == pytest.approx(4 / 6)
    assert scores[GLOBAL_T_BALANCED] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert scores[EXPECTED_LOCAL_T] == pytest.approx(0.75 * 0.5 + 0.25 * 1.0)
    assert scores[ABSENT_CLASS] == pytest.approx(0.5)
    assert scores[LOCAL_T_SE] == pytest.approx(math.sqrt((2 / 3) * (1 / 3) / 3))
    assert scores[EXPECTED_LOCAL_T_SE] == pytest.approx(math.sqrt(0.75**2 * 0.25 / 2))


def test_a_node_holding_every_class_has_no_absent_class_score():
    y = torch.tensor([0, 1, 2])
    scores = score_logits(one_hot([0, 1, 2]), y, one_hot([0, 1, 2]), y, y, 3)
    assert ABSENT_CLASS not in scores and scores[EXPECTED_LOCAL_T] == 1.0


def test_the_local_prior_moves_the_local_readings_only():
    """DFML's rule: its prior is added for Local-T and the expected Local-T; Global-T,
    balanced Global-T and the absent classes read the raw logits."""
    y_train = torch.tensor([0, 0, 0, 1])
    y = torch.tensor([0, 1, 2])
    logits = torch.tensor([[0.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    raw = score_logits(logits, y, logits, y, y_train, 3)
    prior = torch.log(torch.tensor([0.75, 0.25, 0.0]))
    adjusted = score_logits(logits, y, logits, y, y_train, 3, log_prior=prior)
    # with the prior, class 0 wins wherever class 1's margin is under log 3 and class 2
    # (absent) is never predicted: local readings change, the others do not
    assert raw[LOCAL_T] == 2 / 3 and adjusted[LOCAL_T] == 1 / 3
    assert raw[EXPECTED_LOCAL_T] == 0.25 and adjusted[EXPECTED_LOCAL_T] == 0.75
    for key in (GLOBAL_T, GLOBAL_T_BALANCED, ABSENT_CLASS):
        assert adjusted[key] == raw[key]


def test_the_floor_is_the_majority_class_predictor():
    y_train = torch.tensor([2, 2, 1, 0, 2])
    y_local = torch.tensor([2, 2, 1])
    y_global = torch.tensor([0, 1, 2, 2])
    floor = majority_floor(y_local, y_global, y_train, 3)
    assert floor == {
        "floor_local_t_acc": pytest.approx(2 / 3),
        "floor_global_t_acc": pytest.approx(0.5),
        "floor_global_t_balanced_acc": pytest.approx(1 / 3),
        "floor_expected_local_t_acc": pytest.approx(3 / 5),  # max_k p_k
    }


def test_the_expected_local_t_is_several_times_tighter_than_the_sampled_one():
    """The issue's setting in miniature: 50 local test images against 1,000 per class."""
    torch.manual_seed(0)
    y_train = torch.arange(5).repeat(100)
    y_local = torch.arange(5).repeat(10)
    y_global = torch.arange(10).repeat(1000)
    right = torch.rand(len(y_global)) < 0.7
    predicted = torch.where(right, y_global, (y_global + 1) % 10)
    local_right = torch.rand(len(y_local)) < 0.7
    local_pred = torch.where(local_right, y_local, (y_local + 1) % 10)
    scores = score_logits(
        one_hot(local_pred.tolist(), 10),
        y_local,
        one_hot(predicted.tolist(), 10),
        y_global,
        y_train,
        10,
    )
    assert scores[EXPECTED_LOCAL_T_SE] * 3 < scores[LOCAL_T_SE]


def test_a_trained_round_reports_every_score_and_the_floor():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (48,), generator=g)
    data = ClientData(x, y, x[:8], y[:8], x[:32], y[:32], 4)
    cfg = make_config(method="local", dataset="digits", local_epochs=1, device="cpu")
    learner = build_learner(cfg, data.input_shape, data.num_classes, 0)
    metrics = node_round(learner, [], data, 1).metrics
    for key in (LOCAL_T, EXPECTED_LOCAL_T, GLOBAL_T, GLOBAL_T_BALANCED, "floor_local_t_acc"):
        assert 0.0 <= metrics[key] <= 1.0, key
